"""The composition root of one engine process.

config -> KV layout -> host pool -> tiers -> storage manager -> cache engine -> paged KV
caches (synthetic, or handed in by a serving engine) -> services (internal API servers, the
controller worker). Constructors elsewhere take what they need as arguments; only this
module decides what is built.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from kvplane import __version__
from kvplane.config import EngineConfig
from kvplane.engine.cache_engine import CacheEngine
from kvplane.engine.compression import decompress
from kvplane.engine.kv_layout import KVLayout, allocate_kv_caches
from kvplane.engine.memory_pool import HostMemoryPool
from kvplane.engine.metrics import EngineMetrics
from kvplane.engine.storage_manager import StorageManager
from kvplane.engine.tier_metrics import TierStatsCollector
from kvplane.engine.tiers import GB, P2PNode, build_backends
from kvplane.errors import ConfigError, Unavailable
from kvplane.worker.service import ControllerWorker

__all__ = ["EngineRuntime", "Service", "build_backends"]

log = logging.getLogger(__name__)


class Service(Protocol):
    """Something the runtime starts after building the engine and stops before closing it."""

    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...


class EngineRuntime:
    """Everything one engine process (one rank) owns."""

    def __init__(
        self,
        config: EngineConfig,
        *,
        layout: KVLayout | None = None,
        kv_caches: Sequence[torch.Tensor] | None = None,
        device: str = "cpu",
    ) -> None:
        self.config = config
        self.layout = layout or KVLayout.from_config(config)
        self.metrics = EngineMetrics()
        pool = None
        if config.local_cpu:
            page = self.layout.chunk_nbytes(config.chunk_size)
            try:
                pool = HostMemoryPool.for_capacity(int(config.max_local_cpu_size * GB), page)
            except Unavailable as exc:
                raise ConfigError(
                    f"max_local_cpu_size: {config.max_local_cpu_size}: {exc}"
                ) from None
        self.pool = pool
        self.storage = StorageManager(
            build_backends(config, pool), self.metrics, queue_size=config.tier_queue_size
        )
        self.metrics.registry.register(TierStatsCollector(self.storage.backends))
        # The chunk server peers fetch from and push to (move). Bound here so its url is
        # final when the worker registers it as peer_init_url; the worker (or whoever knows
        # where chunks live) wires the p2p tier's locator with self.p2p.set_peer_locator.
        self.p2p = P2PNode(config, self.storage) if config.enable_p2p else None
        if self.p2p is not None:
            self.p2p.bind()
        self.cache_engine = CacheEngine(
            config,
            self.layout,
            self.storage,
            decode=decompress,
            mover=self.p2p.move if self.p2p is not None else None,
        )
        if kv_caches is None:
            kv_caches = allocate_kv_caches(self.layout, device, seed=1234 + config.worker_id)
        self.kv_caches = list(kv_caches)
        self.services: list[Service] = []
        if self.p2p is not None:
            self.add_service(self.p2p)
        if config.enable_controller:
            worker = ControllerWorker(config, self.cache_engine, p2p=self.p2p)
            self.metrics.registry.register(worker.metrics_collector())
            self.add_service(worker)
        self._stopped = threading.Event()
        self._started = False
        config.on_change(self._apply_config_change)
        if config.internal_api_server_enabled:
            # Imported here: the API's modules import the engine's, not the other way round.
            from kvplane.api.server import InternalApiService

            self.add_service(InternalApiService(config, self))

    # ------------------------------------------------------------------ metadata
    def metadata(self) -> dict[str, Any]:
        """What ``/meta`` shows about this engine."""
        c = self.config
        return {
            "model_name": c.model_name,
            "world_size": c.world_size,
            "worker_id": c.worker_id,
            "instance_id": c.lmcache_instance_id,
            "kv_dtype": str(self.layout.dtype),
            "kv_shape": list(self.layout.chunk_shape(c.chunk_size)),
            "chunk_size": c.chunk_size,
            "use_mla": self.layout.use_mla,
            "is_first_rank": c.worker_id == 0,
            "kvplane_version": __version__,
        }

    def _apply_config_change(self, name: str, value: Any) -> None:
        if name == "log_level":
            logging.getLogger("kvplane").setLevel(value)
        elif name == "max_local_cpu_size" and self.storage.cpu is not None:
            held = self.storage.cpu.set_capacity(int(value * GB))
            if held < int(value * GB):
                log.warning(
                    "max_local_cpu_size %s GB: the CPU tier holds at most %.3f GB, the slab "
                    "allocated at start",
                    value,
                    held / GB,
                )

    # ------------------------------------------------------------------ lifecycle
    def add_service(self, service: Service) -> None:
        self.services.append(service)

    def start(self) -> None:
        """Start every service in order; if one fails, those already started are stopped
        (ports released, the worker deregistered) and the tiers closed before it raises."""
        logging.getLogger("kvplane").setLevel(self.config.log_level)
        started: list[Service] = []
        try:
            for service in self.services:
                log.info("starting %s", service.name)
                service.start()
                started.append(service)
        except BaseException:
            self._stop(started)
            raise
        self._started = True

    def stop(self) -> None:
        """Stop services in reverse order, then drain and close the tiers. Idempotent."""
        self._stop(self.services)

    def _stop(self, services: Sequence[Service]) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        for service in reversed(services):
            try:
                service.stop()
            except Exception:  # one failing service must not keep the others running
                log.exception("stopping %s failed", service.name)
        self.storage.flush(timeout=5)
        self.storage.close()

    def run_forever(self) -> None:
        """Start, then block until SIGTERM/SIGINT; shut down cleanly."""
        wake = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: wake.set())
        self.start()
        log.info(
            "engine %s worker %s ready", self.config.lmcache_instance_id, self.config.worker_id
        )
        while not wake.wait(0.5):
            pass
        log.info("shutting down")
        self.stop()
