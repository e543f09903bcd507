"""Controller + two ``kvplane engine`` processes on loopback: the issue's cluster flows.

Each engine runs its worker (enable_controller), its p2p chunk server and its internal API
server (on a Unix socket), and prompts are stored through that API
(``POST /cache/store?tokens_mock=start,end``), as an operator would.
"""

from __future__ import annotations

import contextlib
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.controller_client import controller_args, wait_controller_up
from tests.support import (
    free_ports,
    kvplane_process,
    stop_process,
    wait_for_unix_socket,
    wait_until,
)

pytestmark = pytest.mark.slow

HEARTBEAT = 0.3
WORKER_TIMEOUT = 2.0
CHUNK = 16
API_PORT = 7000  # internal_api_server_port_start 6999 + index 1 (worker 0)


class Engine(NamedTuple):
    instance_id: str
    api: httpx.Client
    proc: Any

    def store(self, start: int, end: int, slots: str | None = None) -> dict[str, Any]:
        params = {"tokens_mock": f"{start},{end}"}
        if slots:
            params["slot_mapping"] = slots
        resp = self.api.post("/cache/store", params=params)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def checksums(self, slots: str) -> list[str]:
        resp = self.api.get(
            "/cache/kvcache/check", params={"slot_mapping": slots, "chunk_size": CHUNK}
        )
        assert resp.status_code == 200, resp.text
        return resp.json()["chunk_checksums"]


class Cluster(NamedTuple):
    url: str
    ports: dict[str, int]
    tmp: Path

    def post(self, path: str, body: Any) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=15)

    def lookup(self, start: int, end: int) -> dict[str, list[Any]]:
        resp = self.post("/lookup", {"tokens": list(range(start, end))})
        assert resp.status_code == 200, resp.text
        return resp.json()["layout_info"]

    def controller(self, log_name: str) -> contextlib.AbstractContextManager[Any]:
        args = controller_args(
            self.ports["http"], self.ports["pull"], self.ports["reply"],
            worker_timeout=WORKER_TIMEOUT, health_check_interval=0.1, command_timeout=3,
        )  # fmt: skip
        return kvplane_process(args, log_path=self.tmp / log_name)

    def wait_up(self) -> None:
        wait_controller_up(self.url)

    @contextlib.contextmanager
    def engine(self, instance_id: str) -> Iterator[Engine]:
        with self.engines(instance_id) as (engine,):
            yield engine

    @contextlib.contextmanager
    def engines(self, *instance_ids: str) -> Iterator[list[Engine]]:
        """``kvplane engine`` processes for ``instance_ids``, each started before any is
        waited for (their start-ups overlap), yielded once each is registered."""
        with contextlib.ExitStack() as stack:
            started = [(i, *self._start_engine(stack, i)) for i in instance_ids]
            engines = []
            for instance_id, sock, proc in started:
                wait_for_unix_socket(sock, what=f"{instance_id} API")
                api = stack.enter_context(
                    httpx.Client(
                        transport=httpx.HTTPTransport(uds=sock),
                        base_url="http://engine",
                        timeout=15,
                    )
                )
                wait_until(
                    lambda i=instance_id: self.post("/query_worker_info", {"instance_id": i}).status_code == 200,
                    timeout=30, what=f"{instance_id} registered",
                )  # fmt: skip
                engines.append(Engine(instance_id, api, proc))
            yield engines

    def _start_engine(self, stack: contextlib.ExitStack, instance_id: str) -> tuple[str, Any]:
        """Start an engine process (stopped when ``stack`` closes); its API socket path and
        the process."""
        worker_port, p2p_port = free_ports(2)
        prefix = self.tmp / f"api-{instance_id}"
        cfg = {
            "chunk_size": CHUNK, "kv_num_layers": 2, "kv_num_heads": 2, "kv_head_size": 16,
            "kv_block_size": 16, "kv_num_blocks": 128, "max_local_cpu_size": 0.01,
            "enable_controller": True, "lmcache_instance_id": instance_id,
            "controller_pull_url": f"127.0.0.1:{self.ports['pull']}",
            "controller_reply_url": f"127.0.0.1:{self.ports['reply']}",
            "lmcache_worker_ports": [worker_port], "lmcache_worker_heartbeat_time": HEARTBEAT,
            "controller_timeout_s": 1.0, "enable_p2p": True, "p2p_host": "127.0.0.1",
            "p2p_init_ports": [p2p_port], "internal_api_server_enabled": True,
            "internal_api_server_socket_path_prefix": str(prefix),
        }  # fmt: skip
        path = self.tmp / f"{instance_id}.yaml"
        path.write_text(json.dumps(cfg))  # JSON is YAML
        log = self.tmp / f"{instance_id}.log"
        proc = stack.enter_context(kvplane_process(["engine", "--config", str(path)], log_path=log))
        return f"{prefix}_{API_PORT}", proc


def new_cluster(tmp: Path) -> Cluster:
    http, pull, reply = free_ports(3)
    return Cluster(f"http://127.0.0.1:{http}", {"http": http, "pull": pull, "reply": reply}, tmp)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Engine, Engine]]:
    c = new_cluster(tmp_path_factory.mktemp("cluster"))
    with c.controller("controller.log"):
        c.wait_up()
        with c.engines("inst-a", "inst-b") as (a, b):
            yield c, a, b


def test_store_lookup_full_partial_and_clear(cluster: tuple[Cluster, Engine, Engine]) -> None:
    c, a, _ = cluster
    n = 5 * CHUNK + 3
    assert a.store(0, n)["num_stored_tokens"] == n
    wait_until(lambda: c.lookup(0, n), timeout=30, what="admits")
    assert c.lookup(0, n) == {"inst-a": ["LocalCPUBackend", n]}
    # a longer prompt sharing 5 full chunks: the partial last chunk differs
    assert c.lookup(0, n + 40) == {"inst-a": ["LocalCPUBackend", 5 * CHUNK]}
    assert c.lookup(1, n) == {}
    resp = c.post("/clear", {"instance_id": "inst-a", "location": "LocalCPUBackend"})
    assert resp.status_code == 200, resp.text
    wait_until(lambda: c.lookup(0, n) == {}, timeout=30, what="evicts")


def test_query_worker_info_both_workers_heartbeats_advance(
    cluster: tuple[Cluster, Engine, Engine],
) -> None:
    c, _, _ = cluster
    first = {i: c.post("/query_worker_info", {"instance_id": i, "worker_ids": [0]}).json()
             for i in ("inst-a", "inst-b")}  # fmt: skip
    for instance_id, body in first.items():
        info = body["worker_infos"][0]
        assert info["instance_id"] == instance_id and info["worker_id"] == 0
        assert info["ip"] == "127.0.0.1" and info["port"] > 0
        assert info["peer_init_url"].startswith("127.0.0.1:")

        def advanced(instance_id: str = instance_id, then: float = info["last_heartbeat_time"]):
            later = c.post("/query_worker_info", {"instance_id": instance_id}).json()
            return later["worker_infos"][0]["last_heartbeat_time"] > then

        wait_until(advanced, timeout=30, what=f"a later heartbeat from {instance_id}")
    assert c.post("/query_instance", {"ip": "127.0.0.1"}).json()["res"] in ("inst-a", "inst-b")
    codes = c.post("/health", {"instance_id": "inst-b"}).json()["error_codes"]
    assert codes == {"0": 0}


def test_move_carries_exact_bytes_from_a_to_b(cluster: tuple[Cluster, Engine, Engine]) -> None:
    c, a, b = cluster
    start, end = 5000, 5000 + 3 * CHUNK
    a.store(start, end, slots=f"[0,{3 * CHUNK - 1}]")
    wait_until(lambda: "inst-a" in c.lookup(start, end), timeout=30)
    resp = c.post("/move", {
        "old_position": ["inst-a", "LocalCPUBackend"],
        "new_position": ["inst-b", "LocalCPUBackend"],
        "tokens": list(range(start, end)),
    })  # fmt: skip
    assert resp.status_code == 200, resp.text
    assert resp.json()["num_tokens"] == 3 * CHUNK
    wait_until(lambda: c.lookup(start, end) == {"inst-b": ["LocalCPUBackend", 3 * CHUNK]},
               timeout=30, what="moved chunks reported by B, gone from A")  # fmt: skip
    # B loads the moved KV into other slots: byte-identical to what A stored
    target = f"[1000,{1000 + 3 * CHUNK - 1}]"
    assert b.checksums(target) != a.checksums(f"[0,{3 * CHUNK - 1}]")
    resp = b.api.post(
        "/cache/retrieve", params={"tokens_mock": f"{start},{end}", "slot_mapping": target}
    )
    assert resp.status_code == 200 and resp.json()["num_retrieved"] == 3 * CHUNK, resp.text
    assert b.checksums(target) == a.checksums(f"[0,{3 * CHUNK - 1}]")


def test_controller_restart_then_kill_9(tmp_path: Path) -> None:
    c = new_cluster(tmp_path)
    n = 4 * CHUNK
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(c.controller("c1.log"))
        c.wait_up()
        a = stack.enter_context(c.engine("inst-a"))
        b = stack.enter_context(c.engine("inst-b"))
        a.store(0, n)
        b.store(100, 100 + n)
        wait_until(lambda: c.lookup(0, n) and c.lookup(100, 100 + n), timeout=30)
        before = (c.lookup(0, n), c.lookup(100, 100 + n))
        assert before == ({"inst-a": ["LocalCPUBackend", n]}, {"inst-b": ["LocalCPUBackend", n]})

        # the controller restarts with an empty index: workers re-register and resync
        stop_process(first)
        with c.controller("c2.log"):
            c.wait_up()
            wait_until(lambda: (c.lookup(0, n), c.lookup(100, 100 + n)) == before,
                       timeout=60, interval=0.02, what="resync after restart")  # fmt: skip
            # how: each worker heard 'unknown worker' on a heartbeat, registered again and
            # resent its keys; the new controller applied exactly those admits
            for engine in (a, b):
                counts = worker_metrics(engine)
                assert counts["kvplane_worker_registrations_total"] == 2
                assert counts["kvplane_worker_resyncs_total"] >= 1
            assert controller_metric(c, "registrations") == 2
            assert controller_metric(c, "admits_applied") == 2 * 4

            # kill -9: no deregistration; the reaper drops it after the worker timeout
            b.proc.send_signal(signal.SIGKILL)
            wait_until(lambda: c.lookup(100, 100 + n) == {}, timeout=60,
                       interval=0.05, what="dead worker reaped")  # fmt: skip
            assert controller_metric(c, "reaped_workers") == 1
            assert controller_metric(c, "deregistrations") == 0
            assert c.lookup(0, n) == {"inst-a": ["LocalCPUBackend", n]}
            assert "reaped worker inst-b/0" in (tmp_path / "c2.log").read_text()
            assert c.post("/health", {"instance_id": "inst-b"}).status_code == 404


def test_p2p_tier_finds_the_peer_through_the_controller(
    cluster: tuple[Cluster, Engine, Engine],
) -> None:
    c, a, b = cluster
    start, end = 9000, 9000 + 2 * CHUNK
    a.store(start, end, slots=f"[200,{200 + 2 * CHUNK - 1}]")
    wait_until(lambda: "inst-a" in c.lookup(start, end), timeout=30)
    target = f"[1500,{1500 + 2 * CHUNK - 1}]"
    resp = b.api.post(
        "/cache/retrieve", params={"tokens_mock": f"{start},{end}", "slot_mapping": target}
    )
    assert resp.status_code == 200 and resp.json()["num_retrieved"] == 2 * CHUNK, resp.text
    assert b.checksums(target) == a.checksums(f"[200,{200 + 2 * CHUNK - 1}]")


def test_clear_while_frozen_reaches_the_controller_when_lifted(
    cluster: tuple[Cluster, Engine, Engine],
) -> None:
    c, a, _ = cluster
    start, end = 12000, 12000 + 3 * CHUNK
    a.store(start, end)
    wait_until(lambda: "inst-a" in c.lookup(start, end), timeout=30, what="admits")
    assert a.api.put("/freeze/enable").status_code == 200
    try:
        resp = a.api.delete("/cache/clear", params={"locations": ["LocalCPUBackend"]})
        assert resp.status_code == 200 and resp.json()["num_removed"] >= 3, resp.text
        # two more heartbeats from inst-a: its worker went round its loop after the clear,
        # and a frozen engine sent no evict: the controller still routes to it
        for _ in range(2):
            seen = heartbeat_time(c, "inst-a")
            wait_until(lambda s=seen: heartbeat_time(c, "inst-a") > s, timeout=30, what="beat")
        assert c.lookup(start, end) == {"inst-a": ["LocalCPUBackend", 3 * CHUNK]}
    finally:
        assert a.api.put("/freeze/disable").status_code == 200
    wait_until(lambda: c.lookup(start, end) == {}, timeout=30, what="held evictions delivered")


def heartbeat_time(c: Cluster, instance_id: str) -> float:
    body = c.post("/query_worker_info", {"instance_id": instance_id, "worker_ids": [0]}).json()
    return float(body["worker_infos"][0]["last_heartbeat_time"])


def controller_metric(c: Cluster, name: str) -> float:
    resp = httpx.get(c.url + "/metrics", timeout=15)
    assert resp.status_code == 200, resp.text
    samples = {
        sample.name: sample.value
        for family in text_string_to_metric_families(resp.text)
        for sample in family.samples
    }
    return samples[f"kvplane_controller_{name}_total"]


def worker_metrics(engine: Engine) -> dict[str, float]:
    resp = engine.api.get("/metrics")
    assert resp.status_code == 200, resp.text
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(resp.text)
        for sample in family.samples
        if sample.name.startswith("kvplane_worker_")
    }


def test_worker_counters_on_the_engines_metrics(cluster: tuple[Cluster, Engine, Engine]) -> None:
    c, _, b = cluster
    before = worker_metrics(b)
    assert before["kvplane_worker_registered"] == 1
    assert before["kvplane_worker_registrations_total"] == 1  # no controller restart here
    assert before["kvplane_worker_resyncs_total"] == 0
    assert before["kvplane_worker_reports_dropped_total"] == 0
    events, reports = "kvplane_worker_events_sent_total", "kvplane_worker_reports_sent_total"
    start, end = 15000, 15000 + 3 * CHUNK
    b.store(start, end)
    wait_until(lambda: "inst-b" in c.lookup(start, end), timeout=30, what="admits")

    def reported() -> dict[str, float] | None:
        now = worker_metrics(b)
        return now if now[events] >= before[events] + 3 else None

    after = wait_until(reported, timeout=30, what="the report counted")
    assert after[events] == before[events] + 3  # one admit per stored chunk
    assert after[reports] >= before[reports] + 1
    assert after["kvplane_worker_pending_events"] == 0
    assert after["kvplane_worker_registrations_total"] == 1
