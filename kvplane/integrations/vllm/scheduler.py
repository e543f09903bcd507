"""The connector's scheduler side (vLLM's EngineCore process).

It answers ``get_num_new_matched_tokens`` from :class:`~.held.HeldChunks`, an index of what
the worker ranks hold that their own tier events keep current: no round trip per step. When
the config has tiers that index cannot see (peers, a shared remote store), a request the
index does not fully cover is first *probed*: the workers are asked to look up (and fetch
from peers into their CPU tier) its chunks, and vLLM is told "ask again" (``None``) until
every rank answered or ``p2p_timeout_s`` passed; with no request running, the scheduling
call waits for the answer itself instead. The same probe, on the synchronous load path
(``promote_before_load``), has the ranks read a hit that only a lower tier holds into their
CPU tier while other requests step, so its load inside a step copies from memory. A chunk evicted between the answer and the
load makes the load fall short; the worker reports those blocks and vLLM recomputes them
(the connector sets ``kv_load_failure_policy`` to ``recompute``).

The process also runs internal API server index 0 (no engine: engine endpoints answer 503).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvplane.config import EngineConfig
from kvplane.engine.facts import EngineFacts
from kvplane.integrations.vllm.channel import SchedulerChannel
from kvplane.integrations.vllm.held import HeldChunks, TierChange
from kvplane.integrations.vllm.messages import endpoint
from kvplane.integrations.vllm.plan import Match, Planner, PlannerPolicy, StepPlan
from kvplane.integrations.vllm.tiers import TIER_ORDER, hit_source
from kvplane.keys import chunk_spans

__all__ = ["BlockLink", "SchedulerSide", "StepInput"]

log = logging.getLogger(__name__)

#: How long a scheduling call waits for an outstanding probe before answering "ask again"
#: while other requests run. vLLM steps again at once on "ask again"; the short wait (GIL
#: released, ended by the last answer) lets this process's channel thread and the ranks'
#: prefetch threads run instead of losing every GIL hand-off to those steps.
_PROBE_WAIT_S = 0.001
#: The same wait when no request runs, so nothing else can be held up: the call that sends
#: the probe waits for its answer. An empty step instead would wake the worker, whose main
#: thread then polls its step queue in a ``sched_yield`` loop for a second, while the engine
#: core polls for the worker's reply (docs/vllm-facts.md §i); on a 2-core machine those two
#: loops made the peer transfer they wait for 3-4x slower.
_IDLE_PROBE_WAIT_S = 0.25
_CPU_TIER = TIER_ORDER[0]


@dataclass(frozen=True)
class StepInput:
    """The parts of vLLM's ``SchedulerOutput`` the plan needs."""

    scheduled: list[tuple[str, int]]  # (req_id, tokens computed after this step)
    new_blocks: dict[str, tuple[list[int], bool]]  # req_id -> (block ids, replace)
    preempted: list[str]
    finished: list[str]


@dataclass(frozen=True)
class BlockLink:
    """The vLLM blocks one stored chunk covers (for vLLM's KV events)."""

    block_hashes: list[int]
    parent: int | None
    token_ids: list[int]


@dataclass
class _Probe:
    deadline: float
    index_tokens: int  # the chunk prefix the index held before the probe
    started: float = 0.0
    answered: bool = False
    probed_tokens: int = 0


@dataclass
class Counters:
    lookups: int = 0
    hit_requests: int = 0
    hit_tokens: int = 0
    probes: int = 0
    promotions: int = 0  # probes sent to read lower-tier hits into the CPU tier
    stores_planned: int = 0
    loads_planned: int = 0
    async_loads_planned: int = 0
    load_waits: int = 0  # lookups that waited for another request's load
    by_source: dict[str, int] = field(default_factory=dict)

    def take(self) -> dict[str, int]:
        out = {k: v for k, v in vars(self).items() if isinstance(v, int)}
        out.update({f"hit_tokens_{k}": v for k, v in self.by_source.items()})
        for name in vars(self):
            if isinstance(getattr(self, name), int):
                setattr(self, name, 0)
        self.by_source = {}
        return out


class SchedulerSide:
    """Everything the scheduler-role connector keeps; vLLM objects are turned into plain
    values by the connector class before they get here."""

    def __init__(
        self,
        config: EngineConfig,
        facts: EngineFacts,
        *,
        engine_id: str,
        dp_rank: int,
        block_size: int,
        kv_consumer_only: bool,
        publish_events: bool,
    ) -> None:
        self.config = config
        self.facts = facts
        self.block_size = block_size
        self.policy = PlannerPolicy(
            chunk_size=config.chunk_size,
            block_size=block_size,
            save_unfull_chunk=config.save_unfull_chunk,
            save_decode_cache=config.save_decode_cache,
            min_retrieve_tokens=config.min_retrieve_tokens,
            skip_save=kv_consumer_only,
            async_loads=config.enable_async_loading,
        )
        held = HeldChunks(facts.world_size, TIER_ORDER)
        self.channel = SchedulerChannel(endpoint(engine_id, dp_rank), held)
        self.planner = Planner(self.policy, held)
        self.probing = bool(config.enable_p2p or config.remote_url)
        #: the synchronous path reads lower-tier hits into the CPU tier before their load
        self.promoting = config.promote_before_load and not config.enable_async_loading
        self.publish_events = publish_events
        self.links: dict[int, BlockLink] = {}
        self.counters = Counters()
        self._probes: dict[str, _Probe] = {}
        #: chunk hashes of each asynchronous load in flight, by request
        self._loading: dict[str, frozenset[int]] = {}
        self._process: Any = None

    # --------------------------------------------------------------- lifecycle
    def start_api(self) -> None:
        """This process's part of the engine process shape: internal API index 0 (when
        enabled and listed in the config), built by the composition root."""
        from kvplane.process import EngineProcess

        process = EngineProcess(self.config, self.facts, role="scheduler")
        process.config_store.subscribe(self._on_config)
        process.start()
        self._process = process

    def _on_config(self, config: EngineConfig, changed: frozenset[str]) -> None:
        """``POST /conf`` on index 0: the planner stores and loads by the new values from
        its next call on (one reference swap; the planner reads it once per decision)."""
        self.config = config
        self.policy = dataclasses.replace(
            self.policy,
            save_unfull_chunk=config.save_unfull_chunk,
            save_decode_cache=config.save_decode_cache,
            min_retrieve_tokens=config.min_retrieve_tokens,
        )
        self.planner.policy = self.policy

    def shutdown(self) -> None:
        if self._process is not None:
            self._process.stop()
            self._process = None
        self.channel.close()

    # --------------------------------------------------------------- lookups
    def matched_tokens(self, req_id: str, tokens: Sequence[int], num_computed: int) -> int | None:
        """Tokens beyond ``num_computed`` to load now, or None while a probe is out."""
        probe = self._probes.get(req_id)
        with self.channel.lock:
            found = self.planner.match(req_id, tokens, num_computed, probed=_probed(probe))
        promote = probe is None and self._promotes(found)
        unseen = self.probing and found.chunk_tokens < _covered(tokens)  # tiers it cannot see
        if probe is None and (promote or unseen):
            now = time.monotonic()
            probe = self._probes[req_id] = _Probe(
                now + self.config.p2p_timeout_s, found.chunk_tokens, now
            )
            self.channel.request_prefetch(req_id, list(tokens))
            self.counters.probes += 1
            self.counters.promotions += int(promote)
            log.debug(
                "probe %s: %d tokens, index holds %d%s",
                req_id,
                len(tokens),
                found.chunk_tokens,
                " (promote)" if promote else "",
            )
            if len(self.planner):  # requests are running: never hold their steps for it
                return None
        if probe is not None and not probe.answered:
            wait = _PROBE_WAIT_S if len(self.planner) else _IDLE_PROBE_WAIT_S
            left = max(0.0, probe.deadline - time.monotonic())
            answers = self.channel.wait_answers(req_id, self.facts.world_size, min(wait, left))
            if answers < self.facts.world_size and time.monotonic() < probe.deadline:
                return None
            probe.answered = True
            probe.probed_tokens = self.channel.probed_tokens(req_id, self.facts.world_size)
            log.debug(
                "probe %s: %d of %d ranks answered, %d tokens held, after %.1f ms",
                req_id,
                answers,
                self.facts.world_size,
                probe.probed_tokens,
                (time.monotonic() - probe.started) * 1e3,
            )
            with self.channel.lock:
                found = self.planner.match(req_id, tokens, num_computed, probed=_probed(probe))
        if found.external and self._behind_a_load(req_id, tokens, found):
            self.counters.load_waits += 1
            return None  # its chunks land in vLLM's own cache once that load ends
        self.counters.lookups += 1
        return found.external

    def _promotes(self, found: Match) -> bool:
        """Whether the hit's load should wait for its lower-tier chunks to be read into the
        CPU tier: only while requests run (an idle engine's load stalls nobody)."""
        if not self.promoting or not found.external or not len(self.planner):
            return False
        first = found.num_computed // self.config.chunk_size
        return any(location != _CPU_TIER for location in found.locations[first:])

    @property
    def load_async(self) -> bool:
        return self.policy.async_loads

    def _behind_a_load(self, req_id: str, tokens: Sequence[int], found: Match) -> bool:
        """Whether another request's asynchronous load brings in chunks this hit would load
        (two requests sharing a prefix load it once: the second waits, then hits vLLM's
        own prefix cache)."""
        if not self._loading:
            return False
        chunk = self.config.chunk_size
        wanted = self.planner.hashes(req_id, tokens)[
            found.num_computed // chunk : -(-found.chunk_tokens // chunk)
        ]
        return any(
            other != req_id and not loading.isdisjoint(wanted)
            for other, loading in self._loading.items()
        )

    def loads_finished(self, req_ids: Iterable[str], invalid_blocks: set[int]) -> None:
        """vLLM's ``finished_recving`` (these requests' asynchronous loads ended) and
        ``invalid_block_ids`` (blocks a load left unwritten, sync or async)."""
        for req_id in req_ids:
            self._loading.pop(req_id, None)
        if invalid_blocks:
            self.planner.load_failed(invalid_blocks)

    def hit_sources(self, req_id: str, num_external: int) -> dict[str, int]:
        """Tokens of the load by where they come from: ``host``, ``disk``, ``p2p`` or
        ``external_unspecified`` (vLLM's CacheHitSource values)."""
        found = self.planner.last_loaded(req_id)
        if found is None or num_external == 0:
            return {}
        probe = self._probes.get(req_id)
        p2p_from = probe.index_tokens if probe is not None and self.config.enable_p2p else None
        return _split_sources(found, num_external, self.config.chunk_size, p2p_from)

    def allocated(
        self, req_id: str, request: Any, block_ids: Sequence[int], num_external: int
    ) -> None:
        self.planner.allocated(
            req_id,
            lambda: request.all_token_ids,
            int(request.num_prompt_tokens),
            block_ids,
            num_external,
        )
        loaded = self.planner.last_loaded(req_id) if num_external else None
        if loaded is not None and self.load_async:
            hashes = self.planner.hashes(req_id, request.all_token_ids)
            chunks = -(-loaded.chunk_tokens // self.config.chunk_size)
            self._loading[req_id] = frozenset(hashes[:chunks])
        if num_external:
            self.counters.hit_requests += 1
            self.counters.hit_tokens += num_external
            for source, n in self.hit_sources(req_id, num_external).items():
                self.counters.by_source[source] = self.counters.by_source.get(source, 0) + n

    # --------------------------------------------------------------- steps
    def plan(self, step: StepInput, block_hashes_of: Any = None) -> StepPlan:
        plan = self.planner.plan(
            step.scheduled,
            new_blocks=step.new_blocks,
            preempted=step.preempted,
            finished=step.finished,
        )
        for req_id in step.finished:
            self.forget(req_id)
        if plan.loads or plan.saves:
            log.debug("step: %d loads, %d saves", len(plan.loads), len(plan.saves))
        self.counters.loads_planned += len(plan.loads)
        self.counters.async_loads_planned += len(plan.async_loads)
        self.counters.stores_planned += len(plan.saves)
        if self.publish_events and block_hashes_of is not None:
            for save in plan.saves:
                self._link(save.token_ids, block_hashes_of(save.req_id))
        return plan

    def forget(self, req_id: str) -> None:
        self.planner.forget(req_id)
        self._probes.pop(req_id, None)
        self._loading.pop(req_id, None)
        self.channel.forget_prefetch(req_id)

    # --------------------------------------------------------------- events
    def tier_changes(self) -> list[TierChange]:
        return self.channel.take_changes()

    def links_for(self, changes: Sequence[TierChange]) -> Iterator[tuple[TierChange, BlockLink]]:
        """Each change of a chunk whose vLLM blocks are known, with those blocks."""
        for change in changes:
            link = self.links.get(change.chunk_hash)
            if link is not None:
                yield change, link
                if not change.held and self.channel.held.holds(change.chunk_hash) is None:
                    self.links.pop(change.chunk_hash, None)

    def _link(self, token_ids: list[int], block_hashes: Sequence[int]) -> None:
        per_chunk = self.config.chunk_size // self.block_size
        hashes = self.planner.hashes_of(token_ids)
        for i, chunk_hash in enumerate(hashes):
            first = i * per_chunk
            blocks = list(block_hashes[first : first + per_chunk])
            if len(blocks) < per_chunk or chunk_hash in self.links:
                continue  # a partial chunk has no whole vLLM blocks to announce
            parent = block_hashes[first - 1] if first else None
            tokens = token_ids[first * self.block_size : (first + per_chunk) * self.block_size]
            self.links[chunk_hash] = BlockLink(blocks, parent, tokens)


def _probed(probe: _Probe | None) -> int:
    return probe.probed_tokens if probe is not None and probe.answered else 0


def _covered(tokens: Sequence[int]) -> int:
    """The chunk prefix that would make the index's answer final: every chunk of the
    request, the partial last one included."""
    return len(tokens) if len(tokens) > 1 else 0


def _split_sources(
    found: Match, num_external: int, chunk_size: int, p2p_from: int | None
) -> dict[str, int]:
    start = found.num_computed
    end = start + num_external
    out: dict[str, int] = {}
    spans = chunk_spans(found.chunk_tokens, chunk_size)
    for (lo, hi), location in zip(spans, found.locations, strict=False):
        n = max(0, min(hi, end) - max(lo, start))
        if not n:
            continue
        source = "p2p" if p2p_from is not None and lo >= p2p_from else hit_source(location)
        out[source] = out.get(source, 0) + n
    rest = num_external - sum(out.values())
    if rest > 0:  # probed chunks beyond what the index knew of
        source = "p2p" if p2p_from is not None else "external_unspecified"
        out[source] = out.get(source, 0) + rest
    return out
