"""The controller's state machine: registry + chunk index + counters, driven by messages.

Pure: no sockets, threads or locks. :meth:`ControllerCore.handle` takes one decoded message
and the current time and returns the reply to send (or None); the service owns the sockets
and serializes calls. Dropped workers' chunk maps are queued for :meth:`take_dropped`, so
the caller frees them outside its lock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import msgspec
import numpy as np

from kvplane.controller.index import ChunkIndex, DroppedChunks, Match, ShardedHashes, shard_hashes
from kvplane.controller.registry import Registry, SeqCheck, WorkerKey, WorkerRecord
from kvplane.protocol import (
    ChunkReport,
    DeregisterReply,
    DeregisterRequest,
    HeartbeatReply,
    HeartbeatRequest,
    HeartbeatStatus,
    PeerLookupReply,
    PeerLookupRequest,
    RegisterReply,
    RegisterRequest,
    UnknownMessage,
    unpack_hashes,
)

__all__ = ["ControllerCore", "Counters", "StagedReport"]

log = logging.getLogger(__name__)


class StagedReport(NamedTuple):
    report: ChunkReport
    hashes: list[ShardedHashes]  # per segment, unpacked and grouped by index shard


@dataclass
class Counters:
    """Monotonic counts exported at /metrics."""

    chunk_events_applied: int = 0
    admits_applied: int = 0
    evicts_applied: int = 0
    reports_applied: int = 0
    reports_stale: int = 0
    reports_unknown_worker: int = 0
    sequence_gaps: int = 0
    resyncs_requested: int = 0
    unknown_heartbeats: int = 0
    unknown_messages: int = 0
    malformed_frames: int = 0
    foreign_messages: int = 0  # event-log messages of a kind or subject that do not belong
    registrations: int = 0
    registrations_refused: int = 0
    deregistrations: int = 0
    reaped_workers: int = 0
    chunks_dropped: int = 0
    auth_failures: int = 0  # failed CURVE handshakes on the worker ports

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class ControllerCore:
    """Applies worker messages to the registry and index."""

    def __init__(self, worker_timeout_s: float) -> None:
        self.registry = Registry(worker_timeout_s)
        self.index = ChunkIndex()
        self.counters = Counters()
        self._dropped: list[DroppedChunks] = []
        self._handlers: dict[type, Callable[[Any, float], msgspec.Struct | None]] = {
            StagedReport: self._on_report,
            RegisterRequest: self._on_register,
            HeartbeatRequest: self._on_heartbeat,
            DeregisterRequest: self._on_deregister,
            PeerLookupRequest: self._on_peer_lookup,
            UnknownMessage: self._on_unknown,
        }

    @staticmethod
    def stage(msg: Any) -> Any:
        """Lock-free preparation of a message for :meth:`handle` (unpacks report hashes), so
        the caller's lock covers only the index update."""
        if type(msg) is ChunkReport:
            staged = [shard_hashes(np.frombuffer(seg.hashes, "<u8")) for seg in msg.segments]
            return StagedReport(msg, staged)
        return msg

    def handle(self, msg: Any, now: float) -> msgspec.Struct | None:
        """Apply one message; the reply to send back, if the message expects one."""
        handler = self._handlers.get(type(msg))
        if handler is None:
            handler = self._on_unknown
        return handler(msg, now)

    def take_dropped(self) -> list[DroppedChunks]:
        dropped, self._dropped = self._dropped, []
        return dropped

    def reap(self, now: float) -> list[WorkerRecord]:
        """Remove workers silent for longer than the timeout; their chunks leave at once."""
        dead = self.registry.reap(now)
        for rec in dead:
            self._drop(rec.key)
            self.counters.reaped_workers += 1
            log.warning(
                "reaped worker %s/%d at %s: no heartbeat for %.1fs",
                rec.instance_id,
                rec.worker_id,
                rec.address,
                now - rec.last_heartbeat_time,
            )
        return dead

    def reap_one(self, key: WorkerKey, epoch: int, last_heartbeat_time: float) -> bool:
        """Apply a reap decided elsewhere (the lease holder's, in the log): the worker goes
        if it is still that incarnation with no newer heartbeat. Whether it went."""
        rec = self.registry.remove_if_silent(key, epoch, last_heartbeat_time)
        if rec is None:
            return False
        self._drop(key)
        self.counters.reaped_workers += 1
        log.warning("reaped worker %s/%d at %s (the lease holder's decision)", *key, rec.address)
        return True

    def lookup(
        self, hashes_by_chunk_size: dict[int, list[int]], num_tokens: int
    ) -> dict[str, Match]:
        return self.index.match(hashes_by_chunk_size, num_tokens)

    # --- handlers ----------------------------------------------------------------------------

    def _on_report(self, staged: StagedReport, now: float) -> None:
        msg = staged.report
        key = WorkerKey(msg.instance_id, msg.worker_id)
        check = self.registry.check_seq(key, msg.epoch, msg.seq)
        if check is SeqCheck.UNKNOWN:
            self.counters.reports_unknown_worker += 1
            return None
        if check is SeqCheck.STALE:
            self.counters.reports_stale += 1
            return None
        if check is SeqCheck.GAP:
            self.counters.sequence_gaps += 1
            log.warning("sequence gap from %s/%d at seq %d", *key, msg.seq)
        index = self.index
        applied = admits = 0
        for seg, hashes in zip(msg.segments, staged.hashes, strict=True):
            if seg.admit:
                index.admit(key, seg.location, hashes)
                admits += hashes.size
            else:
                index.evict(key, seg.location, hashes)
            applied += hashes.size
        c = self.counters
        c.reports_applied += 1
        c.chunk_events_applied += applied
        c.admits_applied += admits
        c.evicts_applied += applied - admits
        return None

    def _on_register(self, msg: RegisterRequest, now: float) -> RegisterReply:
        outcome = self.registry.register(msg, now)
        if not outcome.accepted:
            self.counters.registrations_refused += 1
            log.warning(
                "refused worker %s/%d at %s:%d: %s",
                msg.instance_id,
                msg.worker_id,
                msg.ip,
                msg.port,
                outcome.reason,
            )
            return RegisterReply(ok=False, reason=outcome.reason)
        key = WorkerKey(msg.instance_id, msg.worker_id)
        dropped = self.index.add_worker(key, msg.chunk_size)
        if dropped is not None:
            self._dropped.append(dropped)
            self.counters.chunks_dropped += dropped.num_chunks
        self.counters.registrations += 1
        old = outcome.replaced
        log.info(
            "registered worker %s/%d at %s:%d%s",
            msg.instance_id,
            msg.worker_id,
            msg.ip,
            msg.port,
            f" (replaces {old.ip}:{old.port})" if old else "",
        )
        return RegisterReply(ok=True)

    def _on_heartbeat(self, msg: HeartbeatRequest, now: float) -> HeartbeatReply:
        key = WorkerKey(msg.instance_id, msg.worker_id)
        status = self.registry.heartbeat(key, msg.epoch, now)
        if status is HeartbeatStatus.UNKNOWN_WORKER:
            self.counters.unknown_heartbeats += 1
            log.info("heartbeat from unknown worker %s/%d: told to re-register", *key)
        elif status is HeartbeatStatus.RESYNC:
            self.counters.resyncs_requested += 1
        return HeartbeatReply(status=status)

    def _on_deregister(self, msg: DeregisterRequest, now: float) -> DeregisterReply:
        key = WorkerKey(msg.instance_id, msg.worker_id)
        rec = self.registry.deregister(key, msg.epoch)
        if rec is None:
            return DeregisterReply(ok=False)
        self._drop(key)
        self.counters.deregistrations += 1
        log.info("deregistered worker %s/%d", *key)
        return DeregisterReply(ok=True)

    def _on_peer_lookup(self, msg: PeerLookupRequest, now: float) -> PeerLookupReply:
        hashes = unpack_hashes(msg.hashes)
        matches = self.index.match(
            {msg.chunk_size: hashes}, len(hashes) * msg.chunk_size, exclude=msg.instance_id
        )
        if not matches:
            return PeerLookupReply()
        best_id, best = max(matches.items(), key=lambda kv: (kv[1].num_chunks, kv[0]))
        rank = self.registry.get(WorkerKey(best_id, msg.worker_id))
        return PeerLookupReply(
            instance_id=best_id,
            peer_init_url=rank.peer_init_url if rank else None,
            location=best.location,
            num_chunks=best.num_chunks,
        )

    def _on_unknown(self, msg: Any, now: float) -> None:
        self.counters.unknown_messages += 1
        log.warning("skipped a message of unknown type %r", getattr(msg, "type", type(msg)))
        return None

    def _drop(self, key: WorkerKey) -> None:
        dropped = self.index.drop_worker(key)
        if dropped is not None:
            self._dropped.append(dropped)
            self.counters.chunks_dropped += dropped.num_chunks
