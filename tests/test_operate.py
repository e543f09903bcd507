"""What an operator sees, against a real controller, a real ``kvplane engine`` and a real
``kvplane router``: the metrics they export (docs/metrics.md), the Grafana dashboard's
queries, ``kvplane status``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import NamedTuple

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvplane.metric_specs import (
    CONTROLLER_METRICS,
    COPY_OPS,
    ENGINE_METRICS,
    ROUTER_METRICS,
    TIER_STATS,
    MetricKind,
    MetricSpec,
)
from tests.support import (
    REPO_ROOT,
    free_port,
    kvplane_env,
    kvplane_process,
    run_kvplane,
    stop_process,
    wait_until,
)
from tests.test_controller_integration import CHUNK, Cluster, Engine, new_cluster

pytestmark = pytest.mark.slow

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "kvplane.json"
STORED_CHUNKS = 5


class Running(NamedTuple):
    cluster: Cluster
    engine: Engine
    fresh_scrape: str  # the engine's /metrics before it stored anything
    router: str  # a kvplane router's URL, in front of the controller (no backends)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("operate")
    c = new_cluster(tmp)
    port = free_port()
    args = ["router", "--host", "127.0.0.1", "--port", str(port), "--controller", c.url]
    router = f"http://127.0.0.1:{port}"
    with c.controller("controller.log"), kvplane_process(args, log_path=tmp / "router.log"):
        c.wait_up()
        # its /health is 503 without a backend; /metrics answers as soon as it serves
        wait_until(lambda: _answers(router + "/metrics"), timeout=60, what="the router up")
        with c.engine("inst-a") as a:
            fresh = a.api.get("/metrics")
            assert fresh.status_code == 200, fresh.text
            n = STORED_CHUNKS * CHUNK
            assert a.store(0, n)["num_stored_tokens"] == n
            wait_until(lambda: c.lookup(0, n), timeout=10, what="admits reach the controller")
            c.lookup(0, 2 * n)  # half of these tokens are cached: the hit ratio moves
            yield Running(c, a, fresh.text, router)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _families(text: str) -> dict[str, str]:
    """kvplane family name -> type, from a scrape (families without samples included; the
    client library's ``<name>_created`` timestamps of counters and histograms left out)."""
    families = [f for f in text_string_to_metric_families(text) if f.name.startswith("kvplane_")]
    found = {f.name: f.type for f in families}
    assert len(found) == len(families), "a metric family exported twice"
    return {n: t for n, t in found.items() if not n.endswith("_created") or n[:-8] not in found}


def _scrapes(r: Running) -> tuple[str, str, str]:
    ctl = httpx.get(r.cluster.url + "/metrics", timeout=10)
    eng = r.engine.api.get("/metrics")
    rtr = httpx.get(r.router + "/metrics", timeout=10)
    assert ctl.status_code == 200 and eng.status_code == 200 and rtr.status_code == 200
    return ctl.text, eng.text, rtr.text


def _declared(specs: tuple[MetricSpec, ...]) -> dict[str, str]:
    return {s.name: s.kind.value for s in specs}


def test_every_process_exports_exactly_the_declared_metrics(running: Running):
    ctl, eng, rtr = _scrapes(running)
    assert _families(ctl) == _declared(CONTROLLER_METRICS)
    assert _families(eng) == _declared(ENGINE_METRICS)
    assert _families(rtr) == _declared(ROUTER_METRICS)
    # the tier figures each tier reports are the documented ones
    stats: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(eng):
        if family.name == "kvplane_tier_stat":
            for sample in family.samples:
                stats.setdefault(sample.labels["tier"], set()).add(sample.labels["stat"])
    assert stats["LocalCPUBackend"] == set(TIER_STATS["LocalCPUBackend"])
    assert stats["P2PBackend"] == set(TIER_STATS["P2PBackend"])
    # and the new controller figures count what happened
    values = {
        s.name: s.value
        for f in text_string_to_metric_families(ctl)
        for s in f.samples
        if not s.labels or "instance_id" in s.labels
    }
    assert values["kvplane_controller_lookup_tokens_total"] >= 3 * STORED_CHUNKS * CHUNK
    assert values["kvplane_controller_lookup_matched_tokens_total"] >= 2 * STORED_CHUNKS * CHUNK
    assert values["kvplane_controller_instance_chunks"] == STORED_CHUNKS


def test_a_fresh_engine_exports_every_known_series_at_zero(running: Running):
    """Every family labelled by a tier, a copy op or an event subscriber has a series for
    each of them before any is used (a panel shows 0, not "No data")."""
    _, a, fresh, _ = running
    tiers = a.api.get("/bypass/list").json()["all_backends"]
    assert sorted(tiers) == ["LocalCPUBackend", "P2PBackend"]
    known = {"tier": tiers, "op": list(COPY_OPS), "subscriber": ["controller worker"]}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(fresh)
        for s in f.samples
    }
    checked = 0
    for spec in ENGINE_METRICS:
        if len(spec.labels) != 1 or spec.labels[0] not in known:
            continue
        assert spec.kind is not MetricKind.HISTOGRAM, spec.name
        (label,) = spec.labels
        for value in known[label]:
            assert samples.get((spec.exposed[0], ((label, value),))) == 0, (spec.name, value)
            checked += 1
    # hits, misses, read/written bytes, errors, dropped writes, queue depth, evictions
    assert checked >= 8 * len(tiers) + 2 * len(COPY_OPS) + 1, checked


def _dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            exprs.append(target["expr"])
    return exprs


def test_every_metric_the_grafana_dashboard_queries_exists(running: Running):
    board = json.loads(DASHBOARD.read_text())
    assert [i["name"] for i in board["__inputs"]] == ["DS_PROMETHEUS"]
    assert board["__inputs"][0]["pluginId"] == "prometheus"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    exported = {
        family.name + suffix
        for text in _scrapes(running)
        for family in text_string_to_metric_families(text)
        for suffix in suffixes[family.type]
    }
    queried = {m for e in _dashboard_exprs() for m in re.findall(r"\bkvplane_[a-z0-9_]+", e)}
    assert len(queried) >= 20
    assert sorted(queried - exported) == []
    # the router's row queries its families, not only the controller's and engines'
    assert {m for m in queried if m.startswith("kvplane_router_")} >= {
        "kvplane_router_requests_total",
        "kvplane_router_decision_seconds_bucket",
        "kvplane_router_matched_tokens_total",
        "kvplane_router_backend_in_flight",
    }
    # the panels the issue asks for are there
    titles = " | ".join(p["title"] for p in board["panels"]).lower()
    for topic in ("lookup latency", "lookup rate", "hit ratio", "ingest", "chunks per", "bytes per",
                  "evictions", "throughput", "p2p", "circuit breaker", "router requests by reason",
                  "router decision time", "router matched tokens", "router in flight"):  # fmt: skip
        assert topic in titles, topic


def test_status_shows_the_instance_its_tiers_and_chunks(running: Running):
    c, _, _, _ = running
    done = run_kvplane(["status", "--controller", c.url], timeout=60)
    assert done.returncode == 0, done.stdout
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"kvplane cluster at {c.url}")
    assert "1 instance(s), 1 worker(s), 5 chunk(s)" in lines[0]
    header = lines[1].split()
    assert header[:5] == ["instance", "worker", "address", "heartbeat", "up"]
    assert "LocalCPUBackend" in header and header[-1] == "chunks"
    row = next(line.split() for line in lines if line.split()[:1] == ["inst-a"])
    assert row[1] == "0" and row[2].startswith("tcp://127.0.0.1:")
    assert row[header.index("LocalCPUBackend")] == str(STORED_CHUNKS)
    total = next(line.split() for line in lines if line.split()[:1] == ["total"])
    assert total[-1] == str(STORED_CHUNKS)

    assert c.post("/status", {}).status_code == 405  # read-only
    done = run_kvplane(["status", "--controller", c.url, "--json"], timeout=60)
    assert done.returncode == 0, done.stdout
    status = json.loads(done.stdout)
    assert status["totals"] == {
        "instances": 1,
        "workers": 1,
        "chunks": STORED_CHUNKS,
        "chunks_by_tier": {"LocalCPUBackend": STORED_CHUNKS},
    }
    (worker,) = status["instances"][0]["workers"]
    assert worker["chunks"] == {"LocalCPUBackend": STORED_CHUNKS}
    assert 0 <= worker["heartbeat_age_s"] < status["worker_timeout_s"]


def test_status_watch_refreshes_until_stopped(running: Running):
    c, _, _, _ = running
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvplane", "status", "--controller", c.url, "--watch", "0.2"],
        cwd=REPO_ROOT,
        env=kvplane_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    frames: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("kvplane cluster at"):
                frames.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_until(lambda: len(frames) >= 3, timeout=60, what="three refreshes")
    finally:
        stop_process(proc)  # type: ignore[arg-type]
        reader.join(10)
    assert all("1 instance(s)" in f for f in frames)


def test_status_without_a_controller_is_one_clear_line() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    done = run_kvplane(["status", "--controller", url], timeout=60)
    assert done.returncode != 0
    assert done.stdout.strip().splitlines() == [
        f"kvplane status: error: cannot reach the controller at {url}: [Errno 111] Connection refused"
    ]
    bad = run_kvplane(["status", "--controller", "localhost:9000"], timeout=60)
    assert bad.returncode != 0 and "Traceback" not in bad.stdout
    assert "--controller must be an http:// or https:// URL" in bad.stdout
