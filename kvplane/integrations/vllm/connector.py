"""``KvplaneConnector``: kvplane as a vLLM v1 KV connector.

Use it with::

    KVPLANE_CONFIG_FILE=example.yaml vllm serve MODEL --kv-transfer-config \\
      '{"kv_connector":"KvplaneConnector","kv_connector_module_path":"kvplane.integrations.vllm","kv_role":"kv_both"}'

vLLM builds one object per role: the SCHEDULER one in its EngineCore process
(:class:`~.scheduler.SchedulerSide`) and one WORKER object per rank
(:class:`~.worker.WorkerSide`). This class only translates vLLM's objects into theirs;
nothing is built until vLLM constructs it, so importing this module (which vLLM also does
in its API-server process) starts no thread and opens no socket.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVCacheEvent
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvplane.integrations.vllm.plan import StepPlan
from kvplane.integrations.vllm.settings import VllmFacts, connector_config
from kvplane.integrations.vllm.tiers import medium as tier_medium

if TYPE_CHECKING:
    import torch

    from kvplane.integrations.vllm.scheduler import SchedulerSide
    from kvplane.integrations.vllm.worker import WorkerSide

__all__ = ["KvplaneConnector", "KvplaneMetadata", "KvplaneStats", "LMCacheConnectorV1"]

log = logging.getLogger(__name__)


@dataclass
class KvplaneMetadata(KVConnectorMetadata):
    """What every worker rank does this step (pickled to each of them)."""

    plan: StepPlan = field(default_factory=StepPlan)


@dataclass
class KvplaneStats(KVConnectorStats):
    """Counters since the last report, summed over ranks."""

    def reset(self) -> None:
        self.data = dict[str, Any]()

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for name, value in other.data.items():
            self.data[name] = self.data.get(name, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())


def _log_to_stderr() -> None:
    """vLLM configures only its own loggers: give kvplane's a handler in vLLM's processes."""
    root = logging.getLogger("kvplane")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(
            logging.Formatter(
                "kvplane %(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s",
                datefmt="%m-%d %H:%M:%S",
            )
        )
        root.addHandler(handler)
        root.propagate = False


class KvplaneConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None):
        super().__init__(vllm_config, role, kv_cache_config)
        _log_to_stderr()
        transfer = vllm_config.kv_transfer_config
        facts = VllmFacts.of(vllm_config)
        extra = transfer.kv_connector_extra_config
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        self._requests: dict[str, Any] = {}  # scheduler side: vLLM's live Request objects
        if role == KVConnectorRole.SCHEDULER:
            from kvplane.integrations.vllm.scheduler import SchedulerSide

            # kvplane is a cache: a chunk evicted between lookup and load is recomputed,
            # never a failed request (vLLM reads the policy right after building us).
            transfer.kv_load_failure_policy = "recompute"
            events = vllm_config.kv_events_config
            config = connector_config(facts, extra)
            self._scheduler = SchedulerSide(
                config,
                facts.engine_facts(config),
                engine_id=facts.engine_id,
                dp_rank=facts.dp_rank,
                block_size=facts.block_size,
                kv_consumer_only=transfer.kv_role == "kv_consumer",
                publish_events=bool(events is not None and events.enable_kv_cache_events),
            )
            self._scheduler.start_api()
        else:
            from kvplane.integrations.vllm.worker import WorkerSide

            self._worker = WorkerSide(connector_config(facts, extra), facts)
        self._block_size = facts.block_size

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped store is a future miss

    # ================================================================ scheduler side
    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        side = self._require_scheduler()
        found = side.matched_tokens(request.request_id, request.all_token_ids, num_computed_tokens)
        return (None, False) if found is None else (found, side.load_async and found > 0)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int):
        side = self._require_scheduler()
        block_ids = blocks.get_block_ids()[0]
        side.allocated(request.request_id, request, block_ids, num_external_tokens)

    def get_external_cache_hit_sources(
        self, request: Any, num_external_tokens: int
    ) -> dict[CacheHitSource, int]:
        side = self._require_scheduler()
        split = side.hit_sources(request.request_id, num_external_tokens)
        return {CacheHitSource(source): n for source, n in split.items() if n}

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        from kvplane.integrations.vllm.scheduler import StepInput

        side = self._require_scheduler()
        so = scheduler_output
        scheduled: list[tuple[str, int]] = []
        new_blocks: dict[str, tuple[list[int], bool]] = {}
        for new in so.scheduled_new_reqs:
            scheduled.append(
                (new.req_id, new.num_computed_tokens + so.num_scheduled_tokens[new.req_id])
            )
            new_blocks[new.req_id] = (list(new.block_ids[0]), True)
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            added = cached.new_block_ids[i]
            if added is not None:
                new_blocks[req_id] = (list(added[0]), req_id in cached.resumed_req_ids)
            scheduled.append(
                (req_id, cached.num_computed_tokens[i] + so.num_scheduled_tokens[req_id])
            )
        step = StepInput(
            scheduled,
            new_blocks,
            sorted(getattr(so, "preempted_req_ids", None) or ()),
            sorted(so.finished_req_ids),
        )
        plan = side.plan(step, self._block_hashes_of if side.publish_events else None)
        return KvplaneMetadata(plan)

    def update_connector_output(self, connector_output: Any) -> None:
        self._require_scheduler().loads_finished(
            connector_output.finished_recving or (), set(connector_output.invalid_block_ids or ())
        )

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict | None]:
        self._require_scheduler().forget(request.request_id)
        self._requests.pop(request.request_id, None)
        return False, None

    def on_new_request(self, request: Any) -> None:
        self._requests[request.request_id] = request

    def take_events(self) -> Iterable[KVCacheEvent]:
        side = self._require_scheduler()
        changes = side.tier_changes()
        if not side.publish_events:
            return ()
        events: list[KVCacheEvent] = []
        for change, link in side.links_for(changes):
            medium = tier_medium(change.location)
            if change.held:
                events.append(
                    BlockStored(
                        block_hashes=link.block_hashes,
                        parent_block_hash=link.parent,
                        token_ids=link.token_ids,
                        block_size=self._block_size,
                        lora_id=None,
                        medium=medium,
                        lora_name=None,
                    )
                )
            else:
                events.append(BlockRemoved(block_hashes=link.block_hashes, medium=medium))
        return events

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        if self._scheduler is not None:
            data = self._scheduler.counters.take()
        elif self._worker is not None:
            data = self._worker.take_stats()
        else:
            return None
        stats = KvplaneStats(data=dict(data))
        return None if stats.is_empty() else stats

    @classmethod
    def build_kv_connector_stats(
        cls, data: dict[str, Any] | None = None
    ) -> KVConnectorStats | None:
        return KvplaneStats(data=dict(data or {}))

    def _block_hashes_of(self, req_id: str) -> list[int]:
        from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

        request = self._requests.get(req_id)
        if request is None:
            return []
        return [maybe_convert_block_hash(h) for h in request.block_hashes]

    def _require_scheduler(self) -> SchedulerSide:
        if self._scheduler is None:
            raise RuntimeError("a scheduler-side method was called on a worker connector")
        return self._scheduler

    # ================================================================ worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._require_worker().register(kv_caches)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        """Nothing to rescue: stores run after the forward pass of the step that computed
        the tokens, before vLLM can hand a preempted request's blocks to anyone else."""

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        metadata = self._get_connector_metadata()
        if not isinstance(metadata, KvplaneMetadata):
            return
        if metadata.plan.loads:
            self._require_worker().load(metadata.plan)
        if metadata.plan.async_loads:
            self._require_worker().start_loads(metadata.plan.async_loads)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Loads complete inside :meth:`start_load_kv`."""

    def save_kv_layer(
        self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any
    ) -> None:
        """Stores run once per step in :meth:`wait_for_save`, all layers at once."""

    def wait_for_save(self) -> None:
        metadata = self._get_connector_metadata()
        if isinstance(metadata, KvplaneMetadata):
            self._require_worker().save(metadata.plan)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Nothing is sent asynchronously; received: the asynchronous loads that ended."""
        landed = self._worker.take_landed() if self._worker is not None else set()
        return None, landed or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        if self._worker is None:
            return set()
        return self._worker.take_load_errors()

    def _require_worker(self) -> WorkerSide:
        if self._worker is None:
            raise RuntimeError("a worker-side method was called on the scheduler connector")
        return self._worker

    # ================================================================ both
    def shutdown(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown()
        if self._worker is not None:
            self._worker.shutdown()


class LMCacheConnectorV1(KvplaneConnector):
    """The same connector under the original's class name: a kv-transfer-config written for
    LMCache needs only ``"kv_connector_module_path": "kvplane.integrations.vllm"`` added."""
