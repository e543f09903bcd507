"""Chunk statistics: how many chunks lookups and stores saw, and how many were distinct.

Pure logic (a lock, no I/O): the engine feeds it chunk hashes through :meth:`record`; the
internal API starts, stops, resets and reads it. Collection stops by itself ("auto-exit")
after ``timeout_hours`` of collecting or once ``target_unique_chunks`` distinct chunks were
seen, whichever comes first; zero disables that condition.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple

__all__ = ["AutoExit", "ChunkStatistics", "StatisticsStatus"]


class AutoExit(NamedTuple):
    timeout_hours: float = 0.0
    target_unique_chunks: int = 0

    @property
    def enabled(self) -> bool:
        return self.timeout_hours > 0 or self.target_unique_chunks > 0


class StatisticsStatus(NamedTuple):
    is_collecting: bool
    total_chunks: int
    unique_chunks: int
    timestamp: float
    auto_exit_enabled: bool
    auto_exit_timeout_hours: float
    auto_exit_target_unique_chunks: int


class ChunkStatistics:
    """Counts chunk hashes while collecting. Thread-safe; ``clock`` returns seconds."""

    def __init__(
        self, auto_exit: AutoExit = AutoExit(), *, clock: Callable[[], float] = time.time
    ) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._auto_exit = auto_exit
        self._collecting = False
        self._started_at = 0.0
        self._total = 0
        self._seen: set[int] = set()

    def start(self) -> None:
        """Begin collecting (counts so far are kept; the auto-exit timer restarts)."""
        with self._lock:
            self._collecting = True
            self._started_at = self._clock()

    def stop(self) -> None:
        with self._lock:
            self._collecting = False

    def reset(self) -> None:
        """Forget every count; a running collection goes on with a fresh timer."""
        with self._lock:
            self._total = 0
            self._seen = set()
            self._started_at = self._clock()

    def set_auto_exit(self, auto_exit: AutoExit) -> None:
        with self._lock:
            self._auto_exit = auto_exit
            self._check_auto_exit()

    @property
    def is_collecting(self) -> bool:
        with self._lock:
            self._check_auto_exit()
            return self._collecting

    def record(self, chunk_hashes: Iterable[int]) -> None:
        """Count ``chunk_hashes`` if collecting; ignored otherwise."""
        with self._lock:
            self._check_auto_exit()
            if not self._collecting:
                return
            target = self._auto_exit.target_unique_chunks
            for h in chunk_hashes:
                self._total += 1
                self._seen.add(h)
                if 0 < target <= len(self._seen):
                    self._collecting = False
                    return

    def status(self) -> StatisticsStatus:
        with self._lock:
            self._check_auto_exit()
            return StatisticsStatus(
                is_collecting=self._collecting,
                total_chunks=self._total,
                unique_chunks=len(self._seen),
                timestamp=self._clock(),
                auto_exit_enabled=self._auto_exit.enabled,
                auto_exit_timeout_hours=self._auto_exit.timeout_hours,
                auto_exit_target_unique_chunks=self._auto_exit.target_unique_chunks,
            )

    def _check_auto_exit(self) -> None:
        """Stop collecting when an auto-exit condition holds. Caller holds the lock."""
        if not self._collecting:
            return
        limits = self._auto_exit
        reached = 0 < limits.target_unique_chunks <= len(self._seen)
        expired = (
            limits.timeout_hours > 0
            and self._clock() - self._started_at >= limits.timeout_hours * 3600.0
        )
        if reached or expired:
            self._collecting = False
