"""The controller worker: a service inside each engine process (one per rank), the thin
shell around :class:`~kvplane.worker.session.WorkerSession`.

Two threads, each owning its sockets:

* ``kvplane-worker``: drives the session (register, heartbeat every
  ``lmcache_worker_heartbeat_time``, re-register and resend the full key set when the
  controller lost this worker, saw a gap, or this worker's event subscription overflowed),
  takes the storage events from its subscription into the report buffer and sends them as
  numbered :class:`ChunkReport` batches over PUSH every 20 ms, and deregisters on stop.
* ``kvplane-worker-cmd``: answers controller commands on the command port.

Every request carries a deadline (``controller_timeout_s``) and sockets have LINGER 0. The
p2p tier's peer lookups go through :attr:`ControllerWorker.peers`
(:class:`~kvplane.worker.peers.PeerDirectory`), on the threads that miss.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import zmq

from kvplane.config import rank_port
from kvplane.curve import CurveAuth, make_server
from kvplane.engine.events import ChunkAdmitted
from kvplane.errors import ConfigError
from kvplane.eventlog import worker_subject
from kvplane.eventlog_outbox import NatsOutbox
from kvplane.keys import key_scheme_fingerprint
from kvplane.metric_specs import WORKER_COUNTERS
from kvplane.protocol import (
    ChunkReport,
    CommandReply,
    ErrorCode,
    HeartbeatReply,
    RegisterReply,
    RegisterRequest,
    decode,
    encode,
)
from kvplane.worker.commands import CommandHandlers
from kvplane.worker.link import ClientCurve, ControllerLink, local_ip_towards, zmq_url
from kvplane.worker.metrics import WorkerStatsCollector
from kvplane.worker.peers import PeerDirectory
from kvplane.worker.reports import ReportBuffer, ResyncProgress
from kvplane.worker.session import Change, Outgoing, WorkerSession

if TYPE_CHECKING:
    from kvplane.config import EngineConfig
    from kvplane.engine.engine import Engine
    from kvplane.engine.events import Subscription
    from kvplane.engine.tiers import P2PNode

__all__ = ["ControllerWorker"]

log = logging.getLogger(__name__)

_FLUSH_S = 0.02  # how long an event may wait before it is sent


class ControllerWorker:
    """Reports one rank's chunks to the controller and runs its commands."""

    name = "controller worker"

    def __init__(
        self,
        config: EngineConfig,
        engine: Engine,
        *,
        events: Subscription,
        p2p: P2PNode | None = None,
    ) -> None:
        """``events``: the subscription to the engine's storage events this worker reports
        (made by whoever builds the worker; the worker drains it on its own thread and
        closes it on :meth:`stop`). ``p2p``: this process's peer node, if any: its URL is
        registered as the ``peer_init_url``; whoever builds the worker makes
        ``peers.locate`` the p2p tier's locator."""
        if not config.controller_pull_url and not config.controller_nats_url:
            raise ConfigError(
                "enable_controller needs controller_pull_url (host:port) or controller_nats_url"
            )
        self.config = config
        self.engine = engine
        self.instance_id = config.lmcache_instance_id
        self.worker_id = engine.facts.worker_id
        self._who = f"worker {self.instance_id}/{self.worker_id}"
        # With controller_nats_url every message goes to the event log (no ZMQ towards a
        # controller): registrations go unanswered, as in pull-only mode.
        self.outbox: NatsOutbox | None = None
        if config.controller_nats_url:
            self.outbox = NatsOutbox(
                config.controller_nats_url,
                worker_subject(self.instance_id, self.worker_id),
                capacity=config.controller_nats_buffer,
                who=self._who,
                publish_timeout_s=config.controller_timeout_s,
            )
            self.pull_url = config.controller_nats_url
            reply_url = None
            self.ip = local_ip_towards(config.controller_nats_url.split(",")[0])
        else:
            assert config.controller_pull_url is not None  # checked above
            self.pull_url = zmq_url(config.controller_pull_url)
            reply_url = (
                zmq_url(config.controller_reply_url) if config.controller_reply_url else None
            )
            self.ip = local_ip_towards(self.pull_url)
        self.p2p = p2p
        self.port = rank_port("lmcache_worker_ports", config.lmcache_worker_ports, self.worker_id)
        self.events = events
        self.buffer = ReportBuffer()
        self._resync: ResyncProgress | None = None  # the resync going out (control thread)
        self.registered = threading.Event()  # mirrors the session, for other threads
        self._resync_requested = threading.Event()
        self.handlers = CommandHandlers(engine.cache_engine, self._resync_requested.set)
        self.stats = dict.fromkeys(WORKER_COUNTERS, 0)  # written by the control thread only
        curve = _client_curve(config)  # before anything that needs closing is made
        self._ctx = zmq.Context()
        self._auth: CurveAuth | None = None
        self.link = ControllerLink(self._ctx, reply_url, who=self._who, curve=curve)
        self.peers = PeerDirectory(
            self.outbox or self.link,
            instance_id=self.instance_id,
            worker_id=self.worker_id,
            chunk_size=config.chunk_size,
            timeout_s=config.p2p_timeout_s,
            registered=self.registered.is_set,
        )
        self.session: WorkerSession | None = None  # built by start(), once the port is bound
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._cmd_sock: zmq.Socket[bytes] | None = None

    def metrics_collector(self) -> WorkerStatsCollector:
        """This worker's counters for a Prometheus registry (the engine's ``/metrics``)."""
        return WorkerStatsCollector(
            lambda: self.stats, self.registered.is_set, lambda: len(self.buffer) + len(self.events)
        )

    @property
    def peer_init_url(self) -> str | None:
        """The chunk server's ``host:port`` (known once the p2p node started), else the
        configured ``p2p_host:p2p_init_ports[worker_id]``, else None."""
        if self.p2p is not None:
            return self.p2p.url
        c = self.config
        port = rank_port("p2p_init_ports", c.p2p_init_ports, self.worker_id)
        return f"{c.p2p_host}:{port}" if port is not None else None

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Bind the command port (reported at registration), then start both threads."""
        sock: zmq.Socket[bytes] = self._ctx.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        if ":" in self.ip:
            sock.setsockopt(zmq.IPV6, 1)
        curve = self.link.curve
        if curve is not None:  # only the controller may send commands
            self._auth = CurveAuth(self._ctx, {curve.controller})
            self._auth.start()
            make_server(sock, curve.keys)
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        try:
            if self.port is None:
                self.port = sock.bind_to_random_port(f"tcp://{host}")
            else:
                sock.bind(f"tcp://{host}:{self.port}")
        except zmq.ZMQError as exc:
            sock.close()
            if self._auth is not None:
                self._auth.stop()
            raise ConfigError(f"worker command port {host}:{self.port}: {exc}") from None
        self._cmd_sock = sock
        c = self.config
        hello = RegisterRequest(
            instance_id=self.instance_id,
            worker_id=self.worker_id,
            ip=self.ip,
            port=self.port,
            peer_init_url=self.peer_init_url,
            key_scheme=key_scheme_fingerprint(c.chunk_size),
            chunk_size=c.chunk_size,
            epoch=0,
            chunk_bytes=self.engine.layout.chunk_nbytes(c.chunk_size),
            curve_key=curve.keys.public.decode() if curve is not None else None,
            serving_url=c.serving_url,
        )
        self.session = WorkerSession(
            hello,
            heartbeat_s=c.lmcache_worker_heartbeat_time,
            timeout_s=c.controller_timeout_s,
            replies=self.link.answers,
            now=time.monotonic(),
        )
        if self.outbox is not None:
            self.outbox.start()
        for target, name in (
            (self._control_loop, "kvplane-worker"),
            (self._command_loop, "kvplane-worker-cmd"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info(
            "%s: command port %s:%d, controller %s (reply %s)",
            self._who,
            self.ip,
            self.port,
            self.pull_url,
            self.link.reply_url,
        )

    def stop(self) -> None:
        """Deregister (so this rank's chunks leave lookups at once) and stop the threads."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.config.controller_timeout_s + 5)
        self._threads = []
        if self.outbox is not None:
            self.outbox.stop()
        self.events.close()
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()

    # --- events from the engine --------------------------------------------------------------

    def _take_events(self) -> None:
        """Move this rank's pending storage events into the report buffer (control thread).
        If the subscription overflowed, the controller's view of this rank is incomplete:
        resync (re-register, then resend the full key set), as a RESYNC reply would."""
        for event in self.events.take_events():
            if self.engine.owns(event.key):
                admit = isinstance(event, ChunkAdmitted)
                self.buffer.record(admit, event.location, event.key.chunk_hash)
        if self.events.take_resync():
            self.stats["event_overflows"] += 1
            log.warning("%s: storage events were lost; resyncing", self._who)
            self._resync_requested.set()

    # --- the control thread ------------------------------------------------------------------

    def _control_loop(self) -> None:
        session = self.session
        assert session is not None  # built by start()
        push = self.link.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, 10_000)
        if self.outbox is None:
            push.connect(self.pull_url)
        try:
            while not self._stop.is_set():
                try:
                    self._control_round(session, push)
                except Exception:  # the engine must go on serving even if a round breaks
                    self._round_failed(session)
                self._stop.wait(_FLUSH_S)
            self._take_events()
            self._flush(session, push)
            bye = session.close()
            if bye is not None:
                self._exchange(bye, push)
            if self.outbox is not None:
                self.outbox.drain(self.config.controller_timeout_s)
        except Exception:  # stopping: the engine goes on stopping all the same
            log.exception("%s: deregistering at stop failed", self._who)
        finally:
            self.registered.clear()
            push.close(linger=0)

    def _control_round(self, session: WorkerSession, push: zmq.Socket[bytes]) -> None:
        now = time.monotonic()
        out = session.poll(now)
        if out is not None:
            reply = self._exchange(out, push)
            self._apply(session.on_reply(reply, now), reply)
        self._take_events()
        if self.outbox is not None and self.outbox.take_loss():
            log.warning("%s: messages to the event log were dropped; resyncing", self._who)
            self._resync_requested.set()
        if self._resync_requested.is_set():  # by command (pull-only mode), overflow
            self._resync_requested.clear()
            self._apply(session.resync_requested(now), None)
        self._flush(session, push)

    def _round_failed(self, session: WorkerSession) -> None:
        """A round raised: events it took may be lost, so the controller's view of this rank
        cannot be trusted. Count and log it, and resync (re-register, resend every key), as
        after lost events; the loop goes on after a pause, so a lasting fault is logged once
        a heartbeat interval instead of ending the thread with ``registered`` still set."""
        self.stats["control_failures"] += 1
        log.exception("%s: worker control round failed; resyncing", self._who)
        try:
            self._apply(session.resync_requested(time.monotonic()), None)
        except Exception:
            log.exception("%s: resync after a failed round failed too", self._who)
            self.registered.clear()
        self._stop.wait(min(self.config.lmcache_worker_heartbeat_time, 1.0))

    def _apply(self, change: Change, reply: Any) -> None:
        """Act on what the session says changed: the report stream follows registration."""
        if change is Change.REGISTERED:
            # What is pending now is in the snapshot; events after it follow it.
            self.events.take_events()
            self.events.take_resync()
            resent = self.buffer.restart(lambda: self.engine.own_chunks().items())
            self._resync = ResyncProgress(resent, self.buffer.max_batch) if resent else None
            self.registered.set()
            self.stats["registrations"] += 1
            log.info(
                "%s registered with the controller%s",
                self._who,
                f"; resyncing {resent} chunks" if resent else "",
            )
        elif change is Change.REFUSED:
            reason = reply.reason if isinstance(reply, RegisterReply) else ""
            log.error("%s: controller refused registration: %s", self._who, reason)
        elif change is Change.DROPPED:
            why = (
                f"controller says {reply.status.name}"
                if isinstance(reply, HeartbeatReply)
                else "resync requested (controller command or lost storage events)"
            )
            log.info("%s: %s; re-registering and resyncing", self._who, why)
            self.registered.clear()
            self.buffer.close()
            self._resync = None
            self.stats["resyncs"] += 1

    def _exchange(self, out: Outgoing, push: zmq.Socket[bytes]) -> Any:
        """Send a session request: over the reply port (its reply, None on timeout), or in
        pull-only mode over PUSH with no reply."""
        if self.outbox is not None:
            self.outbox.put(out.message)
            return None
        if self.link.answers:
            return self.link.request(out.message, out.timeout_s)
        with contextlib.suppress(zmq.Again):
            push.send(encode(out.message), zmq.NOBLOCK)
        return None

    def _flush(self, session: WorkerSession, push: zmq.Socket[bytes]) -> None:
        if not len(self.buffer) or not session.registered:
            return
        for segments in self.buffer.drain():
            report = session.next_report(segments)  # numbered even if dropped: a gap
            if self._send(report, push):
                self.stats["reports_sent"] += 1
                self.stats["events_sent"] += sum(len(s.hashes) // 8 for s in segments)
            else:  # the numbered gap makes the controller ask for a resync
                self.stats["reports_dropped"] += 1
            if self._resync is not None:
                line = self._resync.sent(sum(len(s.hashes) // 8 for s in segments))
                if line:
                    log.info("%s: %s", self._who, line)
                if self._resync.finished:
                    self._resync = None

    def _send(self, report: ChunkReport, push: zmq.Socket[bytes]) -> bool:
        """Hand a report to the event log's outbox or the PUSH socket; False: dropped."""
        if self.outbox is not None:
            return self.outbox.put(report)
        try:
            push.send(encode(report), zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    # --- the command thread ------------------------------------------------------------------

    def _command_loop(self) -> None:
        sock = self._cmd_sock
        assert sock is not None  # bound by start()
        try:
            while not self._stop.is_set():
                if not sock.poll(100):
                    continue
                frame = sock.recv()
                try:
                    reply = self.handlers.handle(decode(frame))
                except Exception as exc:  # REP must answer, or the socket wedges
                    reply = CommandReply(error_code=ErrorCode.BAD_REQUEST, message=str(exc))
                sock.send(encode(reply))
        finally:
            sock.close(linger=0)


def _client_curve(config: EngineConfig) -> ClientCurve | None:
    """The worker's CURVE keys from its two key files (both or neither); ConfigError
    naming the key of a missing or unusable one."""
    secret, controller = (
        config.controller_curve_secret_key_file,
        config.controller_curve_public_key_file,
    )
    if secret is None and controller is None:
        return None
    if secret is None or controller is None:
        raise ConfigError(
            "controller_curve_secret_key_file and controller_curve_public_key_file go "
            "together: set both (CURVE to the controller) or neither"
        )
    return ClientCurve.from_files(secret, controller)
