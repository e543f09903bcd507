from hypothesis import given
from hypothesis import strategies as st

from kvplane.engine.chunk_statistics import AutoExit, ChunkStatistics


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


batches = st.lists(st.lists(st.integers(0, 50), max_size=10), max_size=10)


@given(batches)
def test_counts_total_and_unique_while_collecting(batches):
    stats = ChunkStatistics()
    stats.record([1, 2, 3])  # not collecting yet: ignored
    stats.start()
    for batch in batches:
        stats.record(batch)
    status = stats.status()
    assert status.is_collecting
    assert status.total_chunks == sum(len(b) for b in batches)
    assert status.unique_chunks == len({h for b in batches for h in b})


def test_stop_ignores_and_start_keeps_counts_and_reset_forgets():
    stats = ChunkStatistics()
    stats.start()
    stats.record([1, 1, 2])
    stats.stop()
    stats.record([3])
    assert stats.status()[:3] == (False, 3, 2)
    stats.start()
    stats.record([3])
    assert stats.status()[:3] == (True, 4, 3)
    stats.reset()
    assert stats.status()[:3] == (True, 0, 0)


def test_status_reports_settings_and_clock():
    clock = Clock()
    stats = ChunkStatistics(AutoExit(24.0, 1000), clock=clock)
    status = stats.status()
    assert status.timestamp == 1000.0
    assert status.auto_exit_enabled
    assert (status.auto_exit_timeout_hours, status.auto_exit_target_unique_chunks) == (24.0, 1000)
    assert not ChunkStatistics().status().auto_exit_enabled


@given(st.lists(st.integers(0, 30), max_size=80), st.integers(1, 20))
def test_auto_exit_at_target_unique(hashes, target):
    stats = ChunkStatistics(AutoExit(0.0, target))
    stats.start()
    stats.record(hashes)
    status = stats.status()
    assert status.unique_chunks == min(len(set(hashes)), target)
    assert status.is_collecting == (len(set(hashes)) < target)


def test_auto_exit_after_timeout_and_reset_restarts_timer():
    clock = Clock()
    stats = ChunkStatistics(AutoExit(1.0, 0), clock=clock)
    stats.start()
    clock.now += 3000
    stats.reset()
    clock.now += 3000
    assert stats.is_collecting
    clock.now += 600
    assert not stats.is_collecting
    stats.record([1])
    assert stats.status().total_chunks == 0


def test_changed_settings_apply_at_once():
    stats = ChunkStatistics()
    stats.start()
    stats.record([1, 2, 3])
    stats.set_auto_exit(AutoExit(0.0, 2))
    assert not stats.status().is_collecting
