"""Registry: registration checks, liveness, sequence numbers, re-registration."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvplane.controller.registry import Registry, SeqCheck, WorkerKey
from kvplane.keys import key_scheme_fingerprint
from kvplane.protocol import PROTOCOL_VERSION, HeartbeatStatus, RegisterRequest


def req(
    instance: str = "A", worker: int = 0, *, port: int = 8001, epoch: int = 1, **kw
) -> RegisterRequest:
    fields = {
        "instance_id": instance,
        "worker_id": worker,
        "ip": "127.0.0.1",
        "port": port,
        "peer_init_url": "127.0.0.1:8200",
        "key_scheme": key_scheme_fingerprint(256),
        "chunk_size": 256,
        "epoch": epoch,
    }
    fields.update(kw)
    return RegisterRequest(**fields)


def test_register_refuses_protocol_and_key_scheme_mismatches_with_a_reason() -> None:
    reg = Registry(30)
    out = reg.register(req(protocol_version=PROTOCOL_VERSION + 1), 0)
    assert not out.accepted and "protocol version" in out.reason
    out = reg.register(req(key_scheme="md5/chunk_size=256"), 0)
    assert not out.accepted and "key scheme" in out.reason
    assert len(reg) == 0
    assert reg.register(req(), 0).accepted
    other = req(worker=1, chunk_size=128, key_scheme=key_scheme_fingerprint(128))
    out = reg.register(other, 0)
    assert not out.accepted and "rank 0" in out.reason


def test_reregister_replaces_address_and_old_epoch_is_unknown() -> None:
    reg = Registry(30)
    reg.register(req(port=8001, epoch=1), 0)
    out = reg.register(req(port=9001, epoch=2), 5)
    assert out.accepted and out.replaced is not None and out.replaced.port == 8001
    rec = reg.get(WorkerKey("A", 0))
    assert rec is not None and rec.port == 9001 and rec.registration_time == 5
    assert reg.heartbeat(WorkerKey("A", 0), 1, 6) is HeartbeatStatus.UNKNOWN_WORKER
    assert reg.heartbeat(WorkerKey("A", 0), 2, 6) is HeartbeatStatus.OK
    assert reg.deregister(WorkerKey("A", 0), 1) is None
    assert reg.deregister(WorkerKey("A", 0), 2) is not None


def test_reap_returns_exactly_the_silent_workers() -> None:
    reg = Registry(10)
    reg.register(req("A"), 0)
    reg.register(req("B"), 0)
    reg.heartbeat(WorkerKey("A", 0), 1, 8)
    assert reg.reap(10) == []
    dead = reg.reap(10.5)
    assert [r.key for r in dead] == [WorkerKey("B", 0)]
    assert reg.instances() == ["A"]
    assert reg.heartbeat(WorkerKey("B", 0), 1, 11) is HeartbeatStatus.UNKNOWN_WORKER


def test_new_worker_is_not_told_to_resync_but_a_gap_is() -> None:
    reg = Registry(30)
    key = WorkerKey("A", 0)
    reg.register(req(), 0)
    assert reg.heartbeat(key, 1, 1) is HeartbeatStatus.OK
    assert reg.check_seq(key, 1, 1) is SeqCheck.APPLY
    assert reg.check_seq(key, 1, 1) is SeqCheck.STALE
    assert reg.check_seq(key, 1, 3) is SeqCheck.GAP
    assert reg.heartbeat(key, 1, 2) is HeartbeatStatus.RESYNC
    reg.register(req(epoch=2), 3)
    assert reg.heartbeat(key, 2, 4) is HeartbeatStatus.OK
    assert reg.check_seq(key, 1, 4) is SeqCheck.UNKNOWN


def test_query_helpers() -> None:
    reg = Registry(30)
    reg.register(req("B", 1, port=2), 0)
    reg.register(req("B", 0, port=1), 0)
    reg.register(req("A", 0, ip="10.0.0.2"), 0)
    assert [w.worker_id for w in reg.workers("B")] == [0, 1]
    assert reg.workers("nope") == []
    assert reg.instance_by_ip("10.0.0.2") == "A"
    assert reg.instance_by_ip("10.9.9.9") is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 12), max_size=30))
def test_sequence_classification_matches_a_counter(seqs: list[int]) -> None:
    reg = Registry(30)
    key = WorkerKey("A", 0)
    reg.register(req(), 0)
    expected = 1
    gaps = 0
    for seq in seqs:
        got = reg.check_seq(key, 1, seq)
        if seq < expected:
            assert got is SeqCheck.STALE
        elif seq == expected:
            assert got is SeqCheck.APPLY
        else:
            assert got is SeqCheck.GAP
            gaps += 1
        expected = max(expected, seq + 1)
    status = reg.heartbeat(key, 1, 1)
    assert (status is HeartbeatStatus.RESYNC) == (gaps > 0)
