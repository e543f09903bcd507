"""Move or copy stored chunks to a peer's tier: the transport of the controller's ``move``.

Chunks are read from the source tier and pushed in batches no larger than the client's
``max_transfer_bytes``, so a whole tier never sits in memory twice. Without ``copy`` a chunk
leaves the source only once the peer has accepted it; a refused chunk stays where it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from kvplane.engine.backends.base import StorageBackend
from kvplane.engine.chunk import KVChunk
from kvplane.engine.p2p.client import P2PClient
from kvplane.engine.storage_manager import StorageManager
from kvplane.errors import NotFound
from kvplane.keys import CacheKey

__all__ = ["MoveRequest", "MoveResult", "move_chunks"]


@dataclass(frozen=True, kw_only=True)
class MoveRequest:
    """The controller's ``move`` as the engine takes it: which chunks go to which peer tier."""

    source_location: str  # the local tier the chunks are read from
    peer_url: str  # the destination rank's chunk server, ``host:port``
    target_location: str | None = None  # the peer's tier; None: its usual store path
    tokens: Sequence[int] | None = None  # whose chunks; None: every chunk of the source tier
    copy: bool = False  # keep the source copy (False: a chunk the peer accepted leaves here)


class MoveResult(NamedTuple):
    num_chunks: int
    num_tokens: int


def move_chunks(
    storage: StorageManager,
    client: P2PClient,
    request: MoveRequest,
    keys: Sequence[CacheKey] | None = None,
) -> MoveResult:
    """Push the chunks of ``keys`` (the keys of ``request.tokens``, which the caller
    computed; None: all) held in local tier ``request.source_location`` to the peer's tier
    ``request.target_location``; remove each accepted one from the source unless
    ``request.copy``. Raises NotFound for an unknown source tier and Unavailable when the
    peer cannot be reached (chunks already moved stay moved)."""
    source = storage.backends.get(request.source_location)
    if source is None:
        raise NotFound(
            f"Backend {request.source_location!r} not found. Available: {list(storage.backends)}"
        )
    moved = MoveResult(0, 0)
    batch: list[tuple[CacheKey, KVChunk]] = []
    batch_bytes = 0
    for key in source.keys() if keys is None else keys:
        chunk = source.get(key)
        if chunk is None:
            continue
        if batch and batch_bytes + chunk.nbytes > client.max_transfer_bytes:
            moved = _send(source, client, request, batch, moved)
            batch, batch_bytes = [], 0
        batch.append((key, chunk))
        batch_bytes += chunk.nbytes
    if batch:
        moved = _send(source, client, request, batch, moved)
    return moved


def _send(
    source: StorageBackend,
    client: P2PClient,
    request: MoveRequest,
    batch: list[tuple[CacheKey, KVChunk]],
    moved: MoveResult,
) -> MoveResult:
    accepted = client.push(request.peer_url, batch, location=request.target_location)
    chunks, tokens = moved
    for (key, chunk), ok in zip(batch, accepted, strict=True):
        if not ok:
            continue
        chunks += 1
        tokens += chunk.meta.num_tokens
        if not request.copy:
            source.remove(key)
    return MoveResult(chunks, tokens)
