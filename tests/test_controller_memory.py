"""The memory a dropped worker's chunks took is returned, by mechanism: tracemalloc's count
of live Python allocations, read on a real :class:`ControllerService` in this process
(real sockets, real frames from protocol-level workers), before the admits, after them,
and after the workers were deregistered or reaped.

The service's clock is the test's, so the reaper drops the workers exactly when the test
moves it past the timeout, never while the admits are still arriving.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Iterator

import numpy as np
import pytest

from kvplane.controller.registry import WorkerKey
from kvplane.controller.service import ControllerService
from kvplane.controller.settings import ControllerConfig
from kvplane.protocol import HeartbeatStatus
from tests.controller_client import ProtoWorker
from tests.support import free_ports, wait_until

WORKER_TIMEOUT = 30.0
TIERS = {"LocalCPUBackend": 3, "LocalDiskBackend": 2}  # tier -> report batches per worker
BATCH = 4096  # hashes per report, as the real worker batches them
RANKS = [("m0", 0), ("m0", 1), ("m1", 0), ("m2", 0)]  # one instance of two ranks, two of one
PER_WORKER = BATCH * sum(TIERS.values())


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


class Controller:
    """The service under test, its clock, and reads of its state under the cluster lock."""

    def __init__(self) -> None:
        pull, reply = free_ports(2)
        self.clock = Clock()
        settings = ControllerConfig(
            host="127.0.0.1",
            pull_port=pull,
            reply_port=reply,
            worker_timeout=WORKER_TIMEOUT,
            health_check_interval=0.05,
        )
        self.service = ControllerService(settings, clock=self.clock)
        self.pull, self.reply = pull, reply

    def state(self) -> tuple[int, int, list[str]]:
        """(index entries, registered workers, instances)."""
        cluster = self.service.cluster
        with cluster.lock:
            core = cluster.core
            return core.index.num_chunks(), len(core.registry), core.registry.instances()

    def holds_nothing_of(self, keys: list[WorkerKey]) -> bool:
        cluster = self.service.cluster
        with cluster.lock:
            core = cluster.core
            return (
                not any(
                    core.index.has_worker(k) or core.index.chunks(k) or core.registry.get(k)
                    for k in keys
                )
                and core.index.chunk_sizes() == frozenset()
            )

    def settle(self) -> None:
        """Return once the ingest thread has finished the round that dropped the workers:
        a request it answers later (a heartbeat from a stranger) proves that round over."""
        probe = ProtoWorker(self.pull, self.reply, "probe")
        try:
            assert probe.heartbeat() is HeartbeatStatus.UNKNOWN_WORKER
        finally:
            probe.close()


@pytest.fixture
def controller() -> Iterator[Controller]:
    tracemalloc.start()
    c = Controller()
    c.service.start()
    try:
        yield c
    finally:
        c.service.stop()
        tracemalloc.stop()


def traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def fill(c: Controller, workers: list[ProtoWorker], hashes: list[list[np.ndarray]]) -> None:
    for w in workers:
        assert w.register().ok
    for w, batches in zip(workers, hashes, strict=True):
        tiers = [t for t, n in TIERS.items() for _ in range(n)]
        for location, batch in zip(tiers, batches, strict=True):
            w.report(batch, location=location)
    expected = len(workers) * PER_WORKER
    wait_until(lambda: c.state()[0] == expected, timeout=120, what=f"{expected} admits applied")


def warm_up(c: Controller) -> None:
    """One small register/admit/deregister round first, so what the service builds once
    (decoders, interned tier names, log handlers) is in the baseline, not in the residue."""
    w = ProtoWorker(c.pull, c.reply, "warm")
    try:
        assert w.register().ok
        for location in TIERS:
            w.report(np.arange(1, 65, dtype=np.uint64), location=location)
        wait_until(lambda: c.state()[0] == 128, timeout=60, what="warm-up admits")
        assert w.deregister()
        c.settle()
    finally:
        w.close()


@pytest.mark.parametrize("how", ["deregistered", "reaped"])
def test_memory_a_dropped_worker_held_is_returned(controller: Controller, how: str) -> None:
    c = controller
    warm_up(c)
    rng = np.random.default_rng(7)
    n_batches = sum(TIERS.values())
    hashes = [
        [rng.integers(1, 2**64 - 1, BATCH, dtype=np.uint64) for _ in range(n_batches)]
        for _ in RANKS
    ]  # made (and kept) before the baseline: only the controller's copies are measured
    workers = [ProtoWorker(c.pull, c.reply, i, w) for i, w in RANKS]
    keys = [WorkerKey(i, w) for i, w in RANKS]
    try:
        before = traced()
        fill(c, workers, hashes)
        loaded = traced()
        if how == "deregistered":
            for w in workers:
                assert w.deregister()
        else:
            c.clock.now += WORKER_TIMEOUT + 1  # every worker falls silent at once
            wait_until(lambda: c.state()[1] == 0, timeout=60, what="the reaper's drop")
        c.settle()
        after = traced()
    finally:
        for w in workers:
            w.close()
    counters = c.service.cluster.core.counters
    assert counters.chunks_dropped == len(RANKS) * PER_WORKER + 128
    assert (counters.reaped_workers, counters.deregistrations) == (
        (len(RANKS), 1) if how == "reaped" else (0, len(RANKS) + 1)
    )
    assert c.state() == (0, 0, [])
    assert c.holds_nothing_of(keys)
    entries = len(RANKS) * PER_WORKER
    grown = loaded - before
    # each entry is a Python int (32+ bytes) and a dict slot: the admits did allocate
    assert grown > 40 * entries, f"{grown} bytes for {entries} entries"
    assert after - before < grown // 10, f"{after - before} of {grown} bytes still held"
