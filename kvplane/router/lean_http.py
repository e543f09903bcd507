"""A lean keep-alive HTTP/1.1 client for the router's one hot call, ``POST /lookup``.

httpx spends about a millisecond of CPU per request on this machine (its request and
response objects, header parsing, the connection pool's bookkeeping), several times what the
controller spends answering a lookup. This client writes the request in one buffer and reads
``Content-Length`` framed answers from idle asyncio connections it keeps; anything else
(chunked answers, redirects, TLS) is for httpx.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from urllib.parse import urlsplit

__all__ = ["LeanClient", "LeanHttpError"]


class LeanHttpError(Exception):
    """The server could not be reached, closed the connection, or answered unframed."""


class LeanClient:
    """POSTs to one ``http://host:port`` origin, with ``headers`` on every request (an
    ``authorization``). Safe for one event loop's tasks."""

    def __init__(
        self, base_url: str, *, headers: Mapping[str, str] | None = None, max_idle: int = 32
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
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._max_idle = max_idle

    async def post(self, path: str, body: bytes, timeout: float) -> tuple[int, bytes]:
        """(status, body) of ``POST path`` with a JSON ``body``. Raises LeanHttpError, or
        TimeoutError after ``timeout`` seconds."""
        head = (
            b"POST " + path.encode() + b" HTTP/1.1\r\nhost: " + self._authority + self._extra
            + b"\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\n\r\n"
        )  # fmt: skip
        async with asyncio.timeout(timeout):
            if self._idle:
                try:  # an idle connection the server may have closed since: once more on a new one
                    return await self._exchange(self._idle.pop(), head + body)
                except (LeanHttpError, OSError, asyncio.IncompleteReadError):
                    pass
            try:
                conn = await asyncio.open_connection(self._host, self._port)
            except OSError as exc:
                raise LeanHttpError(f"cannot connect to {self._host}:{self._port}: {exc}") from None
            try:
                return await self._exchange(conn, head + body)
            except (OSError, asyncio.IncompleteReadError) as exc:
                raise LeanHttpError(
                    f"connection to {self._host}:{self._port} failed: {exc!r}"
                ) from None

    async def _exchange(
        self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], request: bytes
    ) -> tuple[int, bytes]:
        reader, writer = conn
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            length = None
            keep = True
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value)
                elif name == "connection" and value.strip().lower() == "close":
                    keep = False
            if length is None:
                raise LeanHttpError("an answer without Content-Length")
            body = await reader.readexactly(length)
        except BaseException:
            writer.close()
            raise
        if keep and len(self._idle) < self._max_idle:
            self._idle.append(conn)
        else:
            writer.close()
        return status, body

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()
