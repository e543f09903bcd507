"""The cluster's workers by instance, with their chunks per tier: the one reading of the
registry and the index that ``GET /status`` (:mod:`kvplane.controller.status_api`),
``GET /dashboard/data`` (:mod:`kvplane.controller.dashboard.snapshot`) and the
``kvplane_controller_instance_chunks`` metric are made from; each only names and formats
the fields its own way.

An instance's chunks per tier are summed over its ranks: index entries, one per worker and
tier (two ranks holding their halves of the same chunk count twice). Pure: the caller copies
the state under the cluster's lock (:func:`copy_workers`) and passes the time in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from kvplane.controller.core import ControllerCore
    from kvplane.controller.registry import WorkerKey, WorkerRecord

__all__ = [
    "Instance",
    "Rank",
    "WorkerCounts",
    "by_instance",
    "chunks_by_tier",
    "copy_workers",
    "heartbeat_age_s",
    "is_late",
]


class WorkerCounts(NamedTuple):
    """Copies of the registered workers and of each one's chunks per tier."""

    workers: list[WorkerRecord]
    tier_counts: dict[WorkerKey, dict[str, int]]


class Rank(NamedTuple):
    worker: WorkerRecord
    chunks: dict[str, int]  # tier -> chunks, in the order the worker first reported its tiers


class Instance(NamedTuple):
    instance_id: str
    ranks: list[Rank]  # by worker_id
    chunks: dict[str, int]  # tier -> chunks summed over the ranks, tiers in rank order


def copy_workers(core: ControllerCore) -> WorkerCounts:
    """What :func:`by_instance` reads, copied out of ``core``. The caller holds the lock
    that guards ``core``; the copies stay valid after it is released (the ingest thread
    mutates the records in place)."""
    workers = [replace(w) for w in core.registry.all_workers()]
    return WorkerCounts(workers, {w.key: core.index.tier_counts(w.key) for w in workers})


def _add(into: dict[str, int], counts: Mapping[str, int]) -> None:
    for tier, n in counts.items():
        into[tier] = into.get(tier, 0) + n


def by_instance(
    workers: Iterable[WorkerRecord], tier_counts: Mapping[WorkerKey, Mapping[str, int]]
) -> list[Instance]:
    """Every instance with a registered worker, by id, its ranks by worker id. A worker
    missing from ``tier_counts`` holds nothing."""
    grouped: dict[str, list[WorkerRecord]] = {}
    for w in workers:
        grouped.setdefault(w.instance_id, []).append(w)
    instances = []
    for instance_id in sorted(grouped):
        ranks = [
            Rank(w, dict(tier_counts.get(w.key, {})))
            for w in sorted(grouped[instance_id], key=lambda w: w.worker_id)
        ]
        summed: dict[str, int] = {}
        for rank in ranks:
            _add(summed, rank.chunks)
        instances.append(Instance(instance_id, ranks, summed))
    return instances


def chunks_by_tier(instances: Iterable[Instance]) -> dict[str, int]:
    """The cluster's chunks per tier, tiers in the order the instances first show them."""
    out: dict[str, int] = {}
    for inst in instances:
        _add(out, inst.chunks)
    return out


def heartbeat_age_s(worker: WorkerRecord, now: float) -> float:
    """Seconds since ``worker``'s last heartbeat; 0 rather than negative if the clock
    stepped back."""
    return max(0.0, now - worker.last_heartbeat_time)


def is_late(heartbeat_age_s: float, worker_timeout_s: float) -> bool:
    """No heartbeat for over half the worker timeout: the worker is at risk of being
    reaped (``kvplane status`` marks it LATE, the dashboard's state says ``late``)."""
    return heartbeat_age_s > worker_timeout_s / 2
