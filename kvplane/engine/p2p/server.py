"""The chunk server of one engine process: serves chunks by key, accepts pushed chunks.

It knows nothing of tiers: ``read(key)`` and ``sink(key, chunk)`` are handed in by the
composition root (``read`` is a context manager over the local tiers only, so two peers never
ask each other in a loop, and the chunk it yields stays valid, unevicted, while its bytes are
sent: nothing is copied to serve it; ``sink(key, chunk, location)`` stores into the named
local tier, or the usual store path for None). A reply never exceeds ``max_transfer_bytes``:
chunks past the budget are answered as misses. Each connection has ``timeout_s`` in all.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from kvplane.engine import serde
from kvplane.engine.chunk import KVChunk
from kvplane.engine.p2p import wire
from kvplane.errors import CorruptChunk, KvplaneError, Unavailable
from kvplane.keys import CacheKey

__all__ = ["ChunkReader", "ChunkServer", "ChunkSink"]

log = logging.getLogger(__name__)

ChunkReader = Callable[[CacheKey], AbstractContextManager[KVChunk | None]]
ChunkSink = Callable[[CacheKey, KVChunk, str | None], bool]


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, host: str, port: int, owner: ChunkServer) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.owner = owner
        super().__init__((host, port), _Handler)


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        owner = self.server.owner
        sock: socket.socket = self.request
        deadline = wire.Deadline(owner.timeout_s)
        try:
            owner.dispatch(sock, wire.recv_message(sock, deadline), deadline)
        except (Unavailable, OSError) as exc:
            log.debug("p2p server: connection from %s ended: %s", self.client_address, exc)


class ChunkServer:
    """A threaded TCP server; ``start()`` binds (port 0: any free port), ``close()`` stops."""

    def __init__(
        self,
        host: str,
        port: int,
        read: ChunkReader,
        sink: ChunkSink | None = None,
        *,
        timeout_s: float = 5.0,
        max_transfer_bytes: int = 1 << 30,
    ) -> None:
        self.host = host
        self.read = read
        self.sink = sink
        self.timeout_s = timeout_s
        self.max_transfer_bytes = max_transfer_bytes
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._handlers: dict[type, Callable[[socket.socket, Any, wire.Deadline], None]] = {
            wire.FetchRequest: self.handle_fetch,
            wire.PushRequest: self.handle_push,
        }

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """``host:port`` as peers dial it (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self._port}"

    def bind(self) -> None:
        """Bind and listen (connections queue until ``start``), so the port, and with it
        :attr:`url`, is known early. Raises OSError when the port is taken."""
        if self._server is None:
            self._server = _Server(self.host, self._port, self)
            self._port = int(self._server.server_address[1])

    def start(self) -> None:
        """Bind if not done yet and serve on a daemon thread. Raises OSError."""
        self.bind()
        server = self._server
        assert server is not None  # bound just above
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="p2p-server",
            daemon=True,
        )
        self._thread.start()

    def close(self) -> None:
        if self._server is None:
            return
        if self._thread is not None:  # shutdown() waits for serve_forever: only if it runs
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()
        self._server = None

    # ------------------------------------------------------------------ request handling
    def dispatch(self, sock: socket.socket, msg: wire.Message, deadline: wire.Deadline) -> None:
        """Answer one request by its type; any other message gets an ErrorReply."""
        handler = self._handlers.get(type(msg))
        if handler is None:
            wire.send_message(sock, wire.ErrorReply(f"unexpected {type(msg).__name__}"), deadline)
            return
        handler(sock, msg, deadline)

    def handle_fetch(
        self, sock: socket.socket, req: wire.FetchRequest, deadline: wire.Deadline
    ) -> None:
        with contextlib.ExitStack() as reads:  # the chunks stay put until they are sent
            parts: list[tuple[CacheKey, KVChunk] | None] = []
            sizes: list[int] = []
            budget = self.max_transfer_bytes
            for text in req.keys:
                part, size = None, 0
                try:
                    key = CacheKey.from_str(text)
                    chunk = reads.enter_context(self.read(key))
                    length = 0 if chunk is None else serde.frame_len(key, chunk)
                    if chunk is not None and length <= budget:
                        part, size = (key, chunk), length
                        budget -= size
                except (ValueError, KvplaneError) as exc:
                    log.debug("p2p server: cannot serve %s: %s", text, exc)
                parts.append(part)
                sizes.append(size)
            # Sizes first, each frame's checksum just before it goes: the client receives
            # one frame while the next is hashed.
            wire.send_message(sock, wire.FetchReply(sizes), deadline)
            for part in parts:
                if part is not None:
                    header, payload = serde.encode_parts(*part)
                    wire.send_all(sock, header, deadline)
                    wire.send_all(sock, payload, deadline)

    def handle_push(
        self, sock: socket.socket, req: wire.PushRequest, deadline: wire.Deadline
    ) -> None:
        total = sum(req.sizes)
        fits = total <= self.max_transfer_bytes and min(req.sizes, default=0) >= 0
        if self.sink is None or not fits:
            if fits:  # read what the client is sending, so it reads our answer, not a reset
                wire.recv_exact(sock, total, deadline)
            reason = "pushes are not accepted" if self.sink is None else "push too large"
            wire.send_message(sock, wire.ErrorReply(reason), deadline)
            return
        accepted: list[bool] = []
        for size in req.sizes:
            frame = wire.recv_exact(sock, size, deadline)
            try:
                key, chunk = serde.decode(frame)
                accepted.append(bool(self.sink(key, chunk, req.location)))
            except (CorruptChunk, KvplaneError) as exc:
                log.warning("p2p server: refusing a pushed chunk: %s", exc)
                accepted.append(False)
        wire.send_message(sock, wire.PushReply(accepted), deadline)
