"""Ordered tiers behind one interface: CPU first, then disk, remote / fs, p2p.

Writes go to the CPU tier synchronously and to every lower tier through a bounded queue
drained by that tier's writer thread; a full queue drops the write and counts it, so the
serving path never waits on a slow tier. Reads take the highest tier that has the chunk and
promote a lower-tier hit into the CPU tier. Bypassed tiers are skipped by contains, put and
get. Frozen: stores are skipped, only the CPU tier is read, and no admit/evict events leave.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

from kvplane.engine.backends.base import ChunkEvicted, StorageBackend, StorageEvent
from kvplane.engine.backends.cpu import LocalCPUBackend
from kvplane.engine.chunk import KVChunk
from kvplane.engine.memory_pool import MemoryPage
from kvplane.engine.metrics import EngineMetrics
from kvplane.errors import BadRequest
from kvplane.keys import CacheKey

__all__ = ["StorageManager"]

log = logging.getLogger(__name__)


class _Write(NamedTuple):
    key: CacheKey
    chunk: KVChunk
    page: MemoryPage | None


class _TierWriter:
    """One lower tier's bounded write queue and the thread that drains it."""

    def __init__(self, backend: StorageBackend, metrics: EngineMetrics, size: int) -> None:
        self.backend = backend
        self.metrics = metrics
        self.queue: queue.Queue[_Write | None] = queue.Queue(maxsize=size)
        self.thread = threading.Thread(
            target=self._run, name=f"kvplane-writer-{backend.name}", daemon=True
        )
        self.thread.start()

    def submit(self, write: _Write) -> bool:
        if write.page is not None:
            write.page.retain()
        try:
            self.queue.put_nowait(write)
        except queue.Full:
            if write.page is not None:
                write.page.release()
            self.metrics.tier_dropped_writes.labels(self.backend.name).inc()
            return False
        self.metrics.tier_queue_depth.labels(self.backend.name).set(self.queue.qsize())
        return True

    def _run(self) -> None:
        name = self.backend.name
        while True:
            write = self.queue.get()
            if write is None:
                self.queue.task_done()
                return
            try:
                if self.backend.put(write.key, write.chunk):
                    self.metrics.tier_bytes_written.labels(name).inc(write.chunk.nbytes)
            except Exception:  # a lower tier's failure must never reach the serving path
                log.exception("tier %s: write of %s failed", name, write.key.to_str())
                self.metrics.tier_errors.labels(name).inc()
            finally:
                if write.page is not None:
                    write.page.release()
                self.metrics.tier_queue_depth.labels(name).set(self.queue.qsize())
                self.queue.task_done()

    def flush(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)
        return not self.queue.unfinished_tasks

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=5)


class StorageManager:
    def __init__(
        self,
        backends: Sequence[StorageBackend],
        metrics: EngineMetrics | None = None,
        *,
        queue_size: int = 256,
    ) -> None:
        self.metrics = metrics or EngineMetrics()
        self.backends: dict[str, StorageBackend] = {b.name: b for b in backends}
        first = backends[0] if backends else None
        self.cpu: LocalCPUBackend | None = first if isinstance(first, LocalCPUBackend) else None
        self._writers = {
            b.name: _TierWriter(b, self.metrics, queue_size) for b in backends if b is not self.cpu
        }
        self._bypassed: set[str] = set()
        self._frozen = False
        self._listeners: list[Callable[[StorageEvent], None]] = []
        for backend in backends:
            backend.add_listener(self._forward)

    # ------------------------------------------------------------------ modes
    @property
    def frozen(self) -> bool:
        return self._frozen

    @frozen.setter
    def frozen(self, value: bool) -> None:
        self._frozen = value

    @property
    def bypassed(self) -> list[str]:
        return sorted(self._bypassed)

    def bypass(self, name: str) -> bool:
        """Skip a tier; returns whether it was already bypassed."""
        self._check_name(name)
        was = name in self._bypassed
        self._bypassed.add(name)
        return was

    def unbypass(self, name: str) -> bool:
        """Restore a tier; returns whether it was bypassed."""
        self._check_name(name)
        was = name in self._bypassed
        self._bypassed.discard(name)
        return was

    def _check_name(self, name: str) -> None:
        if name not in self.backends:
            raise BadRequest(f"Backend {name!r} not found. Available: {list(self.backends)}")

    def _active(self) -> list[StorageBackend]:
        tiers = [b for name, b in self.backends.items() if name not in self._bypassed]
        if self._frozen:
            return [b for b in tiers if b is self.cpu]
        return tiers

    @property
    def cpu_writable(self) -> LocalCPUBackend | None:
        """The CPU tier when a store may use it now (present, not bypassed, hot)."""
        cpu = self.cpu
        if cpu is None or cpu.name in self._bypassed or not cpu.hot_cache:
            return None
        return cpu

    # ------------------------------------------------------------------ events
    def add_listener(self, listener: Callable[[StorageEvent], None]) -> None:
        self._listeners.append(listener)

    def _forward(self, event: StorageEvent) -> None:
        if isinstance(event, ChunkEvicted):
            self.metrics.evictions.labels(event.location).inc()
        if self._frozen:
            return
        for listener in list(self._listeners):
            listener(event)

    # ------------------------------------------------------------------ data path
    def put(self, key: CacheKey, chunk: KVChunk, page: MemoryPage | None = None) -> bool:
        """Store a chunk everywhere it belongs; True if any tier took or queued it.

        ``page`` is the CPU page holding ``chunk.payload`` when the caller gathered straight
        into one: the CPU tier takes ownership of it and queued writes keep it alive.
        """
        if self._frozen:
            if page is not None:
                page.release()
            return False
        accepted = False
        cpu = self.cpu_writable
        if page is not None:
            if cpu is not None:
                page.retain()
                accepted = cpu.commit(key, chunk.meta, page, chunk.nbytes)
        elif cpu is not None:
            accepted = cpu.put(key, chunk)
        for backend in self._active():
            writer = self._writers.get(backend.name)
            if writer is not None:
                accepted = writer.submit(_Write(key, chunk, page)) or accepted
        if page is not None:
            page.release()
        return accepted

    @contextmanager
    def read(self, key: CacheKey) -> Iterator[KVChunk | None]:
        """The chunk from the highest tier that has it, valid for the block."""
        for backend in self._active():
            with backend.read(key) as chunk:
                if chunk is None:
                    self.metrics.tier_misses.labels(backend.name).inc()
                    continue
                self.metrics.tier_hits.labels(backend.name).inc()
                self.metrics.tier_bytes_read.labels(backend.name).inc(chunk.nbytes)
                cpu = self.cpu_writable
                if backend is not self.cpu and cpu is not None and not self._frozen:
                    cpu.put(key, chunk)
                yield chunk
                return
        yield None

    def get(self, key: CacheKey) -> KVChunk | None:
        """Like :meth:`read`, but the chunk owns its bytes."""
        with self.read(key) as chunk:
            return None if chunk is None else chunk.with_payload(chunk.payload.clone())

    def locate(self, key: CacheKey) -> str | None:
        """Name of the highest active tier holding ``key``."""
        for backend in self._active():
            if backend.contains(key):
                return backend.name
        return None

    def clear(self, locations: Sequence[str] | None = None) -> int:
        """Remove chunks from the named tiers (all when None); returns how many."""
        names = list(self.backends) if not locations else list(locations)
        for name in names:
            self._check_name(name)
        return sum(self.backends[name].clear() for name in names)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued lower-tier write is done (tests, shutdown)."""
        return all(w.flush(timeout) for w in self._writers.values())

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        for backend in self.backends.values():
            backend.close()
