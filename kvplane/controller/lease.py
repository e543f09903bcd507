"""The lease, and what its holder does once for the whole cluster (docs/ha.md).

The lease is the key :data:`~kvplane.eventlog.LEASE_KEY` of a JetStream key-value bucket
whose entries expire after ``lease_ttl``: a replica takes it with a create (which fails
while another's entry lives) and keeps it with compare-and-set updates every third of the
TTL; one that cannot renew steps down at once. While it holds the lease, a replica:

* reaps: a worker whose last heartbeat (a log timestamp) is older than ``worker_timeout``
  is published as a :class:`~kvplane.protocol.ReapEvent` into the log, so every replica
  drops it at the same point. Not within ``worker_timeout`` of taking the lease or of a
  reconnection (heartbeats buffered by workers during an outage land first), and not while
  it lags the log;
* runs cluster operations from the work queue, each once (:meth:`LeaseHolder._run_one`);
* writes an index snapshot every ``snapshot_interval``, keeps the newest two, and trims
  the log behind the older (a replica replaying from it still finds every message after).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import msgspec

from kvplane.controller.cluster import CommandFailed
from kvplane.controller.replica_context import ReplicaContext
from kvplane.controller.snapshot import capture, encode_snapshot
from kvplane.errors import KvplaneError
from kvplane.eventlog import (
    CONTROL_SUBJECT,
    LEASE_BUCKET,
    LEASE_KEY,
    OPS_BUCKET,
    OPS_STREAM,
    OPS_SUBJECT,
    SNAPSHOT_BUCKET,
    STREAM,
    snapshot_name,
    snapshot_seq,
)
from kvplane.protocol import OperationRecord, OperationRequest, ReapEvent, decode, encode

__all__ = ["KEEP_SNAPSHOTS", "LeaseHolder", "snapshot_names"]

log = logging.getLogger(__name__)

KEEP_SNAPSHOTS = 2
_PAUSE_S = 0.0005  # between workers of a snapshot copy: lookups run
_EXECUTOR = "kvplane-executor"  # the work queue's one durable consumer


class LeaseHolder:
    """Contends for the lease for ``replica`` and, while it holds it, does its duties."""

    def __init__(self, replica: ReplicaContext) -> None:
        self.replica = replica
        self.held = False
        self.holder: str | None = None  # who holds it, as last read
        self._revision = 0
        self._grace_from = time.monotonic()
        self._duties: list[asyncio.Task[Any]] = []

    def grace_from(self, t: float) -> None:
        """No reaping until ``worker_timeout`` after ``t`` (a reconnection)."""
        self._grace_from = max(self._grace_from, t)

    # --- the lease -----------------------------------------------------------------------------

    async def run(self) -> None:
        r = self.replica
        kv = await r.js.key_value(LEASE_BUCKET)
        me = r.replica_id.encode()
        while True:
            try:
                if self.held:
                    self._revision = await kv.update(LEASE_KEY, me, last=self._revision)
                else:
                    self._revision = await kv.create(LEASE_KEY, me)
                    await self._acquired()
            except Exception as exc:
                if self.held:
                    log.warning("replica %s: lost the lease (%s)", r.replica_id, exc)
                    self._step_down()
                with contextlib.suppress(Exception):
                    entry = await kv.get(LEASE_KEY)
                    self.holder = entry.value.decode(errors="replace") if entry.value else None
            await asyncio.sleep(r.settings.lease_ttl / 3)

    async def release(self) -> None:
        """Give the lease up at a clean stop, so another replica takes over at once."""
        if not self.held:
            return
        self._step_down()
        with contextlib.suppress(Exception):
            kv = await self.replica.js.key_value(LEASE_BUCKET)
            await kv.delete(LEASE_KEY, last=self._revision)

    async def _acquired(self) -> None:
        r = self.replica
        self.held, self.holder = True, r.replica_id
        self._grace_from = time.monotonic()
        log.info("replica %s holds the lease", r.replica_id)
        await self._fail_orphans()
        loop = asyncio.get_running_loop()
        self._duties = [
            loop.create_task(self._reaper()),
            loop.create_task(self._snapshots()),
            loop.create_task(self._operations()),
        ]

    def _step_down(self) -> None:
        self.held = False
        for task in self._duties:
            task.cancel()
        self._duties = []

    # --- reaping -------------------------------------------------------------------------------

    async def _reaper(self) -> None:
        r = self.replica
        s = r.settings
        while True:
            await asyncio.sleep(s.health_check_interval)
            now_mono = time.monotonic()
            if now_mono - self._grace_from < s.worker_timeout or r.stale:
                continue
            if now_mono - r.caught_up_at > 2 * s.health_check_interval + 1.0:
                continue  # behind the log: what it would reap may have heartbeat since
            with r.cluster.lock:
                silent = r.cluster.core.registry.silent(time.time())
            for rec in silent:
                event = ReapEvent(
                    instance_id=rec.instance_id,
                    worker_id=rec.worker_id,
                    epoch=rec.epoch,
                    last_heartbeat_time=rec.last_heartbeat_time,
                )
                msg_id = (
                    f"reap-{rec.instance_id}-{rec.worker_id}-{rec.epoch}-{rec.last_heartbeat_time}"
                )
                await r.js.publish(CONTROL_SUBJECT, encode(event), headers={"Nats-Msg-Id": msg_id})
                log.warning(
                    "replica %s: worker %s/%d silent for %.1fs: reaping",
                    r.replica_id,
                    rec.instance_id,
                    rec.worker_id,
                    time.time() - rec.last_heartbeat_time,
                )

    # --- snapshots and trimming ----------------------------------------------------------------

    async def _snapshots(self) -> None:
        r = self.replica
        while True:
            await asyncio.sleep(r.settings.snapshot_interval)
            try:
                await self.snapshot_now()
            except Exception as exc:
                log.warning("replica %s: snapshot failed: %s", r.replica_id, exc)

    async def snapshot_now(self) -> int | None:
        """Write a snapshot of the index as applied now, keep the newest
        :data:`KEEP_SNAPSHOTS`, trim the log behind the oldest kept; the sequence covered
        (None: nothing new since the last)."""
        r = self.replica
        cluster = r.cluster
        if r.applier.applied_seq <= r.snapshot_seq:
            return None
        # No lock: this thread is the only one that changes the core (it applies the log),
        # so nothing moves while it copies, and lookups read on beside it; the pauses hand
        # them the interpreter between workers.
        seq = r.applier.applied_seq
        snap = capture(cluster.core, seq, pause=lambda: time.sleep(_PAUSE_S))
        data = await asyncio.get_running_loop().run_in_executor(None, encode_snapshot, snap)
        obs = await r.js.object_store(SNAPSHOT_BUCKET)
        await obs.put(snapshot_name(seq), data)
        r.snapshot_seq = seq
        kept = sorted(await snapshot_names(obs), reverse=True)
        for _, name in kept[KEEP_SNAPSHOTS:]:
            with contextlib.suppress(Exception):
                await obs.delete(name)
        oldest = kept[:KEEP_SNAPSHOTS][-1][0]
        await r.js.purge_stream(STREAM, seq=oldest + 1)  # removes everything before it
        log.info(
            "replica %s: snapshot at log sequence %d (%d chunks, %d bytes); log trimmed before %d",
            r.replica_id,
            seq,
            snap.num_chunks,
            len(data),
            oldest + 1,
        )
        return seq

    # --- operations ----------------------------------------------------------------------------

    async def _operations(self) -> None:
        from nats.js import api

        r = self.replica
        config = api.ConsumerConfig(ack_wait=max(30.0, 4 * r.settings.command_timeout))
        sub = await r.js.pull_subscribe(OPS_SUBJECT, _EXECUTOR, stream=OPS_STREAM, config=config)
        kv = await r.js.key_value(OPS_BUCKET)
        while True:
            try:
                msgs = await sub.fetch(1, timeout=1.0)
            except Exception:  # nothing queued (a timeout), or the connection is down
                continue
            for msg in msgs:
                await self._run_one(kv, msg)

    async def _run_one(self, kv: Any, msg: Any) -> None:
        """Run one queued operation, at most once over every lease holder: it moves from
        queued to running by a compare-and-set on its record before it runs, and one found
        running (its runner died) is marked failed, never run again."""
        r = self.replica
        try:
            op = decode(msg.data)
        except KvplaneError:
            op = None
        if type(op) is not OperationRequest:
            await msg.ack()
            return
        try:
            entry = await kv.get(op.event_id)
            rec = decode(entry.value)
        except Exception:
            rec, entry = None, None
        if type(rec) is not OperationRecord or entry is None:
            await msg.ack()
            return
        if rec.status == "running":
            await self._fail(kv, entry.key, rec, entry.revision)
        if rec.status != "queued":
            await msg.ack()
            return
        running = msgspec.structs.replace(rec, status="running", owner=r.replica_id)
        try:
            revision = await kv.update(entry.key, encode(running), last=entry.revision)
        except Exception:  # another holder took it first
            await msg.ack()
            return
        loop = asyncio.get_running_loop()
        try:
            done = await loop.run_in_executor(None, r.cluster.execute, op)
            final = msgspec.structs.replace(done, owner=r.replica_id)
        except KvplaneError as exc:
            codes = exc.codes if isinstance(exc, CommandFailed) else {}
            final = msgspec.structs.replace(
                running,
                status="failed",
                error=str(exc),
                error_status=exc.status_code,
                error_codes=codes,
            )
        with contextlib.suppress(Exception):  # marked failed meanwhile: that stands
            await kv.update(entry.key, encode(final), last=revision)
        await msg.ack()

    async def _fail_orphans(self) -> None:
        """Mark failed every operation left running by a replica that no longer runs it
        (the lease moved while it ran): it may have run in part, so it is not run again."""
        with contextlib.suppress(Exception):
            kv = await self.replica.js.key_value(OPS_BUCKET)
            for key in await kv.keys():
                entry = await kv.get(key)
                rec = decode(entry.value)
                if type(rec) is OperationRecord and rec.status == "running":
                    await self._fail(kv, key, rec, entry.revision)

    async def _fail(self, kv: Any, key: str, rec: OperationRecord, revision: int) -> None:
        failed = msgspec.structs.replace(
            rec,
            status="failed",
            error=f"replica {rec.owner} stopped while running it; not run again "
            "(it may have taken effect in part)",
            error_status=503,
        )
        with contextlib.suppress(Exception):
            await kv.update(key, encode(failed), last=revision)
            log.warning("operation %s failed: its runner %s stopped", key, rec.owner)


async def snapshot_names(obs: Any) -> list[tuple[int, str]]:
    """(seq, name) of every snapshot in the object store (none: empty)."""
    try:
        infos = await obs.list()
    except Exception:  # nats-py raises NotFoundError for an empty store
        return []
    found = []
    for info in infos:
        seq = snapshot_seq(info.name)
        if seq is not None and not info.deleted:
            found.append((seq, info.name))
    return found
