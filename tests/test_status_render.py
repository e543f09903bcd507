"""The pure halves of ``kvplane status`` and of the metric table: no processes, no sockets."""

from __future__ import annotations

from dataclasses import fields

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvplane.controller.core import Counters
from kvplane.controller.registry import WorkerKey, WorkerRecord
from kvplane.controller.status_api import LogStatus, snapshot
from kvplane.docs import render_metrics_md
from kvplane.errors import BadRequest
from kvplane.metric_specs import CONTROLLER_COUNTERS, CONTROLLER_METRICS, ENGINE_METRICS
from kvplane.status_cli import check_url, render

CPU, DISK = "LocalCPUBackend", "LocalDiskBackend"


def record(instance_id: str, worker_id: int, heartbeat: float, port: int = 5000) -> WorkerRecord:
    return WorkerRecord(
        instance_id=instance_id,
        worker_id=worker_id,
        ip="10.0.0.1",
        port=port,
        peer_init_url="10.0.0.1:8200",
        chunk_size=256,
        key_scheme="x",
        epoch=1,
        registration_time=1000.0,
        last_heartbeat_time=heartbeat,
    )


def test_snapshot_groups_by_instance_and_sums_tiers() -> None:
    workers = [record("b", 1, 1095.0, 5002), record("a", 0, 1099.0), record("b", 0, 1099.5, 5001)]
    counts = {
        WorkerKey("a", 0): {CPU: 3},
        WorkerKey("b", 0): {CPU: 4, DISK: 10},
        WorkerKey("b", 1): {CPU: 4, DISK: 9},
    }
    s = snapshot(workers, counts, now=1100.0, worker_timeout_s=30.0)
    assert [i.instance_id for i in s.instances] == ["a", "b"]
    b = s.instances[1]
    assert [w.worker_id for w in b.workers] == [0, 1]
    assert b.chunks == {CPU: 8, DISK: 19}
    assert [w.heartbeat_age_s for w in b.workers] == [0.5, 5.0]
    assert b.workers[1].address == "tcp://10.0.0.1:5002"
    assert s.totals.model_dump() == {
        "instances": 2,
        "workers": 3,
        "chunks": 30,
        "chunks_by_tier": {CPU: 11, DISK: 19},
    }


def test_render_has_a_row_per_worker_a_column_per_tier_and_totals() -> None:
    workers = [record("a", 0, 1099.0), record("b", 0, 1080.0)]
    counts = {WorkerKey("a", 0): {CPU: 3}, WorkerKey("b", 0): {DISK: 7}}
    text = render(snapshot(workers, counts, 1100.0, 30.0), "http://ctl:9000")
    lines = text.splitlines()
    assert lines[0].startswith("kvplane cluster at http://ctl:9000 (")
    assert lines[0].endswith("2 instance(s), 2 worker(s), 10 chunk(s)")
    assert lines[1].split() == [
        "instance",
        "worker",
        "address",
        "heartbeat",
        "up",
        CPU,
        DISK,
        "chunks",
    ]
    assert set(lines[2].strip()) == {"-", " "}
    assert lines[3].split() == ["a", "0", "tcp://10.0.0.1:5000", "1.0s", "100.0s", "3", "0", "3"]
    # 20 s without a heartbeat, past half the 30 s timeout: flagged
    assert lines[4].split() == ["b", "0", "tcp://10.0.0.1:5000", "20.0s", "LATE", "100.0s", "0", "7", "7"]  # fmt: skip
    assert lines[5].split() == ["total", "2", "3", "7", "10"]


def test_render_of_a_replica_says_where_it_stands_in_the_log() -> None:
    status = snapshot([record("a", 0, 1099.0)], {WorkerKey("a", 0): {CPU: 1}}, 1100.0, 30.0)
    status.log = LogStatus(
        replica_id="r2", leader=False, leader_id="r1", connected=False, stale=True,
        applied_seq=40, stream_seq=42, lag=2, snapshot_seq=30,
    )  # fmt: skip
    line = render(status, "http://ctl:9000").splitlines()[1]
    assert line.strip() == "replica r2 (lease holder r1): log applied 40 of 42, lag 2, STALE"
    assert "replica" not in render(snapshot([], {}, 1100.0, 30.0), "u")


def test_render_of_an_empty_cluster_says_so() -> None:
    text = render(snapshot([], {}, 1100.0, 30.0), "http://ctl:9000")
    assert "0 instance(s), 0 worker(s), 0 chunk(s)" in text
    assert text.splitlines()[1].strip() == "no workers registered"


@given(st.dictionaries(st.tuples(st.sampled_from("abc"), st.integers(0, 3)),
                       st.dictionaries(st.sampled_from([CPU, DISK, "RemoteBackend"]),
                                       st.integers(0, 10**6)), max_size=8))  # fmt: skip
def test_totals_add_up(counts: dict[tuple[str, int], dict[str, int]]) -> None:
    workers = [record(i, w, 1000.0) for i, w in counts]
    s = snapshot(workers, {WorkerKey(*k): v for k, v in counts.items()}, 1000.0, 30.0)
    assert s.totals.workers == len(counts)
    assert s.totals.chunks == sum(sum(v.values()) for v in counts.values())
    assert s.totals.chunks_by_tier == {
        t: sum(v.get(t, 0) for v in counts.values())
        for t in {t for v in counts.values() for t in v}
    }
    if counts:
        assert render(s, "u").splitlines()[-1].split()[-1] == str(s.totals.chunks)


def test_every_controller_counter_is_declared_once() -> None:
    lookups = ["lookup_tokens", "lookup_matched_tokens"]
    assert [f.name for f in fields(Counters)] + lookups == list(CONTROLLER_COUNTERS)
    names = [s.name for s in (*ENGINE_METRICS, *CONTROLLER_METRICS)]
    assert len(names) == len(set(names))
    assert all(n.startswith("kvplane_") and not n.endswith("_total") for n in names)
    doc = render_metrics_md()
    assert all(f"`{s.exposed[0]}`" in doc or f"`{s.name}`" in doc for s in ENGINE_METRICS)


@pytest.mark.parametrize(
    "url",
    ["localhost:9000", "ftp://x", "http://", "http://h:notaport", "http://[::1", "http://h:99999"],
)
def test_a_controller_url_that_cannot_work_is_named(url: str) -> None:
    with pytest.raises(BadRequest, match="--controller must be an http:// or https:// URL"):
        check_url(url)


def test_good_controller_urls_pass() -> None:
    for url in ("http://127.0.0.1:9000", "https://ctl.example:443/", "http://[::1]:9000"):
        check_url(url)
