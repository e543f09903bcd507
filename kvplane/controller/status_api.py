"""GET /status: the cluster at a glance (instances, workers, tiers, chunk counts, heartbeat
ages, totals), read by ``kvplane status``. The snapshot is a pure function of the registry's
records and the index's counts, so it is tested without a controller.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

from fastapi import APIRouter
from pydantic import BaseModel, Field

from kvplane.controller.cluster import Cluster
from kvplane.controller.registry import WorkerKey, WorkerRecord

__all__ = [
    "ClusterStatus",
    "ClusterTotals",
    "InstanceStatus",
    "WorkerStatus",
    "build_status_router",
    "snapshot",
]


class WorkerStatus(BaseModel):
    worker_id: int
    address: str = Field(description="the worker's command port, tcp://ip:port")
    peer_init_url: str | None
    registration_time: float = Field(description="seconds since the epoch")
    last_heartbeat_time: float = Field(description="seconds since the epoch")
    heartbeat_age_s: float = Field(description="seconds since the last heartbeat")
    chunks: dict[str, int] = Field(description="tier -> chunks held")


class InstanceStatus(BaseModel):
    instance_id: str
    workers: list[WorkerStatus]
    chunks: dict[str, int] = Field(description="tier -> chunks held, summed over the ranks")


class ClusterTotals(BaseModel):
    instances: int
    workers: int
    chunks: int = Field(description="index entries: one per worker and tier")
    chunks_by_tier: dict[str, int]


class ClusterStatus(BaseModel):
    time: float = Field(description="the controller's clock when the snapshot was taken")
    worker_timeout_s: float = Field(description="heartbeat age at which a worker is reaped")
    instances: list[InstanceStatus]
    totals: ClusterTotals


def _add(into: dict[str, int], counts: Mapping[str, int]) -> None:
    for tier, n in counts.items():
        into[tier] = into.get(tier, 0) + n


def snapshot(
    workers: Iterable[WorkerRecord],
    chunk_counts: Mapping[WorkerKey, Mapping[str, int]],
    now: float,
    worker_timeout_s: float,
) -> ClusterStatus:
    """The status of ``workers`` at ``now``: instances by id, ranks by worker id."""
    by_instance: dict[str, list[WorkerRecord]] = {}
    for w in workers:
        by_instance.setdefault(w.instance_id, []).append(w)
    instances = []
    total_by_tier: dict[str, int] = {}
    for instance_id in sorted(by_instance):
        ranks = sorted(by_instance[instance_id], key=lambda w: w.worker_id)
        inst_chunks: dict[str, int] = {}
        statuses = []
        for w in ranks:
            counts = dict(chunk_counts.get(w.key, {}))
            _add(inst_chunks, counts)
            statuses.append(
                WorkerStatus(
                    worker_id=w.worker_id,
                    address=w.address,
                    peer_init_url=w.peer_init_url,
                    registration_time=w.registration_time,
                    last_heartbeat_time=w.last_heartbeat_time,
                    heartbeat_age_s=max(0.0, now - w.last_heartbeat_time),
                    chunks=counts,
                )
            )
        _add(total_by_tier, inst_chunks)
        instances.append(
            InstanceStatus(instance_id=instance_id, workers=statuses, chunks=inst_chunks)
        )
    totals = ClusterTotals(
        instances=len(instances),
        workers=sum(len(i.workers) for i in instances),
        chunks=sum(total_by_tier.values()),
        chunks_by_tier=total_by_tier,
    )
    return ClusterStatus(
        time=now, worker_timeout_s=worker_timeout_s, instances=instances, totals=totals
    )


def build_status_router(cluster: Cluster) -> APIRouter:
    router = APIRouter(tags=["ops"])

    @router.get("/status", response_model=ClusterStatus)
    def status() -> ClusterStatus:
        with cluster.lock:
            registry = cluster.core.registry
            # copies: the records are mutated by the ingest thread once the lock is released
            records = [replace(w) for w in registry.all_workers()]
            counts = {w.key: cluster.core.index.tier_counts(w.key) for w in records}
            timeout = registry.timeout_s
        return snapshot(records, counts, cluster.clock(), timeout)

    return router
