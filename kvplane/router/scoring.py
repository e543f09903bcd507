"""Which backend a request goes to: the expected cost of the request on each instance.
Pure: no I/O, no clock; what the index and the backends say comes in, a ranking goes out.

The cost is counted in *prompt tokens computed* (one token of prefill = 1):

* the tokens the instance must compute: the prompt minus its own hit, minus what it can
  fetch from the best other holder by P2P;
* its own hit, at its tier's cost per token (:attr:`Weights.tier_costs`: loading from the
  CPU tier is far cheaper than computing, disk dearer than CPU);
* the P2P fetch, at :attr:`Weights.p2p_cost` per token (the peer's KV crosses the
  network, then loads as a CPU hit would);
* its load: each request ahead of this one (``max(backend's running + waiting, the
  router's own in flight)``: the router's count is fresh, the backend's includes other
  clients) costs :attr:`Weights.request_cost` tokens, and a KV cache near full (preemption
  ahead) up to :attr:`Weights.kv_usage_cost` (nothing below
  :attr:`Weights.kv_usage_threshold` of the cache in use, all of it at a full cache).

The cheapest wins, so a hot prefix held by B goes to B while B is idle and spreads to A
once B's queue costs more than A's P2P fetch. Ties (within
:attr:`Weights.affinity_tolerance`) go to the request's session backend, if it has one
among them; equal costs are then ordered by candidate name, the backend's URL
(deterministic).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

__all__ = [
    "Candidate",
    "Cost",
    "Decision",
    "Load",
    "Reason",
    "Weights",
    "choose",
    "cost_of",
]


class Reason(Enum):
    """Why a backend was chosen (the ``reason`` label of the router's metrics)."""

    PREFIX = "prefix"  # it holds the longest cached prefix, and that made it cheapest
    LOAD = "load"  # another instance holds as much or more, but this one is less loaded
    AFFINITY = "affinity"  # the session's instance, among the cheapest
    FALLBACK = "fallback"  # no index answer (controller down): load alone decided
    RETRY = "retry"  # the first choice failed before any byte: the next best


@dataclass(frozen=True)
class Weights:
    """The score's weights, in prompt tokens computed (see the module docstring); the
    router's config table sets them (``kvplane/router/settings.py``)."""

    tier_costs: Mapping[str, float] = field(
        default_factory=lambda: {"LocalCPUBackend": 0.05, "LocalDiskBackend": 0.2}
    )
    other_tier_cost: float = 0.3  # a tier not named in tier_costs (remote, FS)
    p2p_cost: float = 0.15
    request_cost: float = 256.0
    kv_usage_cost: float = 512.0
    kv_usage_threshold: float = 0.8
    affinity_tolerance: float = 32.0
    p2p_enabled: bool = True  # the instances fetch from each other (enable_p2p)

    def kv_pressure(self, usage: float) -> float:
        """0 up to ``kv_usage_threshold``, rising to 1 at a full cache: KV in use costs
        nothing until the cache is nearly full (then admitting means preempting)."""
        over = min(max(usage, 0.0), 1.0) - self.kv_usage_threshold
        return max(over, 0.0) / (1.0 - self.kv_usage_threshold) if over > 0 else 0.0

    def tier_cost(self, location: str | None) -> float:
        if location is None:
            return 0.0
        return self.tier_costs.get(location, self.other_tier_cost)


class Load(NamedTuple):
    running: int = 0  # the backend's own count (its /metrics)
    waiting: int = 0
    kv_usage: float = 0.0  # 0..1
    in_flight: int = 0  # the router's requests to it that have not finished

    @property
    def ahead(self) -> int:
        return max(self.running + self.waiting, self.in_flight)


class Candidate(NamedTuple):
    """A healthy backend: its kvplane instance id (None: not known to the controller, so
    no hit), what the index says it holds of this prompt, and its load."""

    name: str
    instance_id: str | None
    hit_tokens: int = 0
    hit_location: str | None = None
    load: Load = Load()


class Cost(NamedTuple):
    total: float
    computed: int  # prompt tokens it must compute
    hit_tokens: int  # its own hit
    fetched: int  # tokens it fetches from the best other holder by P2P


class Decision(NamedTuple):
    ranking: list[str]  # candidate names, cheapest first
    reason: Reason
    costs: dict[str, Cost]

    @property
    def chosen(self) -> str:
        return self.ranking[0]


def cost_of(
    candidate: Candidate, prompt_tokens: int, best_elsewhere: int, weights: Weights
) -> Cost:
    """The expected cost of a ``prompt_tokens`` prompt on ``candidate`` when the longest hit
    on any other instance is ``best_elsewhere`` tokens."""
    hit = min(candidate.hit_tokens, prompt_tokens)
    fetched = max(0, min(best_elsewhere, prompt_tokens) - hit)
    computed = prompt_tokens - hit - fetched
    load = candidate.load
    total = (
        computed
        + hit * weights.tier_cost(candidate.hit_location)
        + fetched * weights.p2p_cost
        + load.ahead * weights.request_cost
        + weights.kv_pressure(load.kv_usage) * weights.kv_usage_cost
    )
    return Cost(total, computed, hit, fetched)


def choose(
    candidates: Sequence[Candidate],
    prompt_tokens: int,
    weights: Weights,
    *,
    holders: Mapping[str, int] | None = None,
    affinity: str | None = None,
) -> Decision:
    """Rank ``candidates`` (at least one) by :func:`cost_of`, cheapest first.

    ``holders``: every instance's hit in tokens as the index answered (instances the
    router does not route to may hold a prefix too, and serve it by P2P); None: the lookup
    failed, so no hit counts and the reason is FALLBACK. ``affinity``: the candidate name
    the request's session went to last, preferred among those within
    ``weights.affinity_tolerance`` of the cheapest. Raises ValueError without candidates."""
    if not candidates:
        raise ValueError("no candidates to choose from")
    if holders is None:
        candidates = [c._replace(hit_tokens=0, hit_location=None) for c in candidates]
    known = holders or {}
    costs: dict[str, Cost] = {}
    for c in candidates:
        elsewhere = 0
        if weights.p2p_enabled:
            elsewhere = max((n for i, n in known.items() if i != c.instance_id), default=0)
        costs[c.name] = cost_of(c, prompt_tokens, elsewhere, weights)
    ranking = sorted(costs, key=lambda n: (costs[n].total, n))
    best = ranking[0]
    reason = Reason.FALLBACK if holders is None else _reason(candidates, best)
    near = (
        affinity in costs
        and costs[affinity].total - costs[best].total <= weights.affinity_tolerance
    )
    if affinity is not None and affinity != best and near:
        ranking.remove(affinity)
        ranking.insert(0, affinity)
        reason = Reason.AFFINITY
    return Decision(ranking, reason, costs)


def _reason(candidates: Sequence[Candidate], best: str) -> Reason:
    """PREFIX when the winner holds strictly the longest hit of all candidates."""
    held = next(c.hit_tokens for c in candidates if c.name == best)
    others = (c.hit_tokens for c in candidates if c.name != best)
    return Reason.PREFIX if held > 0 and all(h < held for h in others) else Reason.LOAD
