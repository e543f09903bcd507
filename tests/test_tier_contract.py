"""One contract, every tier: put/get/contains/remove/keys, events, eviction, concurrency,
restart where the tier persists, and failure injection (a broken tier misses, never lies)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kvplane.engine.chunk import KVChunk
from kvplane.engine.events import ChunkAdmitted, ChunkEvicted
from tests.redis_support import redis_available
from tests.support import run_threads
from tests.tier_cases import CHUNK_SHAPE, TierCase, make_chunk, make_key, same_kv, tier_case

TIERS = [
    "cpu",
    "disk",
    "fs",
    pytest.param(
        "remote", marks=pytest.mark.skipif(not redis_available(), reason="no redis-server")
    ),
    "p2p",
]


@pytest.fixture(params=TIERS)
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TierCase]:
    with tier_case(request.param, tmp_path) as c:
        yield c


def test_stored_chunk_reads_back_byte_exact(case: TierCase) -> None:
    key, chunk = make_key(1), make_chunk(1)
    assert case.seed(key, chunk)
    assert case.backend.contains(key)
    assert same_kv(case.backend.get(key), chunk)
    assert not case.backend.contains(make_key(2))
    assert case.backend.get(make_key(2)) is None


def test_a_second_put_of_a_key_leaves_one_whole_chunk(case: TierCase) -> None:
    # Keys name content, so both are the same KV in practice; a tier may keep either.
    key = make_key(1)
    case.seed(key, make_chunk(1))
    case.seed(key, make_chunk(2))
    got = case.backend.get(key)
    assert same_kv(got, make_chunk(1)) or same_kv(got, make_chunk(2))
    # the p2p tier lists nothing of its own: what it serves lives in the peer
    assert case.backend.keys() == ([key] if case.writable else [])


def test_keys_remove_and_events(case: TierCase) -> None:
    if not case.writable:
        assert not case.backend.put(make_key(1), make_chunk(1))
        assert case.backend.keys() == []
        assert not case.backend.remove(make_key(1))
        return
    keys = [make_key(i) for i in range(3)]
    for i, k in enumerate(keys):
        assert case.backend.put(k, make_chunk(i))
    assert set(case.backend.keys()) == set(keys)
    assert case.events == [ChunkAdmitted(k, case.backend.name) for k in keys]
    assert case.backend.remove(keys[1])
    assert not case.backend.contains(keys[1])
    assert case.backend.get(keys[1]) is None
    assert not case.backend.remove(keys[1])
    assert case.events[-1] == ChunkEvicted(keys[1], case.backend.name)
    assert set(case.backend.keys()) == {keys[0], keys[2]}
    assert case.backend.clear() == 2
    assert case.backend.keys() == []


def test_eviction_drops_least_recently_used(case: TierCase) -> None:
    if case.capacity_chunks is None:
        pytest.skip(f"{case.backend.name} does not evict")
    n = case.capacity_chunks
    keys = [make_key(i) for i in range(n + 2)]
    for i, k in enumerate(keys[:n]):
        assert case.backend.put(k, make_chunk(i))
    assert case.backend.get(keys[0]) is not None  # now most recently used
    for i, k in enumerate(keys[n:], start=n):
        assert case.backend.put(k, make_chunk(i))
    held = set(case.backend.keys())
    assert len(held) == n
    assert keys[0] in held and keys[1] not in held and keys[2] not in held
    evicted = {e.key for e in case.events if isinstance(e, ChunkEvicted)}
    assert evicted == {keys[1], keys[2]}
    assert case.backend.get(keys[1]) is None


def test_pinned_chunk_survives_eviction(case: TierCase) -> None:
    if case.capacity_chunks is None:
        pytest.skip(f"{case.backend.name} does not evict")
    n = case.capacity_chunks
    case.backend.put(make_key(0), make_chunk(0))
    assert case.backend.pin(make_key(0))
    for i in range(1, 2 * n):
        case.backend.put(make_key(i), make_chunk(i))
    assert same_kv(case.backend.get(make_key(0)), make_chunk(0))
    assert case.backend.unpin(make_key(0))


def test_four_threads_keep_chunks_apart(case: TierCase) -> None:
    errors: list[str] = []

    def worker(t: int) -> None:
        for j in range(10):
            i = 100 * (t + 1) + j
            key, chunk = make_key(i), make_chunk(i)
            case.seed(key, chunk)
            got = case.backend.get(key)
            # An evicting tier may already have dropped it; what comes back must be right.
            if got is not None and not same_kv(got, chunk):
                errors.append(f"thread {t}: wrong chunk for key {i}")
            if got is None and case.capacity_chunks is None:
                errors.append(f"thread {t}: lost key {i}")
            if case.writable and j % 3 == 0:
                case.backend.remove(key)

    run_threads(worker, 4, timeout=60)
    assert errors == []


def test_persistent_tier_survives_restart(case: TierCase) -> None:
    if case.reopen is None:
        pytest.skip(f"{case.backend.name} keeps nothing across a restart")
    keys = [make_key(i) for i in range(3)]
    for i, k in enumerate(keys):
        case.seed(k, make_chunk(i))
    case.backend.close()
    again = case.reopen()
    try:
        assert set(again.keys()) >= set(keys)
        for i, k in enumerate(keys):
            assert same_kv(again.get(k), make_chunk(i))
    finally:
        again.close()


def test_chunk_tokens_reads_the_count_a_clear_reports(case: TierCase) -> None:
    if not case.writable:
        assert case.backend.chunk_tokens(make_key(1)) == 0  # holds nothing itself
        return
    shape = (*CHUNK_SHAPE[:2], 5, *CHUNK_SHAPE[3:])  # a prompt's last, 5-token chunk
    partial = KVChunk.from_kv(torch.ones(shape, dtype=torch.bfloat16), 5)
    assert case.backend.put(make_key(1), make_chunk(1))
    assert case.backend.put(make_key(2), partial)
    assert case.backend.chunk_tokens(make_key(1)) == CHUNK_SHAPE[2]
    assert case.backend.chunk_tokens(make_key(2)) == 5
    assert case.backend.chunk_tokens(make_key(9)) == 0


def test_broken_tier_misses_quickly_and_never_returns_bad_kv(case: TierCase) -> None:
    if case.break_it is None:
        pytest.skip(f"{case.backend.name} is this process's memory: it fails only with it")
    key = make_key(7)
    case.seed(key, make_chunk(7))
    case.break_it()
    start = time.monotonic()
    assert case.backend.get(key) is None
    assert case.backend.get(key) is None
    assert time.monotonic() - start < 30  # an outer bound: each read ends at a deadline
