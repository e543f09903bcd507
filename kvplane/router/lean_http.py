"""A lean keep-alive HTTP/1.1 client for the router's hot calls: ``POST /lookup`` to the
controller and every relayed request to a backend.

httpx spends about a millisecond of CPU per request on this machine (its request and
response objects, header parsing, a connection pool that polls each of its sockets for every
request), several times what the controller spends answering a lookup. This client writes
each request in one buffer over idle asyncio connections it keeps, and reads answers framed
by Content-Length, by chunked transfer encoding (a stream, handed on chunk by chunk as it
comes) or by the server closing the connection. No TLS, redirects or compression: those
origins are for httpx.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping
from typing import TypeVar
from urllib.parse import urlsplit

__all__ = [
    "CHUNKED",
    "UNTIL_CLOSE",
    "Answer",
    "Headers",
    "LeanClient",
    "LeanConnectError",
    "LeanHttpError",
    "framing",
    "parse_head",
]

Headers = list[tuple[bytes, bytes]]
_Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]

CHUNKED = -1  # an answer's framing: chunked transfer encoding
UNTIL_CLOSE = -2  # no length given: the body ends where the server closes the connection
_PIECE = 65536  # most bytes handed on at once from a body not framed in chunks
_T = TypeVar("_T")


class LeanHttpError(Exception):
    """The server closed the connection, answered what is not HTTP/1.1, or sent nothing
    for longer than the read timeout."""


class LeanConnectError(LeanHttpError):
    """No connection could be made (in time): nothing was sent."""


class _Stale(Exception):
    """A kept connection gave no byte of answer: the server had closed it while idle."""


def parse_head(head: bytes) -> tuple[int, bool, Headers]:
    """(status, whether the server keeps the connection, headers with lower-case names)
    of an answer's head, its blank line included or not. Raises ValueError."""
    lines = head.rstrip(b"\r\n").split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    if not version.startswith(b"HTTP/1."):
        raise ValueError(f"not an HTTP/1 answer: {lines[0][:80]!r}")
    status = int(rest[:3])
    headers: Headers = []
    keep = version == b"HTTP/1.1"
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise ValueError(f"a header line without a colon: {line[:80]!r}")
        name, value = name.strip().lower(), value.strip()
        if name == b"connection":
            keep = value.lower() != b"close" if keep else value.lower() == b"keep-alive"
        headers.append((name, value))
    return status, keep, headers


def framing(status: int, headers: Headers) -> int:
    """The body's length, :data:`CHUNKED` or :data:`UNTIL_CLOSE`. Raises ValueError."""
    if status < 200 or status in (204, 304):
        return 0
    length = None
    for name, value in headers:
        if name == b"transfer-encoding" and value.lower().endswith(b"chunked"):
            return CHUNKED
        if name == b"content-length":
            length = int(value)
            if length < 0:
                raise ValueError(f"a negative Content-Length: {length}")
    return UNTIL_CLOSE if length is None else length


class Answer:
    """An answer whose head is read. Its body is read once, whole (:meth:`read`) or piece
    by piece (:meth:`pieces`); :meth:`close` then gives the connection back for the next
    request if the body was read to its end, and closes it otherwise."""

    def __init__(
        self, client: LeanClient, conn: _Conn, status: int, keep: bool, headers: Headers
    ) -> None:
        self.status = status
        self.headers = headers
        self._client = client
        self._conn: _Conn | None = conn
        self._keep = keep
        self._length = framing(status, headers)
        self._done = self._length == 0

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower case)."""
        return next((v for k, v in self.headers if k == name), None)

    async def read(self) -> bytes:
        """The whole body. Raises LeanHttpError."""
        if self._length > 0 and self._conn is not None:
            data = await self._client.timed(self._conn[0].readexactly(self._length))
            self._done = True
            return data
        return b"".join([piece async for piece in self.pieces()])

    async def pieces(self) -> AsyncIterator[bytes]:
        """The body as it arrives: each chunk of a chunked body (empty ones skipped), else
        what each read gives. Raises LeanHttpError."""
        if self._done:
            return
        if self._conn is None:
            raise LeanHttpError("the answer was closed before its body was read")
        reader, timed = self._conn[0], self._client.timed
        if self._length == CHUNKED:
            while (size := _chunk_size(await timed(reader.readuntil(b"\r\n")))) > 0:
                data = await timed(reader.readexactly(size + 2))
                if data[-2:] != b"\r\n":
                    raise LeanHttpError("a chunk not ended by CRLF")
                yield data[:-2]
            while await timed(reader.readuntil(b"\r\n")) != b"\r\n":
                pass  # trailers: not relayed
        elif self._length == UNTIL_CLOSE:
            self._keep = False
            while data := await timed(reader.read(_PIECE)):
                yield data
        else:
            left = self._length
            while left:
                data = await timed(reader.read(min(left, _PIECE)))
                if not data:
                    raise LeanHttpError(f"the server closed the connection {left} bytes short")
                left -= len(data)
                yield data
        self._done = True

    def close(self) -> None:
        if self._conn is None:
            return
        conn, self._conn = self._conn, None
        if self._done and self._keep:
            self._client.keep(conn)
        else:
            conn[1].close()


def _chunk_size(line: bytes) -> int:
    try:
        return int(line.split(b";", 1)[0], 16)
    except ValueError:
        raise LeanHttpError(f"a bad chunk size line: {line[:40]!r}") from None


class LeanClient:
    """Requests to one ``http://host:port`` origin, with ``headers`` on every one (an
    ``authorization``). ``connect_timeout``: seconds to connect; ``read_timeout``: seconds
    any one read may wait for the server's next bytes (None: no limit but the caller's).
    Safe for one event loop's tasks."""

    def __init__(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str] | None = None,
        max_idle: int = 32,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"lean client needs an http://host:port URL, got {base_url!r}")
        self._host = parts.hostname
        self._port = parts.port or 80
        self._authority = parts.netloc.encode()
        self._extra = b"".join(
            f"\r\n{k}: {v}".encode("latin-1") for k, v in (headers or {}).items()
        )
        self._idle: list[_Conn] = []
        self._max_idle = max_idle
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._closed = False

    async def post(self, path: str, body: bytes, timeout: float) -> tuple[int, bytes]:
        """(status, body) of ``POST path`` with a JSON ``body``, all of it within
        ``timeout`` seconds. Raises LeanHttpError, or TimeoutError."""
        async with asyncio.timeout(timeout):
            answer = await self.send("POST", path, [(b"content-type", b"application/json")], body)
            try:
                return answer.status, await answer.read()
            finally:
                answer.close()

    async def send(
        self, method: str, path: str, headers: Iterable[tuple[bytes, bytes]], body: bytes
    ) -> Answer:
        """Send a request (``headers`` besides host and content-length, which this sets)
        and read its answer's head. A kept connection that gives no byte of answer (the
        server closed it while idle) is passed over for a new one, once. Raises
        LeanConnectError when no connection is made, LeanHttpError when the server fails."""
        request = b"".join(
            [
                method.encode(), b" ", path.encode(), b" HTTP/1.1\r\nhost: ", self._authority,
                *[b"\r\n" + name + b": " + value for name, value in headers], self._extra,
                b"\r\ncontent-length: ", str(len(body)).encode(), b"\r\n\r\n", body,
            ]
        )  # fmt: skip
        while self._idle:
            conn = self._idle.pop()
            if conn[0].at_eof() or conn[1].is_closing():
                conn[1].close()
                continue
            try:
                return await self._exchange(conn, request)
            except _Stale:
                break
        conn = await self._connect()
        try:
            return await self._exchange(conn, request)
        except _Stale:
            raise LeanHttpError(
                f"{self._host}:{self._port} closed the connection without answering"
            ) from None

    async def _connect(self) -> _Conn:
        try:
            async with asyncio.timeout(self._connect_timeout):
                return await asyncio.open_connection(self._host, self._port)
        except OSError as exc:  # TimeoutError among them
            raise LeanConnectError(
                f"cannot connect to {self._host}:{self._port}: {exc!r}"
            ) from None

    async def _exchange(self, conn: _Conn, request: bytes) -> Answer:
        reader, writer = conn
        try:
            writer.write(request)
            await self.timed(writer.drain(), stale=True)
            while True:
                head = await self.timed(reader.readuntil(b"\r\n\r\n"), stale=True)
                status, keep, headers = parse_head(head)
                if not 100 <= status < 200:
                    return Answer(self, conn, status, keep, headers)
        except ValueError as exc:
            writer.close()
            raise LeanHttpError(f"{self._host}:{self._port}: {exc}") from None
        except BaseException:
            writer.close()
            raise

    async def timed(self, step: Awaitable[_T], *, stale: bool = False) -> _T:
        """Await ``step`` (a write's drain or a read) within the read timeout, its
        failures as LeanHttpError (or _Stale, with ``stale``, when no byte came back)."""
        try:
            if self._read_timeout is None:  # the caller's deadline alone (a lookup's)
                return await step
            async with asyncio.timeout(self._read_timeout):
                return await step
        except TimeoutError:
            raise LeanHttpError(
                f"{self._host}:{self._port} sent nothing for {self._read_timeout} s"
            ) from None
        except asyncio.IncompleteReadError as exc:
            if stale and not exc.partial:
                raise _Stale() from None
            raise LeanHttpError(f"{self._host}:{self._port} closed the connection") from None
        except (ConnectionError, BrokenPipeError) as exc:
            if stale:
                raise _Stale() from None
            raise LeanHttpError(f"{self._host}:{self._port}: {exc!r}") from None
        except (OSError, asyncio.LimitOverrunError) as exc:
            raise LeanHttpError(f"{self._host}:{self._port}: {exc!r}") from None

    def keep(self, conn: _Conn) -> None:
        """Take back a connection whose last answer was read to its end."""
        if not self._closed and len(self._idle) < self._max_idle:
            self._idle.append(conn)
        else:
            conn[1].close()

    def close(self) -> None:
        self._closed = True
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()
