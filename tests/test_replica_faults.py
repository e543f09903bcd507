"""Faults of the replicated controller with real engines (docs/ha.md): a replica killed
during an admit burst, nats-server stopped for 30 s, a 3-node JetStream cluster losing a
node. Each ends with every replica's index equal to the engines' own key lists
(``GET /cache/keys``)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from pathlib import Path
from typing import Any

import nats
import pytest

from kvplane.eventlog import STREAM
from tests.engine_support import EngineProc
from tests.nats_support import (
    NatsServer,
    Replica,
    engine_config,
    start_cluster,
    start_replica,
    wait_agree,
)
from tests.support import wait_until
from tests.test_faults_controller import Burst

pytestmark = pytest.mark.slow

CPU = "LocalCPUBackend"
NAMES = ("inst-a", "inst-b")


class Lookups:
    """Asks ``replica`` for a lookup in a loop on a thread; every answer's status kept."""

    def __init__(self, replica: Replica) -> None:
        self.codes: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(replica,), daemon=True)
        self._thread.start()

    def _run(self, replica: Replica) -> None:
        while not self._stop.wait(0.02):
            try:
                self.codes.append(replica.post("/lookup", {"tokens": list(range(64))}).status_code)
            except Exception:  # a refused connection counts as a failed lookup
                self.codes.append(0)

    def stop(self) -> list[int]:
        self._stop.set()
        self._thread.join(10)
        return self.codes


def converged(replicas: list[Replica], engines: dict[str, EngineProc]) -> bool:
    """Every replica credits each engine with exactly its own chunks."""
    for name, engine in engines.items():
        own = {loc: sorted(hs) for loc, hs in engine.chunks().items() if hs}
        for r in replicas:
            resp = r.post("/query_chunks", {"instance_id": name})
            if resp.status_code != 200:
                return False
            credited = {loc: hs for loc, hs in resp.json()["chunk_hashes"]["0"].items() if hs}
            if credited != own:
                return False
    return True


def audit_calls() -> list[tuple[str, dict[str, Any]]]:
    return [("/query_chunks", {"instance_id": n}) for n in NAMES] + [
        ("/query_worker_info", {"instance_id": n}) for n in NAMES
    ]


def stream_leader(urls: str) -> str:
    """The name of the server leading the log's raft group."""

    async def ask() -> str:
        nc = await nats.connect(urls.split(","))
        info = await nc.jetstream().stream_info(STREAM)
        await nc.close()
        assert info.cluster is not None and len(info.cluster.replicas or []) == 2, info.cluster
        return str(info.cluster.leader)

    return asyncio.run(ask())


def counter(engine: EngineProc, name: str) -> float:
    return engine.metric(f"kvplane_worker_{name}_total")


def start_engines(
    tmp: Path, stack: contextlib.ExitStack, nats_url: str, **extra: Any
) -> dict[str, EngineProc]:
    engines = {
        n: stack.enter_context(EngineProc(tmp, n, **engine_config(nats_url, **extra)))
        for n in NAMES
    }
    for e in engines.values():
        e.launch()
    for e in engines.values():
        e.wait_ready()
    return engines


def test_a_replica_killed_during_an_admit_burst(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        server = NatsServer(tmp_path, "nats").start()
        stack.callback(server.stop)
        extra = ["--snapshot-interval", "1"]
        survivor = start_replica(tmp_path, "r0", server.url, extra=extra)
        stack.callback(survivor.stop)
        doomed = start_replica(tmp_path, "r1", server.url, extra=extra)
        engines = start_engines(tmp_path, stack, server.url)
        lookups = Lookups(survivor)
        burst = Burst(engines)
        stack.callback(burst.stop)
        burst.allow(20)
        assert burst.wait_stored(10)
        doomed.kill()
        burst.allow(40)
        assert burst.wait_stored(30)
        again = start_replica(tmp_path, "r1-again", server.url, extra=extra)
        stack.callback(again.stop)
        burst.allow(50)
        burst.wait_stored(50)
        burst.stop()
        wait_until(
            lambda: converged([survivor, again], engines),
            timeout=60,
            what="the index to equal the engines",
        )
        wait_agree([survivor, again], audit_calls())
        codes = lookups.stop()
        assert codes and set(codes) == {200}, sorted(set(codes))
        for e in engines.values():  # no worker was asked to resync
            assert (counter(e, "registrations"), counter(e, "resyncs")) == (1, 0)


def test_nats_stopped_for_30_seconds(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        server = NatsServer(tmp_path, "nats").start()
        stack.callback(server.stop)
        replicas = [start_replica(tmp_path, f"r{i}", server.url) for i in range(2)]
        for r in replicas:
            stack.callback(r.stop)
        engines = start_engines(tmp_path, stack, server.url)
        small = stack.enter_context(
            EngineProc(tmp_path, "inst-c", **engine_config(server.url, controller_nats_buffer=16))
        )
        small.launch().wait_ready()
        engines["inst-c"] = small
        for i, e in enumerate(engines.values()):
            assert e.store(10_000 * i, 10_000 * i + 64) == 64
        wait_until(lambda: converged(replicas, engines), timeout=30, what="first reports applied")
        server.stop()
        outage = time.monotonic()
        wait_until(
            lambda: all(r.status()["log"]["stale"] for r in replicas),
            timeout=10,
            what="replicas to say stale",
        )
        n = 0
        while time.monotonic() - outage < 30:  # engines keep serving; reports wait
            for i, e in enumerate(engines.values()):
                start = 10_000 * i + 64 * (n + 2)
                assert e.store(start, start + 64) == 64
                assert e.retrieve(10_000 * i, 10_000 * i + 64) == 64
            for r in replicas:
                assert r.post("/lookup", {"tokens": list(range(64))}).status_code == 200
            n += 1
            time.sleep(0.5)
        assert all(r.status()["log"]["stale"] for r in replicas)
        server.start()
        wait_until(
            lambda: converged(replicas, engines), timeout=60, what="the index to equal the engines"
        )
        wait_agree(replicas, audit_calls())
        assert not any(r.status()["log"]["stale"] for r in replicas)
        # the small outbox overflowed: counted, then one resync; the others only waited
        assert counter(small, "reports_dropped") > 0 and counter(small, "resyncs") == 1
        for name in NAMES:
            assert counter(engines[name], "reports_dropped") == 0
            assert counter(engines[name], "resyncs") == 0


def test_a_three_node_cluster_loses_a_node(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        servers = start_cluster(tmp_path, 3)
        for s in servers:
            stack.callback(s.stop)
        urls = ",".join(s.url for s in servers)
        extra = ["--nats-replicas", "3"]
        replicas = [start_replica(tmp_path, f"r{i}", urls, extra=extra) for i in range(2)]
        for r in replicas:
            stack.callback(r.stop)
        engines = start_engines(tmp_path, stack, urls)
        for i, e in enumerate(engines.values()):
            assert e.store(10_000 * i, 10_000 * i + 640) == 640
        wait_until(lambda: converged(replicas, engines), timeout=30, what="first reports applied")
        lookups = Lookups(replicas[0])
        leader = stream_leader(urls)
        next(s for s in servers if s.name == leader).stop()  # the log's raft leader
        for i, e in enumerate(engines.values()):
            assert e.store(10_000 * i + 640, 10_000 * i + 1280) == 640
        wait_until(
            lambda: converged(replicas, engines), timeout=60, what="the index to equal the engines"
        )
        wait_agree(replicas, audit_calls())
        assert set(lookups.stop()) == {200}
        for e in engines.values():  # nothing acknowledged was lost: no resync was needed
            assert counter(e, "resyncs") == 0
