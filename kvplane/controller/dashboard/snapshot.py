"""What the dashboard shows, as a pure function of a captured controller state.

:class:`ClusterView` is a copy of the controller's state taken under its lock (see
:func:`kvplane.controller.dashboard.routes.capture`); :func:`build_snapshot` turns it and
the rate history into :class:`DashboardData`, the body of ``GET /dashboard/data``.

Instances, ranks and chunks per tier are grouped and summed by
:mod:`kvplane.controller.overview`, as for ``GET /status`` and
``kvplane_controller_instance_chunks``; this module adds what only the page shows (bytes,
worker states, lookups, rates, operations). Bytes are chunks times the rank's
``chunk_bytes`` (one full, uncompressed chunk, as the worker registered it): an upper
bound, since a last partial chunk or a compressed one takes less; None when a worker did
not say.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from pydantic import BaseModel, Field

from kvplane.controller.dashboard.history import Point, Sample
from kvplane.controller.executor import EventRecord
from kvplane.controller.overview import Instance, chunks_by_tier, heartbeat_age_s, is_late
from kvplane.controller.registry import WorkerRecord
from kvplane.controller.routers_api import RouterView

__all__ = [
    "ClusterView",
    "DashboardData",
    "build_snapshot",
    "sample_of",
    "worker_state",
]


class ClusterView(NamedTuple):
    """The controller's state at ``now``: copies, safe to read without its lock."""

    now: float
    worker_timeout_s: float
    instances: Sequence[Instance]  # by id, ranks by worker id
    counters: Mapping[str, int]
    lookups: tuple[int, int, int, float]  # LookupStats.totals()
    operations: Sequence[EventRecord]  # newest first


# --- the response model ----------------------------------------------------------------------


class TierView(BaseModel):
    location: str
    chunks: int
    bytes: int | None = Field(description="chunks x full chunk size; null if unknown")


class WorkerView(BaseModel):
    worker_id: int
    address: str = Field(description="command port, ip:port")
    peer_init_url: str | None
    state: str = Field(
        description="ok; late (no heartbeat for over half the worker timeout); "
        "resync (a sequence gap: the worker must resend its chunks)"
    )
    heartbeat_age_s: float
    registration_time: float
    last_heartbeat_time: float
    chunk_size: int
    chunk_bytes: int | None
    chunks: int
    tiers: list[TierView]


class InstanceView(BaseModel):
    instance_id: str
    chunks: int = Field(description="sum of the instance's tiers' chunks")
    bytes: int | None
    tiers: list[TierView] = Field(description="per tier, summed over the ranks")
    workers: list[WorkerView]


class LookupTotals(BaseModel):
    lookups: int
    tokens_asked: int
    tokens_matched: int = Field(description="tokens of the best instance's prefix, summed")
    hit_ratio: float | None = Field(description="tokens matched / tokens asked")
    mean_latency_ms: float | None


class RatePoint(BaseModel):
    t: float = Field(description="end of the interval, seconds since the epoch")
    lookups_per_s: float
    admits_per_s: float
    evicts_per_s: float
    hit_ratio: float | None
    latency_ms: float | None
    chunks_by_tier: dict[str, int]


class OperationView(BaseModel):
    event_id: str
    kind: str
    status: str = Field(description="what /check_finish answers for it")
    created: float
    error: str


class Totals(BaseModel):
    instances: int
    workers: int
    chunks: int
    bytes: int | None
    chunks_by_tier: dict[str, int]


class DashboardData(BaseModel):
    """Everything the dashboard page shows, in one poll."""

    now: float
    started: float = Field(description="when this controller started")
    worker_timeout_s: float
    sample_interval_s: float
    history_span_s: float = Field(description="how far back the history reaches when full")
    totals: Totals
    lookups: LookupTotals
    counters: dict[str, int] = Field(description="the controller's /metrics counters")
    instances: list[InstanceView]
    history: list[RatePoint] = Field(description="rates over the last minutes, oldest first")
    operations: list[OperationView] = Field(description="recent cluster operations, newest first")
    routers: list[RouterView] = Field(
        default_factory=list, description="the routers that report here (GET /routers)"
    )


# --- building it -----------------------------------------------------------------------------


def worker_state(worker: WorkerRecord, now: float, timeout_s: float) -> str:
    if worker.needs_resync:
        return "resync"
    if is_late(heartbeat_age_s(worker, now), timeout_s):
        return "late"
    return "ok"


def _tier_bytes(chunks: int, chunk_bytes: int | None) -> int | None:
    return None if chunk_bytes is None else chunks * chunk_bytes


def _sum_bytes(values: Sequence[int | None]) -> int | None:
    return None if any(v is None for v in values) else sum(v for v in values if v is not None)


def _worker_view(view: ClusterView, w: WorkerRecord, counts: Mapping[str, int]) -> WorkerView:
    return WorkerView(
        worker_id=w.worker_id,
        address=w.host_port,
        peer_init_url=w.peer_init_url,
        state=worker_state(w, view.now, view.worker_timeout_s),
        heartbeat_age_s=heartbeat_age_s(w, view.now),
        registration_time=w.registration_time,
        last_heartbeat_time=w.last_heartbeat_time,
        chunk_size=w.chunk_size,
        chunk_bytes=w.chunk_bytes,
        chunks=sum(counts.values()),
        tiers=[
            TierView(location=loc, chunks=n, bytes=_tier_bytes(n, w.chunk_bytes))
            for loc, n in counts.items()
        ],
    )


def _instance_view(view: ClusterView, inst: Instance) -> InstanceView:
    tiers = [
        TierView(
            location=loc,
            chunks=n,
            bytes=_sum_bytes(
                [_tier_bytes(c[loc], w.chunk_bytes) for w, c in inst.ranks if loc in c]
            ),
        )
        for loc, n in inst.chunks.items()
    ]
    return InstanceView(
        instance_id=inst.instance_id,
        chunks=sum(inst.chunks.values()),
        bytes=_sum_bytes([t.bytes for t in tiers]),
        tiers=tiers,
        workers=[_worker_view(view, w, counts) for w, counts in inst.ranks],
    )


def sample_of(view: ClusterView) -> Sample:
    """The history sample of this state."""
    lookups, asked, matched, seconds = view.lookups
    return Sample(
        t=view.now,
        lookups=lookups,
        tokens_asked=asked,
        tokens_matched=matched,
        lookup_seconds=seconds,
        admits=view.counters.get("admits_applied", 0),
        evicts=view.counters.get("evicts_applied", 0),
        chunks_by_tier=chunks_by_tier(view.instances),
    )


def build_snapshot(
    view: ClusterView,
    history: Sequence[Point],
    *,
    started: float,
    sample_interval_s: float,
    history_span_s: float,
    routers: Sequence[RouterView] = (),
) -> DashboardData:
    instances = [_instance_view(view, inst) for inst in view.instances]
    lookups, asked, matched, seconds = view.lookups
    return DashboardData(
        now=view.now,
        started=started,
        worker_timeout_s=view.worker_timeout_s,
        sample_interval_s=sample_interval_s,
        history_span_s=history_span_s,
        totals=Totals(
            instances=len(instances),
            workers=sum(len(i.workers) for i in instances),
            chunks=sum(i.chunks for i in instances),
            bytes=_sum_bytes([i.bytes for i in instances]),
            chunks_by_tier=chunks_by_tier(view.instances),
        ),
        lookups=LookupTotals(
            lookups=lookups,
            tokens_asked=asked,
            tokens_matched=matched,
            hit_ratio=matched / asked if asked else None,
            mean_latency_ms=1000 * seconds / lookups if lookups else None,
        ),
        counters=dict(view.counters),
        instances=instances,
        history=[
            RatePoint(
                t=p.t,
                lookups_per_s=p.lookups_per_s,
                admits_per_s=p.admits_per_s,
                evicts_per_s=p.evicts_per_s,
                hit_ratio=p.hit_ratio,
                latency_ms=p.latency_ms,
                chunks_by_tier=dict(p.chunks_by_tier),
            )
            for p in history
        ],
        operations=[
            OperationView(
                event_id=e.event_id,
                kind=e.kind,
                status=e.status.value,
                created=e.created,
                error=e.error,
            )
            for e in view.operations
        ],
        routers=list(routers),
    )
