"""The engine of one process, and the narrow handle the services above it get.

:func:`build_engine`: config and facts -> KV layout -> host memory pool -> tiers -> storage
manager -> cache engine, around paged KV caches (allocated here, or handed in by the host
framework). The config comes as the process's :class:`~kvplane.config.ConfigStore`, so that
what reads a runtime-mutable key reads its current value; the facts (model, ranks, KV shape)
as the host's :class:`~kvplane.engine.facts.EngineFacts`.
It opens no port and starts no service: the p2p node, the controller worker and the
internal API server are built on top by :mod:`kvplane.process`, and they see the engine
only through :class:`Engine`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvplane import __version__
from kvplane.config import ConfigStore, EngineConfig
from kvplane.engine.cache_engine import CacheEngine
from kvplane.engine.compression import decompress
from kvplane.engine.facts import EngineFacts
from kvplane.engine.kv.layout import KVLayout, allocate_kv_caches
from kvplane.engine.memory_pool import HostMemoryPool
from kvplane.engine.metrics import EngineMetrics
from kvplane.engine.storage_manager import StorageManager
from kvplane.engine.tier_metrics import TierStatsCollector
from kvplane.engine.tiers import GB, build_backends
from kvplane.errors import ConfigError, Unavailable
from kvplane.keys import CacheKey

__all__ = ["Engine", "build_engine", "engine_metadata"]


@dataclass(frozen=True)
class Engine:
    """What the internal API and the controller worker may use of one engine rank.

    ``kv_caches`` are the per-layer paged caches the engine gathers from and scatters into
    (the host framework's own tensors when it handed them in); ``metrics.registry`` is the
    Prometheus registry ``/metrics`` serves; ``facts`` what the host decided (model, ranks,
    KV shape); ``config_store`` the process's config (:attr:`config`: the current one). The
    handle owns nothing the objects it names do not already own; closing the tiers is the
    process's job.
    """

    config_store: ConfigStore
    facts: EngineFacts
    layout: KVLayout
    storage: StorageManager
    cache_engine: CacheEngine
    kv_caches: tuple[torch.Tensor, ...]
    metrics: EngineMetrics

    @property
    def config(self) -> EngineConfig:
        """The config now (``POST /conf`` swaps in a new one)."""
        return self.config_store.current

    def metadata(self) -> dict[str, Any]:
        """What ``/meta`` shows about this engine (:func:`engine_metadata`)."""
        return engine_metadata(self.facts, self.config, self.layout)

    def owns(self, key: CacheKey) -> bool:
        """Whether ``key`` is one of this rank's chunks (a shared store, Redis or a shared
        directory, also holds other instances' and ranks' chunks)."""
        return key.worker_id == self.facts.worker_id and key.model_name == self.facts.model_name

    def own_chunks(self) -> dict[str, list[int]]:
        """The chunk hashes of this rank's chunks per tier: what the controller worker
        resends at (re)registration, so what the controller's index should say."""
        return self.storage.snapshot(self.owns)


def engine_metadata(
    facts: EngineFacts, config: EngineConfig, layout: KVLayout | None = None
) -> dict[str, Any]:
    """What ``/meta`` shows about an engine of ``facts`` and ``config`` with ``layout``
    (default: the facts' KV shape, what a process without an engine, a scheduler, shows)."""
    layout = layout or KVLayout.from_shape(facts.kv)
    return {
        "model_name": facts.model_name,
        "world_size": facts.world_size,
        "worker_id": facts.worker_id,
        "instance_id": config.lmcache_instance_id,
        "kv_dtype": str(layout.dtype).removeprefix("torch."),
        # a packed layout's chunks hold the same KV as the paged shape says
        "kv_shape": list(layout._replace(packed=False).chunk_shape(config.chunk_size)),
        "chunk_size": config.chunk_size,
        "use_mla": layout.use_mla,
        "is_first_rank": facts.worker_id == 0,
        "kvplane_version": __version__,
    }


def build_engine(
    config_store: ConfigStore,
    facts: EngineFacts,
    layout: KVLayout | None = None,
    kv_caches: Sequence[torch.Tensor] | None = None,
    device: str = "cpu",
) -> Engine:
    """Build one rank's engine. ``layout`` defaults to the facts' KV shape (a host with
    caches of another memory layout, vLLM's packed blocks, passes its own, of that shape);
    without ``kv_caches``, synthetic caches of that layout are allocated on ``device``
    (seeded by the rank). Raises ConfigError for an unusable tier setting, ValueError for a
    layout of another shape than the facts say."""
    if layout is None:
        layout = KVLayout.from_shape(facts.kv)
    elif layout.kv_shape() != facts.kv:
        raise ValueError(f"KV layout {layout} is not of the facts' shape {facts.kv}")
    config = config_store.current
    metrics = EngineMetrics()
    pool = None
    if config.local_cpu:
        page = layout.chunk_nbytes(config.chunk_size)
        try:
            pool = HostMemoryPool.for_capacity(
                int(config.max_local_cpu_size * GB), page, prefault=config.local_cpu_prefault
            )
        except Unavailable as exc:
            raise ConfigError(f"max_local_cpu_size: {config.max_local_cpu_size}: {exc}") from None
    storage = StorageManager(
        build_backends(config, pool), metrics, queue_size=config.tier_queue_size
    )
    metrics.registry.register(TierStatsCollector(storage.backends))
    cache_engine = CacheEngine(config_store, facts, layout, storage, decode=decompress)
    if kv_caches is None:
        kv_caches = allocate_kv_caches(layout, device, seed=1234 + facts.worker_id)
    return Engine(config_store, facts, layout, storage, cache_engine, tuple(kv_caches), metrics)
