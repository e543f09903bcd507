"""The connector's worker side without vLLM: a rank's tier events travel from its storage
subscription, through its pump thread and channel, into the scheduler side's index. Pure
kvplane (no vLLM import): vLLM's per-layer KV views are plain CPU tensors here."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from kvplane.config import EngineConfig
from kvplane.integrations.vllm.channel import SchedulerChannel
from kvplane.integrations.vllm.held import HeldChunks
from kvplane.integrations.vllm.messages import endpoints
from kvplane.integrations.vllm.worker import WorkerSide
from kvplane.keys import chunk_hashes
from tests.support import wait_until
from tests.vllm_support import fake_facts

BLOCK, CHUNK, BLOCKS = 4, 8, 16
CPU = "LocalCPUBackend"
BASE: dict[str, Any] = dict(chunk_size=CHUNK, max_local_cpu_size=0.01)


@pytest.fixture
def sides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[WorkerSide, Any]]:
    monkeypatch.setenv("VLLM_RPC_BASE_PATH", str(tmp_path))
    held = HeldChunks(1, [CPU])
    scheduler = SchedulerChannel(*endpoints("events-test", 0), held)

    side = WorkerSide(EngineConfig(**BASE), fake_facts(block_size=BLOCK, engine_id="events-test"))
    views = {f"layer.{i}": torch.randn(BLOCKS, 2, BLOCK, 16) for i in range(2)}
    side.register(views)
    try:
        yield side, scheduler
    finally:
        side.shutdown()
        scheduler.close()


def held_prefix(scheduler: SchedulerChannel, hashes: list[int]) -> int:
    with scheduler.lock:
        return scheduler.held.prefix(hashes).num_chunks


def test_stores_and_clears_reach_the_scheduler_index_through_the_pump(sides):
    side, scheduler = sides
    tokens = list(range(3 * CHUNK))
    hashes = chunk_hashes(tokens, CHUNK)
    slots = side._slots(list(range(6)), len(tokens))
    assert side.process.cache_engine.store(tokens, side.caches, slots).num_chunks == 3
    wait_until(lambda: held_prefix(scheduler, hashes) == 3, timeout=10, what="admits")
    assert side.process.storage.clear().num_chunks == 3
    wait_until(lambda: held_prefix(scheduler, hashes) == 0, timeout=10, what="evicts")
    events = side._events
    side.shutdown()
    assert events is not None and events.closed


def test_a_probe_waiter_wakes_when_the_ranks_prefetch_answer_lands(sides):
    """The scheduler's wait for a probe ends when the rank's answer arrives (a condition
    the channel thread signals), not at its timeout; the answer is the held prefix."""
    side, scheduler = sides
    tokens = list(range(2 * CHUNK))
    slots = side._slots(list(range(4)), len(tokens))
    assert side.process.cache_engine.store(tokens, side.caches, slots).num_chunks == 2
    assert scheduler.wait_answers("nobody-asked", 1, 0.01) == 0
    for attempt in range(40):  # a PUB/SUB subscription may join after the first requests
        scheduler.request_prefetch(f"warm-{attempt}", tokens)
        if scheduler.wait_answers(f"warm-{attempt}", 1, 0.5):
            break
    else:
        pytest.fail("the rank never answered a prefetch")
    scheduler.request_prefetch("r1", tokens)
    start = time.monotonic()
    assert scheduler.wait_answers("r1", 1, 120.0) == 1
    assert time.monotonic() - start < 60  # woken by the answer: a missed wake-up waits 120 s
    assert scheduler.probed_tokens("r1", 1) == 2 * CHUNK
