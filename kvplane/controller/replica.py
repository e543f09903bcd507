"""A controller replica: the index fed from the event log on NATS JetStream (docs/ha.md).

One thread, ``kvplane-replica``, runs an asyncio loop with one NATS connection:

* it joins from the latest snapshot in the object store (:mod:`kvplane.controller.snapshot`)
  and consumes the log from the sequence after it with an ordered consumer, applying each
  message under the cluster lock (:class:`~kvplane.controller.log_apply.LogApplier`); a
  jump in the log's sequence (the log was trimmed past this replica) reloads the snapshot;
* it polls the stream's last sequence, for ``/status``'s lag, and marks itself stale
  while it has no connection;
* it answers peer lookups (a NATS request, one replica of the queue group answers);
* it contends for the lease and, while it holds it, does what must happen once
  (:mod:`kvplane.controller.lease`);
* HTTP threads hand it cluster operations (:mod:`kvplane.controller.opbus`).

Thin: the state changes are the pure core's; this module moves bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import zmq

from kvplane.controller.cluster import Cluster
from kvplane.controller.core import ControllerCore
from kvplane.controller.executor import Executor
from kvplane.controller.lease import LeaseHolder, snapshot_names
from kvplane.controller.log_apply import LogApplier, ReplicaView
from kvplane.controller.opbus import NatsOperationBus
from kvplane.controller.settings import ControllerConfig
from kvplane.controller.snapshot import decode_snapshot, restore
from kvplane.controller.transport import CommandSender, resync_target
from kvplane.curve import load_key_pair
from kvplane.errors import ConfigError, Unavailable
from kvplane.eventlog import (
    PEER_LOOKUP_SUBJECT,
    REPLICA_QUEUE,
    SNAPSHOT_BUCKET,
    STREAM,
    ensure_log,
)
from kvplane.protocol import (
    HeartbeatReply,
    HeartbeatRequest,
    HeartbeatStatus,
    PeerLookupRequest,
    ResyncCommand,
    decode,
    encode,
)

__all__ = ["ReplicaService", "start_replica"]

log = logging.getLogger(__name__)

T = TypeVar("T")
_POLL_S = 0.25  # how often the stream's last sequence is read
_STALE_S = 2.0  # no word from the server for this long: stale
_BRIDGE_CAPACITY = 65_536  # frames from ZMQ workers waiting for the log


class ReplicaService:
    """:meth:`start` / :meth:`stop` like :class:`~kvplane.controller.service.ControllerService`;
    :attr:`cluster` is what the HTTP API serves."""

    def __init__(self, settings: ControllerConfig) -> None:
        if not settings.nats_url:
            raise ConfigError("a replica needs nats_url (--nats)")
        self.settings = settings
        self.replica_id = settings.replica_id or f"{socket.gethostname()}-{os.getpid()}"
        self._ctx = zmq.Context()
        keys = None
        if settings.curve_secret_key_file is not None:
            keys = load_key_pair(settings.curve_secret_key_file, "curve_secret_key_file")
        executor = Executor(CommandSender(self._ctx, keys), settings.command_timeout)
        # Times in the registry are log timestamps; the cluster's clock (heartbeat ages in
        # /status) is the wall clock they are compared with.
        self.cluster = Cluster(ControllerCore(settings.worker_timeout), executor, time.time)
        self.applier = LogApplier(self.cluster.core)
        self.loop = asyncio.new_event_loop()
        self.nc: Any = None
        self.js: Any = None
        self.connected = False
        self.stream_seq = 0
        self.snapshot_seq = 0
        self.caught_up_at = 0.0  # monotonic time the last poll saw no lag
        self._contact = 0.0  # monotonic time of the last answer from the server
        self.lease = LeaseHolder(self)
        self.bus = NatsOperationBus(self)
        self.cluster.bus = self.bus
        self.cluster.log_position = self.position
        self._sub: Any = None
        self._first_after_join = False
        self._reload = asyncio.Event()
        self._stopping = False
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._tasks: list[asyncio.Task[Any]] = []

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self, ready_timeout: float = 30.0) -> None:
        """Start the loop; wait (at most ``ready_timeout``) until the replica has joined,
        so its first answers are not of an empty index. It keeps trying in the background
        when the server is not there yet, answering stale until then."""
        self._thread = threading.Thread(target=self._run, name="kvplane-replica", daemon=True)
        self._thread.start()
        if not self._ready.wait(ready_timeout):
            log.warning(
                "replica %s: not joined after %.0fs; serving stale", self.replica_id, ready_timeout
            )

    def stop(self) -> None:
        self._stopping = True
        if self._thread is not None and self.loop.is_running():
            with contextlib.suppress(Exception):
                self.call(self._shutdown(), timeout=10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
        self.cluster.executor.close()
        self._ctx.term()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the replica's loop from another thread; its result."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise Unavailable(f"the event log did not answer within {timeout:g}s") from None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.create_task(self._main())
        self.loop.run_forever()

    async def _main(self) -> None:
        import nats

        async def disconnected() -> None:
            self.connected = False
            if self._stopping:
                return
            log.warning("replica %s: lost the NATS connection", self.replica_id)

        async def reconnected() -> None:
            self.connected = True
            self.lease.grace_from(time.monotonic())
            log.info("replica %s: NATS connection back", self.replica_id)

        servers = (self.settings.nats_url or "").split(",")
        while not self._stopping:
            try:
                self.nc = await nats.connect(
                    servers,
                    name=f"kvplane-replica-{self.replica_id}",
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    disconnected_cb=disconnected,
                    reconnected_cb=reconnected,
                    connect_timeout=2,
                )
                self.js = self.nc.jetstream(timeout=5)
                await ensure_log(
                    self.js,
                    replicas=self.settings.nats_replicas,
                    lease_ttl_s=self.settings.lease_ttl,
                )
                break
            except Exception as exc:  # the server is not up yet: try again
                log.warning(
                    "replica %s: event log not reachable (%s); retrying", self.replica_id, exc
                )
                if self.nc is not None:
                    with contextlib.suppress(Exception):
                        await self.nc.close()
                await asyncio.sleep(1.0)
        if self._stopping:
            return
        self.connected = True
        self._contact = time.monotonic()
        await self.nc.subscribe(PEER_LOOKUP_SUBJECT, queue=REPLICA_QUEUE, cb=self._peer_lookup)
        await self._join()
        self._ready.set()
        for coro in (self._poll_stream(), self._watch_reloads(), self.lease.run()):
            self._tasks.append(self.loop.create_task(coro))

    async def _shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        await self.lease.release()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()

    # --- joining and consuming -----------------------------------------------------------------

    async def _join(self) -> None:
        """Load the latest snapshot newer than what is applied, then consume after it."""
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        snap = await self._latest_snapshot()
        if snap is not None and snap.seq > self.applier.applied_seq:
            core = await self.loop.run_in_executor(
                None, restore, snap, self.settings.worker_timeout
            )
            cluster = self.cluster
            with cluster.lock:
                core.counters = cluster.core.counters
                cluster.core = core
                self.applier.core = core
                self.applier.applied_seq = snap.seq
            self.snapshot_seq = snap.seq
            log.info(
                "replica %s: joined from the snapshot at log sequence %d (%d workers, %d chunks)",
                self.replica_id,
                snap.seq,
                len(snap.workers),
                snap.num_chunks,
            )
        from nats.js import api

        start = self.applier.applied_seq + 1
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start
        )
        self._sub = await self.js.subscribe(
            ">", stream=STREAM, cb=self._on_message, ordered_consumer=True, config=config
        )
        self._first_after_join = True

    async def _latest_snapshot(self) -> Any:
        obs = await self.js.object_store(SNAPSHOT_BUCKET)
        names = await snapshot_names(obs)
        for _seq, name in sorted(names, reverse=True):
            try:
                data = (await obs.get(name)).data
                return decode_snapshot(data)
            except Exception as exc:  # deleted under us, or unreadable: try the next
                log.warning("replica %s: snapshot %s unusable: %s", self.replica_id, name, exc)
        return None

    async def _on_message(self, msg: Any) -> None:
        meta = msg.metadata
        seq = meta.sequence.stream
        applier = self.applier
        if seq <= applier.applied_seq:
            return  # redelivered after a consumer reset
        if seq != applier.applied_seq + 1 and self._first_after_join:
            # Nothing newer to join from: what the log lost before this is lost (its workers
            # are told to resync when their heartbeats come in unknown).
            log.error(
                "replica %s: the log starts at %d, after %d, and no snapshot covers the gap",
                self.replica_id,
                seq,
                applier.applied_seq,
            )
        elif seq != applier.applied_seq + 1:
            if not self._reload.is_set():
                log.warning(
                    "replica %s: log jumped from %d to %d (trimmed past it); reloading",
                    self.replica_id,
                    applier.applied_seq,
                    seq,
                )
                self._reload.set()
            return
        self._first_after_join = False
        prepared = applier.prepare(msg.subject, msg.data)
        stamp = meta.timestamp.timestamp()
        cluster = self.cluster
        with cluster.lock:
            reply = applier.apply(seq, prepared, stamp)
            dropped = cluster.core.take_dropped()
        for d in dropped:
            for chunks in d.maps:
                chunks.clear()
        if type(reply) is HeartbeatReply and reply.status != HeartbeatStatus.OK:
            self._tell_to_resync(prepared.msg, stamp)
        cluster.gate.wait_for_readers(0.005)

    async def _watch_reloads(self) -> None:
        while True:
            await self._reload.wait()
            self._reload.clear()
            await self._join()

    def _tell_to_resync(self, heartbeat: HeartbeatRequest, stamp: float) -> None:
        """A heartbeat the registry did not like (an unknown worker, or one with a gap): the
        lease holder asks that worker to resync, once, and only for a live heartbeat (not
        one replayed from the past)."""
        if not self.lease.held or time.time() - stamp > self.settings.worker_timeout:
            return
        target = resync_target(heartbeat, time.time())
        if target is not None:
            event_id = self.cluster.events.start("resync", finished=True)
            self.cluster.executor.submit(target, ResyncCommand(event_id=event_id))

    async def _poll_stream(self) -> None:
        while True:
            try:
                info = await self.js.stream_info(STREAM)
                self.stream_seq = info.state.last_seq
                self._contact = time.monotonic()
                if self.applier.applied_seq >= self.stream_seq:
                    self.caught_up_at = self._contact
            except Exception as exc:
                log.debug("replica %s: stream info failed: %s", self.replica_id, exc)
            await asyncio.sleep(_POLL_S)

    async def _peer_lookup(self, msg: Any) -> None:
        try:
            req = decode(msg.data)
        except Exception:
            return
        if type(req) is not PeerLookupRequest:
            return
        cluster = self.cluster
        with cluster.lock:
            reply = cluster.core.handle(req, time.time())
        if reply is not None and msg.reply:
            await msg.respond(encode(reply))

    # --- status --------------------------------------------------------------------------------

    @property
    def stale(self) -> bool:
        return not self.connected or time.monotonic() - self._contact > _STALE_S

    def position(self) -> ReplicaView:
        applied = self.applier.applied_seq
        stream = max(self.stream_seq, applied)
        return ReplicaView(
            replica_id=self.replica_id,
            leader=self.lease.held,
            leader_id=self.lease.holder,
            connected=self.connected,
            stale=self.stale,
            applied_seq=applied,
            stream_seq=stream,
            lag=stream - applied,
            snapshot_seq=self.snapshot_seq,
        )


def start_replica(settings: ControllerConfig, started: list[Any], *, bridge: bool) -> Cluster:
    """Start a replica (and, with ``bridge``, the ZMQ worker ports feeding its workers'
    messages into the log through an outbox), appending each service to ``started`` as
    it starts, so the caller stops them; the cluster the HTTP API serves."""
    from kvplane.controller.service import ControllerService
    from kvplane.eventlog import worker_subject
    from kvplane.eventlog_outbox import NatsOutbox

    replica = ReplicaService(settings)
    started.append(replica)
    replica.start()
    if bridge:
        outbox = NatsOutbox(
            settings.nats_url or "", "kvplane.w._", capacity=_BRIDGE_CAPACITY, who="bridge"
        )
        outbox.start()
        started.append(outbox)

        def forward(msg: Any, frame: bytes) -> None:
            outbox.put(frame, worker_subject(msg.instance_id, msg.worker_id))

        zmq_ports = ControllerService(settings, bridge=forward, cluster=replica.cluster)
        zmq_ports.start()
        started.append(zmq_ports)
    return replica.cluster
