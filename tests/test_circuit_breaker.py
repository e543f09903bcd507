from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kvplane.engine.circuit_breaker import BreakerPolicy, BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def breaker(threshold: int = 3, reset: float = 1.0) -> tuple[CircuitBreaker, Clock]:
    clock = Clock()
    return CircuitBreaker(BreakerPolicy(threshold, reset), clock), clock


def test_opens_after_threshold_consecutive_failures_only() -> None:
    b, _ = breaker(3)
    b.record_failure()
    b.record_failure()
    b.record_success()  # resets the streak
    b.record_failure()
    b.record_failure()
    assert b.allow() and b.state is BreakerState.CLOSED
    b.record_failure()
    assert b.state is BreakerState.OPEN
    assert not b.allow()


def test_one_probe_after_reset_time_then_closes_on_success() -> None:
    b, clock = breaker(1, 2.0)
    b.record_failure()
    clock.now = 1.9
    assert not b.allow()
    clock.now = 2.0
    assert b.allow()  # the probe
    assert not b.allow()  # only one at a time
    b.record_success()
    assert b.state is BreakerState.CLOSED and b.allow() and b.allow()


def test_failed_probe_reopens_for_a_full_period() -> None:
    b, clock = breaker(1, 2.0)
    b.record_failure()
    clock.now = 5.0
    assert b.allow()
    b.record_failure()
    assert b.state is BreakerState.OPEN
    clock.now = 6.9
    assert not b.allow()
    clock.now = 7.0
    assert b.allow()
    assert b.times_opened == 2


@given(
    st.integers(1, 5),
    st.lists(st.tuples(st.sampled_from(["ok", "fail", "call"]), st.floats(0, 3)), max_size=60),
)
def test_model_properties(threshold: int, steps: list[tuple[str, float]]) -> None:
    """Against any sequence: closed always allows; open never allows before the reset time
    and lets one probe through after it; ``threshold`` failures in a row from closed always
    open it; a success always closes it."""
    reset = 1.0
    b, clock = breaker(threshold, reset)
    streak = 0  # failures in a row since the breaker was last closed by a success
    opened_at: float | None = None
    for op, dt in steps:
        clock.now += dt
        before = b.state
        if op == "call":
            allowed = b.allow()
            if before is BreakerState.CLOSED:
                assert allowed
            elif before is BreakerState.OPEN:
                assert opened_at is not None
                assert allowed == (clock.now - opened_at >= reset)
                if allowed:
                    assert b.state is BreakerState.HALF_OPEN
                    assert not b.allow()  # one probe at a time
        elif op == "ok":
            b.record_success()
            streak = 0
            assert b.state is BreakerState.CLOSED
        else:
            b.record_failure()
            if before is BreakerState.CLOSED:
                streak += 1
                assert (b.state is BreakerState.OPEN) == (streak >= threshold)
            if before is BreakerState.HALF_OPEN:
                assert b.state is BreakerState.OPEN  # a failed probe reopens it
        if b.state is BreakerState.OPEN and before is not BreakerState.OPEN:
            opened_at = clock.now
            streak = 0
