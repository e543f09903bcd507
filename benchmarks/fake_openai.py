"""An instant OpenAI-compatible backend and a tiny round-robin proxy, for
``benchmarks/route.py``: plain asyncio HTTP/1.1 with keep-alive, no framework, so that what
a router adds in front of the fake backend is the router's, not this server's.

* ``python -m benchmarks.fake_openai backend --port P``: answers ``/v1/completions`` and
  ``/v1/chat/completions`` at once, streamed (``"stream": true``, server-sent events in
  chunked encoding, one event per token, then ``[DONE]``) or as one JSON body; ``/health``,
  ``/v1/models``, ``/tokenize`` and a ``/metrics`` with vLLM's load gauges at zero.
* ``python -m benchmarks.fake_openai proxy --port P --backend URL ...``: sends each request
  to the next backend in turn and relays the answer chunk by chunk (the round-robin row).

The parsing helpers (:func:`read_head`, :func:`read_body`, :func:`relay_body`) are the
client side of :mod:`benchmarks.latency` too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = [
    "Head",
    "Served",
    "answer",
    "read_body",
    "read_head",
    "relay_body",
    "serve_backend",
    "serve_proxy",
]

MODEL = "fake"
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 502: "Bad Gateway"}


@dataclass(frozen=True)
class Head:
    """A request line or status line with its headers (names in lower case)."""

    first: str
    headers: dict[str, str]

    @property
    def status(self) -> int:
        return int(self.first.split(" ", 2)[1])


async def read_head(reader: asyncio.StreamReader) -> Head | None:
    """The next message head on ``reader`` (blank lines before it skipped); None at the end
    of the stream. Raises ValueError on a first line that is not HTTP/1."""
    line = await reader.readline()
    while line in (b"\r\n", b"\n"):
        line = await reader.readline()
    if not line:
        return None
    if len(line.split(b" ")) < 3:
        raise ValueError(f"not an HTTP/1 message: {line[:80]!r}")
    headers: dict[str, str] = {}
    while True:
        raw = await reader.readline()
        if raw in (b"\r\n", b"\n", b""):
            break
        name, _, value = raw.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return Head(line.decode("latin-1").rstrip("\r\n"), headers)


async def relay_body(
    reader: asyncio.StreamReader, head: Head, writer: asyncio.StreamWriter | None = None
) -> bytes:
    """Read the body that follows ``head`` (content-length or chunked) and return it
    de-chunked; with ``writer``, copy each piece there as it arrives, framing unchanged."""
    parts: list[bytes] = []
    if head.headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size_line = await reader.readline()
            size = int(size_line.split(b";")[0], 16)
            data = await reader.readexactly(size + 2)
            if writer is not None:
                writer.write(size_line + data)
                await writer.drain()
            if size == 0:
                return b"".join(parts)
            parts.append(data[:-2])
    length = int(head.headers.get("content-length", "0"))
    data = await reader.readexactly(length) if length else b""
    if writer is not None and data:
        writer.write(data)
        await writer.drain()
    return data


async def read_body(reader: asyncio.StreamReader, head: Head) -> bytes:
    return await relay_body(reader, head)


def _response(status: int, body: bytes, content_type: str = "application/json") -> bytes:
    return (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\ncontent-type: {content_type}\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


METRICS = (
    'vllm:num_requests_running{{model_name="fake"}} 0.0\n'
    'vllm:num_requests_waiting{{model_name="fake"}} 0.0\n'
    'vllm:kv_cache_usage_perc{{model_name="fake"}} 0.0\n'
    "fake:completions_total {completions}\n"
    "fake:prompt_tokens_total {prompt_tokens}\n"
    "fake:tokenize_total {tokenize}\n"
)


@dataclass
class Served:
    """One fake backend: the model it names, how ``/tokenize`` encodes text (default: one
    id per byte), and what it answered (completions, the prompt ids they carried, /tokenize
    calls)."""

    model: str = MODEL
    encode: Callable[[str], list[int]] | None = None
    completions: int = 0
    prompt_tokens: int = 0
    tokenize: int = 0


def answer(path: str, body: bytes, served: Served) -> bytes:
    """The whole HTTP response of the fake backend to ``POST path`` (or GET with no body);
    counts completions in ``served`` (shown on ``/metrics``)."""
    if path in ("/health", "/healthz"):
        return _response(200, b"")
    if path == "/v1/models":
        entry = {"id": served.model, "object": "model", "owned_by": "fake"}
        data = {"object": "list", "data": [entry]}
        return _response(200, json.dumps(data).encode())
    if path == "/metrics":
        text = METRICS.format(
            completions=served.completions,
            prompt_tokens=served.prompt_tokens,
            tokenize=served.tokenize,
        )
        return _response(200, text.encode(), "text/plain; version=0.0.4")
    try:
        request = json.loads(body or b"{}")
    except ValueError:
        return _response(400, b'{"error": {"message": "malformed JSON", "type": "bad_request"}}')
    if path == "/tokenize":
        served.tokenize += 1
        text = request.get("prompt", "")
        if isinstance(text, list):
            ids = text
        else:
            ids = served.encode(text) if served.encode else list(text.encode())
        return _response(200, json.dumps({"tokens": ids, "count": len(ids)}).encode())
    chat = path == "/v1/chat/completions"
    if path != "/v1/completions" and not chat:
        return _response(404, b'{"error": {"message": "no such route", "type": "not_found"}}')
    n = max(1, int(request.get("max_tokens") or 1))
    prompt = request.get("prompt")
    served.completions += 1
    served.prompt_tokens += len(prompt) if isinstance(prompt, list) else 0
    kind = "chat.completion" if chat else "text_completion"
    base = {"id": "fake-1", "created": int(time.time()), "model": request.get("model", MODEL)}
    if not request.get("stream"):
        choice: dict[str, object] = {"index": 0, "finish_reason": "length"}
        choice.update(
            {"message": {"role": "assistant", "content": "x" * n}} if chat else {"text": "x" * n}
        )
        usage = {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}
        full = {**base, "object": kind, "choices": [choice], "usage": usage}
        return _response(200, json.dumps(full).encode())
    events = []
    for i in range(n):
        piece = {"delta": {"content": "x"}} if chat else {"text": "x", "token_ids": [3]}
        last = "length" if i == n - 1 else None
        chunk = {
            **base,
            "object": f"{kind}.chunk",
            "choices": [{"index": 0, **piece, "finish_reason": last}],
        }
        events.append(_chunk(b"data: " + json.dumps(chunk).encode() + b"\n\n"))
    events.append(_chunk(b"data: [DONE]\n\n"))
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    return head + b"".join(events) + _chunk(b"")


async def serve_backend(host: str, port: int, served: Served | None = None) -> asyncio.Server:
    """The fake backend on ``host:port``, answering as ``served`` says (and counting there)."""
    served = served or Served()

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ValueError):
            while (head := await read_head(reader)) is not None:
                body = await read_body(reader, head)
                writer.write(answer(head.first.split(" ")[1].split("?")[0], body, served))
                await writer.drain()
        writer.close()

    return await asyncio.start_server(connection, host, port, backlog=1024)


class _Pool:
    """Idle keep-alive connections to one backend."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def get(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while self.idle:
            reader, writer = self.idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return reader, writer
        return await asyncio.open_connection(self.host, self.port)


def _request_bytes(head: Head, body: bytes, host: str) -> bytes:
    headers = {k: v for k, v in head.headers.items() if k not in ("host", "transfer-encoding")}
    headers.update({"host": host, "content-length": str(len(body))})
    lines = [head.first, *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def serve_proxy(host: str, port: int, backends: Sequence[str]) -> asyncio.Server:
    """Round robin over ``backends``, one request at a time per client connection; a
    backend's answer is relayed piece by piece as it arrives (streams stay streams)."""
    pools = [_Pool(url) for url in backends]
    turn = itertools.cycle(range(len(pools)))

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ValueError):
            while (head := await read_head(reader)) is not None:
                body = await read_body(reader, head)
                pool = pools[next(turn)]
                up_reader, up_writer = await pool.get()
                up_writer.write(_request_bytes(head, body, f"{pool.host}:{pool.port}"))
                await up_writer.drain()
                reply = await read_head(up_reader)
                if reply is None:
                    writer.write(_response(502, b'{"error": {"message": "backend closed"}}'))
                    await writer.drain()
                    continue
                lines = [reply.first, *(f"{k}: {v}" for k, v in reply.headers.items())]
                writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
                await relay_body(up_reader, reply, writer)
                pool.idle.append((up_reader, up_writer))
        writer.close()

    return await asyncio.start_server(connection, host, port, backlog=1024)


async def _run(args: argparse.Namespace) -> None:
    if args.role == "backend":
        encode = None
        if args.tokenizer:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(args.tokenizer)

            def encode(text: str) -> list[int]:
                return list(tokenizer.encode(text).ids)

        server = await serve_backend(args.host, args.port, Served(args.model, encode))
    else:
        server = await serve_proxy(args.host, args.port, args.backend)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=("backend", "proxy"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", nargs="+", default=[], help="proxy: backend base URLs")
    parser.add_argument("--model", default=MODEL, help="backend: the model name it serves")
    parser.add_argument("--tokenizer", help="backend: a tokenizer.json for /tokenize")
    args = parser.parse_args()
    if args.role == "proxy" and not args.backend:
        parser.error("proxy needs --backend URL ...")
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    asyncio.run(_run(args))


if __name__ == "__main__":
    main()
