"""The worker inside a real engine runtime, against a real controller process.

Engines run in this process (EngineProcess with enable_controller) so the test can store
prompts directly; the controller is a separate process reached over loopback.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from kvplane.config import EngineConfig
from kvplane.engine.events import StorageEvent, Subscription
from kvplane.process import EngineProcess
from kvplane.protocol import ErrorCode, ResyncCommand
from kvplane.worker.reports import ReportBuffer
from kvplane.worker.service import ControllerWorker
from tests.controller_client import ControllerProc, controller_args, wait_controller_up
from tests.support import free_ports, kvplane_process, wait_until

HEARTBEAT = 0.3
CHUNK = 16


def fast_controller_args(http: int, pull: int, reply: int) -> list[str]:
    return controller_args(
        http, pull, reply, worker_timeout=2.0, health_check_interval=0.1, command_timeout=2
    )


@pytest.fixture
def ports() -> list[int]:
    return free_ports(3)


@pytest.fixture
def ctl(tmp_path: Path, ports: list[int]) -> Iterator[ControllerProc]:
    http, pull, reply = ports
    log = tmp_path / "controller.log"
    with kvplane_process(fast_controller_args(http, pull, reply), log_path=log):
        url = f"http://127.0.0.1:{http}"
        wait_controller_up(url)
        yield ControllerProc(url, pull, reply, log)


def make_engine(
    ctl: ControllerProc, instance_id: str, *, start: bool = True, **overrides: Any
) -> EngineProcess:
    cfg = dict(
        chunk_size=CHUNK,
        kv_num_layers=2,
        kv_num_heads=2,
        kv_head_size=16,
        kv_block_size=16,
        kv_num_blocks=64,
        max_local_cpu_size=0.01,
        enable_controller=True,
        lmcache_instance_id=instance_id,
        controller_pull_url=f"127.0.0.1:{ctl.pull}",
        controller_reply_url=f"127.0.0.1:{ctl.reply}",
        lmcache_worker_heartbeat_time=HEARTBEAT,
        controller_timeout_s=1.0,
    )
    cfg.update(overrides)
    rt = EngineProcess(EngineConfig(**cfg))
    if start:
        rt.start()
    return rt


def store(rt: EngineProcess, tokens: list[int]) -> int:
    slots = torch.arange(len(tokens))
    return rt.cache_engine.store(tokens, rt.kv_caches, slots).num_tokens


@pytest.fixture
def engines(ctl: ControllerProc) -> Iterator[list[EngineProcess]]:
    rts = [make_engine(ctl, "inst-a"), make_engine(ctl, "inst-b")]
    yield rts
    for rt in rts:
        rt.stop()


def registered(ctl: ControllerProc, *instances: str) -> bool:
    return all(
        ctl.post("/query_worker_info", {"instance_id": i}).status_code == 200 for i in instances
    )


PROMPT = list(range(1000, 1000 + 5 * CHUNK + 7))  # 5 full chunks + a partial one


def test_store_lookup_partial_clear(ctl: ControllerProc, engines: list[EngineProcess]) -> None:
    a, b = engines
    wait_until(lambda: registered(ctl, "inst-a", "inst-b"), timeout=30, what="registration")
    assert store(a, PROMPT) == len(PROMPT)
    wait_until(lambda: ctl.lookup(PROMPT), timeout=30, what="admits reach the controller")
    assert ctl.lookup(PROMPT) == {"inst-a": ["LocalCPUBackend", len(PROMPT)]}
    longer = [*PROMPT[: 3 * CHUNK], *range(7, 7 + 2 * CHUNK)]
    assert ctl.lookup(longer) == {"inst-a": ["LocalCPUBackend", 3 * CHUNK]}
    assert store(b, PROMPT[: 2 * CHUNK]) == 2 * CHUNK
    wait_until(lambda: "inst-b" in ctl.lookup(PROMPT), timeout=30)
    assert ctl.lookup(PROMPT)["inst-b"] == ["LocalCPUBackend", 2 * CHUNK]
    resp = ctl.post("/clear", {"instance_id": "inst-a", "location": "LocalCPUBackend"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["num_tokens"] == len(PROMPT)  # 5 full chunks and a 7-token one
    wait_until(lambda: "inst-a" not in ctl.lookup(PROMPT), timeout=30, what="evicts applied")
    assert ctl.lookup(PROMPT) == {"inst-b": ["LocalCPUBackend", 2 * CHUNK]}
    assert a.cache_engine.lookup(PROMPT) == 0
    resp = ctl.post("/clear", {"instance_id": "inst-b", "location": "NoSuchBackend"})
    assert resp.status_code == 404 and "NoSuchBackend" in resp.json()["message"]


def test_pinned_chunks_survive_memory_pressure(ctl: ControllerProc) -> None:
    # room for about 8 chunks in the CPU tier
    rt = make_engine(ctl, "inst-p", max_local_cpu_size=8 * 2 * 2 * CHUNK * 2 * 16 * 2 / 2**30)
    try:
        wait_until(lambda: registered(ctl, "inst-p"), timeout=30)
        pinned = list(range(2 * CHUNK))
        store(rt, pinned)
        resp = ctl.post(
            "/pin", {"instance_id": "inst-p", "location": "LocalCPUBackend", "tokens": pinned}
        )
        assert resp.status_code == 200 and resp.json()["num_tokens"] == 2 * CHUNK
        for i in range(6):  # 30 more chunks through an 8-chunk tier
            store(rt, list(range(10_000 * (i + 1), 10_000 * (i + 1) + 5 * CHUNK)))
        assert rt.cache_engine.lookup(pinned) == 2 * CHUNK
        first = list(range(10_000, 10_000 + 5 * CHUNK))
        wait_until(lambda: "inst-p" not in ctl.lookup(first), timeout=30, what="evictions reported")
        # the evictions have reached the controller; the pinned chunks were not among them
        assert ctl.lookup(pinned) == {"inst-p": ["LocalCPUBackend", 2 * CHUNK]}
    finally:
        rt.stop()


def test_pin_acts_on_the_named_tier_and_refuses_an_unknown_one(
    ctl: ControllerProc, tmp_path: Path
) -> None:
    rt = make_engine(ctl, "inst-d", local_disk=str(tmp_path / "disk"), max_local_disk_size=0.01)
    try:
        wait_until(lambda: registered(ctl, "inst-d"), timeout=30)
        store(rt, PROMPT)
        assert rt.storage.flush(30)
        keys = rt.cache_engine.keys_for(PROMPT)
        disk = rt.storage.backends["LocalDiskBackend"]
        body = {"instance_id": "inst-d", "location": "LocalDiskBackend", "tokens": PROMPT}
        resp = ctl.post("/pin", body)
        assert resp.status_code == 200 and resp.json()["num_tokens"] == len(PROMPT), resp.text
        assert all(disk.is_pinned(k) for k in keys)  # type: ignore[attr-defined]
        assert not any(rt.storage.cpu.is_pinned(k) for k in keys)  # type: ignore[union-attr]
        resp = ctl.post("/pin", {**body, "location": "NoSuchBackend"})
        assert resp.status_code == 404 and "NoSuchBackend" in resp.json()["message"]
        assert "LocalDiskBackend" in resp.json()["message"]  # the tiers there are
        resp = ctl.post("/pin", {**body, "location": None})  # no location: the CPU tier
        assert resp.status_code == 200 and all(rt.storage.cpu.is_pinned(k) for k in keys)  # type: ignore[union-attr]
    finally:
        rt.stop()


def test_health_check_finish_compress_and_move_without_p2p(
    ctl: ControllerProc, engines: list[EngineProcess]
) -> None:
    a, _ = engines
    wait_until(lambda: registered(ctl, "inst-a", "inst-b"), timeout=30)
    resp = ctl.post("/health", {"instance_id": "inst-a"})
    assert resp.status_code == 200 and resp.json()["error_codes"] == {"0": 0}
    status = ctl.post("/check_finish", {"event_id": resp.json()["event_id"]}).json()["status"]
    assert status == "finished"
    store(a, PROMPT)
    body = {
        "instance_id": "inst-a",
        "method": "zstd",
        "location": "LocalCPUBackend",
        "tokens": PROMPT,
    }
    resp = ctl.post("/compress", body)
    assert resp.status_code == 200 and resp.json()["num_tokens"] == len(PROMPT), resp.text
    resp = ctl.post("/decompress", body)
    assert resp.status_code == 200 and resp.json()["num_tokens"] == len(PROMPT), resp.text
    resp = ctl.post("/compress", {**body, "method": "no-such-codec"})
    assert resp.status_code == 400 and "no-such-codec" in resp.json()["message"]
    resp = ctl.post("/decompress", {**body, "method": "no-such-codec"})
    message = resp.json()["message"]  # names the bad method and the valid ones
    assert resp.status_code == 400 and "no-such-codec" in message and "zstd" in message, message
    assert ctl.post("/compress", body).json()["num_tokens"] == len(PROMPT)
    resp = ctl.post("/decompress", {**body, "method": "int8"})  # they are zstd chunks
    assert resp.status_code == 200 and resp.json()["num_tokens"] == 0, resp.text
    move = {
        "old_position": ["inst-a", "LocalCPUBackend"],
        "new_position": ["inst-b", "LocalCPUBackend"],
        "tokens": PROMPT,
        "copy": True,
    }
    resp = ctl.post("/move", move)  # these engines run without enable_p2p: understood, not servable
    body = resp.json()
    assert resp.status_code == 409 and body["error"] == "Unsupported", resp.text
    assert "peer URL" in body["message"] and "enable_p2p" in body["message"], resp.text


def test_workers_info_heartbeats_advance_and_clean_stop_deregisters(ctl: ControllerProc) -> None:
    a, b = make_engine(ctl, "inst-a"), make_engine(ctl, "inst-b")
    try:
        wait_until(lambda: registered(ctl, "inst-a", "inst-b"), timeout=30)
        infos = [
            ctl.post("/query_worker_info", {"instance_id": i}).json()["worker_infos"][0]
            for i in ("inst-a", "inst-b")
        ]
        assert {i["instance_id"] for i in infos} == {"inst-a", "inst-b"}
        assert all(i["port"] > 0 and i["ip"] == "127.0.0.1" for i in infos)
        body = {"instance_id": "inst-a", "worker_ids": [0]}
        wait_until(
            lambda: (
                ctl.post("/query_worker_info", body).json()["worker_infos"][0][
                    "last_heartbeat_time"
                ]
                > infos[0]["last_heartbeat_time"]
            ),
            timeout=30,
            what="a later heartbeat",
        )
        store(a, PROMPT)
        wait_until(lambda: ctl.lookup(PROMPT), timeout=30)
    finally:
        a.stop()
    assert ctl.lookup(PROMPT) == {}  # deregistered at stop: gone at once, no timeout wait
    assert ctl.post("/health", {"instance_id": "inst-a"}).status_code == 404
    b.stop()


def test_controller_restart_reregisters_and_resyncs(
    tmp_path: Path, ports: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kvplane.worker.service")
    http, pull, reply = ports
    url = f"http://127.0.0.1:{http}"
    ctl = ControllerProc(url, pull, reply, tmp_path / "c1.log")
    with kvplane_process(fast_controller_args(http, pull, reply), log_path=ctl.log):
        wait_controller_up(url)
        rt = make_engine(ctl, "inst-r", start=False)
        worker = rt.services[0]
        assert isinstance(worker, ControllerWorker)
        worker.buffer = ReportBuffer(max_batch=2)  # 6 chunks: a "large" resync of 3 reports
        rt.start()
        try:
            wait_until(lambda: registered(ctl, "inst-r"), timeout=30)
            store(rt, PROMPT)
            wait_until(lambda: ctl.lookup(PROMPT), timeout=30)
        except BaseException:
            rt.stop()
            raise
    try:
        with kvplane_process(fast_controller_args(http, pull, reply), log_path=tmp_path / "c2.log"):
            wait_controller_up(url)
            wait_until(
                lambda: ctl.lookup(PROMPT) == {"inst-r": ["LocalCPUBackend", len(PROMPT)]},
                timeout=60,
                interval=0.02,
                what="resync after restart",
            )
            # how: told 'unknown worker' by the new controller, it registered again and
            # resent its keys (6 chunks)
            stats = rt.services[0].stats  # type: ignore[attr-defined]
            assert stats["registrations"] == 2 and stats["resyncs"] >= 1
            assert ctl.metric("registrations") == 1 and ctl.metric("admits_applied") == 6
        resync = [r.getMessage() for r in caplog.records if "resync" in r.getMessage()]
        assert "worker inst-r/0 registered with the controller; resyncing 6 chunks" in resync
        assert "worker inst-r/0: resync sent: 6 chunks in 3 reports" in resync
    finally:
        rt.stop()


class GatedEvents:
    """A worker's event subscription that the test holds back: while ``open`` is clear the
    worker takes nothing, as if its thread were slow."""

    def __init__(self, sub: Subscription) -> None:
        self.sub = sub
        self.open = threading.Event()
        self.open.set()

    def take_events(self, timeout: float | None = 0.0) -> list[StorageEvent]:
        return self.sub.take_events(timeout) if self.open.is_set() else []

    def take_resync(self) -> bool:
        return self.open.is_set() and self.sub.take_resync()

    def close(self) -> None:
        self.sub.close()

    def __len__(self) -> int:
        return len(self.sub)


def test_lost_events_make_the_worker_resync_so_the_controller_still_agrees(
    ctl: ControllerProc,
) -> None:
    rt = make_engine(ctl, "inst-o", start=False)
    worker = rt.services[0]
    assert isinstance(worker, ControllerWorker)
    worker.events.close()
    gated = GatedEvents(rt.storage.subscribe("controller worker", capacity=4))
    worker.events = gated  # type: ignore[assignment]
    rt.start()
    try:
        wait_until(lambda: registered(ctl, "inst-o"), timeout=30, what="registration")
        gated.open.clear()
        assert store(rt, PROMPT) == len(PROMPT)  # 6 admits into a queue of 4: 4 are lost
        assert gated.sub.dropped == 4
        gated.open.set()
        wait_until(
            lambda: ctl.lookup(PROMPT) == {"inst-o": ["LocalCPUBackend", len(PROMPT)]},
            timeout=30,
            what="the resync restores the lost admits",
        )
        stats = worker.stats
        assert (stats["event_overflows"], stats["resyncs"], stats["registrations"]) == (1, 1, 2)
        dropped = rt.metrics.events_dropped.labels("controller worker")._value.get()
        assert dropped == 4
    finally:
        rt.stop()
    assert gated.sub.closed  # the worker closes its subscription on stop


class FailingOnce:
    """A worker's event subscription whose next take raises once ``armed`` is set: a bug or
    fault inside the worker's control round."""

    def __init__(self, sub: Subscription) -> None:
        self.sub = sub
        self.armed = threading.Event()

    def take_events(self, timeout: float | None = 0.0) -> list[StorageEvent]:
        if self.armed.is_set():
            self.armed.clear()
            raise RuntimeError("injected fault in the control round")
        return self.sub.take_events(timeout)

    def take_resync(self) -> bool:
        return self.sub.take_resync()

    def close(self) -> None:
        self.sub.close()

    def __len__(self) -> int:
        return len(self.sub)


def test_a_failing_control_round_is_reported_and_the_worker_resyncs(
    ctl: ControllerProc, caplog: pytest.LogCaptureFixture
) -> None:
    rt = make_engine(ctl, "inst-f", start=False)
    worker = rt.services[0]
    assert isinstance(worker, ControllerWorker)
    worker.events.close()
    failing = FailingOnce(rt.storage.subscribe("controller worker"))
    worker.events = failing  # type: ignore[assignment]
    rt.start()
    try:
        wait_until(lambda: registered(ctl, "inst-f"), timeout=30, what="registration")
        failing.armed.set()
        assert store(rt, PROMPT) == len(PROMPT)
        wait_until(lambda: worker.stats["control_failures"] == 1, timeout=30, what="the fault")
        # the loop went on: it re-registered, resent its keys, and reports what follows
        wait_until(lambda: worker.stats["registrations"] == 2, timeout=30, what="resync")
        full = {"inst-f": ["LocalCPUBackend", len(PROMPT)]}
        wait_until(lambda: ctl.lookup(PROMPT) == full, timeout=30, what="the prompt routed")
        later = list(range(50_000, 50_000 + 2 * CHUNK))
        store(rt, later)
        wait_until(lambda: ctl.lookup(later), timeout=30, what="reports after the fault")
        assert worker.registered.is_set() and worker.stats["resyncs"] == 1
        assert "worker control round failed" in caplog.text
    finally:
        rt.stop()
    assert not worker.registered.is_set()


def test_a_resync_while_frozen_sends_the_tiers_as_they_are(ctl: ControllerProc) -> None:
    """Frozen, the engine reports nothing, but a resync (here the controller's
    ResyncCommand, through the worker's command handlers) resends the tiers' true contents;
    the evictions held back by the freeze, delivered when it is lifted, agree with them."""
    rt = make_engine(ctl, "inst-z")
    worker = rt.services[0]
    assert isinstance(worker, ControllerWorker)
    try:
        wait_until(lambda: registered(ctl, "inst-z"), timeout=30, what="registration")
        kept = list(range(60_000, 60_000 + 2 * CHUNK))
        store(rt, PROMPT)
        store(rt, kept)
        wait_until(lambda: ctl.lookup(PROMPT) and ctl.lookup(kept), timeout=30, what="admits")
        rt.cache_engine.frozen = True
        cpu = rt.storage.backends["LocalCPUBackend"]
        for key in rt.cache_engine.keys_for(PROMPT):
            assert cpu.remove(key)  # gone from the tier; the freeze holds the evictions back
        assert ctl.lookup(PROMPT) == {"inst-z": ["LocalCPUBackend", len(PROMPT)]}
        reply = worker.handlers.handle(ResyncCommand(event_id="resync-frozen"))
        assert reply.error_code == ErrorCode.OK
        wait_until(lambda: worker.stats["registrations"] == 2, timeout=30, what="resync")
        wait_until(lambda: ctl.lookup(PROMPT) == {}, timeout=30, what="the snapshot applied")
        assert ctl.lookup(kept) == {"inst-z": ["LocalCPUBackend", len(kept)]}
        assert ctl.metric("index_chunks") == 2
        rt.cache_engine.frozen = False  # the held evictions go out now: nothing changes
        wait_until(
            lambda: ctl.metric("evicts_applied") >= len(rt.cache_engine.keys_for(PROMPT)),
            timeout=30,
            what="the held evictions delivered",
        )
        assert ctl.lookup(PROMPT) == {}
        assert ctl.lookup(kept) == {"inst-z": ["LocalCPUBackend", len(kept)]}
        assert ctl.metric("index_chunks") == 2
    finally:
        rt.stop()


def test_a_dropped_report_leaves_a_gap_and_the_worker_resyncs(
    ctl: ControllerProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A report the worker's socket refuses (zmq.Again, a full queue) is counted and its
    sequence number skipped; the controller sees the gap, answers RESYNC, and the worker
    re-registers and resends its keys: what the dropped report carried is routed again."""
    import zmq

    from kvplane.protocol import ChunkReport
    from kvplane.worker import service

    full = threading.Event()
    real_encode = service.encode

    def encode(msg: Any) -> bytes:
        if isinstance(msg, ChunkReport) and full.is_set():
            full.clear()
            raise zmq.Again("the socket's queue is full")
        return real_encode(msg)

    monkeypatch.setattr(service, "encode", encode)
    rt = make_engine(ctl, "inst-g")
    worker = rt.services[0]
    assert isinstance(worker, ControllerWorker)
    try:
        wait_until(lambda: registered(ctl, "inst-g"), timeout=30, what="registration")
        full.set()
        store(rt, PROMPT)
        wait_until(lambda: worker.stats["reports_dropped"] == 1, timeout=30, what="the drop")
        assert ctl.lookup(PROMPT) == {}
        after = list(range(70_000, 70_000 + 2 * CHUNK))
        store(rt, after)  # the next report's number shows the gap
        wait_until(lambda: ctl.metric("sequence_gaps") == 1, timeout=30, what="the gap")
        wait_until(lambda: worker.stats["registrations"] == 2, timeout=30, what="resync")
        full_prompt = {"inst-g": ["LocalCPUBackend", len(PROMPT)]}
        wait_until(lambda: ctl.lookup(PROMPT) == full_prompt, timeout=30, what="resent keys")
        assert ctl.lookup(after) == {"inst-g": ["LocalCPUBackend", len(after)]}
        assert worker.stats["resyncs"] == 1 and ctl.metric("resyncs_requested") >= 1
    finally:
        rt.stop()


def test_worker_refused_on_key_scheme_mismatch_logs_on_both_sides(
    ctl: ControllerProc, caplog: pytest.LogCaptureFixture
) -> None:
    a = make_engine(ctl, "inst-k", chunk_size=CHUNK)
    try:
        wait_until(lambda: registered(ctl, "inst-k"), timeout=30)
        b = make_engine(ctl, "inst-k", chunk_size=2 * CHUNK, worker_id=1, world_size=2)
        try:
            wait_until(lambda: "refused worker inst-k/1" in ctl.log.read_text(), timeout=30)
            wait_until(lambda: "refused registration" in caplog.text, timeout=30)
            assert not b.services[0].registered.is_set()  # type: ignore[attr-defined]
        finally:
            b.stop()
    finally:
        a.stop()


def test_unknown_error_code_values_are_stable() -> None:
    assert [int(c) for c in ErrorCode] == [0, 1, 2, 3, 4, 5, 6, 7]
