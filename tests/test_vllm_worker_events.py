"""The connector's worker side without vLLM: a rank's tier events travel from its storage
subscription, through its pump thread and channel, into the scheduler side's index. Pure
kvplane (no vLLM import): vLLM's per-layer KV views are plain CPU tensors here."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from kvplane.config import EngineConfig
from kvplane.errors import ConfigError
from kvplane.integrations.vllm import scheduler as scheduler_module
from kvplane.integrations.vllm.channel import SchedulerChannel, WorkerChannel
from kvplane.integrations.vllm.held import HeldChunks
from kvplane.integrations.vllm.messages import IPC_PATH_MAX, endpoint
from kvplane.integrations.vllm.scheduler import SchedulerSide
from kvplane.integrations.vllm.worker import WorkerSide
from kvplane.keys import chunk_hashes
from tests.support import wait_until
from tests.vllm_support import fake_facts

BLOCK, CHUNK, BLOCKS = 4, 8, 16
CPU = "LocalCPUBackend"
DISK = "LocalDiskBackend"
BASE: dict[str, Any] = dict(chunk_size=CHUNK, max_local_cpu_size=0.01)


@pytest.fixture
def sides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[WorkerSide, Any]]:
    monkeypatch.setenv("VLLM_RPC_BASE_PATH", str(tmp_path))
    held = HeldChunks(1, [CPU])
    scheduler = SchedulerChannel(endpoint("events-test", 0), held)

    side = WorkerSide(EngineConfig(**BASE), fake_facts(block_size=BLOCK, engine_id="events-test"))
    views = {f"layer.{i}": torch.randn(BLOCKS, 2, BLOCK, 16) for i in range(2)}
    side.register(views)
    try:
        yield side, scheduler
    finally:
        side.shutdown()
        scheduler.close()


def scheduler_side(facts: Any, **config: Any) -> SchedulerSide:
    """The scheduler side of engine ``facts.engine_id`` with ``BASE`` and ``config``."""
    engine_config = EngineConfig(**BASE, **config)
    return SchedulerSide(
        engine_config,
        facts.engine_facts(engine_config),
        engine_id=facts.engine_id,
        dp_rank=0,
        block_size=BLOCK,
        kv_consumer_only=False,
        publish_events=False,
    )


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
    scheduler = scheduler_side(facts, enable_p2p=True, p2p_timeout_s=60.0)
    side = WorkerSide(EngineConfig(**BASE), facts)
    side.register({f"layer.{i}": torch.randn(BLOCKS, 2, BLOCK, 16) for i in range(2)})
    try:
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


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("probe_first", [True, False], ids=["probe-before-rank", "rank-first"])
def test_the_first_probe_reaches_a_rank_the_instant_it_starts(
    tmp_path: Path, world_size: int, probe_first: bool
) -> None:
    """200 times: a probe sent the instant a rank's channel exists (or before) is answered
    by every rank; nothing waits out a timeout (a lost probe would: the wait is 60 s)."""
    url = f"ipc://{tmp_path}/race"
    tokens = [1, 2, 3]
    for round_ in range(200):
        scheduler = SchedulerChannel(url, HeldChunks(world_size, [CPU]))
        ranks: list[WorkerChannel] = []
        try:
            if probe_first:
                scheduler.request_prefetch(f"r{round_}", tokens)
            ranks = [WorkerChannel(rank, url, len) for rank in range(world_size)]
            if not probe_first:
                scheduler.request_prefetch(f"r{round_}", tokens)
            started = time.monotonic()
            assert scheduler.wait_answers(f"r{round_}", world_size, 60.0) == world_size
            assert time.monotonic() - started < 30, "answered only near the timeout"
            assert scheduler.probed_tokens(f"r{round_}", world_size) == len(tokens)
        finally:
            for rank_channel in ranks:
                rank_channel.close()
            scheduler.close()


def test_a_late_answer_to_a_forgotten_probe_is_dropped(tmp_path: Path) -> None:
    url = f"ipc://{tmp_path}/late"
    scheduler = SchedulerChannel(url, HeldChunks(1, [CPU]))
    release = threading.Event()

    def slow(tokens: list[int]) -> int:
        release.wait(10)
        return len(tokens)

    rank = WorkerChannel(0, url, slow)
    try:
        scheduler.request_prefetch("gone", [1, 2])
        scheduler.forget_prefetch("gone")
        release.set()
        scheduler.request_prefetch("next", [1, 2, 3])
        assert scheduler.wait_answers("next", 1, 60.0) == 1
        assert scheduler.wait_answers("gone", 1, 0.01) == 0
        with scheduler.lock:
            assert set(scheduler._prefetch_done) == {"next"}
    finally:
        rank.close()
        scheduler.close()


def test_ipc_endpoints_are_short_and_a_path_that_cannot_fit_says_what_to_change(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    engine_id = "0f5c1a52-6a1e-4f1c-9d2e-8d7e2a9b4c11"
    deep = tmp_path / ("d" * 200)
    base = Path(str(deep)[: IPC_PATH_MAX - 37])  # as deep as vLLM's own base/<uuid4> allows
    monkeypatch.setenv("VLLM_RPC_BASE_PATH", str(base))
    url = endpoint(engine_id, 0)
    assert len(url.removeprefix("ipc://")) <= len(f"{base}/{engine_id}") <= IPC_PATH_MAX
    assert url != endpoint(engine_id, 1) and url != endpoint("another", 0)
    monkeypatch.setenv("VLLM_RPC_BASE_PATH", str(deep))
    with pytest.raises(ConfigError, match="VLLM_RPC_BASE_PATH"):
        endpoint(engine_id, 0)


def test_two_requests_sharing_a_prefix_load_it_once_on_the_async_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second request waits ("ask again") while the first one's async load of the same
    chunks is in flight; once vLLM reports it landed, the second is answered."""
    monkeypatch.setenv("VLLM_RPC_BASE_PATH", str(tmp_path))
    scheduler = scheduler_side(
        fake_facts(block_size=BLOCK, engine_id="async-test"), enable_async_loading=True
    )
    try:
        scheduler.planner.warm = True
        tokens = list(range(3 * CHUNK + 2))
        with scheduler.channel.lock:
            scheduler.channel.held.admit(0, CPU, chunk_hashes(tokens, CHUNK)[:3])
        assert scheduler.load_async
        first = scheduler.matched_tokens("a", tokens, 0)
        assert first == 3 * CHUNK
        scheduler.allocated("a", _Running(tokens), list(range(7)), first)
        other = [*tokens[: 2 * CHUNK], 999, 998]  # shares two of the chunks being loaded
        assert scheduler.matched_tokens("b", other, 0) is None
        assert scheduler.matched_tokens("c", list(range(500, 520)), 0) == 0  # unrelated
        assert scheduler.counters.load_waits == 1
        scheduler.loads_finished(["a"], set())
        assert scheduler.matched_tokens("b", other, 2 * CHUNK) == 0  # vLLM's own hit now
        assert scheduler.matched_tokens("b", other, 0) == 2 * CHUNK
    finally:
        scheduler.shutdown()


def test_a_busy_sync_scheduler_has_a_disk_hit_read_into_the_cpu_tier_before_its_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """promote_before_load: with a request running, a hit only the disk tier holds is
    answered "ask again" while the rank reads it into its CPU tier on the prefetch thread;
    then the hit is answered from the CPU tier, so the load inside the step copies from
    memory. With nothing running, and on the asynchronous path, the hit is answered at
    once (its load stalls nobody, or runs on the loader thread)."""
    monkeypatch.setenv("VLLM_RPC_BASE_PATH", str(tmp_path))
    disk = dict(local_disk=str(tmp_path / "disk"), max_local_disk_size=0.05, p2p_timeout_s=60.0)
    facts = fake_facts(block_size=BLOCK, engine_id="promote-test")
    scheduler = scheduler_side(facts, **disk)
    side = WorkerSide(EngineConfig(**BASE, **disk), facts)
    side.register({f"layer.{i}": torch.randn(BLOCKS, 2, BLOCK, 16) for i in range(2)})
    storage = side.process.storage
    try:
        scheduler.planner.warm = True
        tokens = list(range(3 * CHUNK + 2))
        hashes = chunk_hashes(tokens, CHUNK)  # the partial last chunk too
        hit = len(tokens) - 1  # vLLM computes at least one token
        slots = side._slots(list(range(7)), len(tokens))
        assert side.process.cache_engine.store(tokens, side.caches, slots).num_chunks == 4
        assert storage.flush(30.0)
        storage.clear([CPU])

        def locations() -> tuple[str, ...]:
            with scheduler.channel.lock:
                return scheduler.channel.held.prefix(hashes).locations

        wait_until(lambda: locations() == (DISK,) * 4, timeout=10, what="the disk admits")

        assert scheduler.matched_tokens("idle", tokens, 0) == hit
        assert scheduler.counters.promotions == 0

        scheduler.allocated("running", _Running(list(range(2000, 2000 + CHUNK))), [7, 8], 0)
        assert scheduler.matched_tokens("r", tokens, 0) is None
        assert scheduler.counters.promotions == 1
        assert scheduler.channel.wait_answers("r", 1, 60.0) == 1
        assert scheduler.matched_tokens("r", tokens, 0) == hit
        assert locations() == (CPU,) * 4
        keys = side.process.cache_engine.keys_for(tokens)
        assert [storage.locate(k) for k in keys] == [CPU] * 4
        assert scheduler.counters.promotions == 1  # one probe per request
        assert not scheduler_side(facts, **disk, enable_async_loading=True).promoting
    finally:
        side.shutdown()
        scheduler.shutdown()


def test_the_loader_and_the_promoter_run_below_normal_priority(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The async loader and the sync path's promoter yield the CPU to the serving threads
    (their nice value, read from /proc, is the worker's _LOADER_NICE); the threads that
    serve steps, and the prefetch thread that fetches from peers, stay at normal priority."""
    import os

    from kvplane.integrations.vllm import worker

    monkeypatch.setenv("VLLM_RPC_BASE_PATH", str(tmp_path))
    held = HeldChunks(1, [CPU])
    scheduler = SchedulerChannel(endpoint("nice-test", 0), held)
    config = EngineConfig(**BASE, enable_async_loading=True)
    side = WorkerSide(config, fake_facts(block_size=BLOCK, engine_id="nice-test"))
    side.register({f"layer.{i}": torch.randn(BLOCKS, 2, BLOCK, 16) for i in range(2)})
    try:

        def nice_of(name: str) -> int:
            thread = next(t for t in threading.enumerate() if t.name == name)
            stat = Path(f"/proc/self/task/{thread.native_id}/stat").read_text()
            return int(stat[stat.rindex(")") + 2 :].split()[16])  # field 19, nice

        assert wait_until(lambda: nice_of("kvplane-vllm-loader") == worker._LOADER_NICE)
        assert nice_of("kvplane-vllm-tier-events") == os.getpriority(os.PRIO_PROCESS, 0)
    finally:
        side.shutdown()
        scheduler.close()

    # the synchronous path's promoter (its thread starts with its first promotion)
    sync = WorkerSide(EngineConfig(**BASE), fake_facts(block_size=BLOCK, engine_id="nice-test"))
    sync.register({f"layer.{i}": torch.randn(BLOCKS, 2, BLOCK, 16) for i in range(2)})
    try:
        assert sync._promoter is not None
        sync._promoter.submit(lambda: None).result()
        assert nice_of("kvplane-vllm-promoter_0") == worker._LOADER_NICE
        assert nice_of("kvplane-vllm-prefetch") == os.getpriority(os.PRIO_PROCESS, 0)
    finally:
        sync.shutdown()
