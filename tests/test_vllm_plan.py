"""The vLLM connector's pure scheduler logic: the held-chunks index and the planner
(no vLLM, no sockets)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvplane.integrations.vllm.held import HeldChunks, TierChange
from kvplane.integrations.vllm.plan import LoadSpec, Planner, PlannerPolicy
from kvplane.keys import chunk_hashes

CPU, DISK = "LocalCPUBackend", "LocalDiskBackend"
CHUNK, BLOCK = 8, 4


def planner(world_size: int = 1, *, warm: bool = True, **policy: object) -> Planner:
    held = HeldChunks(world_size, (CPU, DISK))
    p = Planner(PlannerPolicy(chunk_size=CHUNK, block_size=BLOCK, **policy), held)  # type: ignore[arg-type]
    p.warm = warm
    return p


def hold(p: Planner, tokens: list[int], n_chunks: int, rank: int = 0, tier: str = CPU) -> None:
    p.held.admit(rank, tier, chunk_hashes(tokens, CHUNK)[:n_chunks])


def test_a_chunk_counts_once_every_rank_holds_it_and_transitions_are_reported() -> None:
    held = HeldChunks(2, (CPU, DISK))
    assert held.admit(0, CPU, [1, 2]) == []
    assert held.admit(1, CPU, [1]) == [TierChange(1, CPU, True)]
    assert held.prefix([1, 2]).num_chunks == 1
    assert held.admit(1, DISK, [2]) == []  # rank 1's part of chunk 2 is on disk
    assert held.prefix([1, 2]) == (2, (CPU, DISK))
    assert held.evict(0, CPU, [1]) == [TierChange(1, CPU, False)]
    assert held.prefix([1, 2]).num_chunks == 0
    assert held.drop_rank(0) == []  # rank 0 held chunk 2 alone: no tier was whole
    assert held.holds(2) is None and len(held) == 2  # rank 1 still reports both


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.booleans(), st.integers(0, 2), st.sampled_from([CPU, DISK]), st.integers(0, 5)
        ),
        max_size=60,
    )
)
def test_index_agrees_with_a_model_of_sets(ops: list[tuple[bool, int, str, int]]) -> None:
    held = HeldChunks(3, (CPU, DISK))
    model: dict[tuple[int, str], set[int]] = {}
    for admit, rank, tier, h in ops:
        (held.admit if admit else held.evict)(rank, tier, [h])
        ranks = model.setdefault((h, tier), set())
        (ranks.add if admit else ranks.discard)(rank)
    for h in range(6):
        union = set().union(*(model.get((h, t), set()) for t in (CPU, DISK)))
        assert (held.holds(h) is not None) == (union == {0, 1, 2})
        if model.get((h, CPU)) == {0, 1, 2}:
            assert held.holds(h) == CPU


def test_match_is_chunk_aligned_beyond_the_local_hit_and_leaves_a_token() -> None:
    p = planner()
    tokens = list(range(30))  # chunks [0,8) [8,16) [16,24) [24,30)
    hold(p, tokens, 2)
    assert p.match("r", tokens, 0).external == 16
    assert p.match("r", tokens, 4).external == 12  # vLLM holds the first block itself
    assert p.match("r", tokens, 16).external == 0
    assert p.match("r", tokens, 0) == p.match("r", tokens, 0)  # idempotent
    hold(p, tokens, 4)
    whole = p.match("r", tokens, 0)
    assert whole.external == 29 and whole.chunk_tokens == 30  # the last token is computed


def test_min_retrieve_tokens_and_probed_prefixes() -> None:
    p = planner(min_retrieve_tokens=20)
    tokens = list(range(40))
    hold(p, tokens, 2)
    assert p.match("r", tokens, 0).external == 0
    assert p.match("r", tokens, 0, probed=24).external == 24


def test_allocation_plans_one_load_that_skips_vllms_blocks() -> None:
    p = planner()
    tokens = list(range(30))
    hold(p, tokens, 2)
    p.match("r", tokens, 4)
    p.allocated("r", lambda: tokens, 30, [10, 11, 12, 13, 14, 15, 16, 17], 12)
    plan = p.plan([("r", 30)])
    assert plan.loads == [LoadSpec("r", tokens[:16], [10, 11, 12, 13], 4)]
    assert [(s.token_ids, s.block_ids) for s in plan.saves] == [
        (tokens, [10, 11, 12, 13, 14, 15, 16, 17])
    ]
    assert p.plan([("r", 31)]).loads == []  # a load happens once


def test_an_async_load_starts_in_the_step_it_was_allocated_and_runs_once() -> None:
    """vLLM's async path: the request waits (it is not scheduled) while its load runs;
    when it lands vLLM admits it again (``num_external=0``) and schedules it: no second
    load, no store of what was loaded, and the step that computed its rest is a step."""
    p = planner(async_loads=True)
    tokens = list(range(30))
    hold(p, tokens, 2)
    p.match("r", tokens, 4)
    p.allocated("r", lambda: tokens, 30, [10, 11, 12, 13, 14, 15, 16, 17], 12)
    waiting = p.plan([])
    assert waiting.loads == [] and waiting.idle
    assert waiting.async_loads == [LoadSpec("r", tokens[:16], [10, 11, 12, 13], 4)]
    assert p.plan([]).async_loads == []  # started once
    p.allocated("r", lambda: tokens, 30, [10, 11, 12, 13, 14, 15, 16, 17], 0)
    running = p.plan([("r", 30)])
    assert running.loads == [] and running.async_loads == [] and not running.idle
    assert [s.token_ids for s in running.saves] == [tokens]  # past the loaded chunks


def test_chunks_of_a_failed_load_are_stored_again_once_recomputed() -> None:
    p = planner()
    tokens = list(range(30))
    hold(p, tokens, 3)
    p.match("r", tokens, 0)
    p.allocated("r", lambda: tokens, 30, [1, 2, 3, 4, 5, 6, 7, 8], 24)
    assert p.plan([("r", 30)]).saves[0].token_ids == tokens  # only the partial chunk left
    p.load_failed({4})  # the second chunk's second block: recomputed from there
    assert [s.token_ids for s in p.plan([("r", 30)]).saves] == [tokens]
    p.load_failed({99})  # another request's block: nothing changes
    assert p.plan([("r", 30)]).saves == []


def test_sync_loads_never_go_to_the_async_list() -> None:
    p = planner()
    tokens = list(range(30))
    hold(p, tokens, 2)
    p.match("r", tokens, 0)
    p.allocated("r", lambda: tokens, 30, [1, 2, 3, 4, 5, 6, 7, 8], 16)
    plan = p.plan([("r", 30)])
    assert len(plan.loads) == 1 and plan.async_loads == []


def test_no_load_when_vllm_allocated_no_external_tokens() -> None:
    p = planner()
    tokens = list(range(16))
    hold(p, tokens, 2)
    p.match("r", tokens, 0)
    p.allocated("r", lambda: tokens, 16, [1, 2, 3, 4], 0)
    assert p.plan([("r", 16)]).loads == []


def test_stores_follow_chunk_boundaries_during_chunked_prefill() -> None:
    p = planner(save_unfull_chunk=False)
    tokens = list(range(21))
    p.match("r", tokens, 0)
    p.allocated("r", lambda: tokens, 21, [0, 1], 0)
    assert [s.token_ids for s in p.plan([("r", 6)]).saves] == []
    assert [len(s.token_ids) for s in p.plan([("r", 8)]).saves] == [8]
    p.plan([], new_blocks={"r": ([2, 3, 4, 5], False)})
    assert [s.block_ids for s in p.plan([("r", 21)]).saves] == [[0, 1, 2, 3]]
    assert p.plan([("r", 22)]).saves == []  # decode: not saved by default


def test_decode_tokens_are_stored_in_whole_chunks_with_save_decode_cache() -> None:
    p = planner(save_decode_cache=True)
    tokens = list(range(30))
    p.match("r", tokens, 0)
    p.allocated("r", lambda: tokens, 10, [0, 1, 2, 3, 4, 5, 6, 7], 0)
    assert [len(s.token_ids) for s in p.plan([("r", 10)]).saves] == [10]  # unfull prompt
    assert p.plan([("r", 15)]).saves == []  # decode, short of the next chunk boundary
    assert [len(s.token_ids) for s in p.plan([("r", 16)]).saves] == [16]
    assert [len(s.token_ids) for s in p.plan([("r", 29)]).saves] == [24]


def test_preemption_drops_blocks_until_vllm_allocates_again() -> None:
    p = planner()
    tokens = list(range(16))
    p.match("r", tokens, 0)
    p.allocated("r", lambda: tokens, 16, [5, 6], 0)
    plan = p.plan([], preempted=["r"])
    assert plan.preempted == ["r"]
    assert p.plan([("r", 16)]).saves == []  # no blocks known: nothing stored from stale ids
    p.allocated("r", lambda: tokens, 16, [7, 8, 9, 1], 0)
    assert [s.block_ids for s in p.plan([("r", 16)]).saves] == [[7, 8, 9, 1]]
    p.plan([], finished=["r"])
    assert len(p) == 0


def test_chunk_size_must_be_whole_blocks() -> None:
    with pytest.raises(ValueError, match="chunk_size 200 is not whole blocks of 128"):
        PlannerPolicy(chunk_size=200, block_size=128)


def test_until_a_step_computed_two_tokens_a_full_hit_leaves_a_block() -> None:
    p = planner(warm=False)
    tokens = list(range(17))  # chunks [0,8) [8,16) [16,17)
    hold(p, tokens, 3)
    assert p.match("r", tokens, 0).external == 12  # not 16: two tokens or more computed
    p.allocated("r", lambda: tokens, 17, [1, 2, 3, 4, 5], 12)
    p.plan([("r", 17)])  # the step computes 5 tokens
    assert p.warm
    assert p.match("s", tokens, 0).external == 16
