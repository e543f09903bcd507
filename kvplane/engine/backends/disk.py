"""The local disk tier: one file per chunk under ``local_disk``, LRU under a byte limit.

The index (key -> file size, in LRU order) lives in memory and is rebuilt from the directory
on start, oldest modification time first, so the cache survives a restart; a hit touches the
file's mtime so that order survives too. Files are written outside the lock (big, slow) and
renamed into place under it, so the index and the directory agree whenever the lock is free.
A file that fails its checksum or is truncated is deleted, counted and reported as a miss.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from kvplane.engine import chunk_files
from kvplane.engine.backends.base import StorageBackend, register_backend
from kvplane.engine.chunk import KVChunk, Landing
from kvplane.engine.events import ChunkAdmitted, ChunkEvicted, StorageEvent
from kvplane.errors import CorruptChunk
from kvplane.keys import CacheKey

__all__ = ["DiskStats", "LocalDiskBackend"]

log = logging.getLogger(__name__)


class DiskStats(NamedTuple):
    chunks: int
    used_bytes: int
    capacity_bytes: int
    evictions: int
    corrupt: int
    write_errors: int


@register_backend
class LocalDiskBackend(StorageBackend):
    name = "LocalDiskBackend"
    lands_payloads = True

    def __init__(self, root: str | Path, max_bytes: int) -> None:
        """Open (creating it if needed) the directory ``root`` and index what it holds.

        Raises OSError when the directory cannot be created or read."""
        super().__init__()
        self.root = Path(root)
        self.capacity = int(max_bytes)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._index: OrderedDict[CacheKey, int] = OrderedDict()
        self._pinned: set[CacheKey] = set()
        self._used = 0
        self._evictions = 0
        self._corrupt = 0
        self._write_errors = 0
        self._write_log = chunk_files.WriteFailureLog(log, "disk tier")
        chunk_files.remove_temp_files(self.root)
        for f in sorted(chunk_files.scan(self.root), key=lambda f: f.mtime_ns):
            self._index[f.key] = f.size
            self._used += f.size
        with self._lock:
            events = self._evict_locked(0)
        self._emit_all(events)

    # ------------------------------------------------------------------ contract
    def chunk_tokens(self, key: CacheKey) -> int:
        try:
            return chunk_files.read_chunk_tokens(chunk_files.chunk_path(self.root, key), key)
        except (CorruptChunk, OSError):
            return 0  # gone or unreadable: a clear removes it all the same

    def contains(self, key: CacheKey) -> bool:
        with self._lock:
            return key in self._index

    def put(self, key: CacheKey, chunk: KVChunk) -> bool:
        try:
            size = chunk_files.write_chunk_file(self.root, key, chunk)
        except OSError as exc:  # the disk is full, gone or read-only: refused and counted
            with self._lock:
                self._write_errors += 1
            self._write_log.failed(key, exc)
            return False
        self._write_log.succeeded()
        with self._lock:
            old = self._index.pop(key, None)
            if old is not None:
                self._used -= old
            events = self._evict_locked(size)
            # Refused when everything left is pinned or the chunk is larger than the tier.
            admitted = self._used + size <= self.capacity
            if admitted:
                self._index[key] = size
                self._used += size
            else:
                self._unlink(key)
        if admitted:
            events.append(ChunkAdmitted(key, self.name))
        elif old is not None:
            events.append(ChunkEvicted(key, self.name))
        self._emit_all(events)
        return admitted

    def get(self, key: CacheKey, into: Landing | None = None) -> KVChunk | None:
        """The chunk; with ``into``, its payload read straight into the buffer ``into``
        hands out (see :func:`kvplane.engine.chunk_files.read_chunk_file`)."""
        with self._lock:
            if key not in self._index:
                return None
            self._index.move_to_end(key)
        path = chunk_files.chunk_path(self.root, key)
        try:
            chunk = chunk_files.read_chunk_file(path, key, into)
        except FileNotFoundError:
            self._forget(key)
            return None
        except (CorruptChunk, OSError) as exc:
            log.warning("disk tier: dropping unreadable chunk file %s: %s", path.name, exc)
            with self._lock:
                self._corrupt += 1
            self._forget(key, unlink=True)
            return None
        with contextlib.suppress(OSError):  # only the restart order would suffer
            os.utime(path)
        return chunk

    def get_many(
        self, keys: Sequence[CacheKey], into: Landing | None = None
    ) -> list[KVChunk | None]:
        return [self.get(k, into) for k in keys]

    def remove(self, key: CacheKey) -> bool:
        return self._forget(key, unlink=True)

    def keys(self) -> list[CacheKey]:
        with self._lock:
            return list(self._index)

    def pin(self, key: CacheKey) -> bool:
        with self._lock:
            if key not in self._index:
                return False
            self._pinned.add(key)
            return True

    def unpin(self, key: CacheKey) -> bool:
        with self._lock:
            was = key in self._pinned
            self._pinned.discard(key)
            return was

    def is_pinned(self, key: CacheKey) -> bool:
        with self._lock:
            return key in self._pinned

    def stats(self) -> DiskStats:
        with self._lock:
            return DiskStats(
                len(self._index),
                self._used,
                self.capacity,
                self._evictions,
                self._corrupt,
                self._write_errors,
            )

    def counters(self) -> dict[str, float]:
        return {name: float(value) for name, value in self.stats()._asdict().items()}

    # ------------------------------------------------------------------ internals
    def _evict_locked(self, incoming: int) -> list[StorageEvent]:
        """Drop least recently used unpinned chunks until ``incoming`` more bytes fit."""
        events: list[StorageEvent] = []
        if self._used + incoming <= self.capacity:
            return events
        for victim in [k for k in self._index if k not in self._pinned]:
            if self._used + incoming <= self.capacity:
                break
            self._used -= self._index.pop(victim)
            self._unlink(victim)
            self._evictions += 1
            events.append(ChunkEvicted(victim, self.name))
        return events

    def _forget(self, key: CacheKey, *, unlink: bool = False) -> bool:
        with self._lock:
            size = self._index.pop(key, None)
            self._pinned.discard(key)
            if size is not None:
                self._used -= size
            if unlink:
                self._unlink(key)
        if size is None:
            return False
        self._emit(ChunkEvicted(key, self.name))
        return True

    def _unlink(self, key: CacheKey) -> None:
        try:
            chunk_files.chunk_path(self.root, key).unlink(missing_ok=True)
        except OSError as exc:
            log.warning("disk tier: could not delete %s: %s", key.to_str(), exc)

    def _emit_all(self, events: list[StorageEvent]) -> None:
        for event in events:
            self._emit(event)
