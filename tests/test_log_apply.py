"""The index as a consumer of the event log (kvplane/controller/log_apply.py) and its
snapshots (kvplane/controller/snapshot.py), pure: no NATS. A log applied whole, or from a
snapshot taken anywhere in it plus the rest, gives the same registry and index."""

from __future__ import annotations

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from kvplane.controller.core import ControllerCore
from kvplane.controller.log_apply import LogApplier
from kvplane.controller.registry import WorkerKey
from kvplane.controller.snapshot import capture, decode_snapshot, encode_snapshot, restore
from kvplane.eventlog import CONTROL_SUBJECT, worker_subject
from kvplane.keys import key_scheme_fingerprint
from kvplane.protocol import (
    ChunkReport,
    ClearCommand,
    HeartbeatRequest,
    ReapEvent,
    RegisterRequest,
    Segment,
    encode,
    pack_hashes,
)

CHUNK = 16
TIERS = ("LocalCPUBackend", "LocalDiskBackend")


def register(instance: str, epoch: int, worker: int = 0) -> RegisterRequest:
    return RegisterRequest(
        instance_id=instance,
        worker_id=worker,
        ip="127.0.0.1",
        port=7000 + worker,
        key_scheme=key_scheme_fingerprint(CHUNK),
        chunk_size=CHUNK,
        epoch=epoch,
    )


def report(instance: str, epoch: int, seq: int, segments: list[Segment]) -> ChunkReport:
    return ChunkReport(instance_id=instance, worker_id=0, epoch=epoch, seq=seq, segments=segments)


def state(core: ControllerCore) -> tuple[object, ...]:
    """Everything a replica answers from: records, and chunks per tier in tier order."""
    records = [msgspec.to_builtins(r) for r in core.registry.all_workers()]
    chunks = {
        str(r.key): [(loc, sorted(hs)) for loc, hs in core.index.chunks(r.key).items()]
        for r in core.registry.all_workers()
    }
    return records, chunks


# a log: per step, (instance 0/1, admit?, tier, hashes) or a re-registration
steps = st.lists(
    st.one_of(
        st.tuples(
            st.integers(0, 1),
            st.booleans(),
            st.sampled_from(TIERS),
            st.lists(st.integers(0, 2**64 - 1), max_size=20),
        ),
        st.tuples(st.integers(0, 1)),
    ),
    max_size=40,
)


def build_log(plan: list[tuple[object, ...]]) -> list[tuple[str, bytes]]:
    epochs, seqs = {0: 1, 1: 1}, {0: 0, 1: 0}
    log = [(worker_subject(f"i{i}", 0), encode(register(f"i{i}", 1))) for i in (0, 1)]
    for step in plan:
        i = int(step[0])  # type: ignore[call-overload]
        name = f"i{i}"
        if len(step) == 1:
            epochs[i] += 1
            seqs[i] = 0
            log.append((worker_subject(name, 0), encode(register(name, epochs[i]))))
            continue
        _, admit, tier, hashes = step
        seqs[i] += 1
        seg = Segment(bool(admit), str(tier), pack_hashes(list(hashes)))  # type: ignore[call-overload]
        log.append((worker_subject(name, 0), encode(report(name, epochs[i], seqs[i], [seg]))))
    return log


def apply_all(applier: LogApplier, log: list[tuple[str, bytes]], first_seq: int = 1) -> None:
    for n, (subject, data) in enumerate(log, start=first_seq):
        applier.apply(n, applier.prepare(subject, data), 1000.0 + n)


@settings(max_examples=60, deadline=None)
@given(steps, st.data())
def test_snapshot_anywhere_then_replay_equals_the_whole_log(plan, data) -> None:
    log = build_log(plan)
    whole = LogApplier(ControllerCore(30.0))
    apply_all(whole, log)
    cut = data.draw(st.integers(0, len(log)))
    head = LogApplier(ControllerCore(30.0))
    apply_all(head, log[:cut])
    snap = decode_snapshot(encode_snapshot(capture(head.core, cut)))
    assert snap.seq == cut
    joined = LogApplier(restore(snap, 30.0), snap.seq)
    apply_all(joined, log[cut:], first_seq=cut + 1)
    assert state(joined.core) == state(whole.core)
    assert joined.applied_seq == whole.applied_seq == len(log)
    for r in whole.core.registry.all_workers():  # and lookups match alike, tier included
        for held in whole.core.index.chunks(r.key).values():
            probe = {CHUNK: held[:3]}
            if held:
                want = whole.core.index.match(probe, 3 * CHUNK)
                assert joined.core.index.match(probe, 3 * CHUNK) == want


def test_registry_times_are_the_log_timestamps() -> None:
    applier = LogApplier(ControllerCore(30.0))
    subject = worker_subject("a", 0)
    applier.apply(1, applier.prepare(subject, encode(register("a", 5))), 100.0)
    beat = HeartbeatRequest(instance_id="a", worker_id=0, epoch=5)
    applier.apply(2, applier.prepare(subject, encode(beat)), 107.5)
    rec = applier.core.registry.get(WorkerKey("a", 0))
    assert rec is not None
    assert (rec.registration_time, rec.last_heartbeat_time) == (100.0, 107.5)


def test_a_reap_drops_the_worker_only_without_a_newer_heartbeat() -> None:
    applier = LogApplier(ControllerCore(30.0))
    subject = worker_subject("a", 0)
    applier.apply(1, applier.prepare(subject, encode(register("a", 5))), 100.0)
    seg = Segment(True, TIERS[0], pack_hashes([1, 2, 3]))
    applier.apply(2, applier.prepare(subject, encode(report("a", 5, 1, [seg]))), 101.0)
    beat = HeartbeatRequest(instance_id="a", worker_id=0, epoch=5)
    applier.apply(3, applier.prepare(subject, encode(beat)), 140.0)
    stale = ReapEvent(instance_id="a", worker_id=0, epoch=5, last_heartbeat_time=100.0)
    applier.apply(4, applier.prepare(CONTROL_SUBJECT, encode(stale)), 141.0)
    assert applier.core.registry.get(WorkerKey("a", 0)) is not None  # beat at 140 keeps it
    other_epoch = ReapEvent(instance_id="a", worker_id=0, epoch=6, last_heartbeat_time=140.0)
    applier.apply(5, applier.prepare(CONTROL_SUBJECT, encode(other_epoch)), 142.0)
    assert applier.core.registry.get(WorkerKey("a", 0)) is not None
    due = ReapEvent(instance_id="a", worker_id=0, epoch=5, last_heartbeat_time=140.0)
    applier.apply(6, applier.prepare(CONTROL_SUBJECT, encode(due)), 180.0)
    assert applier.core.registry.get(WorkerKey("a", 0)) is None
    assert applier.core.index.num_chunks() == 0
    assert applier.core.counters.reaped_workers == 1


def test_garbage_foreign_and_unknown_messages_are_counted_and_skipped() -> None:
    applier = LogApplier(ControllerCore(30.0))
    subject = worker_subject("a", 0)
    applier.apply(1, applier.prepare(subject, encode(register("a", 5))), 100.0)
    seg = Segment(True, TIERS[0], pack_hashes([7]))
    skipped = [
        (subject, b"\x00garbage"),  # not msgpack of a message
        (subject, msgspec.msgpack.encode({"type": "from-the-future", "x": 1})),  # unknown
        (worker_subject("b", 0), encode(report("a", 5, 1, [seg]))),  # another's subject
        (subject, encode(ClearCommand(event_id="e"))),  # a command is not a log message
        (CONTROL_SUBJECT, encode(register("a", 9))),  # a worker's message on ctl
        (
            subject,
            encode(ReapEvent(instance_id="a", worker_id=0, epoch=5, last_heartbeat_time=1e9)),
        ),
    ]
    for n, (subj, data) in enumerate(skipped, start=2):
        applier.apply(n, applier.prepare(subj, data), 101.0)
    c = applier.core.counters
    assert (c.malformed_frames, c.unknown_messages, c.foreign_messages) == (1, 1, 4)
    rec = applier.core.registry.get(WorkerKey("a", 0))
    assert rec is not None and rec.epoch == 5 and applier.core.index.num_chunks() == 0
    assert applier.applied_seq == 1 + len(skipped)


def test_a_registration_seen_again_does_not_wipe_the_chunks_since() -> None:
    applier = LogApplier(ControllerCore(30.0))
    subject = worker_subject("a", 0)
    applier.apply(1, applier.prepare(subject, encode(register("a", 5))), 100.0)
    seg = Segment(True, TIERS[0], pack_hashes([1, 2]))
    applier.apply(2, applier.prepare(subject, encode(report("a", 5, 1, [seg]))), 101.0)
    applier.apply(3, applier.prepare(subject, encode(register("a", 5))), 102.0)
    assert applier.core.index.num_chunks() == 2
    applier.apply(4, applier.prepare(subject, encode(register("a", 6))), 103.0)
    assert applier.core.index.num_chunks() == 0  # a new incarnation starts empty
