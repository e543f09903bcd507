"""The worker's outbox of admit/evict events, kept in order and cut into wire batches.

The worker thread takes the storage events from its subscription, :meth:`ReportBuffer.record`s
this rank's and :meth:`drain`s them into reports; the lock lets ``/metrics`` read the length. Consecutive events of the same kind and tier share one
segment, so a store of N chunks travels as one packed run of N hashes. While the worker is
not registered, events are dropped: the full key set is resent at (re)registration
(:meth:`restart`), and events recorded after it follow it (an event older than the
snapshot, replayed after it, sets what the snapshot already says or what a later event sets
again: see :mod:`kvplane.engine.events`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from kvplane.protocol import Segment, pack_hashes

__all__ = ["ReportBuffer", "ResyncProgress"]

MAX_BATCH_HASHES = 4096  # small enough that one report never holds the index long


class ReportBuffer:
    def __init__(self, max_batch: int = MAX_BATCH_HASHES) -> None:
        self.max_batch = max_batch
        self._lock = threading.Lock()
        self._open = False
        self._segments: list[tuple[bool, str, list[int]]] = []
        self._pending = 0

    def record(self, admit: bool, location: str, chunk_hash: int) -> None:
        with self._lock:
            if not self._open:
                return
            segs = self._segments
            if segs and segs[-1][0] == admit and segs[-1][1] == location:
                segs[-1][2].append(chunk_hash)
            else:
                segs.append((admit, location, [chunk_hash]))
            self._pending += 1

    def restart(self, snapshot: Callable[[], Iterable[tuple[str, list[int]]]]) -> int:
        """Open (again) with ``snapshot()``'s keys as admits, replacing anything pending.

        ``snapshot`` runs under the buffer lock: it must not call back into the buffer.
        Returns how many hashes the snapshot held.
        """
        with self._lock:
            self._segments = [(True, loc, list(hashes)) for loc, hashes in snapshot() if hashes]
            self._pending = sum(len(s[2]) for s in self._segments)
            self._open = True
            return self._pending

    def close(self) -> None:
        """Stop recording (not registered) and drop what is pending."""
        with self._lock:
            self._open = False
            self._segments, self._pending = [], 0

    def __len__(self) -> int:
        return self._pending

    def drain(self) -> list[list[Segment]]:
        """Everything pending, as batches of at most ``max_batch`` hashes each, in order."""
        with self._lock:
            segments, self._segments, self._pending = self._segments, [], 0
        batches: list[list[Segment]] = []
        current: list[Segment] = []
        room = self.max_batch
        for admit, location, hashes in segments:
            start = 0
            while start < len(hashes):
                take = hashes[start : start + room]
                current.append(Segment(admit, location, pack_hashes(take)))
                start += len(take)
                room -= len(take)
                if room == 0:
                    batches.append(current)
                    current, room = [], self.max_batch
        if current:
            batches.append(current)
        return batches


class ResyncProgress:
    """How far a resync's key set has gone out, as log lines for a person watching a large
    one: a line each time another of its ``steps`` parts (a tenth) is sent, and one at the end. A
    resync of at most ``min_batches`` reports logs nothing more than its start.

    The snapshot leads the stream after :meth:`ReportBuffer.restart`, so the first ``total``
    hashes drained are the resync's; :meth:`sent` is told each report's size in order.
    """

    def __init__(self, total: int, batch: int, *, steps: int = 10, min_batches: int = 2) -> None:
        self.total = total
        self.done = 0
        self.reports = 0
        self._quiet = total <= batch * min_batches
        self._steps = steps
        self._shown = 0  # steps (tenths) reported so far

    @property
    def finished(self) -> bool:
        return self.done >= self.total

    def sent(self, num_hashes: int) -> str | None:
        """Count one report; the progress line to log now, if any."""
        if self.finished:
            return None
        self.done = min(self.total, self.done + num_hashes)
        self.reports += 1
        if self._quiet:
            return None
        if self.finished:
            return f"resync sent: {self.total} chunks in {self.reports} reports"
        reached = self._steps * self.done // self.total
        if reached <= self._shown:
            return None
        self._shown = reached
        pct = 100 * self.done // self.total
        return f"resync {pct}%: {self.done} of {self.total} chunks sent in {self.reports} reports"
