"""The chunk index against a naive model: exact prefix lengths, locations, worker drops."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvplane.controller.index import ChunkIndex, Match
from kvplane.controller.registry import WorkerKey
from kvplane.keys import chunk_hashes

CPU, DISK = "LocalCPUBackend", "LocalDiskBackend"


def test_full_and_partial_prefix_in_tokens() -> None:
    index = ChunkIndex()
    a = WorkerKey("A", 0)
    index.add_worker(a, 4)
    tokens = list(range(10))  # chunks: [0,4) [4,8) [8,10)
    index.admit(a, CPU, chunk_hashes(tokens, 4))
    assert index.match({4: chunk_hashes(tokens, 4)}, 10) == {"A": Match(CPU, 3, 10)}
    longer = [*tokens[:8], 99, 98, 97, 96, 95]
    assert index.match({4: chunk_hashes(longer, 4)}, 13) == {"A": Match(CPU, 2, 8)}
    other = [7, *tokens[1:]]
    assert index.match({4: chunk_hashes(other, 4)}, 10) == {}


def test_a_hole_ends_the_prefix() -> None:
    index = ChunkIndex()
    a = WorkerKey("A", 0)
    index.add_worker(a, 4)
    hashes = chunk_hashes(list(range(16)), 4)
    index.admit(a, CPU, [hashes[0], hashes[2], hashes[3]])
    assert index.match({4: hashes}, 16) == {"A": Match(CPU, 1, 4)}


def test_instance_counts_a_chunk_only_when_all_ranks_hold_it() -> None:
    index = ChunkIndex()
    r0, r1 = WorkerKey("A", 0), WorkerKey("A", 1)
    index.add_worker(r0, 4)
    index.add_worker(r1, 4)
    hashes = chunk_hashes(list(range(12)), 4)
    index.admit(r0, CPU, hashes)
    index.admit(r1, CPU, hashes[:2])
    assert index.match({4: hashes}, 12)["A"].num_tokens == 8
    index.drop_worker(r1)
    assert index.match({4: hashes}, 12)["A"].num_tokens == 12


def test_location_prefers_a_tier_holding_the_whole_prefix() -> None:
    index = ChunkIndex()
    a = WorkerKey("A", 0)
    index.add_worker(a, 4)
    hashes = chunk_hashes(list(range(12)), 4)
    index.admit(a, CPU, hashes[:1])
    index.admit(a, DISK, hashes)
    assert index.match({4: hashes}, 12) == {"A": Match(DISK, 3, 12)}
    index.evict(a, DISK, hashes[1:2])
    assert index.match({4: hashes}, 12) == {"A": Match(CPU, 1, 4)}


def test_drop_worker_returns_what_it_held_and_forgets_it() -> None:
    index = ChunkIndex()
    a = WorkerKey("A", 0)
    index.add_worker(a, 4)
    index.admit(a, CPU, range(1000))
    dropped = index.drop_worker(a)
    assert dropped is not None and dropped.num_chunks == 1000
    assert index.num_chunks() == 0 and not index.has_worker(a)
    assert index.drop_worker(a) is None


# --- model-based: random admits/evicts/drops across instances, ranks and tiers -------------

WORKERS = [WorkerKey("A", 0), WorkerKey("A", 1), WorkerKey("B", 0), WorkerKey("C", 0)]
PROMPT = list(range(40))
HASHES = chunk_hashes(PROMPT, 4)  # 10 chunks

op = st.one_of(
    st.tuples(
        st.just("admit"),
        st.sampled_from(WORKERS),
        st.sampled_from([CPU, DISK]),
        st.lists(st.integers(0, 9), max_size=10),
    ),
    st.tuples(
        st.just("evict"),
        st.sampled_from(WORKERS),
        st.sampled_from([CPU, DISK]),
        st.lists(st.integers(0, 9), max_size=10),
    ),
    st.tuples(st.just("drop"), st.sampled_from(WORKERS), st.just(""), st.just([])),
)


def _model_match(
    held: dict[WorkerKey, dict[str, set[int]]], query: list[int], length: int
) -> dict[str, int]:
    out: dict[str, int] = {}
    for inst in {k.instance_id for k in held}:
        ranks = [held[k] for k in held if k.instance_id == inst]
        n = 0
        while n < len(query) and all(any(query[n] in s for s in r.values()) for r in ranks):
            n += 1
        if n:
            out[inst] = min(n * 4, length)
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(op, max_size=40), st.sampled_from([1, 3, 4, 9, 16, 23, 40]))
def test_index_matches_the_model(ops: list, length: int) -> None:
    index = ChunkIndex()
    held: dict[WorkerKey, dict[str, set[int]]] = {}
    for kind, key, loc, idxs in ops:
        if key not in held:
            index.add_worker(key, 4)
            held[key] = {}
        hs = [HASHES[i] for i in idxs]
        if kind == "admit":
            index.admit(key, loc, hs)
            held[key].setdefault(loc, set()).update(hs)
        elif kind == "evict":
            index.evict(key, loc, hs)
            held[key].setdefault(loc, set()).difference_update(hs)
        else:
            index.drop_worker(key)
            del held[key]
    query = chunk_hashes(PROMPT[:length], 4)
    got = {k: m.num_tokens for k, m in index.match({4: query}, length).items()}
    assert got == _model_match(held, query, length)
    assert index.num_chunks() == sum(len(s) for w in held.values() for s in w.values())
    for key in WORKERS:  # the audit copy: exactly what each worker holds, per tier
        listed = index.chunks(key)
        assert all(len(hs) == len(set(hs)) for hs in listed.values())
        got_sets = {loc: set(hs) for loc, hs in listed.items() if hs}
        assert got_sets == {loc: s for loc, s in held.get(key, {}).items() if s}
    for key, tiers in held.items():  # the dashboard's per-tier counts (empty tiers aside)
        counts = {loc: n for loc, n in index.tier_counts(key).items() if n}
        assert counts == {loc: len(s) for loc, s in tiers.items() if s}
    assert index.tier_counts(WorkerKey("nobody", 0)) == {}


def test_tier_counts_follow_admits_evicts_and_drops() -> None:
    index = ChunkIndex()
    a0, a1, b0 = WorkerKey("A", 0), WorkerKey("A", 1), WorkerKey("B", 0)
    for key in (a0, a1, b0):
        index.add_worker(key, 4)
    hashes = chunk_hashes(list(range(40)), 4)
    index.admit(a0, CPU, hashes[:6])
    index.admit(a0, DISK, hashes[:10])
    index.admit(a1, CPU, hashes[:3])
    index.evict(a0, CPU, hashes[4:6])
    index.evict(a1, CPU, hashes[:3])
    counts = {k: index.tier_counts(k) for k in (a0, a1, b0)}
    assert counts == {a0: {CPU: 4, DISK: 10}, a1: {CPU: 0}, b0: {}}
    assert sum(sum(c.values()) for c in counts.values()) == index.num_chunks()
    index.drop_worker(a1)
    assert index.tier_counts(a1) == {}
