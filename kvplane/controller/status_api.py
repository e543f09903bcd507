"""GET /status: the cluster at a glance (instances, workers, tiers, chunk counts, heartbeat
ages, totals), read by ``kvplane status``. The snapshot is a pure function of the registry's
records and the index's counts (grouped and summed by :mod:`kvplane.controller.overview`, as
the dashboard's are), so it is tested without a controller.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from fastapi import APIRouter
from pydantic import BaseModel, Field

from kvplane.controller.cluster import Cluster
from kvplane.controller.overview import by_instance, chunks_by_tier, copy_workers, heartbeat_age_s
from kvplane.controller.registry import WorkerKey, WorkerRecord
from kvplane.web.openapi import link, linked

__all__ = [
    "ClusterStatus",
    "ClusterTotals",
    "InstanceStatus",
    "LogStatus",
    "WorkerStatus",
    "build_status_router",
    "snapshot",
]


class WorkerStatus(BaseModel):
    worker_id: int
    address: str = Field(description="the worker's command port, tcp://ip:port")
    peer_init_url: str | None
    serving_url: str | None = Field(
        None, description="the OpenAI URL the instance serves on (config key serving_url)"
    )
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


class LogStatus(BaseModel):
    """A replica's place in the event log (docs/ha.md)."""

    replica_id: str
    leader: bool = Field(description="whether this replica holds the lease")
    leader_id: str | None = Field(description="the lease holder, as last read")
    connected: bool = Field(description="whether it has a connection to NATS")
    stale: bool = Field(
        description="no word from NATS lately: the index may lack what workers reported since"
    )
    applied_seq: int = Field(description="the last log sequence applied to the index")
    stream_seq: int = Field(description="the log's last sequence, as last read")
    lag: int = Field(description="stream_seq - applied_seq")
    snapshot_seq: int = Field(description="the sequence of the latest snapshot it loaded or wrote")


class ClusterStatus(BaseModel):
    time: float = Field(description="the controller's clock when the snapshot was taken")
    worker_timeout_s: float = Field(description="heartbeat age at which a worker is reaped")
    instances: list[InstanceStatus]
    totals: ClusterTotals
    log: LogStatus | None = Field(
        None, description="where this replica stands in the event log; null: ZMQ controller"
    )


def snapshot(
    workers: Iterable[WorkerRecord],
    chunk_counts: Mapping[WorkerKey, Mapping[str, int]],
    now: float,
    worker_timeout_s: float,
) -> ClusterStatus:
    """The status of ``workers`` at ``now``: instances by id, ranks by worker id."""
    instances = by_instance(workers, chunk_counts)
    by_tier = chunks_by_tier(instances)
    return ClusterStatus(
        time=now,
        worker_timeout_s=worker_timeout_s,
        instances=[
            InstanceStatus(
                instance_id=inst.instance_id,
                workers=[
                    WorkerStatus(
                        worker_id=w.worker_id,
                        address=w.address,
                        peer_init_url=w.peer_init_url,
                        serving_url=w.serving_url,
                        registration_time=w.registration_time,
                        last_heartbeat_time=w.last_heartbeat_time,
                        heartbeat_age_s=heartbeat_age_s(w, now),
                        chunks=chunks,
                    )
                    for w, chunks in inst.ranks
                ],
                chunks=inst.chunks,
            )
            for inst in instances
        ],
        totals=ClusterTotals(
            instances=len(instances),
            workers=sum(len(i.ranks) for i in instances),
            chunks=sum(by_tier.values()),
            chunks_by_tier=by_tier,
        ),
        log=None,
    )


_FIRST_INSTANCE = "$response.body#/instances/0/instance_id"
#: From the cluster's first instance to the seeds' calls that name one (a position's first
#: element is its instance; the rest of each body is the caller's): with these the fuzzing's
#: stateful phase (tests/test_openapi_fuzz.py) calls them with an instance that exists,
#: where its own random ids would all be 404s.
_LINKS = linked(
    QueryWorkerInfo=link("query_worker_info", "its workers", instance_id=_FIRST_INSTANCE),
    QueryChunks=link("query_chunks", "the chunks it holds", instance_id=_FIRST_INSTANCE),
    Health=link("health", "its health", instance_id=_FIRST_INSTANCE),
    Clear=link("clear", "clear its caches", instance_id=_FIRST_INSTANCE),
    Pin=link("pin", "pin a prefix on it", instance_id=_FIRST_INSTANCE),
    Compress=link("compress", "compress a tier of it", instance_id=_FIRST_INSTANCE),
    Decompress=link("decompress", "decompress a tier of it", instance_id=_FIRST_INSTANCE),
    Move=link(
        "move",
        "move chunks between its tiers",
        old_position=[_FIRST_INSTANCE],
        new_position=[_FIRST_INSTANCE],
    ),
)


def build_status_router(cluster: Cluster) -> APIRouter:
    router = APIRouter(tags=["ops"])

    @router.get("/status", response_model=ClusterStatus, responses=_LINKS)
    def status() -> ClusterStatus:
        with cluster.lock:
            copied = copy_workers(cluster.core)
        timeout = cluster.core.registry.timeout_s
        out = snapshot(copied.workers, copied.tier_counts, cluster.clock(), timeout)
        if cluster.log_position is not None:
            out.log = LogStatus(**cluster.log_position()._asdict())
        return out

    return router
