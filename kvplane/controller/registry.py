"""Which workers exist, where they listen and whether they are alive. Pure: no I/O, no threads.

A worker is named by ``(instance_id, worker_id)``; an instance is the set of its ranks.
Every registration gets a fresh ``epoch`` (chosen by the worker), and reports are checked
against it, so a report or heartbeat from an older incarnation of a worker never counts
for the new one. Times are passed in (``now``), so tests drive the clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

from kvplane.keys import key_scheme_fingerprint
from kvplane.protocol import PROTOCOL_VERSION, HeartbeatStatus, RegisterRequest

__all__ = [
    "RegisterOutcome",
    "Registry",
    "SeqCheck",
    "WorkerKey",
    "WorkerRecord",
]


class WorkerKey(NamedTuple):
    instance_id: str
    worker_id: int


@dataclass
class WorkerRecord:
    """One registered worker. Mutated only by :class:`Registry`."""

    instance_id: str
    worker_id: int
    ip: str
    port: int
    peer_init_url: str | None
    chunk_size: int
    key_scheme: str
    epoch: int
    registration_time: float
    last_heartbeat_time: float
    next_seq: int = 1
    needs_resync: bool = False
    chunk_bytes: int | None = None  # one full uncompressed chunk, if the worker said
    curve_key: str | None = None  # the command port's CURVE public key (z85); None: plain
    serving_url: str | None = None  # the instance's OpenAI URL, if the worker said

    @property
    def key(self) -> WorkerKey:
        return WorkerKey(self.instance_id, self.worker_id)

    @property
    def host_port(self) -> str:
        """``ip:port`` of the command port, an IPv6 address in brackets."""
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{host}:{self.port}"

    @property
    def address(self) -> str:
        return f"tcp://{self.host_port}"


class RegisterOutcome(NamedTuple):
    accepted: bool
    reason: str
    replaced: WorkerRecord | None  # the previous incarnation, if any (its chunks go)


class SeqCheck(Enum):
    APPLY = "apply"  # the next expected batch
    GAP = "gap"  # batches were lost: apply this one, and the worker must resync
    STALE = "stale"  # a duplicate or an older batch: drop it
    UNKNOWN = "unknown"  # no such worker, or another incarnation: drop it


class Registry:
    """Workers by key; liveness by heartbeat age against ``timeout_s``."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._workers: dict[WorkerKey, WorkerRecord] = {}

    def __len__(self) -> int:
        return len(self._workers)

    def register(self, req: RegisterRequest, now: float) -> RegisterOutcome:
        """Add or replace a worker. Refused (with a reason) on a protocol or key-scheme
        mismatch, against this controller or against the instance's other ranks."""
        if req.protocol_version != PROTOCOL_VERSION:
            return RegisterOutcome(
                False,
                f"protocol version {req.protocol_version} != controller's {PROTOCOL_VERSION}",
                None,
            )
        expected = key_scheme_fingerprint(req.chunk_size)
        if req.key_scheme != expected:
            return RegisterOutcome(
                False, f"key scheme {req.key_scheme!r} != controller's {expected!r}", None
            )
        key = WorkerKey(req.instance_id, req.worker_id)
        for other in self.workers(req.instance_id):
            if other.key != key and other.key_scheme != req.key_scheme:
                return RegisterOutcome(
                    False,
                    f"key scheme {req.key_scheme!r} differs from rank {other.worker_id} of "
                    f"instance {req.instance_id!r} ({other.key_scheme!r})",
                    None,
                )
        replaced = self._workers.get(key)
        self._workers[key] = WorkerRecord(
            instance_id=req.instance_id,
            worker_id=req.worker_id,
            ip=req.ip,
            port=req.port,
            peer_init_url=req.peer_init_url,
            chunk_size=req.chunk_size,
            key_scheme=req.key_scheme,
            epoch=req.epoch,
            registration_time=now,
            last_heartbeat_time=now,
            chunk_bytes=req.chunk_bytes,
            curve_key=req.curve_key,
            serving_url=req.serving_url,
        )
        return RegisterOutcome(True, "", replaced)

    def heartbeat(self, key: WorkerKey, epoch: int, now: float) -> HeartbeatStatus:
        rec = self._workers.get(key)
        if rec is None or rec.epoch != epoch:
            return HeartbeatStatus.UNKNOWN_WORKER
        rec.last_heartbeat_time = now
        return HeartbeatStatus.RESYNC if rec.needs_resync else HeartbeatStatus.OK

    def deregister(self, key: WorkerKey, epoch: int) -> WorkerRecord | None:
        """Remove the worker if ``epoch`` is its current one; the removed record or None."""
        rec = self._workers.get(key)
        if rec is None or rec.epoch != epoch:
            return None
        return self._workers.pop(key)

    def check_seq(self, key: WorkerKey, epoch: int, seq: int) -> SeqCheck:
        """Classify a report's sequence number and advance the expected one."""
        rec = self._workers.get(key)
        if rec is None or rec.epoch != epoch:
            return SeqCheck.UNKNOWN
        if seq < rec.next_seq:
            return SeqCheck.STALE
        gap = seq > rec.next_seq
        rec.next_seq = seq + 1
        if gap:
            rec.needs_resync = True
            return SeqCheck.GAP
        return SeqCheck.APPLY

    def reap(self, now: float) -> list[WorkerRecord]:
        """Remove and return every worker whose last heartbeat is older than the timeout."""
        dead = self.silent(now)
        for rec in dead:
            del self._workers[rec.key]
        return dead

    def remove_if_silent(
        self, key: WorkerKey, epoch: int, last_heartbeat_time: float
    ) -> WorkerRecord | None:
        """Remove the worker if it is still incarnation ``epoch`` and has not heartbeat
        since ``last_heartbeat_time`` (a reap decided elsewhere); the removed record or None."""
        rec = self._workers.get(key)
        if rec is None or rec.epoch != epoch or rec.last_heartbeat_time > last_heartbeat_time:
            return None
        return self._workers.pop(key)

    def restore(self, rec: WorkerRecord) -> None:
        """Put back a record as a snapshot holds it (sequence and resync state included)."""
        self._workers[rec.key] = rec

    def silent(self, now: float) -> list[WorkerRecord]:
        """The workers :meth:`reap` would remove at ``now``, without removing them."""
        return [r for r in self._workers.values() if now - r.last_heartbeat_time > self.timeout_s]

    def get(self, key: WorkerKey) -> WorkerRecord | None:
        return self._workers.get(key)

    def workers(self, instance_id: str) -> list[WorkerRecord]:
        """The instance's workers by rank; empty for an unknown instance."""
        found = [r for r in self._workers.values() if r.instance_id == instance_id]
        return sorted(found, key=lambda r: r.worker_id)

    def all_workers(self) -> list[WorkerRecord]:
        """Every worker, by instance and rank."""
        return sorted(self._workers.values(), key=lambda r: r.key)

    def instances(self) -> list[str]:
        return sorted({k.instance_id for k in self._workers})

    def instance_by_ip(self, ip: str) -> str | None:
        """The instance with a worker at ``ip`` (lowest instance id if several)."""
        ids = sorted(r.instance_id for r in self._workers.values() if r.ip == ip)
        return ids[0] if ids else None
