"""Ordered tiers behind one interface: CPU first, then disk, remote / fs, p2p.

Writes go to the CPU tier synchronously and to every lower tier through a bounded queue
drained by that tier's writer thread; a full queue drops the write and counts it, so the
serving path never waits on a slow tier. Reads take the highest tier that has the chunk and
promote a lower-tier hit into the CPU tier. Bypassed tiers are skipped by contains, put and
get.

Events: every tier's admit/evict events come here (its one sink) and go out through the
manager's :class:`~kvplane.engine.events.EventStream`: each consumer takes them from its own
:meth:`subscribe`-d queue, on its own thread. Frozen: stores are skipped, only the CPU tier
is read, and no admit/evict events leave; the events tiers emit meanwhile (a clear, a
hot-cache disable, a queued lower-tier write landing) are held, the last one per chunk and
tier, and published when freeze is lifted, so subscribers (the controller worker) end up
agreeing with the tiers.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

from kvplane.engine.backends.base import StorageBackend
from kvplane.engine.backends.cpu import LocalCPUBackend
from kvplane.engine.chunk import KVChunk, Landing
from kvplane.engine.compression import CompressResult, compress, get_codec
from kvplane.engine.events import (
    DEFAULT_CAPACITY,
    ChunkEvicted,
    EventStream,
    StorageEvent,
    Subscription,
)
from kvplane.engine.memory_pool import MemoryPage
from kvplane.engine.metrics import EngineMetrics
from kvplane.errors import Conflict, NotFound
from kvplane.keys import CacheKey

__all__ = ["Cleared", "StorageManager"]

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


class Cleared(NamedTuple):
    """What a clear removed: chunks, and the tokens whose KV they held."""

    num_chunks: int
    num_tokens: int


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
        self.metrics.start_series("tier", self.backends)
        first = backends[0] if backends else None
        self.cpu: LocalCPUBackend | None = first if isinstance(first, LocalCPUBackend) else None
        self._writers = {
            b.name: _TierWriter(b, self.metrics, queue_size)
            for b in backends
            if b is not self.cpu and not b.fetch_only
        }
        self._bypassed: set[str] = set()
        self._frozen = False
        # Events suppressed while frozen, the latest per (key, tier) in order of arrival.
        # Publishing and holding share one lock so a replay never overtakes a newer event,
        # and every subscription sees one order.
        self._held: dict[tuple[CacheKey, str], StorageEvent] = {}
        self._events_lock = threading.Lock()
        self._events = EventStream(on_drop=self._count_dropped)
        for backend in backends:
            backend.set_event_sink(self._on_tier_event)

    # ------------------------------------------------------------------ modes
    @property
    def frozen(self) -> bool:
        return self._frozen

    @frozen.setter
    def frozen(self, value: bool) -> None:
        """Lifting freeze first publishes the events held while frozen."""
        with self._events_lock:
            self._frozen = value
            if value:
                return
            held, self._held = list(self._held.values()), {}
            for event in held:
                self._events.publish(event)

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

    def backend(self, name: str) -> StorageBackend:
        """The tier called ``name``; NotFound naming the tiers there are otherwise."""
        self._check_name(name)
        return self.backends[name]

    def _check_name(self, name: str) -> None:
        if name not in self.backends:
            raise NotFound(f"Backend {name!r} not found. Available: {list(self.backends)}")

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
    def subscribe(self, name: str, *, capacity: int = DEFAULT_CAPACITY) -> Subscription:
        """A queue of every admit/evict event the tiers emit from now on (held back while
        frozen), for one consumer to drain on its own thread; ``name`` labels its losses in
        ``kvplane_events_dropped_total``. The consumer closes it when done. Publishing never
        waits for it: on overflow its pending events are dropped and it is told to resync
        (:mod:`kvplane.engine.events`)."""
        self.metrics.start_series("subscriber", [name])
        return self._events.subscribe(name, capacity=capacity)

    def _on_tier_event(self, event: StorageEvent) -> None:
        if isinstance(event, ChunkEvicted):
            self.metrics.evictions.labels(event.location).inc()
        with self._events_lock:
            if self._frozen:
                slot = (event.key, event.location)
                self._held.pop(slot, None)  # re-inserted last: replay keeps arrival order
                self._held[slot] = event
                return
            self._events.publish(event)

    def _count_dropped(self, name: str, num_events: int) -> None:
        self.metrics.events_dropped.labels(name).inc(num_events)
        log.warning(
            "event subscription %r overflowed: %d events dropped, its consumer resyncs",
            name,
            num_events,
        )

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
            with self._read_from(backend, key) as chunk:
                if chunk is None:
                    self.metrics.tier_misses.labels(backend.name).inc()
                    continue
                self.metrics.tier_hits.labels(backend.name).inc()
                self.metrics.tier_bytes_read.labels(backend.name).inc(chunk.nbytes)
                yield chunk
                return
        yield None

    @contextmanager
    def _read_from(self, backend: StorageBackend, key: CacheKey) -> Iterator[KVChunk | None]:
        """``backend``'s chunk for the block, a lower tier's promoted into the CPU tier:
        read straight into a CPU-tier page where the tier can land payloads (then lent by
        the CPU tier), else read and copied there."""
        cpu = self.cpu_writable
        if backend is self.cpu or cpu is None or self._frozen:
            with backend.read(key) as chunk:
                yield chunk
            return
        if backend.lands_payloads:
            with _landing_in(cpu) as (into, landed):
                chunk = backend.get_many([key], into)[0]
                # a miss (a damaged file too) leaves its page to be freed with the landing
                page = landed.pop(key, None) if chunk is not None else None
                if chunk is None or page is None:  # a miss, or no free page: its own buffer
                    if chunk is not None:
                        cpu.put(key, chunk)
                    yield chunk
                    return
                cpu.commit(key, chunk.meta, page, chunk.nbytes)
            with cpu.read(key) as promoted:
                if promoted is not None:
                    yield promoted
                    return
            # evicted again at once (a full CPU tier under other writers): read it anew
        with backend.read(key) as chunk:
            if chunk is not None:
                cpu.put(key, chunk)
            yield chunk

    def get(self, key: CacheKey) -> KVChunk | None:
        """Like :meth:`read`, but the chunk owns its bytes."""
        with self.read(key) as chunk:
            return None if chunk is None else chunk.with_payload(chunk.payload.clone())

    @property
    def fetches_from_peers(self) -> bool:
        """Whether an active fetch-only tier (p2p) may supply chunks local tiers lack."""
        return not self._frozen and any(b.fetch_only for b in self._active())

    def locate(self, key: CacheKey) -> str | None:
        """Name of the highest active local tier holding ``key`` (fetch-only tiers, i.e.
        peers, are not asked: see :meth:`prefetch`)."""
        for backend in self._active():
            if not backend.fetch_only and backend.contains(key):
                return backend.name
        return None

    @contextmanager
    def read_local(self, key: CacheKey) -> Iterator[KVChunk | None]:
        """The chunk from the highest active local tier, valid (not evicted) for the block,
        without promotion: what this process serves to peers; never asks a peer itself."""
        for backend in self._active():
            if backend.fetch_only:
                continue
            with backend.read(key) as chunk:
                if chunk is not None:
                    yield chunk
                    return
        yield None

    def put_into(self, key: CacheKey, chunk: KVChunk, location: str | None = None) -> bool:
        """Store into one named tier synchronously (a chunk pushed by a peer for ``move``),
        or through :meth:`put` when ``location`` is None. False when frozen or refused."""
        if location is None:
            return self.put(key, chunk)
        self._check_name(location)
        backend = self.backends[location]
        if self._frozen or location in self._bypassed or backend.fetch_only:
            return False
        return backend.put(key, chunk)

    def promote(self, keys: Sequence[CacheKey]) -> int:
        """Read each chunk of the leading run of ``keys`` that local tiers hold, and that
        only a lower tier holds, into the CPU tier, as :meth:`read` would. Later loads of
        the run then copy from memory. Returns how many were promoted."""
        cpu = self.cpu_writable
        if cpu is None or self._frozen:
            return 0
        promoted = 0
        for key in keys:
            location = self.locate(key)
            if location is None:
                break
            if location == cpu.name:
                continue
            with self.read(key) as chunk:
                if chunk is None:  # evicted since it was located
                    break
            promoted += 1
        return promoted

    def prefetch(self, keys: Sequence[CacheKey]) -> int:
        """Bring the leading run of ``keys`` that local tiers lack in from fetch-only tiers
        (peers), one batch per tier, promoted into the CPU tier. Returns how many leading
        keys are held locally afterwards."""
        held = 0
        while held < len(keys) and self.locate(keys[held]) is not None:
            held += 1
        cpu = self.cpu_writable
        if held == len(keys) or cpu is None or self._frozen:
            return held
        for backend in self._active():
            if not backend.fetch_only or held == len(keys):
                continue
            missing = keys[held:]
            with _landing_in(cpu) as (into, landed):
                for key, chunk in zip(missing, backend.get_many(missing, into), strict=True):
                    if chunk is None:
                        self.metrics.tier_misses.labels(backend.name).inc()
                        break
                    self.metrics.tier_hits.labels(backend.name).inc()
                    self.metrics.tier_bytes_read.labels(backend.name).inc(chunk.nbytes)
                    page = landed.pop(key, None)
                    if page is None:
                        stored = cpu.put(key, chunk)
                    else:
                        stored = cpu.commit(key, chunk.meta, page, chunk.nbytes)
                    if not stored:
                        return held
                    held += 1
        return held

    def compress(
        self,
        method: str,
        location: str,
        keys: Sequence[CacheKey] | None = None,
        *,
        only_from: str | None = None,
    ) -> CompressResult:
        """Re-encode the chunks of tier ``location`` (all, or those of ``keys`` it holds)
        with ``method`` (``none`` decompresses); with ``only_from``, only those stored with
        that method now (the others are neither changed nor counted). A chunk a reader is
        using right now is skipped. Raises NotFound (unknown tier), BadRequest (unknown
        method), Conflict while frozen."""
        get_codec(method)
        if only_from is not None:
            get_codec(only_from)
        self._check_name(location)
        if self._frozen:
            raise Conflict("the engine is frozen: stored chunks may not change")
        backend = self.backends[location]
        result = CompressResult(0, 0, 0, 0)
        for key in backend.keys() if keys is None else keys:
            chunk = backend.get(key)
            if chunk is None or only_from not in (None, chunk.meta.compression):
                continue
            packed = compress(chunk, method)
            if packed is not chunk and not backend.replace_chunk(key, packed):
                continue
            result = CompressResult(
                result.num_chunks + 1,
                result.num_tokens + chunk.meta.num_tokens,
                result.bytes_before + chunk.nbytes,
                result.bytes_after + packed.nbytes,
            )
        return result

    def snapshot(self, match: Callable[[CacheKey], bool]) -> dict[str, list[int]]:
        """The chunk hashes of the keys ``match`` accepts, per tier (every tier, in order,
        bypassed or not): what a controller worker resends when it (re)registers."""
        return {
            name: [key.chunk_hash for key in backend.keys() if match(key)]
            for name, backend in self.backends.items()
        }

    def clear(self, locations: Sequence[str] | None = None) -> Cleared:
        """Remove chunks from the named tiers (all when None); returns how many chunks and
        how many tokens they held (a prompt's last chunk may be partial)."""
        names = list(self.backends) if not locations else list(locations)
        for name in names:
            self._check_name(name)
        chunks = tokens = 0
        for name in names:
            backend = self.backends[name]
            for key in backend.keys():
                held = backend.chunk_tokens(key)
                if backend.remove(key):
                    chunks += 1
                    tokens += held
        return Cleared(chunks, tokens)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued lower-tier write is done (tests, shutdown)."""
        return all(w.flush(timeout) for w in self._writers.values())

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        for backend in self.backends.values():
            backend.close()


@contextmanager
def _landing_in(
    cpu: LocalCPUBackend,
) -> Iterator[tuple[Landing, dict[CacheKey, MemoryPage]]]:
    """A landing that receives fetched payloads straight into free CPU-tier pages, and the
    pages it handed out by key; a page not committed by the end of the block is freed."""
    landed: dict[CacheKey, MemoryPage] = {}

    def into(key: CacheKey, nbytes: int) -> memoryview | None:
        if nbytes > cpu.pool.page_nbytes or key in landed:
            return None
        page = cpu.allocate()
        if page is None:
            return None
        landed[key] = page
        return page.data[:nbytes].numpy().data

    try:
        yield into, landed
    finally:
        for page in landed.values():
            page.release()
