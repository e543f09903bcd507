"""The controller killed with SIGKILL during an admit burst from two engines, and restarted
on the same ports: its index (``POST /query_chunks``) converges to what the engines really
hold (each engine's own key list, ``GET /cache/keys``) within two heartbeat intervals of its
restart, through one re-registration and resync per worker, and its lookups agree.

The heartbeat interval is 2 s, and each heartbeat waits as long for its reply, so a worker's
heartbeat is always pending while the controller is down; the restarted controller answers
the next one "unknown worker", and the worker re-registers after a jitter of at most half an
interval and resends its key set. That is about one interval; two leave room for a busy
machine.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvplane.keys import chunk_hashes
from tests.controller_client import controller_args, wait_controller_up
from tests.engine_support import SMALL_KV, EngineProc
from tests.support import free_ports, kvplane_process, wait_until

pytestmark = pytest.mark.slow

HEARTBEAT = 2.0
CHUNK = 16
PROMPT = 4 * CHUNK
CPU = "LocalCPUBackend"


class Burst:
    """Stores distinct prompts into each engine as fast as it can, up to a quota per engine
    that the test raises; the CPU tiers are small, so admits evict older chunks too."""

    def __init__(self, engines: dict[str, EngineProc]) -> None:
        self.engines = engines
        self.quota = 0
        self.stored: dict[str, list[int]] = {name: [] for name in engines}
        self.errors: list[BaseException] = []
        self._cond = threading.Condition()
        self._stop = False
        self._threads = [
            threading.Thread(target=self._run, args=(name, base), daemon=True)
            for name, base in zip(engines, range(1_000_000, 10**8, 1_000_000), strict=False)
        ]
        for t in self._threads:
            t.start()

    def _run(self, name: str, base: int) -> None:
        engine, done = self.engines[name], self.stored[name]
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._stop or len(done) < self.quota)
                    if self._stop:
                        return
                start = base + len(done) * PROMPT
                assert engine.store(start, start + PROMPT) == PROMPT
                with self._cond:
                    done.append(start)
                    self._cond.notify_all()
        except BaseException as exc:  # reported by stop()
            self.errors.append(exc)

    def allow(self, quota: int) -> None:
        with self._cond:
            self.quota = quota
            self._cond.notify_all()

    def wait_stored(self, count: int, timeout: float = 60) -> bool:
        with self._cond:
            return self._cond.wait_for(
                lambda: self.errors or all(len(s) >= count for s in self.stored.values()),
                timeout=timeout,
            )

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(60)
        assert not self.errors, self.errors


def expected_layout(start: int, held: dict[str, set[int]]) -> dict[str, list[Any]]:
    """What ``/lookup`` of the prompt at ``start`` must say, given each engine's chunks."""
    hashes = chunk_hashes(list(range(start, start + PROMPT)), CHUNK)
    layout = {}
    for name, chunks in held.items():
        k = 0
        while k < len(hashes) and hashes[k] in chunks:
            k += 1
        if k:
            layout[name] = [CPU, k * CHUNK]
    return layout


def engine_for(tmp_path: Path, name: str, pull: int, reply: int) -> EngineProc:
    return EngineProc(
        tmp_path, name, chunk_size=CHUNK, **SMALL_KV, max_local_cpu_size=0.0005,
        enable_controller=True, controller_pull_url=f"127.0.0.1:{pull}",
        controller_reply_url=f"127.0.0.1:{reply}", lmcache_worker_heartbeat_time=HEARTBEAT,
        controller_timeout_s=HEARTBEAT,
    )  # fmt: skip


def test_controller_killed_during_an_admit_burst_converges_after_restart(tmp_path: Path) -> None:
    http, pull, reply = free_ports(3)
    url = f"http://127.0.0.1:{http}"
    args = controller_args(http, pull, reply, worker_timeout=60)
    engines = {name: engine_for(tmp_path, name, pull, reply) for name in ("inst-a", "inst-b")}
    client = httpx.Client(base_url=url, timeout=30)

    def post(path: str, body: Any) -> Any:
        resp = client.post(path, json=body)
        assert resp.status_code == 200, f"{path}: {resp.status_code} {resp.text}"
        return resp.json()

    def registration_times() -> dict[str, float]:
        times = {}
        for name in engines:
            resp = client.post("/query_worker_info", json={"instance_id": name})
            if resp.status_code == 200:
                times[name] = resp.json()["worker_infos"][0]["registration_time"]
        return times

    def worker_counter(engine: EngineProc, name: str) -> float:
        return engine.metric(f"kvplane_worker_{name}_total")

    with contextlib.ExitStack() as stack:
        first = stack.enter_context(kvplane_process(args, log_path=tmp_path / "c1.log"))
        for engine in engines.values():
            stack.enter_context(engine).launch()
        for engine in engines.values():
            engine.wait_ready()
        wait_controller_up(url)
        wait_until(lambda: len(registration_times()) == 2, timeout=30, what="both registered")
        assert all(worker_counter(e, "registrations") == 1 for e in engines.values())

        burst = Burst(engines)
        stack.callback(burst.stop)
        burst.allow(20)
        assert burst.wait_stored(10)
        first.kill()  # SIGKILL in the middle of the burst
        first.wait(10)
        killed = time.time()
        assert burst.wait_stored(20)
        burst.allow(40)  # admits and evictions while no controller listens
        assert burst.wait_stored(30)
        burst.allow(60)  # and while the new one starts
        stack.enter_context(kvplane_process(args, log_path=tmp_path / "c2.log"))
        wait_controller_up(url)
        up, up_wall = time.monotonic(), time.time()
        burst.allow(70)  # admits while the workers rejoin, for up to a second
        burst.wait_stored(70, timeout=1.0)
        burst.stop()

        held = {name: set(e.chunks()[CPU]) for name, e in engines.items()}

        def converged() -> bool:
            """The index credits each worker exactly its engine's chunks."""
            for name, chunks in held.items():
                resp = client.post("/query_chunks", json={"instance_id": name})
                if resp.status_code == 404:  # not registered again yet
                    return False
                assert resp.status_code == 200, resp.text
                credited = resp.json()["chunk_hashes"]["0"]
                if {loc: hs for loc, hs in credited.items() if hs} != {CPU: sorted(chunks)}:
                    return False
            return True

        wait_until(converged, timeout=60, interval=0.02, what="the index to equal the engines")
        took = time.monotonic() - up
        assert took < 2 * HEARTBEAT, f"converged {took:.2f}s after the restart"

        # and so do lookups, prompt by prompt (evicted ones included)
        for name, starts in burst.stored.items():
            assert len(held[name]) < 4 * len(starts)  # its CPU tier evicted
            for start in starts:
                tokens = list(range(start, start + PROMPT))
                got = post("/lookup", {"tokens": tokens})["layout_info"]
                assert got == expected_layout(start, held), (name, start)

        # the mechanism: one re-registration and resync per worker, after the kill; the
        # restarted controller's own clock dates it within two intervals of its start
        for name, at in registration_times().items():
            assert killed < at < up_wall + 2 * HEARTBEAT, (name, at - up_wall)
        for engine in engines.values():
            assert worker_counter(engine, "registrations") == 2
            assert worker_counter(engine, "resyncs") == 1
        for engine in engines.values():  # while the controller runs: deregistrations answered
            engine.terminate()
        for engine in engines.values():
            engine.stop()
