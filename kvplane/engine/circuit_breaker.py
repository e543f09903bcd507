"""A circuit breaker: stop calling a store that keeps failing, probe it now and then.

Pure logic over an injected clock; the remote tier feeds it outcomes. States:

- ``closed``: calls go through; ``failure_threshold`` consecutive failures open it.
- ``open``: calls are refused (the caller answers "miss"/"dropped" at once) until
  ``reset_after_s`` has passed since it opened.
- ``half_open``: one probe call at a time is let through; success closes the breaker,
  failure re-opens it for another ``reset_after_s``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

__all__ = ["BreakerPolicy", "BreakerState", "CircuitBreaker"]


class BreakerState(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerPolicy:
    failure_threshold: int = 3
    reset_after_s: float = 1.0


class CircuitBreaker:
    """Thread-safe. ``allow()`` before a call; then ``record_success()`` or ``record_failure()``."""

    def __init__(
        self,
        policy: BreakerPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy or BreakerPolicy()
        if self.policy.failure_threshold < 1 or self.policy.reset_after_s < 0:
            raise ValueError(f"invalid breaker policy {self.policy}")
        self._clock = clock
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_out = False
        self.times_opened = 0

    @property
    def state(self) -> BreakerState:
        with self._lock:
            return self._state

    def allow(self) -> bool:
        """Whether a call may go out now. In half-open, True for one probe at a time."""
        with self._lock:
            if self._state is BreakerState.CLOSED:
                return True
            if self._state is BreakerState.OPEN:
                if self._clock() - self._opened_at < self.policy.reset_after_s:
                    return False
                self._state = BreakerState.HALF_OPEN
                self._probe_out = False
            if self._probe_out:
                return False
            self._probe_out = True
            return True

    def record_success(self) -> None:
        with self._lock:
            self._state = BreakerState.CLOSED
            self._failures = 0
            self._probe_out = False

    def record_failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self._state is BreakerState.HALF_OPEN or (
                self._state is BreakerState.CLOSED
                and self._failures >= self.policy.failure_threshold
            ):
                self._state = BreakerState.OPEN
                self._opened_at = self._clock()
                self._probe_out = False
                self.times_opened += 1
