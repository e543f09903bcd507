"""The storage-tier contract and the registry of tiers.

Every tier (CPU, disk, remote, fs, p2p) implements :class:`StorageBackend`. Methods are
thread-safe and never block the caller beyond the tier's own deadline. A tier announces
what it holds as :class:`~kvplane.engine.events.ChunkAdmitted` /
:class:`~kvplane.engine.events.ChunkEvicted` events to its one sink (:meth:`set_event_sink`:
the storage manager, which queues them for its subscribers, see :mod:`kvplane.engine.events`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import ClassVar

from kvplane.engine.chunk import KVChunk, Landing
from kvplane.engine.events import EventSink, StorageEvent
from kvplane.keys import CacheKey

__all__ = ["BACKENDS", "StorageBackend", "register_backend"]


class StorageBackend(ABC):
    """One tier. ``name`` is the seeds' backend name (e.g. ``LocalCPUBackend``)."""

    name: ClassVar[str]
    #: True for a tier that holds nothing itself and fetches from elsewhere (the p2p tier):
    #: the storage manager queues no writes to it and asks it only after local tiers miss.
    fetch_only: ClassVar[bool] = False
    #: True for a tier whose reads (:meth:`get_many` with a landing) put the payload in the
    #: caller's buffer: the storage manager promotes its hits by reading them straight
    #: into a CPU-tier page instead of copying them there.
    lands_payloads: ClassVar[bool] = False

    def __init__(self) -> None:
        self._sink: EventSink | None = None

    def set_event_sink(self, sink: EventSink | None) -> None:
        """Send this tier's events to ``sink`` (None: nowhere). One sink, the storage
        manager: consumers subscribe there, so freeze applies to every one of them."""
        self._sink = sink

    def _emit(self, event: StorageEvent) -> None:
        """Called by the tier, outside its own locks, on the thread that changed it."""
        sink = self._sink
        if sink is not None:
            sink(event)

    @abstractmethod
    def contains(self, key: CacheKey) -> bool:
        """Whether ``get(key)`` would return a chunk now."""

    @abstractmethod
    def put(self, key: CacheKey, chunk: KVChunk) -> bool:
        """Store ``chunk`` (the tier copies what it keeps). False when refused (full, down)."""

    @abstractmethod
    def get(self, key: CacheKey) -> KVChunk | None:
        """The chunk, or None on a miss. The payload stays valid after later puts/evictions."""

    def get_many(
        self,
        keys: Sequence[CacheKey],
        into: Landing | None = None,
    ) -> list[KVChunk | None]:
        """``get`` for several keys; tiers with a cheaper batch path override it. A tier
        that receives payloads (the peer tier) may take each one's buffer from ``into``
        (see :data:`~kvplane.engine.chunk.Landing`); the others ignore it."""
        return [self.get(k) for k in keys]

    @contextmanager
    def read(self, key: CacheKey) -> Iterator[KVChunk | None]:
        """The chunk for the duration of the block; tiers that can lend bytes without a copy
        (the CPU tier) keep them from being reused until the block ends."""
        yield self.get(key)

    @abstractmethod
    def remove(self, key: CacheKey) -> bool:
        """Drop one chunk; True if it was there. Emits ChunkEvicted."""

    @abstractmethod
    def keys(self) -> list[CacheKey]:
        """Every key held now."""

    def chunk_tokens(self, key: CacheKey) -> int:
        """How many tokens the chunk under ``key`` holds (0 when absent). Tiers that know
        it without reading the payload override this."""
        with self.read(key) as chunk:
            return 0 if chunk is None else chunk.meta.num_tokens

    def clear(self) -> int:
        """Drop everything; returns the number of chunks removed."""
        return sum(1 for k in self.keys() if self.remove(k))

    def pin(self, key: CacheKey) -> bool:
        """Exempt a chunk from eviction. Tiers without eviction accept and ignore."""
        return self.contains(key)

    def unpin(self, key: CacheKey) -> bool:
        return self.contains(key)

    def replace_chunk(self, key: CacheKey, chunk: KVChunk) -> bool:
        """Swap a held chunk for ``chunk`` (e.g. compressed); False when the key is absent."""
        return self.contains(key) and self.put(key, chunk)

    def counters(self) -> dict[str, float]:
        """Tier-internal figures for metrics (corrupt files, breaker openings, ...)."""
        return {}

    def close(self) -> None:  # noqa: B027 - most tiers hold nothing to release
        """Release files, sockets and threads."""


BACKENDS: dict[str, type[StorageBackend]] = {}


def register_backend(cls: type[StorageBackend]) -> type[StorageBackend]:
    """Class decorator: make a tier selectable by its ``name``."""
    BACKENDS[cls.name] = cls
    return cls
