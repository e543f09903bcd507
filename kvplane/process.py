"""The composition root: one kvplane process, built and wired in this module only.

A ``"worker"`` process is one engine rank: :func:`~kvplane.engine.engine.build_engine`
(around the host framework's KV caches, or synthetic ones), then its services in start
order: the p2p node (``enable_p2p``), the controller worker (``enable_controller``), the
internal API servers (``internal_api_server_enabled``) of index ``worker_id + 1``, and of
index 0 too on rank 0, since ``kvplane engine`` and ``kvplane serve`` have no separate
scheduler process (a host that has one, vLLM, passes ``scheduler_api=False`` to its worker
ranks). A ``"scheduler"`` process has no engine, no worker and no p2p node: only
the internal API server of index 0, whose engine endpoints answer 503.

The process owns the :class:`~kvplane.config.ConfigStore` its config lives in: ``POST /conf``
changes it there (and only there), and the subscribers below apply what the engine cannot
read per call (logger levels, the CPU tier's capacity, the chunk statistics' auto-exit).
The host's :class:`~kvplane.engine.facts.EngineFacts` (model, ranks, KV shape) come in
beside the config, never inside it.

The services get the narrow :class:`~kvplane.engine.engine.Engine` handle and subscribe to
nothing themselves; every event subscription, observer, locator and config callback is
attached here. Storage events reach the controller worker as data: a subscription to the
storage manager's event stream that the worker drains on its own thread.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from typing import Literal, Protocol, get_args

import torch

from kvplane.api.server import InternalApiService, process_indices
from kvplane.config import ConfigStore, EngineConfig
from kvplane.engine.cache_engine import CacheEngine
from kvplane.engine.engine import Engine, build_engine
from kvplane.engine.facts import EngineFacts
from kvplane.engine.kv.layout import KVLayout
from kvplane.engine.metrics import EngineMetrics
from kvplane.engine.storage_manager import StorageManager
from kvplane.engine.tiers import GB, P2PNode
from kvplane.errors import ConfigError, Unavailable
from kvplane.worker.service import ControllerWorker

__all__ = ["EngineProcess", "Role", "Service"]

log = logging.getLogger(__name__)

Role = Literal["worker", "scheduler"]


class Service(Protocol):
    """Something the process starts after building the engine and stops before closing it."""

    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...


class EngineProcess:
    """Everything one kvplane process owns: the engine (role ``"worker"``) and the services
    around it. Building opens only the p2p node's port (so its URL is final when the worker
    registers it); :meth:`start` starts the services."""

    def __init__(
        self,
        config: EngineConfig,
        facts: EngineFacts | None = None,
        *,
        layout: KVLayout | None = None,
        kv_caches: Sequence[torch.Tensor] | None = None,
        device: str = "cpu",
        role: Role = "worker",
        scheduler_api: bool | None = None,
    ) -> None:
        """``facts``: what the host decided (model, ranks, KV shape); None: the config's
        model keys (:meth:`EngineFacts.from_config`, the synthetic engine's only source).
        ``layout`` defaults to the facts' KV shape; ``kv_caches`` are the host framework's
        paged caches (else synthetic ones are allocated on ``device``). ``scheduler_api``:
        whether a worker also serves the internal API index 0; None means on rank 0 only.
        Raises ConfigError for an unknown role or an unusable setting."""
        if role not in get_args(Role):
            raise ConfigError(f"role {role!r}: expected one of {list(get_args(Role))}")
        if role == "scheduler" and (
            layout is not None or kv_caches is not None or scheduler_api is not None
        ):
            raise ConfigError(
                "a scheduler process has no engine and always serves index 0: layout, "
                "kv_caches and scheduler_api are for role 'worker'"
            )
        self.config_store = ConfigStore(config)
        self.facts = facts if facts is not None else EngineFacts.from_config(config)
        self.role: Role = role
        self._scheduler_api = scheduler_api
        self.engine: Engine | None = None
        self.p2p: P2PNode | None = None
        self.services: list[Service] = []
        self._stopped = threading.Event()
        if role == "worker":
            self.engine = build_engine(self.config_store, self.facts, layout, kv_caches, device)
        try:
            self._build_services()
        except BaseException:  # release what was built: the p2p port, the tiers
            if self.p2p is not None:
                self.p2p.stop()
            self._close_engine()
            raise
        self.config_store.subscribe(self._apply_config_change)

    @property
    def config(self) -> EngineConfig:
        """The config now (``POST /conf`` swaps in a new one through :attr:`config_store`)."""
        return self.config_store.current

    def _build_services(self) -> None:
        config, engine = self.config, self.engine
        if engine is not None and config.enable_p2p:
            self.p2p = P2PNode(config, engine.storage, worker_id=self.facts.worker_id)
            self.p2p.bind()
            engine.cache_engine.set_mover(self.p2p.move)
            self.services.append(self.p2p)
        if engine is not None and config.enable_controller:
            events = engine.storage.subscribe("controller worker")
            worker = ControllerWorker(config, engine, events=events, p2p=self.p2p)
            if self.p2p is not None:
                self.p2p.set_peer_locator(worker.peers.locate)
            engine.metrics.registry.register(worker.metrics_collector())
            self.services.append(worker)
        if config.internal_api_server_enabled:
            api = InternalApiService(
                self.config_store, self.facts, engine, indices=self._api_indices()
            )
            if engine is not None:
                engine.cache_engine.add_lookup_observer(api.statistics.record)
                engine.cache_engine.add_transfer_observer(api.slot_recording.record)
            self.config_store.subscribe(api.on_config_change)
            self.services.append(api)

    def _api_indices(self) -> list[int]:
        """The internal API indices of this process, before ``include_index_list``."""
        if self.role == "scheduler":
            return [0]
        if self._scheduler_api is None:
            return process_indices(self.facts)
        worker = self.facts.worker_id + 1
        return [0, worker] if self._scheduler_api else [worker]

    # ------------------------------------------------------------------ the engine's parts
    def _require_engine(self) -> Engine:
        if self.engine is None:
            raise Unavailable(f"this {self.role} process has no engine")
        return self.engine

    @property
    def cache_engine(self) -> CacheEngine:
        return self._require_engine().cache_engine

    @property
    def storage(self) -> StorageManager:
        return self._require_engine().storage

    @property
    def kv_caches(self) -> tuple[torch.Tensor, ...]:
        return self._require_engine().kv_caches

    @property
    def layout(self) -> KVLayout:
        return self._require_engine().layout

    @property
    def metrics(self) -> EngineMetrics:
        return self._require_engine().metrics

    def _apply_config_change(self, config: EngineConfig, changed: frozenset[str]) -> None:
        if "log_level" in changed:
            logging.getLogger("kvplane").setLevel(config.log_level)
        if "max_local_cpu_size" in changed and self.engine is not None:
            cpu = self.engine.storage.cpu
            if cpu is None:
                return
            value = config.max_local_cpu_size
            held = cpu.set_capacity(int(value * GB))
            if held < int(value * GB):
                log.warning(
                    "max_local_cpu_size %s GB: the CPU tier holds at most %.3f GB, the slab "
                    "allocated at start",
                    value,
                    held / GB,
                )

    # ------------------------------------------------------------------ lifecycle
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
        self._close_engine()

    def _close_engine(self) -> None:
        if self.engine is not None:
            self.engine.storage.flush(timeout=5)
            self.engine.storage.close()

    def run_forever(self) -> None:
        """Start, then block until SIGTERM/SIGINT; shut down cleanly."""
        wake = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: wake.set())
        self.start()
        if self.engine is not None:
            log.info(
                "engine %s worker %s ready", self.config.lmcache_instance_id, self.facts.worker_id
            )
        else:
            log.info("scheduler of %s ready", self.config.lmcache_instance_id)
        while not wake.wait(0.5):
            pass
        log.info("shutting down")
        self.stop()
