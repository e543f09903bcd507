"""The router's lean HTTP/1.1 client against real asyncio servers on loopback: framing
(Content-Length, chunked, until close), a stream handed on chunk by chunk, a server closing
mid-stream, keep-alive reuse and a kept connection the server closed, timeouts."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Coroutine

import pytest

from kvplane.router.lean_http import (
    CHUNKED,
    UNTIL_CLOSE,
    LeanClient,
    LeanConnectError,
    LeanHttpError,
    framing,
    parse_head,
)
from tests.support import read_request

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class Server:
    """A loopback server running ``handler(reader, writer, n)`` for each request head it
    reads (``n`` counts requests from 0), on as many connections as the client opens."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []  # each request's head and body
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head, body = await read_request(reader)
                self.requests.append(head + body)
                await self.handler(reader, writer, len(self.requests) - 1)
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


def answer(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def replies(*payloads: bytes) -> Handler:
    async def handler(_: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(payloads[n])
        await writer.drain()

    return handler


def run(coro: Coroutine[None, None, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))


def test_heads_and_framing_parse_as_http_1_1_says() -> None:
    status, keep, headers = parse_head(
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nX-A:  b \r\n\r\n"
    )
    assert (status, keep) == (503, True)
    assert headers == [(b"content-type", b"text/plain"), (b"x-a", b"b")]
    assert parse_head(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")[1] is False
    assert parse_head(b"HTTP/1.0 200 OK\r\n\r\n")[1] is False
    assert parse_head(b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\n\r\n")[1] is True
    with pytest.raises(ValueError, match="not an HTTP/1 answer"):
        parse_head(b"SSH-2.0-OpenSSH\r\n\r\n")
    with pytest.raises(ValueError, match="without a colon"):
        parse_head(b"HTTP/1.1 200 OK\r\nbroken\r\n\r\n")
    assert framing(200, [(b"transfer-encoding", b"chunked")]) == CHUNKED
    assert framing(200, [(b"content-length", b"12")]) == 12
    assert framing(200, []) == UNTIL_CLOSE
    assert framing(204, []) == 0 and framing(304, [(b"content-length", b"5")]) == 0


def test_a_request_is_framed_with_host_length_and_the_given_headers() -> None:
    async def main() -> None:
        server = Server(replies(answer(b"ok")))
        async with server as url:
            client = LeanClient(url, headers={"authorization": "Bearer t"})
            reply = await client.send("POST", "/v1/x", [(b"x-request-id", b"r1")], b"{}")
            assert (reply.status, await reply.read()) == (200, b"ok")
            reply.close()
            client.close()
        head, body = server.requests[0].split(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert lines[0] == b"POST /v1/x HTTP/1.1"
        authority = url.removeprefix("http://").encode()
        assert lines[1:] == [
            b"host: " + authority,
            b"x-request-id: r1",
            b"authorization: Bearer t",
            b"content-length: 2",
        ]
        assert body == b"{}"

    run(main())


def test_a_chunked_answer_is_handed_on_chunk_by_chunk_as_it_arrives() -> None:
    async def main() -> None:
        more = asyncio.Event()

        async def handler(_: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            writer.write(chunk(b"data: one\n\n"))
            await writer.drain()
            await more.wait()  # the client has the first chunk before the second is sent
            writer.write(b"6;ext=1\r\nsecond\r\n" + b"0\r\nx-trailer: t\r\n\r\n")
            await writer.drain()

        server = Server(handler)
        async with server as url:
            client = LeanClient(url)
            reply = await client.send("POST", "/", [], b"")
            got: list[bytes] = []
            async for piece in reply.pieces():
                got.append(piece)
                more.set()
            assert got == [b"data: one\n\n", b"second"]
            reply.close()
            more.clear()
            again = await client.send("POST", "/", [], b"")  # read to its end: kept
            more.set()
            assert await again.read() == b"data: one\n\nsecond"
            again.close()
            assert server.connections == 1
            client.close()

    run(main())


def test_a_server_closing_mid_stream_is_an_error_and_the_connection_is_not_kept() -> None:
    async def main() -> None:
        async def handler(_: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            if n == 0:
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                writer.write(chunk(b"first") + b"40\r\npartial")
                await writer.drain()
                writer.close()
            else:
                writer.write(answer(b"fine"))
                await writer.drain()

        server = Server(handler)
        async with server as url:
            client = LeanClient(url)
            reply = await client.send("POST", "/", [], b"")
            got = []
            with pytest.raises(LeanHttpError, match="closed the connection"):
                async for piece in reply.pieces():
                    got.append(piece)
            assert got == [b"first"]
            reply.close()
            second = await client.send("POST", "/", [], b"")
            assert await second.read() == b"fine"
            second.close()
            assert server.connections == 2
            client.close()

    run(main())


def test_a_body_short_of_its_length_or_until_close_reads_as_the_server_says() -> None:
    async def main() -> None:
        async def handler(_: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            if n == 0:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\n\r\nall of it until the end")
            await writer.drain()
            writer.close()

        server = Server(handler)
        async with server as url:
            client = LeanClient(url)
            reply = await client.send("POST", "/", [], b"")
            with pytest.raises(LeanHttpError, match="closed the connection"):
                await reply.read()
            reply.close()
            reply = await client.send("POST", "/", [], b"")
            assert await reply.read() == b"all of it until the end"
            reply.close()
            client.close()

    run(main())


def test_keep_alive_reuses_a_connection_and_replaces_one_the_server_closed() -> None:
    async def main() -> None:
        closing: list[asyncio.StreamWriter] = []

        async def handler(_: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            writer.write(answer(b"%d" % n))
            await writer.drain()
            closing.append(writer)

        server = Server(handler)
        async with server as url:
            client = LeanClient(url)
            for n in range(2):
                assert await client.post("/", b"{}", 5) == (200, b"%d" % n)
            assert server.connections == 1
            closing[-1].close()  # the server drops the idle connection
            await asyncio.sleep(0.1)
            assert await client.post("/", b"{}", 5) == (200, b"2")
            assert server.connections == 2
            client.close()

    run(main())


def test_a_kept_connection_closed_as_the_request_arrives_is_retried_on_a_new_one() -> None:
    async def main() -> None:
        async def handler(_: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            if n == 1:  # read the request, then close without a byte (the keep-alive race)
                writer.close()
                return
            writer.write(answer(b"%d" % n))
            await writer.drain()

        server = Server(handler)
        async with server as url:
            client = LeanClient(url)
            assert await client.post("/", b"{}", 5) == (200, b"0")
            assert await client.post("/", b"{}", 5) == (200, b"2")
            assert server.connections == 2
            client.close()

    run(main())


def test_a_fresh_connection_closed_without_an_answer_is_an_error() -> None:
    async def main() -> None:
        async def handler(_: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            writer.close()

        async with Server(handler) as url:
            client = LeanClient(url)
            with pytest.raises(LeanHttpError, match="without answering"):
                await client.send("POST", "/", [], b"")
            client.close()

    run(main())


def test_timeouts_and_a_refused_connection() -> None:
    async def main() -> None:
        async def handler(_: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            if n == 0:
                await asyncio.sleep(5)  # no answer at all
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunk(b"a"))
            await writer.drain()
            await asyncio.sleep(5)  # then nothing more

        async with Server(handler) as url:
            client = LeanClient(url, read_timeout=0.2)
            with pytest.raises(LeanHttpError, match=r"sent nothing for 0\.2 s"):
                await client.send("POST", "/", [], b"")
            reply = await client.send("POST", "/", [], b"")
            pieces = reply.pieces()
            assert await anext(pieces) == b"a"
            with pytest.raises(LeanHttpError, match="sent nothing"):
                await anext(pieces)
            reply.close()
            other = LeanClient(url)
            with pytest.raises(TimeoutError):  # the caller's deadline, over the whole call
                await other.post("/", b"{}", 0.2)
            other.close()
            client.close()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # nothing listens there
        with pytest.raises(LeanConnectError, match="cannot connect"):
            await LeanClient(f"http://127.0.0.1:{port}", connect_timeout=1.0).send(
                "POST", "/", [], b""
            )

    run(main())
