"""The CPU tier: chunks in pages of the (pinned) host memory pool, LRU under its size.

Eviction takes the least recently used chunk that is neither pinned nor being read (a page
with a reference beyond the tier's own). When nothing can be evicted the store is refused
and counted; the pool never grows and never raises for lack of memory.

Hot cache off means: existing entries are dropped and no new ones are kept.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from kvplane.engine.backends.base import StorageBackend, register_backend
from kvplane.engine.chunk import ChunkMeta, KVChunk
from kvplane.engine.events import ChunkAdmitted, ChunkEvicted
from kvplane.engine.memory_pool import HostMemoryPool, MemoryPage
from kvplane.keys import CacheKey

__all__ = ["LocalCPUBackend"]


@dataclass
class _Entry:
    meta: ChunkMeta
    page: MemoryPage
    nbytes: int
    pinned: bool = False


@register_backend
class LocalCPUBackend(StorageBackend):
    name = "LocalCPUBackend"

    def __init__(self, pool: HostMemoryPool) -> None:
        super().__init__()
        self.pool = pool
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()
        self._lock = threading.RLock()
        self._hot = True
        self._max_pages = pool.num_pages
        self.refused_stores = 0
        self.evictions = 0

    # ------------------------------------------------------------------ hot cache
    @property
    def hot_cache(self) -> bool:
        return self._hot

    def set_hot_cache(self, enabled: bool) -> int:
        """Turn the tier on or off; turning it off drops every entry (returned count)."""
        with self._lock:
            self._hot = enabled
            return 0 if enabled else self.clear()

    # ------------------------------------------------------------------ capacity
    @property
    def capacity_bytes(self) -> int:
        with self._lock:
            return self._max_pages * self.pool.page_nbytes

    def set_capacity(self, nbytes: int) -> int:
        """Hold at most ``nbytes`` from now on (whole pages; never more than the slab
        allocated at start), evicting LRU entries down to it. Pinned or in-use entries stay,
        and stores are refused until they go. Returns the capacity in effect, in bytes."""
        with self._lock:
            self._max_pages = max(0, min(self.pool.num_pages, nbytes // self.pool.page_nbytes))
        while self._pages_in_use() > self._max_pages and self._evict_one():
            pass
        return self.capacity_bytes

    def _pages_in_use(self) -> int:
        return self.pool.num_pages - self.pool.free_pages

    # ------------------------------------------------------------------ zero-copy store
    def allocate(self) -> MemoryPage | None:
        """A free page (evicting LRU entries if needed), or None: the store is refused."""
        if not self._hot:
            return None
        while True:
            with self._lock:
                page = self.pool.allocate() if self._pages_in_use() < self._max_pages else None
            if page is not None:
                return page
            if not self._evict_one():
                with self._lock:
                    self.refused_stores += 1
                return None

    def commit(self, key: CacheKey, meta: ChunkMeta, page: MemoryPage, nbytes: int) -> bool:
        """Take ownership of ``page`` (filled by the caller) as ``key``'s chunk."""
        with self._lock:
            if not self._hot or key in self._entries:
                page.release()
                if key in self._entries:
                    self._entries.move_to_end(key)
                return key in self._entries
            self._entries[key] = _Entry(meta, page, nbytes)
        self._emit(ChunkAdmitted(key, self.name))
        return True

    # ------------------------------------------------------------------ contract
    def contains(self, key: CacheKey) -> bool:
        with self._lock:
            return key in self._entries

    def put(self, key: CacheKey, chunk: KVChunk) -> bool:
        if chunk.nbytes > self.pool.page_nbytes:
            with self._lock:
                self.refused_stores += 1
            return False
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return True
        page = self.allocate()
        if page is None:
            return False
        page.data[: chunk.nbytes].copy_(chunk.payload)
        return self.commit(key, chunk.meta, page, chunk.nbytes)

    @contextmanager
    def read(self, key: CacheKey) -> Iterator[KVChunk | None]:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                page = None
            else:
                self._entries.move_to_end(key)
                page = entry.page.retain()
        if entry is None or page is None:
            yield None
            return
        try:
            yield KVChunk(entry.meta, page.data[: entry.nbytes])
        finally:
            page.release()

    def get(self, key: CacheKey) -> KVChunk | None:
        with self.read(key) as chunk:
            return None if chunk is None else chunk.with_payload(chunk.payload.clone())

    def remove(self, key: CacheKey) -> bool:
        with self._lock:
            entry = self._entries.pop(key, None)
        if entry is None:
            return False
        entry.page.release()
        self._emit(ChunkEvicted(key, self.name))
        return True

    def keys(self) -> list[CacheKey]:
        with self._lock:
            return list(self._entries)

    def chunk_tokens(self, key: CacheKey) -> int:
        with self._lock:
            entry = self._entries.get(key)
            return 0 if entry is None else entry.meta.num_tokens

    def clear(self) -> int:
        with self._lock:
            keys = list(self._entries)
        return sum(1 for k in keys if self.remove(k))

    def pin(self, key: CacheKey) -> bool:
        return self._set_pinned(key, True)

    def unpin(self, key: CacheKey) -> bool:
        return self._set_pinned(key, False)

    def is_pinned(self, key: CacheKey) -> bool:
        with self._lock:
            entry = self._entries.get(key)
            return entry is not None and entry.pinned

    def _set_pinned(self, key: CacheKey, pinned: bool) -> bool:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return False
            entry.pinned = pinned
            return True

    def replace_chunk(self, key: CacheKey, chunk: KVChunk) -> bool:
        """Swap a held chunk's bytes and meta in place (e.g. compressed), keeping its pin and
        LRU position. False when the key is absent or the chunk does not fit a page."""
        if chunk.nbytes > self.pool.page_nbytes:
            return False
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.page.refcount > 1:  # a reader is using the bytes
                return False
            entry.page.data[: chunk.nbytes].copy_(chunk.payload)
            entry.meta, entry.nbytes = chunk.meta, chunk.nbytes
            return True

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def counters(self) -> dict[str, float]:
        with self._lock:
            return {
                "chunks": float(len(self._entries)),
                "used_bytes": float(sum(e.nbytes for e in self._entries.values())),
                "capacity_bytes": float(self._max_pages * self.pool.page_nbytes),
                "evictions": float(self.evictions),
                "refused_stores": float(self.refused_stores),
            }

    def _evict_one(self) -> bool:
        with self._lock:
            victim = next(
                (k for k, e in self._entries.items() if not e.pinned and e.page.refcount == 1),
                None,
            )
            if victim is None:
                return False
            self.evictions += 1
        return self.remove(victim)
