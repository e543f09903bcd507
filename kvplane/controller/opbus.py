"""Cluster operations on a replica: accepted here, run once by the lease holder.

:meth:`NatsOperationBus.submit` (an HTTP thread) gives the operation its event id, writes
its record (``queued``) into the operations bucket, queues it on the work queue and waits
for the record to say finished or failed (:mod:`kvplane.controller.lease` runs it). The
same errors as a local run come back: the record keeps the HTTP status and message. The
record is what ``/check_finish`` reads on every replica (:meth:`status`).
"""

from __future__ import annotations

import asyncio

import msgspec

from kvplane.controller.cluster import CommandFailed
from kvplane.controller.executor import EventStatus, EventTable
from kvplane.controller.replica_context import ReplicaContext
from kvplane.errors import BadRequest, Conflict, KvplaneError, NotFound, Unavailable
from kvplane.eventlog import OPS_BUCKET, OPS_SUBJECT
from kvplane.protocol import OperationRecord, OperationRequest, decode, encode

__all__ = ["NatsOperationBus"]

_STATUS = {
    "queued": EventStatus.RUNNING,
    "running": EventStatus.RUNNING,
    "finished": EventStatus.FINISHED,
    "failed": EventStatus.FAILED,
}
_ERRORS: dict[int, type[KvplaneError]] = {400: BadRequest, 404: NotFound, 409: Conflict}
_POLL_S = 0.02


class NatsOperationBus:
    """:class:`~kvplane.controller.cluster.OperationBus` over JetStream."""

    def __init__(self, replica: ReplicaContext) -> None:
        self.replica = replica

    @property
    def wait_s(self) -> float:
        """How long a caller waits for an outcome: a lease takeover plus a fan-out."""
        s = self.replica.settings
        return 2 * s.lease_ttl + 3 * s.command_timeout + 5.0

    def submit(self, op: OperationRequest) -> OperationRecord:
        op = msgspec.structs.replace(op, event_id=EventTable.new_id(op.kind))
        try:
            rec = self.replica.call(self._submit(op), timeout=self.wait_s + 5.0)
        except KvplaneError:
            raise
        except Exception as exc:  # NATS's own errors: no connection, no stream, a timeout
            raise Unavailable(f"the event log did not take the {op.kind}: {exc!r}") from None
        if rec.status == "finished":
            return rec
        if rec.status != "failed":
            raise Unavailable(
                f"{op.kind} on instance {op.instance_id!r} is still {rec.status} after "
                f"{self.wait_s:g}s (no lease holder ran it yet?); ask /check_finish about "
                f"{op.event_id}",
                details={"event_id": op.event_id},
            )
        error = _ERRORS.get(rec.error_status)
        if error is not None:
            raise error(rec.error)
        raise CommandFailed(rec.error, op.event_id, rec.error_codes)

    async def _submit(self, op: OperationRequest) -> OperationRecord:
        r = self.replica
        if r.js is None:
            raise Unavailable("the event log is not reachable: operations cannot run")
        kv = await r.js.key_value(OPS_BUCKET)
        await kv.create(op.event_id, encode(OperationRecord(request=op)))
        await r.js.publish(OPS_SUBJECT, encode(op), headers={"Nats-Msg-Id": op.event_id})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        rec = OperationRecord(request=op)
        while loop.time() < deadline:
            entry = await kv.get(op.event_id)
            found = decode(entry.value)
            if type(found) is OperationRecord:
                rec = found
                if rec.status in ("finished", "failed"):
                    return rec
            await asyncio.sleep(_POLL_S)
        return rec

    def status(self, event_id: str) -> EventStatus | None:
        """The operation's state from the bucket; None for an id that names no operation
        (a lookup's, say: those live in each replica's own table)."""
        kind = event_id.rpartition("-")[0]
        if not kind or kind in EventTable.QUERIES or self.replica.js is None:
            return None
        rec = self.replica.call(self._get(event_id), timeout=5.0)
        return None if rec is None else _STATUS.get(rec.status, EventStatus.RUNNING)

    async def _get(self, event_id: str) -> OperationRecord | None:
        from nats.js.errors import InvalidKeyError, NotFoundError

        try:
            kv = await self.replica.js.key_value(OPS_BUCKET)
            entry = await kv.get(event_id)
        except (NotFoundError, InvalidKeyError):  # not found, deleted, or not a key at all
            return None
        except Exception as exc:  # no connection, or a timeout: not "no such operation"
            raise Unavailable(f"the event log did not answer: {exc!r}") from None
        found = decode(entry.value)
        return found if type(found) is OperationRecord else None
