"""The connector's worker side (one per vLLM worker rank).

``register_kv_caches`` wraps vLLM's per-layer views as packed-block caches (no copy: each
layer's ``[B, H, N, C]`` view becomes ``[B, block_elems]`` rows over the same memory) and
builds this rank's engine process around them: tiers, controller worker, p2p node, internal
API server index ``rank + 1``. Loads run in ``start_load_kv`` (before the forward pass for
vLLM's synchronous loads; on the loader thread, reported through ``get_finished``, for its
asynchronous ones), stores in ``wait_for_save`` (after it); both move whole blocks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from kvplane.config import EngineConfig
from kvplane.engine.events import ChunkAdmitted, Subscription
from kvplane.engine.kv.layout import KVLayout, packed_view
from kvplane.errors import ConfigError
from kvplane.integrations.vllm.channel import WorkerChannel
from kvplane.integrations.vllm.cpus import unpinned
from kvplane.integrations.vllm.messages import endpoint
from kvplane.integrations.vllm.plan import LoadSpec, SaveSpec, StepPlan
from kvplane.integrations.vllm.settings import VllmFacts

__all__ = ["WorkerSide", "layout_of"]

log = logging.getLogger(__name__)

#: How long a step with nothing for kvplane may wait for a running prefetch.
_IDLE_STEP_WAIT_S = 0.005
#: the nice value (0 normal, 19 lowest) of the asynchronous loader and the promoter:
#: below the serving threads
_LOADER_NICE = 10


def _below_normal_priority() -> None:
    """The calling thread at ``_LOADER_NICE``: its background reads yield the CPU to the
    serving threads."""
    with contextlib.suppress(OSError, AttributeError):  # per-thread priority: Linux only
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _LOADER_NICE)


def layout_of(views: Sequence[torch.Tensor], *, block_size: int, use_mla: bool) -> KVLayout:
    """The packed layout of vLLM's per-layer ``[num_blocks, H, N, C]`` views."""
    first = views[0]
    if first.dim() != 4:
        raise ConfigError(
            f"vLLM KV cache views must be [num_blocks, heads, block_size, content]; got "
            f"{list(first.shape)}"
        )
    num_blocks, heads, tokens, content = (int(d) for d in first.shape)
    if tokens != block_size:
        raise ConfigError(
            f"vLLM's KV views hold {tokens} tokens per block, its block_size is {block_size}"
        )
    for view in views:
        if tuple(view.shape) != tuple(first.shape) or view.dtype != first.dtype:
            raise ConfigError("kvplane needs every attention layer's KV cache in one shape")
    head_size = content if use_mla else content // 2
    return KVLayout(
        len(views), heads, head_size, block_size, num_blocks, first.dtype, use_mla, packed=True
    )


class WorkerSide:
    def __init__(self, config: EngineConfig, facts: VllmFacts) -> None:
        """``facts``: what vLLM decided; with the KV shape of the tensors it hands
        :meth:`register`, they become the engine's facts."""
        self.config = config
        self.facts = facts
        self.rank = facts.rank
        self.block_size = facts.block_size
        self.use_mla = facts.use_mla
        self._url = endpoint(facts.engine_id, facts.dp_rank)
        self.process: Any = None
        self.caches: list[torch.Tensor] = []
        self.channel: WorkerChannel | None = None
        self._events: Subscription | None = None
        self._pump: threading.Thread | None = None
        self._forward_lock = threading.Lock()
        self._load_errors: set[int] = set()
        self._lock = threading.Lock()
        self.stats: dict[str, int] = {}
        #: asynchronous loads: queued to the loader thread, then reported done by request
        self._loads: queue.SimpleQueue[LoadSpec | None] = queue.SimpleQueue()
        self._loader: threading.Thread | None = None
        self._in_flight = 0
        self._landed: set[str] = set()
        self._load_ended = threading.Condition(self._lock)
        #: the synchronous path's promotions (promote_before_load), below normal priority
        self._promoter: ThreadPoolExecutor | None = None

    # --------------------------------------------------------------- start-up
    def register(self, kv_caches: Mapping[str, torch.Tensor]) -> None:
        from kvplane.process import EngineProcess

        views: list[torch.Tensor] = []
        seen: set[int] = set()
        for name, tensor in kv_caches.items():
            key = tensor.data_ptr()
            if key in seen:  # layers sharing one KV cache move once
                log.debug("layer %s shares its KV cache", name)
                continue
            seen.add(key)
            views.append(tensor)
        try:
            packed = [packed_view(v) for v in views]
        except ValueError as exc:
            raise ConfigError(f"vLLM's KV cache layout: {exc}") from None
        layout = layout_of(views, block_size=self.block_size, use_mla=self.use_mla)
        facts = self.facts.engine_facts(self.config, layout.kv_shape())
        # Every thread and ZMQ context is made in here, so none inherits vLLM's compute binding.
        with unpinned() as (compute_cpus, thread_cpus):
            # Internal API index 0 is the scheduler process's; this rank serves rank + 1.
            process = EngineProcess(
                self.config, facts, layout=layout, kv_caches=packed, scheduler_api=False
            )
            self.caches = packed
            self.channel = WorkerChannel(self.rank, self._url, self._prefetch)
            if self.config.enable_async_loading:
                self._loader = threading.Thread(
                    target=self._load_loop, name="kvplane-vllm-loader", daemon=True
                )
                self._loader.start()
            elif self.config.promote_before_load:
                self._promoter = ThreadPoolExecutor(
                    1, "kvplane-vllm-promoter", initializer=_below_normal_priority
                )
            events = process.storage.subscribe("vllm scheduler")
            process.start()
            self.process = process
            events.take_events()  # in the snapshot that follows
            assert process.engine is not None  # a worker process always builds its engine
            self.channel.snapshot(process.engine.own_chunks())
            self._events = events
            self._pump = threading.Thread(
                target=self._forward_events,
                args=(events, self.channel),
                name="kvplane-vllm-tier-events",
                daemon=True,
            )
            self._pump.start()
        log.info(
            "kvplane rank %d: %d layers of %d blocks x %d tokens (%s), chunk %d tokens; "
            "kvplane threads on CPUs %s, vLLM's compute on %s",
            self.rank,
            layout.num_layers,
            layout.num_blocks,
            layout.block_size,
            layout.dtype,
            self.config.chunk_size,
            sorted(thread_cpus),
            sorted(compute_cpus),
        )

    def _forward_events(self, events: Subscription, channel: WorkerChannel) -> None:
        """The pump thread: this rank's tier events to the scheduler until the subscription
        is closed."""
        while not events.closed:
            events.wait(timeout=None)
            try:
                self._forward(events, channel)
            except Exception:  # reporting must outlive one bad snapshot
                log.exception("kvplane: forwarding tier events to the scheduler failed")

    def _forward(self, events: Subscription, channel: WorkerChannel) -> None:
        """Queue the pending tier events of this rank on the channel, in order (one lock for
        every thread that forwards); after an overflow (events lost), a fresh snapshot first
        replaces what the scheduler knows of this rank."""
        process = self.process
        if process is None:
            return
        engine = process.engine
        with self._forward_lock:
            taken = events.take_events()
            if events.take_resync():
                channel.snapshot(engine.own_chunks())
            for event in taken:
                if engine.owns(event.key):
                    admitted = isinstance(event, ChunkAdmitted)
                    channel.changed(event.location, admitted, event.key.chunk_hash)

    def _prefetch(self, token_ids: list[int]) -> int:
        """A scheduler's probe (on the channel's prefetch thread): on the synchronous path
        the prompt's lower-tier chunks are first promoted into the CPU tier (on the
        promoter thread, while the batch steps: the load inside the step then copies from
        memory), then its chunks are fetched from peers. Returns the prefix held."""
        engine = self.process.cache_engine
        if self._promoter is not None:
            self._promoter.submit(engine.promote, token_ids).result()
        held = int(engine.lookup(token_ids))
        events, channel = self._events, self.channel
        if events is not None and channel is not None:
            self._forward(events, channel)  # the fetched chunks' admits go before PrefetchDone
        return held

    # --------------------------------------------------------------- steps
    def load(self, plan: StepPlan) -> None:
        for spec in plan.loads:
            self._load(spec)

    def _load(self, spec: LoadSpec) -> None:
        engine = self.process.cache_engine
        want = len(spec.token_ids)
        start = time.perf_counter()
        try:
            got = engine.retrieve(
                spec.token_ids,
                self.caches,
                self._slots(spec.block_ids, want),
                skip_tokens=spec.skip_tokens,
            ).num_tokens
        except Exception:  # a failed load is a miss: vLLM recomputes the blocks
            log.exception("kvplane: load of %s failed", spec.req_id)
            got = spec.skip_tokens
        self._count("load_tokens", max(0, got - spec.skip_tokens))
        log.debug(
            "load %s: %d of %d tokens in %.1f ms",
            spec.req_id,
            got - spec.skip_tokens,
            want - spec.skip_tokens,
            (time.perf_counter() - start) * 1e3,
        )
        if got < want:
            first_bad = max(got, spec.skip_tokens) // self.block_size
            bad = spec.block_ids[first_bad:]
            log.warning(
                "kvplane: %s loaded %d of %d tokens; %d blocks recomputed",
                spec.req_id,
                got,
                want,
                len(bad),
            )
            self._count("load_errors", 1)
            with self._lock:
                self._load_errors.update(bad)

    def start_loads(self, specs: Sequence[LoadSpec]) -> None:
        """Hand asynchronous loads to the loader thread; :meth:`take_landed` reports each
        request once its blocks are written (or its failed blocks are in the load errors)."""
        if self._loader is None:
            raise RuntimeError("asynchronous loads need enable_async_loading")
        with self._lock:
            self._in_flight += len(specs)
        for spec in specs:
            self._loads.put(spec)

    def _load_loop(self) -> None:
        """The loader thread. It runs below normal priority: an asynchronous load exists so
        that the running requests' steps (vLLM's compute thread, its engine core and API
        server, which share this machine's cores) never wait for it; the load takes what
        CPU they leave."""
        _below_normal_priority()
        while (spec := self._loads.get()) is not None:
            self._load(spec)  # failed blocks are recorded before the request is reported
            log.debug("async load %s landed", spec.req_id)
            with self._lock:
                self._in_flight -= 1
                self._landed.add(spec.req_id)
                self._load_ended.notify_all()

    def take_landed(self) -> set[str]:
        """The requests whose asynchronous loads ended since the last call (vLLM's
        ``finished_recving``)."""
        with self._lock:
            landed, self._landed = self._landed, set()
        return landed

    def save(self, plan: StepPlan) -> None:
        for spec in plan.saves:
            self._save(spec)
        if plan.idle and self._in_flight:
            # vLLM steps empty while requests wait for their KV: each step is Python on
            # the GIL the loader needs; wait for a load to land instead (a few ms at most)
            with self._load_ended:
                self._load_ended.wait_for(lambda: bool(self._landed), _IDLE_STEP_WAIT_S)
        elif not plan.loads and not plan.saves and self.channel is not None:
            self.channel.yield_to_prefetch(_IDLE_STEP_WAIT_S)

    def _save(self, spec: SaveSpec) -> None:
        start = time.perf_counter()
        try:
            result = self.process.cache_engine.store(
                spec.token_ids, self.caches, self._slots(spec.block_ids, len(spec.token_ids))
            )
        except Exception:  # a failed store is a future miss, never an error in vLLM
            log.exception("kvplane: store of %s failed", spec.req_id)
            return
        log.debug(
            "store %s: %d chunks in %.1f ms",
            spec.req_id,
            result.num_chunks,
            (time.perf_counter() - start) * 1e3,
        )
        self._count("stored_chunks", result.num_chunks)

    def _slots(self, block_ids: Sequence[int], num_tokens: int) -> torch.Tensor:
        blocks = torch.as_tensor(list(block_ids), dtype=torch.long)
        offsets = torch.arange(self.block_size, dtype=torch.long)
        return (blocks[:, None] * self.block_size + offsets).reshape(-1)[:num_tokens]

    def take_load_errors(self) -> set[int]:
        with self._lock:
            errors, self._load_errors = self._load_errors, set()
        return errors

    def take_stats(self) -> dict[str, int]:
        with self._lock:
            stats, self.stats = self.stats, {}
        return stats

    def _count(self, name: str, n: int) -> None:
        with self._lock:
            self.stats[name] = self.stats.get(name, 0) + n

    def shutdown(self) -> None:
        """Stop the loader, the engine process (the controller worker deregisters) and the
        channel."""
        if self._loader is not None:
            self._loads.put(None)
            self._loader.join(timeout=30)
            self._loader = None
        if self._promoter is not None:
            self._promoter.shutdown(wait=True, cancel_futures=True)
            self._promoter = None
        if self._events is not None:
            self._events.close()
            self._events = None
        if self._pump is not None:
            self._pump.join(timeout=2)
            self._pump = None
        if self.process is not None:
            self.process.stop()
            self.process = None
        if self.channel is not None:
            self.channel.close()
            self.channel = None
