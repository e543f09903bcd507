"""The controller process over real sockets: HTTP API shapes, errors, liveness, robustness.

Workers here are protocol-level clients (tests/controller_client.py), so each test sends
exact frames; the engine-backed worker is covered by tests/test_controller_integration.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from kvplane.keys import chunk_hashes
from kvplane.protocol import CommandReply, ErrorCode, HealthCommand, HeartbeatStatus
from tests.controller_client import (
    ControllerProc,
    ProtoWorker,
    controller_args,
    wait_controller_up,
)
from tests.support import free_ports, kvplane_process, wait_until

TIMEOUT = 1.5  # worker timeout of the controller under test, seconds


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[ControllerProc]:
    http, pull, reply = free_ports(3)
    log = tmp_path / "controller.log"
    args = controller_args(
        http, pull, reply, worker_timeout=TIMEOUT, health_check_interval=0.2, command_timeout=1
    )
    with kvplane_process(args, log_path=log):
        url = f"http://127.0.0.1:{http}"
        wait_controller_up(url)
        yield ControllerProc(url, pull, reply, log)


@pytest.fixture
def worker(controller: ControllerProc) -> Iterator[ProtoWorker]:
    w = ProtoWorker(controller.pull, controller.reply, "A", port=free_ports(1)[0])
    yield w
    w.close()


TOKENS = list(range(10))  # chunk_size 4: chunks [0,4) [4,8) [8,10)


def test_lookup_full_partial_and_miss(controller: ControllerProc, worker: ProtoWorker) -> None:
    assert worker.register().ok
    worker.report(chunk_hashes(TOKENS, 4))
    wait_until(lambda: controller.lookup(TOKENS), timeout=5, what="admits applied")
    assert controller.lookup(TOKENS) == {"A": ["LocalCPUBackend", 10]}
    assert controller.lookup([*TOKENS[:8], 50, 51, 52]) == {"A": ["LocalCPUBackend", 8]}
    assert controller.lookup([*TOKENS[:6]]) == {"A": ["LocalCPUBackend", 4]}
    assert controller.lookup([9, 9, 9, 9]) == {}
    resp = controller.post("/lookup", {"tokens": TOKENS}).json()
    assert isinstance(resp["event_id"], str) and resp["event_id"]
    worker.report(chunk_hashes(TOKENS, 4)[1:2], admit=False)
    wait_until(lambda: controller.lookup(TOKENS) == {"A": ["LocalCPUBackend", 4]}, timeout=5)


def test_lookup_of_a_long_prompt_and_its_other_methods(
    controller: ControllerProc, worker: ProtoWorker
) -> None:
    """An 8K-token body arrives in several pieces; /lookup answers only POST, as documented."""
    long_prompt = [(i * 7919) % 128_000 for i in range(8190)]
    assert worker.register().ok
    hashes = chunk_hashes(long_prompt, 4)
    worker.report(hashes[:1000])
    wait_until(lambda: controller.lookup(long_prompt), timeout=5, what="admits applied")
    assert controller.lookup(long_prompt) == {"A": ["LocalCPUBackend", 4000]}
    worker.report(hashes[1000:])
    full = {"A": ["LocalCPUBackend", 8190]}
    wait_until(lambda: controller.lookup(long_prompt) == full, timeout=5, what="all admits")
    body = json.dumps({"tokens": long_prompt}).encode()
    chunked = httpx.post(controller.url + "/lookup", content=iter([body[:999], body[999:]]))
    assert chunked.status_code == 200
    assert chunked.json()["layout_info"] == full
    assert chunked.headers["content-type"] == "application/json"
    assert httpx.get(controller.url + "/lookup").status_code == 405
    assert "/lookup" in httpx.get(controller.url + "/openapi.json").json()["paths"]


def test_errors_are_4xx_json_naming_the_problem(controller: ControllerProc) -> None:
    resp = controller.post("/health", {"instance_id": "nope"})
    assert resp.status_code == 404
    assert resp.json()["error"] == "Not found" and "nope" in resp.json()["message"]
    resp = controller.post("/lookup", {"tokens": "abc"})
    assert resp.status_code == 400 and "tokens" in resp.json()["message"]
    resp = controller.post("/lookup", {"tokens": [-1]})
    assert resp.status_code == 400 and "tokens" in resp.json()["message"]
    resp = controller.post("/pin", {"instance_id": "nope", "tokens": [3, -1]})
    assert resp.status_code == 400
    assert "body.tokens.1: Input should be greater than or equal to 0" in resp.json()["message"]
    resp = controller.post("/pin", {"instance_id": "nope", "tokens": ["3"]})
    assert resp.status_code == 400 and "body.tokens.0" in resp.json()["message"]
    resp = controller.post("/query_instance", {"ip": "10.1.1.1", "event_id": "x"})
    assert resp.status_code == 404 and "10.1.1.1" in resp.json()["message"]
    resp = controller.post("/clear", {"location": "LocalCPUBackend"})
    assert resp.status_code == 400 and "instance_id" in resp.json()["message"]
    assert controller.post("/check_finish", {"event_id": "zzz"}).json() == {"status": "not_found"}


def test_worker_info_instance_query_and_reregistration(
    controller: ControllerProc, worker: ProtoWorker
) -> None:
    assert worker.register().ok
    body = {"instance_id": "A", "worker_ids": [0]}
    info = controller.post("/query_worker_info", body).json()["worker_infos"][0]
    assert info["port"] == worker.port and info["ip"] == "127.0.0.1"
    assert info["peer_init_url"] == f"127.0.0.1:{worker.port + 1}"
    time.sleep(0.05)
    assert worker.heartbeat() is HeartbeatStatus.OK
    info2 = controller.post("/query_worker_info", body).json()["worker_infos"][0]
    assert info2["last_heartbeat_time"] > info["last_heartbeat_time"]
    resp = controller.post("/query_instance", {"ip": "127.0.0.1", "event_id": "old-client"})
    assert resp.json()["res"] == "A"
    assert (
        controller.post("/query_worker_info", {"instance_id": "A", "worker_ids": [3]}).status_code
        == 404
    )
    # a restarted worker on a new port replaces its address
    worker.port += 7
    assert worker.register().ok
    info3 = controller.post("/query_worker_info", body).json()["worker_infos"][0]
    assert info3["port"] == worker.port


def test_refused_registration_says_why_in_reply_and_log(
    controller: ControllerProc, worker: ProtoWorker
) -> None:
    reply = worker.register(key_scheme="sha1/chunk_size=4")
    assert not reply.ok and "key scheme" in reply.reason
    reply = worker.register(protocol_version=99)
    assert not reply.ok and "protocol version" in reply.reason
    wait_until(lambda: "refused worker A/0" in controller.log.read_text(), timeout=5)
    assert controller.metric("registrations_refused") == 2


def test_unknown_and_malformed_frames_are_skipped_and_ingestion_goes_on(
    controller: ControllerProc, worker: ProtoWorker
) -> None:
    assert worker.register().ok
    worker.send_raw(msgspec.msgpack.encode({"type": "admit_v9", "hashes": [1, 2]}))
    worker.send_raw(b"\x00\xffnot msgpack")
    worker.report(chunk_hashes(TOKENS, 4))
    wait_until(lambda: controller.lookup(TOKENS), timeout=5, what="admits after junk")
    assert controller.metric("unknown_messages") == 1
    assert controller.metric("malformed_frames") == 1
    assert "unknown type 'admit_v9'" in controller.log.read_text()


def test_dead_worker_is_reaped_and_told_to_reregister(
    controller: ControllerProc, worker: ProtoWorker
) -> None:
    assert worker.register().ok
    assert worker.heartbeat() is HeartbeatStatus.OK  # brand new, no keys: no resync
    worker.report(chunk_hashes(TOKENS, 4))
    wait_until(lambda: controller.lookup(TOKENS), timeout=5)
    start = time.monotonic()
    wait_until(lambda: not controller.lookup(TOKENS), timeout=TIMEOUT + 3, what="reap")
    assert time.monotonic() - start < TIMEOUT + 2
    assert controller.metric("reaped_workers") == 1
    assert controller.metric("index_chunks") == 0
    assert "reaped worker A/0" in controller.log.read_text()
    assert worker.heartbeat() is HeartbeatStatus.UNKNOWN_WORKER
    assert controller.post("/health", {"instance_id": "A"}).status_code == 404


def test_query_chunks_lists_what_the_index_credits_each_worker(
    controller: ControllerProc, worker: ProtoWorker
) -> None:
    assert worker.register().ok
    hashes = chunk_hashes(TOKENS, 4)
    worker.report(hashes)
    worker.report([2**64 - 1, 5], location="LocalDiskBackend")
    worker.report(hashes[1:2], admit=False)
    wait_until(lambda: controller.metric("index_chunks") == 4, timeout=5, what="reports applied")
    body = controller.post("/query_chunks", {"instance_id": "A"}).json()
    assert body["event_id"] and body["chunk_hashes"] == {
        "0": {
            "LocalCPUBackend": sorted((hashes[0], hashes[2])),
            "LocalDiskBackend": [5, 2**64 - 1],
        }
    }
    resp = controller.post("/query_chunks", {"instance_id": "A", "worker_ids": [1]})
    assert resp.status_code == 404 and "[1]" in resp.json()["message"]
    resp = controller.post("/query_chunks", {"instance_id": "nope"})
    assert resp.status_code == 404 and "'nope'" in resp.json()["message"]
    assert worker.deregister()
    assert controller.post("/query_chunks", {"instance_id": "A"}).status_code == 404


def test_deregistration_drops_chunks_and_memory_at_once(
    controller: ControllerProc, worker: ProtoWorker
) -> None:
    assert worker.register().ok
    worker.report(range(1, 50_001))
    worker.report(chunk_hashes(TOKENS, 4))
    wait_until(lambda: controller.lookup(TOKENS), timeout=5)
    assert controller.metric("index_chunks") == 50_003
    assert worker.deregister()
    assert controller.lookup(TOKENS) == {}
    assert controller.metric("index_chunks") == 0
    assert controller.metric("chunks_dropped") == 50_003


def test_sequence_gap_asks_for_resync(controller: ControllerProc, worker: ProtoWorker) -> None:
    assert worker.register().ok
    worker.report([1])
    worker.report([2], seq=5)
    wait_until(lambda: controller.metric("sequence_gaps") == 1, timeout=5)
    assert worker.heartbeat() is HeartbeatStatus.RESYNC
    assert worker.register().ok  # the resync starts with a fresh registration
    assert worker.heartbeat() is HeartbeatStatus.OK


def test_commands_to_dead_or_hung_workers_answer_within_the_deadline(
    controller: ControllerProc, worker: ProtoWorker
) -> None:
    assert worker.register().ok  # nothing listens on its command port yet: dead
    worker.keep_alive()
    start = time.monotonic()
    resp = controller.post("/health", {"instance_id": "A"})
    assert time.monotonic() - start < 4
    assert resp.status_code == 200
    assert resp.json()["error_codes"] == {"0": int(ErrorCode.TIMEOUT)}
    resp = controller.post("/clear", {"instance_id": "A", "location": "LocalCPUBackend"})
    assert resp.status_code == 503
    body = resp.json()
    assert (
        body["error_codes"] == {"0": int(ErrorCode.TIMEOUT)} and "did not answer" in body["message"]
    )
    assert controller.post("/check_finish", {"event_id": body["event_id"]}).json() == {
        "status": "failed"
    }
    # the worker comes up: the next call works
    seen: list[Any] = []

    def answer(cmd: Any) -> CommandReply:
        seen.append(cmd)
        return CommandReply(num_tokens=12)

    worker.serve_commands(answer)
    resp = controller.post("/clear", {"instance_id": "A", "location": "LocalCPUBackend"})
    assert resp.status_code == 200 and resp.json()["num_tokens"] == 12
    assert seen[-1].locations == ["LocalCPUBackend"]
    event_id = resp.json()["event_id"]
    assert controller.post("/check_finish", {"event_id": event_id}).json() == {"status": "finished"}
    resp = controller.post("/health", {"instance_id": "A"})
    assert resp.json()["error_codes"] == {"0": 0}
    assert isinstance(seen[-1], HealthCommand)


def test_hung_worker_times_out_and_unsupported_maps_to_501(
    controller: ControllerProc, worker: ProtoWorker
) -> None:
    worker.serve_commands(lambda cmd: None)  # receives, never answers
    assert worker.register().ok
    worker.keep_alive()
    start = time.monotonic()
    resp = controller.post("/health", {"instance_id": "A"})
    assert time.monotonic() - start < 4
    assert resp.json()["error_codes"] == {"0": int(ErrorCode.TIMEOUT)}
    other = ProtoWorker(controller.pull, controller.reply, "B", port=free_ports(1)[0])
    try:
        other.serve_commands(
            lambda cmd: CommandReply(error_code=ErrorCode.UNSUPPORTED, message="no codec")
        )
        assert other.register().ok
        body = {"instance_id": "B", "method": "zstd", "location": "LocalCPUBackend"}
        resp = controller.post("/compress", body)
        assert resp.status_code == 501 and "no codec" in resp.json()["message"]
    finally:
        other.close()


def test_ops_endpoints(controller: ControllerProc) -> None:
    assert httpx.get(controller.url + "/conf").json()["worker_timeout"] == TIMEOUT
    # /threads and /loglevel answer as on the internal API (kvplane.web.diagnostics)
    threads = httpx.get(controller.url + "/threads").json()
    assert threads["count"] == len(threads["threads"])
    assert "kvplane-ingest" in [t["name"] for t in threads["threads"]]
    # Levels are set by POST (open here: no api_token); a GET with level= is refused.
    resp = httpx.get(
        controller.url + "/loglevel", params={"logger_name": "kvplane", "level": "DEBUG"}
    )
    assert (resp.status_code, resp.json()["error"]) == (400, "Use POST")
    resp = httpx.post(
        controller.url + "/loglevel", json={"logger_name": "kvplane", "level": "DEBUG"}
    )
    assert resp.json() == {
        "status": "success",
        "logger_name": "kvplane",
        "level": "DEBUG",
        "effective_level": "DEBUG",
    }
    resp = httpx.post(controller.url + "/loglevel", json={"logger_name": "x", "level": "LOUD"})
    assert (resp.status_code, resp.json()["error"]) == (400, "Bad level")
    resp = httpx.get(controller.url + "/loglevel", params={"logger_name": "no.such.logger"})
    assert (resp.status_code, resp.json()["error"]) == (404, "Unknown logger")
    assert httpx.get(controller.url + "/loglevel").json()["loggers"]["kvplane"] == "DEBUG"
    resp = httpx.get(controller.url + "/no/such/path")
    assert resp.status_code == 404 and resp.json()["error"] == "Not Found"
    assert httpx.get(controller.url + "/docs").status_code == 200
    schema = httpx.get(controller.url + "/openapi.json").json()
    assert "/lookup" in schema["paths"]
    # No api_token: nothing is guarded, and the document says so.
    assert httpx.get(controller.url + "/conf").json()["api_token"] is None
    assert "securitySchemes" not in schema.get("components", {})
    assert "401" not in schema["paths"]["/clear"]["post"]["responses"]


def test_lookups_are_not_starved_by_an_admit_burst(
    controller: ControllerProc, worker: ProtoWorker
) -> None:
    """/lookup p99 < 10 ms while 300K admits are ingested.

    The machine is shared, so a burst counts only when lookups on the idle controller just
    before and just after it had p99 < 5 ms (else the round is repeated), and the median of
    three counted bursts must hold. Too busy a machine for three clean rounds skips, saying
    so."""
    import http.client

    import numpy as np

    from kvplane.protocol import ChunkReport, Segment, encode

    assert worker.register().ok
    worker.keep_alive()
    worker.report(chunk_hashes(TOKENS, 4))
    wait_until(lambda: controller.lookup(TOKENS), timeout=5)
    port = int(controller.url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    body = json.dumps({"tokens": list(range(8192))}).encode()

    def lookup() -> float:
        start = time.perf_counter()
        conn.request("POST", "/lookup", body, {"content-type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
        return time.perf_counter() - start

    def p99(values: list[float]) -> float:
        return sorted(values)[min(len(values) - 1, int(0.99 * len(values)))]

    rng = np.random.default_rng(3)
    burst_p99s: list[float] = []
    idle_p99s: list[float] = []
    total = 0
    for _ in range(10):
        idle = p99([lookup() for _ in range(50)])
        idle_p99s.append(idle)
        hashes = rng.integers(1, 2**63, 300_000, dtype=np.uint64)
        total += len(hashes)
        frames = [
            encode(
                ChunkReport(
                    instance_id="A", worker_id=0, epoch=worker.epoch, seq=worker.seq + 1 + i,
                    segments=[Segment(True, "LocalCPUBackend", hashes[s : s + 4096].tobytes())],
                )
            )
            for i, s in enumerate(range(0, len(hashes), 4096))
        ]  # fmt: skip
        worker.seq += len(frames)
        target = controller.metric("chunk_events_applied") + len(hashes)
        for frame in frames:
            worker.send_raw(frame)
        latencies: list[float] = []
        deadline = time.monotonic() + 60
        while controller.metric("chunk_events_applied") < target:
            assert time.monotonic() < deadline, "the burst was not applied within 60 s"
            latencies.extend(lookup() for _ in range(10))
        idle = max(idle, p99([lookup() for _ in range(50)]))
        if idle < 0.005:
            burst_p99s.append(p99(latencies))
        if len(burst_p99s) == 3:
            break
    conn.close()
    assert controller.metric("index_chunks") == total + 3
    if len(burst_p99s) < 3:
        pytest.skip(
            f"machine too busy to measure: idle p99s {[round(v * 1000, 1) for v in idle_p99s]} ms"
        )
    burst_p99s.sort()
    assert burst_p99s[1] < 0.010, (
        f"lookup p99 per burst (ms): {[round(v * 1000, 1) for v in burst_p99s]}"
    )
