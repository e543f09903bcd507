"""The router's score and choice (pure): exact costs, and properties over random fleets."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvplane.router.scoring import Candidate, Load, Reason, Weights, choose, cost_of

W = Weights()
CPU = "LocalCPUBackend"


def test_cost_counts_compute_hit_fetch_and_load() -> None:
    c = Candidate("a", "inst-a", 300, CPU, Load(running=1, waiting=1, kv_usage=0.9, in_flight=1))
    cost = cost_of(c, 1000, 800, W)
    assert (cost.hit_tokens, cost.fetched, cost.computed) == (300, 500, 200)
    # 0.9 of the cache in use: half way from the 0.8 threshold to full
    expected = 200 + 300 * 0.05 + 500 * W.p2p_cost + 2 * W.request_cost + 0.5 * W.kv_usage_cost
    assert cost.total == pytest.approx(expected)
    assert cost_of(c._replace(load=Load(kv_usage=0.7)), 1000, 800, W).total == pytest.approx(
        200 + 300 * 0.05 + 500 * W.p2p_cost
    )


def test_a_prefix_only_b_holds_goes_to_b() -> None:
    a, b = Candidate("a", "inst-a"), Candidate("b", "inst-b", 960, CPU)
    d = choose([a, b], 1000, W, holders={"inst-b": 960})
    assert d.ranking == ["b", "a"] and d.reason is Reason.PREFIX
    assert d.costs["a"].fetched == 960  # a would fetch it by P2P


def test_a_hot_prefix_spreads_to_a_once_b_is_loaded() -> None:
    a = Candidate("a", "inst-a")
    b = Candidate("b", "inst-b", 960, CPU, Load(in_flight=1))
    d = choose([a, b], 1000, W, holders={"inst-b": 960})
    assert d.chosen == "a" and d.reason is Reason.LOAD
    assert d.costs["a"].fetched == 960 and d.costs["a"].computed == 40
    # without P2P, A would recompute the prefix: B stays cheaper despite its queue
    no_p2p = Weights(p2p_enabled=False)
    assert choose([a, b], 1000, no_p2p, holders={"inst-b": 960}).chosen == "b"


def test_no_index_answer_is_a_fallback_by_load() -> None:
    a = Candidate("a", "inst-a", 500, CPU, Load(running=2))
    b = Candidate("b", "inst-b")
    d = choose([a, b], 600, W, holders=None)
    assert d.chosen == "b" and d.reason is Reason.FALLBACK
    assert d.costs["a"].hit_tokens == 0  # hits do not count without the index


def test_affinity_breaks_near_ties_only() -> None:
    a, b = Candidate("a", "inst-a"), Candidate("b", "inst-b")
    d = choose([a, b], 100, W, holders={}, affinity="b")
    assert d.ranking == ["b", "a"] and d.reason is Reason.AFFINITY
    loaded = b._replace(load=Load(waiting=1))  # 256 dearer: beyond the tolerance
    assert choose([a, loaded], 100, W, holders={}, affinity="b").chosen == "a"


loads = st.builds(
    Load,
    st.integers(0, 8),
    st.integers(0, 8),
    st.floats(0, 1, allow_nan=False),
    st.integers(0, 8),
)


@st.composite
def fleets(draw: st.DrawFn) -> tuple[list[Candidate], int]:
    n = draw(st.integers(1, 5))
    prompt = draw(st.integers(0, 4000))
    tiers = st.sampled_from([CPU, "LocalDiskBackend", "RemoteBackend"])
    found = [
        Candidate(f"b{i}", f"inst-{i}", draw(st.integers(0, prompt)), draw(tiers), draw(loads))
        for i in range(n)
    ]
    return found, prompt


@settings(max_examples=300, deadline=None)
@given(fleets())
def test_the_cheapest_wins_and_the_ranking_is_by_cost(fleet: tuple[list[Candidate], int]) -> None:
    candidates, prompt = fleet
    holders = {c.instance_id or "": c.hit_tokens for c in candidates}
    d = choose(candidates, prompt, W, holders=holders)
    totals = [d.costs[n].total for n in d.ranking]
    assert totals == sorted(totals)
    assert sorted(d.ranking) == sorted(c.name for c in candidates)
    for name, cost in d.costs.items():
        # every prompt token is computed, hit or fetched, exactly once
        assert cost.computed + cost.hit_tokens + cost.fetched == prompt
        assert cost.computed >= 0 and cost.fetched >= 0
        # with P2P every instance reaches the longest hit, its own or fetched
        assert cost.hit_tokens + cost.fetched == max(holders.values(), default=0), name


@settings(max_examples=300, deadline=None)
@given(fleets(), st.integers(0, 4), st.integers(1, 8))
def test_more_load_never_makes_a_backend_preferred(
    fleet: tuple[list[Candidate], int], which: int, more: int
) -> None:
    candidates, prompt = fleet
    which %= len(candidates)
    holders = {c.instance_id or "": c.hit_tokens for c in candidates}
    before = choose(candidates, prompt, W, holders=holders)
    c = candidates[which]
    heavier = c._replace(load=c.load._replace(waiting=c.load.waiting + more))
    after = choose([heavier if x is c else x for x in candidates], prompt, W, holders=holders)
    assert after.ranking.index(c.name) >= before.ranking.index(c.name)


@settings(max_examples=200, deadline=None)
@given(fleets())
def test_prefix_is_the_reason_only_for_the_strictly_longest_hit(
    fleet: tuple[list[Candidate], int],
) -> None:
    candidates, prompt = fleet
    holders = {c.instance_id or "": c.hit_tokens for c in candidates}
    d = choose(candidates, prompt, W, holders=holders)
    held = {c.name: c.hit_tokens for c in candidates}
    if d.reason is Reason.PREFIX:
        assert held[d.chosen] > 0
        assert all(h < held[d.chosen] for n, h in held.items() if n != d.chosen)
    else:
        assert d.reason is Reason.LOAD
