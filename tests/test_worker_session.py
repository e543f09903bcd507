"""The worker's session state machine alone: a fake clock, scripted replies, exact transitions."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvplane.protocol import (
    DeregisterRequest,
    HeartbeatReply,
    HeartbeatRequest,
    HeartbeatStatus,
    RegisterReply,
    RegisterRequest,
    Segment,
)
from kvplane.worker.session import Change, Outgoing, Phase, WorkerSession

HB = 5.0  # heartbeat interval
TIMEOUT = 2.0  # reply deadline

HELLO = RegisterRequest(
    instance_id="inst",
    worker_id=1,
    ip="10.0.0.1",
    port=7001,
    peer_init_url="10.0.0.1:8001",
    key_scheme="scheme",
    chunk_size=16,
    epoch=0,
)

OK = RegisterReply(ok=True)


def session(*, replies: bool = True, seed: int = 0, now: float = 100.0) -> WorkerSession:
    return WorkerSession(
        HELLO,
        heartbeat_s=HB,
        timeout_s=TIMEOUT,
        replies=replies,
        rng=random.Random(seed),
        now=now,
    )


def register(s: WorkerSession, now: float) -> int:
    out = s.poll(now)
    assert out is not None and isinstance(out.message, RegisterRequest)
    assert s.on_reply(OK, now) is Change.REGISTERED
    return out.message.epoch


def seg() -> list[Segment]:
    return [Segment(True, "LocalCPUBackend", b"\x01" * 8)]


def test_register_then_heartbeat_on_the_interval() -> None:
    s = session()
    assert s.phase is Phase.UNREGISTERED and not s.registered
    assert s.poll(99.9) is None  # not due before the time it was built with
    out = s.poll(100.0)
    expected_epoch = random.Random(0).getrandbits(62)
    assert out == Outgoing(RegisterRequest(**{**_fields(HELLO), "epoch": expected_epoch}), TIMEOUT)
    assert s.on_reply(OK, 100.0) is Change.REGISTERED
    assert (s.phase, s.epoch, s.seq, s.next_heartbeat) == (
        Phase.REGISTERED,
        expected_epoch,
        0,
        105.0,
    )
    assert s.poll(104.99) is None
    beat = s.poll(105.0)
    assert beat == Outgoing(
        HeartbeatRequest(
            instance_id="inst", worker_id=1, epoch=expected_epoch, ip="10.0.0.1", port=7001
        ),
        min(TIMEOUT, HB),
    )
    assert s.on_reply(HeartbeatReply(status=HeartbeatStatus.OK), 105.0) is Change.NONE
    assert s.next_heartbeat == 110.0


def test_a_heartbeat_never_waits_past_the_next_one() -> None:
    s = WorkerSession(HELLO, heartbeat_s=0.5, timeout_s=3.0, rng=random.Random(1))
    register(s, 0.0)
    out = s.poll(0.5)
    assert out is not None and out.timeout_s == 0.5


def test_refused_and_unanswered_registrations_retry_after_a_second_at_most() -> None:
    s = session()
    first = s.poll(100.0)
    assert s.on_reply(RegisterReply(ok=False, reason="key scheme"), 100.0) is Change.REFUSED
    assert (s.phase, s.next_register) == (Phase.UNREGISTERED, 101.0)
    assert s.poll(100.5) is None
    second = s.poll(101.0)
    assert s.on_reply(None, 101.0) is Change.NO_ANSWER
    assert s.next_register == 102.0
    assert first is not None and second is not None
    assert first.message.epoch != second.message.epoch  # a fresh epoch per attempt
    fast = WorkerSession(HELLO, heartbeat_s=0.2, timeout_s=1.0, rng=random.Random(2))
    fast.poll(0.0)
    fast.on_reply(None, 0.0)
    assert fast.next_register == 0.2  # never slower than the heartbeat


@pytest.mark.parametrize("status", [HeartbeatStatus.UNKNOWN_WORKER, HeartbeatStatus.RESYNC])
def test_unknown_worker_or_resync_re_registers_after_a_jitter(status: HeartbeatStatus) -> None:
    s = session(seed=3)
    old_epoch = register(s, 100.0)
    for _ in range(3):
        s.next_report(seg())
    s.poll(105.0)
    rng = random.Random(3)
    rng.getrandbits(62)  # the epoch drawn at registration
    jitter = rng.uniform(0, min(1.0, HB / 2))
    assert s.on_reply(HeartbeatReply(status=status), 105.0) is Change.DROPPED
    assert (s.phase, s.next_register, s.next_heartbeat) == (
        Phase.UNREGISTERED,
        105.0 + jitter,
        float("inf"),
    )
    with pytest.raises(RuntimeError):
        s.next_report(seg())  # nothing is reported while unregistered
    assert s.poll(105.0 + jitter - 1e-9) is None
    new_epoch = register(s, 105.0 + jitter)
    assert new_epoch != old_epoch and s.seq == 0
    assert s.next_report(seg()).seq == 1  # numbering restarts with the registration


def test_reports_are_numbered_so_a_dropped_one_leaves_a_gap() -> None:
    s = session()
    epoch = register(s, 100.0)
    reports = [s.next_report(seg()) for _ in range(3)]
    assert [(r.epoch, r.seq) for r in reports] == [(epoch, 1), (epoch, 2), (epoch, 3)]
    assert all((r.instance_id, r.worker_id) == ("inst", 1) for r in reports)
    # The shell dropped report 2 (socket full); the controller saw 1 then 3 and answers the
    # next heartbeat with RESYNC:
    s.poll(105.0)
    assert s.on_reply(HeartbeatReply(status=HeartbeatStatus.RESYNC), 105.0) is Change.DROPPED


def test_no_answer_to_a_heartbeat_keeps_the_registration() -> None:
    s = session()
    register(s, 100.0)
    s.poll(105.0)
    assert s.on_reply(None, 105.0) is Change.NONE
    assert s.registered and s.next_heartbeat == 110.0


def test_pull_only_mode_counts_every_registration_as_accepted() -> None:
    s = session(replies=False)
    s.poll(100.0)
    assert s.on_reply(None, 100.0) is Change.REGISTERED
    s.poll(105.0)
    assert s.on_reply(None, 105.0) is Change.NONE
    # A pull-only controller tells an unknown worker to resync by command instead:
    assert s.resync_requested(106.0) is Change.DROPPED
    assert s.resync_requested(106.0) is Change.NONE  # not registered: nothing to drop


def test_close_deregisters_only_a_registered_session() -> None:
    s = session()
    assert s.close() is None and s.phase is Phase.CLOSED
    assert s.poll(1e9) is None
    s = session()
    epoch = register(s, 100.0)
    assert s.close() == Outgoing(
        DeregisterRequest(instance_id="inst", worker_id=1, epoch=epoch), min(TIMEOUT, 2.0)
    )
    assert s.poll(1e9) is None and not s.registered


def test_poll_and_on_reply_alternate() -> None:
    s = session()
    s.poll(100.0)
    with pytest.raises(RuntimeError, match="awaits"):
        s.poll(100.0)
    s.on_reply(OK, 100.0)
    with pytest.raises(RuntimeError):
        s.on_reply(OK, 100.0)


REPLIES = st.sampled_from(
    [
        None,
        RegisterReply(ok=True),
        RegisterReply(ok=False, reason="no"),
        HeartbeatReply(status=HeartbeatStatus.OK),
        HeartbeatReply(status=HeartbeatStatus.UNKNOWN_WORKER),
        HeartbeatReply(status=HeartbeatStatus.RESYNC),
    ]
)
STEPS = st.lists(
    st.tuples(st.floats(0.0, 3 * HB), REPLIES, st.booleans(), st.integers(0, 3)), max_size=60
)


@settings(max_examples=200, deadline=None)
@given(steps=STEPS, seed=st.integers(0, 2**32 - 1), replies=st.booleans())
def test_any_run_keeps_the_session_invariants(
    steps: list[tuple[float, object, bool, int]], seed: int, replies: bool
) -> None:
    """Whatever the controller answers and whenever: heartbeats only while registered and at
    least an interval apart, a fresh epoch per registration, reports numbered 1, 2, ... per
    registration, and a re-registration no sooner than its retry or jitter allows."""
    s = session(replies=replies, seed=seed, now=0.0)
    now = 0.0
    epochs: list[int] = []
    last_beat = -float("inf")
    for dt, reply, resync, reports in steps:
        now += dt
        was = s.phase
        earliest = s.next_register
        out = s.poll(now)
        if out is not None:
            msg = out.message
            if isinstance(msg, RegisterRequest):
                assert was is Phase.UNREGISTERED and now >= earliest
                assert msg.epoch not in epochs
                registering = msg.epoch
            else:
                assert isinstance(msg, HeartbeatRequest)
                assert was is Phase.REGISTERED and msg.epoch == s.epoch
                assert now >= last_beat + HB  # as the session adds (now - last rounds)
                last_beat = now
            change = s.on_reply(reply if replies else None, now)
            if change is Change.REGISTERED:
                epochs.append(registering)
                assert (s.epoch, s.seq) == (registering, 0)
                last_beat = now
            elif change is Change.DROPPED:
                assert s.next_register - now <= min(1.0, HB / 2)
        if resync:
            s.resync_requested(now)
        if s.registered:
            start = s.seq
            numbers = [s.next_report(seg()).seq for _ in range(reports)]
            assert numbers == list(range(start + 1, start + reports + 1))
    assert len(set(epochs)) == len(epochs)


def _fields(msg: RegisterRequest) -> dict[str, object]:
    return {f: getattr(msg, f) for f in msg.__struct_fields__}
