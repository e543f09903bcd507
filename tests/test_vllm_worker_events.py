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
from kvplane.integrations.vllm import scheduler as scheduler_module
from kvplane.integrations.vllm.channel import SchedulerChannel
from kvplane.integrations.vllm.held import HeldChunks
from kvplane.integrations.vllm.messages import endpoints
from kvplane.integrations.vllm.scheduler import SchedulerSide
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


class _Running:
    """What the scheduler side reads of a vLLM request it tracks."""

    def __init__(self, tokens: list[int]) -> None:
        self.all_token_ids = tokens
        self.num_prompt_tokens = len(tokens)


def test_an_idle_scheduler_waits_for_the_probe_it_sends_a_busy_one_asks_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no request running, the scheduling call that sends a probe waits for the ranks'
    answer and returns the match (no empty steps while the peer transfer runs); with one
    running, it answers "ask again" (None) at once so that request's steps go on."""
    monkeypatch.setenv("VLLM_RPC_BASE_PATH", str(tmp_path))
    # the idle wait is as long as the probe's deadline, so a slow answer cannot look like
    # an "ask again" on a busy machine: the call returns when the answer lands
    monkeypatch.setattr(scheduler_module, "_IDLE_PROBE_WAIT_S", 60.0)
    facts = fake_facts(block_size=BLOCK, engine_id="probe-test")
    config = EngineConfig(**BASE, enable_p2p=True, p2p_timeout_s=60.0)
    scheduler = SchedulerSide(
        config,
        facts.engine_facts(config),
        engine_id="probe-test",
        dp_rank=0,
        block_size=BLOCK,
        kv_consumer_only=False,
        publish_events=False,
    )
    side = WorkerSide(EngineConfig(**BASE), facts)
    side.register({f"layer.{i}": torch.randn(BLOCKS, 2, BLOCK, 16) for i in range(2)})
    try:
        for attempt in range(40):  # a PUB/SUB subscription may join after the first requests
            scheduler.channel.request_prefetch(f"warm-{attempt}", [1, 2, 3])
            if scheduler.channel.wait_answers(f"warm-{attempt}", 1, 0.5):
                break
        else:
            pytest.fail("the rank never answered a prefetch")
        unheld = list(range(1000, 1000 + 2 * CHUNK))
        assert scheduler.matched_tokens("idle", unheld, 0) == 0
        assert scheduler.counters.probes == 1

        running = list(range(2000, 2000 + CHUNK))
        scheduler.allocated("running", _Running(running), [0, 1], 0)
        other = list(range(3000, 3000 + 2 * CHUNK))
        assert scheduler.matched_tokens("busy", other, 0) is None
        assert scheduler.counters.probes == 2
        assert scheduler.channel.wait_answers("busy", 1, 60.0) == 1
        assert scheduler.matched_tokens("busy", other, 0) == 0
    finally:
        side.shutdown()
        scheduler.shutdown()
