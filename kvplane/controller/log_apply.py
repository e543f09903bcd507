"""The index as a consumer of the event log: apply its messages in log order and every
replica holds the same registry and index. Pure: no sockets, threads or clock.

The apply logic is :class:`~kvplane.controller.core.ControllerCore`'s, the one the ZMQ
ingest feeds; this layer adds what a shared log needs:

* the time a message is applied at is its log timestamp, never the replica's clock, so
  registration and heartbeat times (and so ``/query_worker_info``) agree everywhere;
* a worker's messages must come on its own subject (:func:`~kvplane.eventlog.worker_subject`),
  the lease holder's on :data:`~kvplane.eventlog.CONTROL_SUBJECT`; anything else, and any
  frame that does not decode, is counted and skipped;
* a registration already applied (same worker, same epoch: a publish retried past the
  log's duplicate window) is not applied again, so it cannot wipe the chunks reported since.

:meth:`LogApplier.prepare` does the lock-free part (decode, check, unpack hashes);
:meth:`LogApplier.apply` the state change, under the caller's lock.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import msgspec

from kvplane.controller.core import ControllerCore
from kvplane.controller.registry import WorkerKey
from kvplane.errors import BadRequest
from kvplane.eventlog import CONTROL_SUBJECT, worker_subject
from kvplane.protocol import (
    ChunkReport,
    DeregisterRequest,
    HeartbeatRequest,
    ReapEvent,
    RegisterRequest,
    UnknownMessage,
    decode,
)

__all__ = ["LogApplier", "Prepared", "ReplicaView"]

log = logging.getLogger(__name__)

_WORKER_MESSAGES = (RegisterRequest, HeartbeatRequest, ChunkReport, DeregisterRequest)


class Prepared(NamedTuple):
    """A log message ready to apply: ``staged`` for the core, or ``skip`` saying why not
    (``"malformed"``, ``"unknown"``, ``"foreign"``)."""

    msg: Any
    staged: Any
    skip: str | None


class ReplicaView(NamedTuple):
    """Where a replica stands in the log (``/status``'s ``log``)."""

    replica_id: str
    leader: bool
    leader_id: str | None
    connected: bool
    stale: bool
    applied_seq: int
    stream_seq: int
    lag: int
    snapshot_seq: int


class LogApplier:
    """Applies log messages to ``core`` and remembers the last sequence applied."""

    def __init__(self, core: ControllerCore, applied_seq: int = 0) -> None:
        self.core = core
        self.applied_seq = applied_seq

    @staticmethod
    def prepare(subject: str, data: bytes | memoryview) -> Prepared:
        """Decode and check one message (no state read or changed)."""
        try:
            msg = decode(data)
        except BadRequest as exc:
            log.warning("skipped a malformed log message on %s: %s", subject, exc)
            return Prepared(None, None, "malformed")
        if type(msg) is UnknownMessage:
            return Prepared(msg, None, "unknown")
        if subject == CONTROL_SUBJECT:
            ok = type(msg) is ReapEvent
        else:
            ok = isinstance(msg, _WORKER_MESSAGES) and subject == worker_subject(
                msg.instance_id, msg.worker_id
            )
        if not ok:
            log.warning("skipped a %s message on %s", type(msg).__name__, subject)
            return Prepared(msg, None, "foreign")
        return Prepared(msg, ControllerCore.stage(msg), None)

    def apply(self, seq: int, prepared: Prepared, timestamp: float) -> msgspec.Struct | None:
        """Apply the message at log sequence ``seq`` (stored at ``timestamp``); the reply
        the core would have sent a ZMQ worker (a heartbeat's status tells the lease holder
        whom to ask for a resync)."""
        self.applied_seq = seq
        core = self.core
        counters = core.counters
        if prepared.skip == "malformed":
            counters.malformed_frames += 1
            return None
        if prepared.skip == "unknown":
            counters.unknown_messages += 1
            return None
        if prepared.skip is not None:
            counters.foreign_messages += 1
            return None
        msg = prepared.msg
        if type(msg) is ReapEvent:
            key = WorkerKey(msg.instance_id, msg.worker_id)
            core.reap_one(key, msg.epoch, msg.last_heartbeat_time)
            return None
        if type(msg) is RegisterRequest:
            rec = core.registry.get(WorkerKey(msg.instance_id, msg.worker_id))
            if rec is not None and rec.epoch == msg.epoch:
                return None
        return core.handle(prepared.staged, timestamp)
