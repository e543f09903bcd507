"""The worker's report buffer: order kept, runs merged, batches bounded, closed = dropped."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvplane.protocol import unpack_hashes
from kvplane.worker.reports import ReportBuffer, ResyncProgress

event = st.tuples(
    st.booleans(),
    st.sampled_from(["LocalCPUBackend", "LocalDiskBackend"]),
    st.integers(0, 2**64 - 1),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(event, max_size=60), st.integers(1, 7))
def test_drain_replays_events_in_order_within_batch_limits(events: list, max_batch: int) -> None:
    buf = ReportBuffer(max_batch=max_batch)
    buf.restart(lambda: [])
    for admit, loc, h in events:
        buf.record(admit, loc, h)
    assert len(buf) == len(events)
    batches = buf.drain()
    replay = [
        (seg.admit, seg.location, h)
        for batch in batches
        for seg in batch
        for h in unpack_hashes(seg.hashes)
    ]
    assert replay == events
    assert all(sum(len(s.hashes) // 8 for s in batch) <= max_batch for batch in batches)
    assert all(sum(len(s.hashes) // 8 for s in batch) == max_batch for batch in batches[:-1])
    assert len(buf) == 0 and buf.drain() == []


def test_closed_buffer_drops_and_restart_snapshots_first() -> None:
    buf = ReportBuffer()
    buf.record(True, "LocalCPUBackend", 1)  # not registered yet: dropped
    assert len(buf) == 0
    assert buf.restart(lambda: [("LocalCPUBackend", [5, 6]), ("LocalDiskBackend", [])]) == 2
    buf.record(False, "LocalCPUBackend", 5)
    (batch,) = buf.drain()
    assert [(s.admit, s.location, unpack_hashes(s.hashes)) for s in batch] == [
        (True, "LocalCPUBackend", [5, 6]),
        (False, "LocalCPUBackend", [5]),
    ]
    buf.close()
    buf.record(True, "LocalCPUBackend", 7)
    assert buf.drain() == []


def test_a_large_resync_reports_each_tenth_and_its_end() -> None:
    buf = ReportBuffer(max_batch=100)
    total = buf.restart(lambda: [("LocalCPUBackend", list(range(1000)))])
    progress = ResyncProgress(total, buf.max_batch)
    lines = [progress.sent(sum(len(s.hashes) // 8 for s in batch)) for batch in buf.drain()]
    assert lines[:2] == [
        "resync 10%: 100 of 1000 chunks sent in 1 reports",
        "resync 20%: 200 of 1000 chunks sent in 2 reports",
    ]
    assert lines[-1] == "resync sent: 1000 chunks in 10 reports"
    assert len([line for line in lines if line]) == 10 and progress.finished
    assert progress.sent(100) is None  # later reports are not the resync's


@given(st.integers(1, 5000), st.integers(1, 600))
def test_resync_progress_lines_rise_to_the_total(total: int, batch: int) -> None:
    progress = ResyncProgress(total, batch)
    lines = []
    while not progress.finished:
        lines.append(progress.sent(batch))
    shown = [line for line in lines if line]
    if total <= 2 * batch:  # a small resync: no progress lines
        assert shown == []
    else:
        assert shown[-1] == f"resync sent: {total} chunks in {len(lines)} reports"
        assert len(shown) <= 10  # nine tenths at most, then the end
