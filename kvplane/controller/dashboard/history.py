"""Rates over the last minutes: a ring buffer of cumulative samples. Pure: times are passed in.

The controller keeps running totals (lookups, tokens asked and matched, seconds spent
answering, admits and evicts applied); a rate is the difference of two samples over the
time between them. Samples are taken at most every ``interval_s``, and the buffer keeps
``capacity`` of them, so the oldest fall out: 151 samples 2 s apart give 5 minutes of rates.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from itertools import pairwise
from typing import NamedTuple

__all__ = ["History", "Point", "Sample"]


class Sample(NamedTuple):
    """Cumulative totals at wall-clock time ``t``, and the chunks per tier then."""

    t: float
    lookups: int
    tokens_asked: int
    tokens_matched: int
    lookup_seconds: float
    admits: int
    evicts: int
    chunks_by_tier: Mapping[str, int]


class Point(NamedTuple):
    """What happened between two samples, stamped with the later one's time. ``hit_ratio``
    (tokens matched / tokens asked) and ``latency_ms`` (mean) are None without lookups."""

    t: float
    lookups_per_s: float
    admits_per_s: float
    evicts_per_s: float
    hit_ratio: float | None
    latency_ms: float | None
    chunks_by_tier: Mapping[str, int]


class History:
    """The last ``capacity`` samples, at least ``interval_s`` apart. Not thread-safe."""

    def __init__(self, interval_s: float = 2.0, capacity: int = 151) -> None:
        if interval_s <= 0 or capacity < 2:
            raise ValueError("History needs interval_s > 0 and capacity >= 2")
        self.interval_s = interval_s
        self.span_s = interval_s * (capacity - 1)  # how far back a full history reaches
        self._samples: deque[Sample] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self._samples)

    def due(self, now: float) -> bool:
        """Whether a sample taken at ``now`` would be kept."""
        return not self._samples or now - self._samples[-1].t >= self.interval_s

    def add(self, sample: Sample) -> bool:
        """Keep ``sample`` if it is due (True). A clock that went back (a wall-clock step)
        starts the history afresh rather than produce negative intervals."""
        if self._samples and sample.t < self._samples[-1].t:
            self._samples.clear()
        if not self.due(sample.t):
            return False
        self._samples.append(sample)
        return True

    def points(self) -> list[Point]:
        """One point per pair of neighbouring samples, oldest first. A total that went down
        (a counter reset) counts as no activity in that interval, never as a negative rate."""
        return [_point(a, b) for a, b in pairwise(self._samples)]


def _point(a: Sample, b: Sample) -> Point:
    dt = b.t - a.t

    def rate(before: float, after: float) -> float:
        return max(after - before, 0) / dt

    lookups = max(b.lookups - a.lookups, 0)
    asked = max(b.tokens_asked - a.tokens_asked, 0)
    matched = max(b.tokens_matched - a.tokens_matched, 0)
    seconds = max(b.lookup_seconds - a.lookup_seconds, 0.0)
    return Point(
        t=b.t,
        lookups_per_s=rate(a.lookups, b.lookups),
        admits_per_s=rate(a.admits, b.admits),
        evicts_per_s=rate(a.evicts, b.evicts),
        hit_ratio=min(matched / asked, 1.0) if asked else None,
        latency_ms=1000 * seconds / lookups if lookups else None,
        chunks_by_tier=b.chunks_by_tier,
    )
