"""Fetch chunks from, and push chunks to, a peer's chunk server.

Every call has one deadline (``timeout_s``) covering connect, send and receive, and one size
bound (``max_transfer_bytes``): a reply that announces more is refused before it is read.
A dead, slow or misbehaving peer raises :class:`~kvplane.errors.Unavailable`.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

from kvplane.engine import serde
from kvplane.engine.chunk import KVChunk, Landing
from kvplane.engine.p2p import wire
from kvplane.errors import BadRequest, CorruptChunk, Unavailable
from kvplane.keys import CacheKey

__all__ = ["P2PClient", "parse_peer_url"]


def parse_peer_url(url: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``tcp://host:port`` -> (host, port). Raises BadRequest."""
    rest = url.split("://", 1)[1] if "://" in url else url
    host, sep, port = rest.rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadRequest(f"not a peer URL (host:port): {url!r}")
    return host.strip("[]"), int(port)


class P2PClient:
    def __init__(self, *, timeout_s: float = 5.0, max_transfer_bytes: int = 1 << 30) -> None:
        self.timeout_s = timeout_s
        self.max_transfer_bytes = max_transfer_bytes

    def fetch(
        self, peer_url: str, keys: Sequence[CacheKey], *, into: Landing | None = None
    ) -> list[KVChunk | None]:
        """The peer's chunk for each key (None: the peer does not have it, it did not fit in
        one transfer, or it failed its checksum). With ``into``, each payload is received
        straight into the buffer it supplies (no copy after the socket's). Raises
        Unavailable when the peer cannot be reached in time."""
        if not keys:
            return []
        deadline = wire.Deadline(self.timeout_s)
        with self._connect(peer_url, deadline) as sock:
            wire.send_message(sock, wire.FetchRequest([k.to_str() for k in keys]), deadline)
            reply = wire.recv_message(sock, deadline)
            if isinstance(reply, wire.ErrorReply):
                raise Unavailable(f"peer {peer_url} refused the fetch: {reply.message}")
            if not isinstance(reply, wire.FetchReply) or len(reply.sizes) != len(keys):
                raise Unavailable(f"peer {peer_url} sent a malformed fetch reply")
            if sum(reply.sizes) > self.max_transfer_bytes or min(reply.sizes) < 0:
                raise Unavailable(
                    f"peer {peer_url} announced {sum(reply.sizes)} bytes, over the limit"
                )
            out: list[KVChunk | None] = []
            for key, size in zip(keys, reply.sizes, strict=True):
                if size == 0:
                    out.append(None)
                    continue
                out.append(_received(sock, key, size, into, deadline))
            return out

    def push(
        self,
        peer_url: str,
        items: Sequence[tuple[CacheKey, KVChunk]],
        *,
        location: str | None = None,
    ) -> list[bool]:
        """Send chunks for the peer to store (into its tier ``location``; None: its usual
        store path); whether each was accepted. Chunks go in batches
        under ``max_transfer_bytes``; a chunk larger than that is not sent (False).
        Raises Unavailable when the peer cannot be reached or refuses pushes."""
        frames = [serde.encode_parts(key, chunk) for key, chunk in items]
        sizes = [len(h) + p.nbytes for h, p in frames]
        accepted = [False] * len(frames)
        batch: list[int] = []
        batch_bytes = 0
        for i, size in enumerate(sizes):
            if size > self.max_transfer_bytes:
                continue
            if batch and batch_bytes + size > self.max_transfer_bytes:
                self._push_batch(peer_url, batch, frames, sizes, accepted, location)
                batch, batch_bytes = [], 0
            batch.append(i)
            batch_bytes += size
        if batch:
            self._push_batch(peer_url, batch, frames, sizes, accepted, location)
        return accepted

    def _push_batch(
        self,
        peer_url: str,
        batch: list[int],
        frames: list[tuple[bytes, memoryview]],
        sizes: list[int],
        accepted: list[bool],
        location: str | None,
    ) -> None:
        deadline = wire.Deadline(self.timeout_s)
        with self._connect(peer_url, deadline) as sock:
            try:
                wire.send_message(
                    sock, wire.PushRequest([sizes[i] for i in batch], location), deadline
                )
                for i in batch:
                    wire.send_all(sock, frames[i][0], deadline)
                    wire.send_all(sock, frames[i][1], deadline)
            except Unavailable:
                # A peer refusing a push it cannot read answers and closes early: its
                # answer says more than our failed send, when it arrived.
                reply = _answer_if_any(sock, deadline)
                if reply is None:
                    raise
            else:
                reply = wire.recv_message(sock, deadline)
        if isinstance(reply, wire.ErrorReply):
            raise Unavailable(f"peer {peer_url} refused the push: {reply.message}")
        if not isinstance(reply, wire.PushReply) or len(reply.accepted) != len(batch):
            raise Unavailable(f"peer {peer_url} sent a malformed push reply")
        for i, ok in zip(batch, reply.accepted, strict=True):
            accepted[i] = ok

    def _connect(self, peer_url: str, deadline: wire.Deadline) -> socket.socket:
        host, port = parse_peer_url(peer_url)
        try:
            sock = socket.create_connection((host, port), timeout=deadline.remaining())
        except OSError as exc:
            raise Unavailable(f"peer {peer_url} is unreachable: {exc}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


def _received(
    sock: socket.socket,
    key: CacheKey,
    size: int,
    into: Landing | None,
    deadline: wire.Deadline,
) -> KVChunk | None:
    """Receive one ``size``-byte frame: its header first, then its payload into the
    buffer ``into`` supplies (else one of its own), each piece hashed as it lands. A header that does not add up
    to ``size`` is a miss, its bytes read off the socket so the next frame lines up."""
    got = min(size, serde.PREFIX_SIZE)
    head = wire.recv_exact(sock, got, deadline)
    try:
        header_len = serde.header_size(head)
        if header_len > size:
            raise CorruptChunk(f"header of {header_len} bytes in a {size}-byte frame")
        rest = wire.recv_exact(sock, header_len - got, deadline)
        got = header_len
        check = serde.PayloadCheck(bytes(head) + bytes(rest))
        if check.header.frame_len != size:
            raise CorruptChunk(f"frame of {size} bytes, its header says {check.header.frame_len}")
    except CorruptChunk:
        if size > got:
            wire.recv_exact(sock, size - got, deadline)
        return None
    n = check.header.payload_len
    buf = None if into is None else into(key, n)
    if buf is None or buf.nbytes < n:
        buf = wire.new_buffer(n)
    payload = buf[:n]
    wire.recv_into(sock, payload, deadline, check.update)
    try:
        return check.chunk(payload, expected_key=key)
    except CorruptChunk:
        return None


def _answer_if_any(sock: socket.socket, deadline: wire.Deadline) -> wire.Message | None:
    try:
        return wire.recv_message(sock, deadline)
    except Unavailable:
        return None
