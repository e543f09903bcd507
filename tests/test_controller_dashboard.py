"""The dashboard's data without a browser: the rate history on a fake clock, the snapshot of a
controller core fed real messages, and the routes and assets over the ASGI app.

The page itself, in Chromium against real processes: tests/test_dashboard_browser.py.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from importlib.resources import files
from itertools import pairwise
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from kvplane.controller.cluster import Cluster
from kvplane.controller.core import ControllerCore
from kvplane.controller.dashboard.history import History, Sample
from kvplane.controller.dashboard.routes import capture
from kvplane.controller.dashboard.snapshot import ClusterView, build_snapshot
from kvplane.controller.executor import EventStatus, EventTable, Executor
from kvplane.controller.http import create_app
from kvplane.controller.overview import by_instance
from kvplane.controller.registry import WorkerKey, WorkerRecord
from kvplane.controller.settings import ControllerConfig
from kvplane.controller.status_api import snapshot
from kvplane.keys import chunk_hashes, key_scheme_fingerprint
from kvplane.protocol import (
    ChunkReport,
    CommandReply,
    HeartbeatRequest,
    RegisterRequest,
    Segment,
    pack_hashes,
)

CHUNK = 4
CPU, DISK = "LocalCPUBackend", "LocalDiskBackend"
ROOT = Path(__file__).resolve().parent.parent
STATIC = ("index.html", "dashboard.html", "dashboard.js", "dashboard.css")


def sample(t: float, lookups: int = 0, asked: int = 0, matched: int = 0, seconds: float = 0.0,
           admits: int = 0, evicts: int = 0) -> Sample:  # fmt: skip
    return Sample(t, lookups, asked, matched, seconds, admits, evicts, {CPU: admits - evicts})


# --- history -----------------------------------------------------------------------------


def test_rates_are_differences_over_the_time_between_samples() -> None:
    assert History(interval_s=2.0, capacity=151).span_s == 300.0  # 5 minutes of rates
    h = History(interval_s=2.0, capacity=4)
    assert h.points() == [] and h.due(100.0)
    assert h.add(sample(100.0))
    assert not h.add(sample(101.0, lookups=5))  # not due: 1 s after the last sample
    assert h.add(sample(102.0, lookups=10, asked=400, matched=100, seconds=0.02, admits=8))
    assert h.add(
        sample(106.0, lookups=10, asked=400, matched=100, seconds=0.02, admits=8, evicts=4)
    )
    first, second = h.points()
    assert first.t == 102.0
    assert (first.lookups_per_s, first.admits_per_s, first.evicts_per_s) == (5.0, 4.0, 0.0)
    assert first.hit_ratio == 0.25
    assert first.latency_ms == pytest.approx(2.0)
    assert first.chunks_by_tier == {CPU: 8}
    assert (second.lookups_per_s, second.evicts_per_s) == (0.0, 1.0)
    assert second.hit_ratio is None and second.latency_ms is None  # no lookups in between
    assert second.chunks_by_tier == {CPU: 4}


def test_the_oldest_samples_fall_out_and_a_clock_step_back_restarts() -> None:
    h = History(interval_s=1.0, capacity=3)
    for t in range(10):
        h.add(sample(float(t), lookups=t))
    assert len(h) == 3
    assert [p.t for p in h.points()] == [8.0, 9.0]
    assert h.add(sample(5.0, lookups=100))  # the wall clock went back: history restarts
    assert len(h) == 1 and h.points() == []
    h.add(sample(6.0, lookups=40))  # a total that went down counts as no activity
    assert h.points()[0].lookups_per_s == 0.0
    with pytest.raises(ValueError, match="capacity"):
        History(interval_s=1.0, capacity=1)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0.1, 10.0), st.integers(0, 1000), st.integers(0, 1000)), max_size=30
    ),
    st.floats(0.5, 3.0),
)
def test_rates_integrate_back_to_the_totals_of_the_kept_samples(steps, interval) -> None:
    h = History(interval_s=interval, capacity=10)
    t, lookups, admits, kept = 0.0, 0, 0, []
    for dt, more_lookups, more_admits in steps:
        t, lookups, admits = t + dt, lookups + more_lookups, admits + more_admits
        s = sample(t, lookups=lookups, asked=2 * lookups, matched=lookups, admits=admits)
        if h.add(s):
            kept.append(s)
    kept = kept[-10:]
    points = h.points()
    assert len(points) == max(len(kept) - 1, 0)
    times = [s.t for s in kept]
    assert [p.t for p in points] == times[1:]
    assert all(b - a >= interval for a, b in pairwise(times))
    if points:
        span = [b - a for a, b in pairwise(times)]
        got = sum(p.lookups_per_s * d for p, d in zip(points, span, strict=True))
        assert got == pytest.approx(kept[-1].lookups - kept[0].lookups)
        got = sum(p.admits_per_s * d for p, d in zip(points, span, strict=True))
        assert got == pytest.approx(kept[-1].admits - kept[0].admits)
        assert all(p.hit_ratio in (None, 0.5) for p in points)


# --- the snapshot of a controller fed real messages ----------------------------------------


def hello(instance: str, worker: int, epoch: int, chunk_bytes: int | None) -> RegisterRequest:
    return RegisterRequest(
        instance_id=instance,
        worker_id=worker,
        ip="10.0.0.1",
        port=7000 + worker,
        peer_init_url=f"{instance}.peer:{8000 + worker}",
        key_scheme=key_scheme_fingerprint(CHUNK),
        chunk_size=CHUNK,
        epoch=epoch,
        chunk_bytes=chunk_bytes,
    )


def report(instance: str, worker: int, epoch: int, seq: int, *segments: Segment) -> ChunkReport:
    return ChunkReport(
        instance_id=instance, worker_id=worker, epoch=epoch, seq=seq, segments=list(segments)
    )


def admit(location: str, tokens: range) -> Segment:
    return Segment(True, location, pack_hashes(chunk_hashes(list(tokens), CHUNK)))


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def cluster_of_two(clock: FakeClock) -> Cluster:
    """A: two ranks (1 KiB chunks), 3 CPU chunks each and 2 disk chunks on rank 0 only;
    B: one rank that did not say its chunk size in bytes, 1 CPU chunk, then a sequence gap."""
    core = ControllerCore(worker_timeout_s=10.0)

    def apply(msg: object) -> None:
        core.handle(core.stage(msg), clock())

    for worker in (0, 1):
        apply(hello("A", worker, 10 + worker, 1024))
        apply(report("A", worker, 10 + worker, 1, admit(CPU, range(12))))
    apply(report("A", 0, 10, 2, admit(DISK, range(100, 108))))
    apply(hello("B", 0, 20, None))
    apply(report("B", 0, 20, 1, admit(CPU, range(4))))
    apply(report("B", 0, 20, 3, admit(CPU, range(200, 204))))  # seq 2 lost: a gap
    clock.now += 6.0  # A's ranks heartbeat now; B's last one is 6 s old: late
    apply(HeartbeatRequest(instance_id="A", worker_id=0, epoch=10))
    apply(HeartbeatRequest(instance_id="A", worker_id=1, epoch=11))
    return Cluster(core, Executor(lambda w, c, t: CommandReply(), 1.0), clock=clock)


def test_the_snapshot_shows_instances_workers_tiers_and_states() -> None:
    clock = FakeClock(1_000.0)
    cluster = cluster_of_two(clock)
    op = cluster.events.start("clear")
    cluster.events.finish(op, error="worker 1: FAILED disk")
    cluster.lookup(list(range(12)))  # a lookup is not an operation
    health = cluster.events.start("health")
    clock.now += 1.0
    data = build_snapshot(
        capture(cluster), [], started=900.0, sample_interval_s=2.0, history_span_s=300.0
    )
    cluster.executor.close()

    assert (data.now, data.started, data.worker_timeout_s) == (1_007.0, 900.0, 10.0)
    assert [i.instance_id for i in data.instances] == ["A", "B"]
    a, b = data.instances
    assert [(t.location, t.chunks, t.bytes) for t in a.tiers] == [
        (CPU, 2 * 3, 2 * 3 * 1024),  # summed over the ranks, as GET /status counts
        (DISK, 2, 2 * 1024),  # only rank 0 holds these
    ]
    assert (a.chunks, a.bytes) == (8, 8 * 1024)
    r0, r1 = a.workers
    assert (r0.worker_id, r0.address, r0.peer_init_url) == (0, "10.0.0.1:7000", "A.peer:8000")
    assert (r0.chunks, r1.chunks) == (5, 3)
    assert [(t.location, t.chunks, t.bytes) for t in r1.tiers] == [(CPU, 3, 3 * 1024)]
    assert (r0.state, r0.heartbeat_age_s, r0.registration_time) == ("ok", 1.0, 1_000.0)
    (rb,) = b.workers
    assert (b.chunks, b.bytes, rb.chunk_bytes) == (2, None, None)  # bytes unknown
    assert (rb.state, rb.heartbeat_age_s) == ("resync", 7.0)
    assert data.totals.model_dump() == {
        "instances": 2,
        "workers": 3,
        "chunks": 10,
        "bytes": None,
        "chunks_by_tier": {CPU: 8, DISK: 2},
    }
    assert data.counters["sequence_gaps"] == 1 and data.counters["registrations"] == 3
    assert [(o.event_id, o.kind, o.status, o.error) for o in data.operations] == [
        (health, "health", "running", ""),
        (op, "clear", "failed", "worker 1: FAILED disk"),
    ]


def test_recent_operations_skip_queries_which_never_push_them_out() -> None:
    table = EventTable(capacity=2)
    first = table.start("clear")
    lookup = table.start("lookup", finished=True)
    second = table.start("pin")
    table.start("query_worker_info", finished=True)
    table.start("query_chunks", finished=True)
    assert [e.event_id for e in table.recent_operations()] == [second, first]
    for _ in range(5):  # a lookup storm: only older lookups leave
        table.start("lookup", finished=True)
    assert table.get(lookup) is None
    assert [e.event_id for e in table.recent_operations(1)] == [second]
    third = table.start("move")  # a third operation: the oldest operation leaves
    assert table.get(first) is None
    copy = table.recent_operations()[0]
    table.finish(third, error="worker 0: TIMEOUT")
    assert (copy.event_id, copy.status) == (third, EventStatus.RUNNING)  # a copy
    assert table.get(third).status is EventStatus.FAILED  # type: ignore[union-attr]


def test_a_worker_silent_for_half_the_timeout_is_late() -> None:
    clock = FakeClock(50.0)
    cluster = cluster_of_two(clock)
    clock.now += 5.5  # A's ranks: 5.5 s of a 10 s timeout
    states = [
        (i.instance_id, w.state)
        for i in build_snapshot(
            capture(cluster), [], started=0, sample_interval_s=2, history_span_s=300
        ).instances
        for w in i.workers
    ]
    cluster.executor.close()
    assert states == [("A", "late"), ("A", "late"), ("B", "resync")]


def record(instance_id: str, worker_id: int, ip: str, heartbeat: float, resync: bool,
           chunk_bytes: int | None) -> WorkerRecord:  # fmt: skip
    return WorkerRecord(
        instance_id=instance_id,
        worker_id=worker_id,
        ip=ip,
        port=7000 + worker_id,
        peer_init_url=None,
        chunk_size=CHUNK,
        key_scheme="x",
        epoch=1,
        registration_time=900.0,
        last_heartbeat_time=heartbeat,
        needs_resync=resync,
        chunk_bytes=chunk_bytes,
    )


workers = st.lists(
    st.builds(
        record,
        st.sampled_from("abc"),
        st.integers(0, 3),
        st.sampled_from(["10.0.0.1", "fd00::1"]),
        st.floats(970.0, 1000.0),  # up to 30 s old at now = 1000, with a 20 s timeout
        st.booleans(),
        st.none() | st.integers(1, 4096),
    ),
    max_size=8,
    unique_by=lambda w: w.key,
)
counts = st.dictionaries(
    st.tuples(st.sampled_from("abcd"), st.integers(0, 3)),  # "d": chunks of no registered worker
    st.dictionaries(st.sampled_from([CPU, DISK, "RemoteBackend"]), st.integers(0, 50)),
    max_size=8,
)


@settings(max_examples=100, deadline=None)
@given(workers, counts)
def test_the_dashboard_and_get_status_say_the_same_of_every_worker(records, raw) -> None:
    tier_counts = {WorkerKey(*k): v for k, v in raw.items()}
    status = snapshot(records, tier_counts, 1000.0, 20.0)
    view = ClusterView(1000.0, 20.0, by_instance(records, tier_counts), {}, (0, 0, 0, 0.0), [])
    data = build_snapshot(view, [], started=0.0, sample_interval_s=2.0, history_span_s=300.0)

    assert data.totals.model_dump(exclude={"bytes"}) == status.totals.model_dump()
    assert [i.instance_id for i in data.instances] == [i.instance_id for i in status.instances]
    by_key = {w.key: w for w in records}
    for shown, told in zip(data.instances, status.instances, strict=True):
        assert [(t.location, t.chunks) for t in shown.tiers] == list(told.chunks.items())
        assert shown.chunks == sum(told.chunks.values())
        for w, s in zip(shown.workers, told.workers, strict=True):
            assert (w.worker_id, "tcp://" + w.address, w.peer_init_url) == (
                s.worker_id, s.address, s.peer_init_url)  # fmt: skip
            assert (w.heartbeat_age_s, w.registration_time, w.last_heartbeat_time) == (
                s.heartbeat_age_s, s.registration_time, s.last_heartbeat_time)  # fmt: skip
            assert {t.location: t.chunks for t in w.tiers} == s.chunks
            rec = by_key[WorkerKey(shown.instance_id, w.worker_id)]
            late = s.heartbeat_age_s > status.worker_timeout_s / 2  # as `kvplane status` marks
            assert w.state == ("resync" if rec.needs_resync else "late" if late else "ok")
        for tier in shown.tiers:  # bytes: each holding rank's chunks x its chunk size
            sizes = [
                (s.chunks[tier.location], by_key[WorkerKey(told.instance_id, s.worker_id)])
                for s in told.workers
                if tier.location in s.chunks
            ]
            unknown = any(r.chunk_bytes is None for _, r in sizes)
            expect = None if unknown else sum(n * (r.chunk_bytes or 0) for n, r in sizes)
            assert tier.bytes == expect


# --- routes, assets, packaging ---------------------------------------------------------------


def test_routes_serve_the_pages_the_data_and_its_schema() -> None:
    clock = FakeClock(2_000.0)
    cluster = cluster_of_two(clock)
    with TestClient(create_app(cluster, ControllerConfig())) as client:
        index = client.get("/")
        assert index.status_code == 200 and 'href="/dashboard"' in index.text
        page = client.get("/dashboard")
        assert page.headers["content-type"].startswith("text/html")
        assert 'src="/dashboard/dashboard.js"' in page.text
        assert "http" not in page.text.replace("http://www.w3.org", "")  # nothing from afar
        js = client.get("/dashboard/dashboard.js")
        assert js.headers["content-type"].startswith("text/javascript")
        assert "/dashboard/data" in js.text
        missing = client.get("/dashboard/nope.js")
        assert missing.status_code == 404 and missing.json()["error"] == "Not found"
        assert "dashboard.js" in missing.json()["message"]
        # A's ranks hold tokens 0..11, B 0..3: the best match of 16 tokens is 12
        lookup = client.post("/lookup", json={"tokens": list(range(16))})
        assert lookup.json()["layout_info"] == {"A": [CPU, 12], "B": [CPU, 4]}
        body = client.get("/dashboard/data").json()
        assert body["lookups"]["lookups"] == 1
        assert (body["lookups"]["tokens_asked"], body["lookups"]["tokens_matched"]) == (16, 12)
        assert body["lookups"]["hit_ratio"] == 0.75
        assert [i["chunks"] for i in body["instances"]] == [8, 2]
        status = client.get("/status").json()  # the same counts as GET /status
        assert [sum(i["chunks"].values()) for i in status["instances"]] == [8, 2]
        assert status["totals"]["chunks_by_tier"] == body["totals"]["chunks_by_tier"]
        schema = client.get("/openapi.json").json()
        get = schema["paths"]["/dashboard/data"]["get"]
        assert get["responses"]["200"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/DashboardData"
        }
        assert not {"/", "/dashboard", "/dashboard/{name}"} & set(schema["paths"])
        metrics = client.get("/metrics").text
        assert "kvplane_controller_lookup_tokens_total 16.0" in metrics
        assert "kvplane_controller_lookup_matched_tokens_total 12.0" in metrics
    cluster.executor.close()


def test_the_package_ships_every_dashboard_asset(tmp_path: Path) -> None:
    static = files("kvplane.controller.dashboard") / "static"
    assert sorted(p.name for p in static.iterdir()) == sorted(STATIC)
    # A wheel built from a copy of the sources carries them (package-data in pyproject).
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (src / name).write_bytes((ROOT / name).read_bytes())
    shutil.copytree(ROOT / "kvplane", src / "kvplane", ignore=shutil.ignore_patterns("__pycache__"))
    build = f"from setuptools import build_meta as b; print(b.build_wheel({str(tmp_path)!r}))"
    out = subprocess.run(
        [sys.executable, "-c", build], cwd=src, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = tmp_path / out.stdout.strip().splitlines()[-1]
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"kvplane/controller/dashboard/static/{n}" for n in STATIC} <= names
