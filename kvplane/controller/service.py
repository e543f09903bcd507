"""The controller's sockets: a PULL for chunk reports, REP(s) for worker requests, and the
REQ transport for commands to workers. Thin: decoding and state changes live elsewhere.

One ingest thread owns the PULL and REP sockets. Each round it answers pending worker
requests first (registrations and heartbeats are never queued behind a report burst), then
applies a bounded number of reports, taking the cluster lock once per message so HTTP
lookups interleave. Reaping runs on the same thread every ``health_check_interval``.

With ``curve_secret_key_file`` the PULL and REP sockets are CURVE servers that take only
the workers whose public keys are in ``curve_allowed_keys_dir`` (:mod:`kvplane.curve`); the
ingest thread also reads their monitor sockets and counts each failed handshake
(``kvplane_controller_auth_failures_total``). Commands reach a worker that registered a
CURVE key over CURVE too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from kvplane.controller.cluster import Cluster
from kvplane.controller.core import ControllerCore
from kvplane.controller.executor import Executor
from kvplane.controller.index import DroppedChunks
from kvplane.controller.settings import ControllerConfig
from kvplane.controller.transport import CommandSender, resync_target
from kvplane.curve import (
    HANDSHAKE_FAILURES,
    CurveAuth,
    KeyPair,
    load_key_pair,
    load_public_keys,
    make_server,
)
from kvplane.errors import BadRequest, Unavailable
from kvplane.protocol import (
    ChunkReport,
    CommandReply,
    DeregisterReply,
    DeregisterRequest,
    ErrorCode,
    HeartbeatReply,
    HeartbeatRequest,
    HeartbeatStatus,
    RegisterReply,
    RegisterRequest,
    ResyncCommand,
    decode,
    encode,
)

__all__ = ["ControllerService", "bridge_reply"]

log = logging.getLogger(__name__)

_REPORTS_PER_ROUND = 256
_POLL_MS = 100
_WORK_SLICE_S = 0.002
_YIELD_S = 0.0001
_READER_WAIT_S = 0.005


class ControllerService:
    """Binds the worker-facing sockets and runs the ingest thread (:meth:`start`/:meth:`stop`)."""

    def __init__(
        self,
        settings: ControllerConfig,
        clock: Callable[[], float] = time.time,
        *,
        bridge: Callable[[Any, bytes], None] | None = None,
        cluster: Cluster | None = None,
    ) -> None:
        """``clock``: the time registrations, heartbeats and the reaper read (tests move it).
        ``bridge`` (a replica's, with its ``cluster``): worker messages are handed to it
        for the event log instead of applied here (:func:`bridge_reply` answers them), and
        nothing is reaped here: the log's lease holder does that."""
        self.settings = settings
        self._ctx = zmq.Context()
        self._commands = CommandSender(self._ctx)
        if cluster is None:
            core = ControllerCore(settings.worker_timeout)
            cluster = Cluster(core, Executor(self._commands, settings.command_timeout), clock)
        self.cluster = cluster
        self._bridge = bridge
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pull: zmq.Socket[bytes] | None = None
        self._reps: list[zmq.Socket[bytes]] = []
        self._keys: KeyPair | None = None
        self._auth: CurveAuth | None = None
        self._monitors: list[zmq.Socket[bytes]] = []
        self._failures_logged = 0

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Bind the sockets and start ingesting. Raises Unavailable if a port is taken,
        ConfigError if a CURVE key file cannot be used."""
        s = self.settings
        host = f"[{s.host}]" if ":" in s.host else s.host
        if s.curve_secret_key_file is not None and s.curve_allowed_keys_dir is not None:
            self._keys = load_key_pair(s.curve_secret_key_file, "curve_secret_key_file")
            self._commands.keys = self._keys
            allowed = load_public_keys(s.curve_allowed_keys_dir, "curve_allowed_keys_dir")
            self._auth = CurveAuth(self._ctx, allowed)
            self._auth.start()
            log.info("worker ports require CURVE: %d allowed worker key(s)", len(allowed))
        try:
            self._pull = self._bind(zmq.PULL, f"tcp://{host}:{s.pull_port}")
            for port in (s.reply_port, s.heartbeat_port):
                if port is not None:
                    self._reps.append(self._bind(zmq.REP, f"tcp://{host}:{port}"))
        except zmq.ZMQError as exc:
            self._close_sockets()
            if self._auth is not None:
                self._auth.stop()
            raise Unavailable(f"controller cannot bind its worker ports: {exc}") from None
        self._thread = threading.Thread(target=self._run, name="kvplane-ingest", daemon=True)
        self._thread.start()
        log.info(
            "controller listening for workers: pull %s, reply %s, heartbeat %s",
            s.pull_port,
            s.reply_port,
            s.heartbeat_port,
        )

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.cluster.executor.close()
        self._close_sockets()
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()

    def _bind(self, kind: int, url: str) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = self._ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if ":" in url.rsplit(":", 1)[0]:
            sock.setsockopt(zmq.IPV6, 1)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        if self._keys is not None:
            make_server(sock, self._keys)
            self._monitors.append(sock.get_monitor_socket(HANDSHAKE_FAILURES))
        sock.bind(url)
        return sock

    def _close_sockets(self) -> None:
        for sock in [self._pull, *self._reps]:
            if sock is not None:
                if self._keys is not None:
                    sock.disable_monitor()
                sock.close(linger=0)
        for monitor in self._monitors:
            monitor.close(linger=0)
        self._pull, self._reps, self._monitors = None, [], []

    # --- ingest thread -----------------------------------------------------------------------

    def _run(self) -> None:
        assert self._pull is not None  # set by start()
        poller = zmq.Poller()
        poller.register(self._pull, zmq.POLLIN)
        for sock in [*self._reps, *self._monitors]:
            poller.register(sock, zmq.POLLIN)
        next_reap = time.monotonic() + self.settings.health_check_interval
        while not self._stop.is_set():
            try:
                ready = dict(poller.poll(_POLL_MS))
                for rep in self._reps:
                    if rep in ready:
                        self._answer(rep)
                if self._pull in ready:
                    self._ingest(self._pull)
                for monitor in self._monitors:
                    if monitor in ready:
                        self._count_refusals(monitor)
                if self._bridge is None and time.monotonic() >= next_reap:
                    next_reap = time.monotonic() + self.settings.health_check_interval
                    self._reap()
            except zmq.ZMQError as exc:
                if self._stop.is_set():
                    return
                log.error("ingest socket error: %s", exc)
            except Exception:  # one bad message must not end ingestion for good
                log.exception("ingest round failed; continuing")

    def _answer(self, rep: zmq.Socket[bytes]) -> None:
        """Answer every request waiting on ``rep`` (REP: one reply per request)."""
        while True:
            try:
                frame = rep.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            _, reply, dropped = self._apply(frame)
            if reply is None:  # REP must answer every request, even one it could not use
                reply = CommandReply(error_code=ErrorCode.BAD_REQUEST, message="no reply")
            rep.send(encode(reply))
            _free(dropped)  # after the reply: a deregistering worker is not kept waiting

    def _count_refusals(self, monitor: zmq.Socket[bytes]) -> None:
        """Count the failed CURVE handshakes ``monitor`` reports (a refused client retries
        every 100 ms or so: the first is logged at WARNING, then every 100th)."""
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            with self.cluster.lock:
                self.cluster.core.counters.auth_failures += 1
            if self._failures_logged % 100 == 0:
                log.warning(
                    "refused a worker connection on %s: CURVE handshake failed (%s, code %s); "
                    "%d refused so far",
                    event["endpoint"].decode(errors="replace"),
                    zmq.Event(event["event"]).name,
                    event["value"],
                    self._failures_logged + 1,
                )
            self._failures_logged += 1

    def _ingest(self, pull: zmq.Socket[bytes]) -> None:
        busy_since = time.perf_counter()
        for _ in range(_REPORTS_PER_ROUND):
            try:
                frame = pull.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            msg, reply, dropped = self._apply(frame.buffer)
            _free(dropped)
            if type(reply) is HeartbeatReply and reply.status != HeartbeatStatus.OK:
                self._tell_to_resync(msg)
            self.cluster.gate.wait_for_readers(_READER_WAIT_S)
            if time.perf_counter() - busy_since > _WORK_SLICE_S:
                # A CPU-bound thread starves I/O-bound ones under the GIL (each of a lookup's
                # many GIL hand-offs waits a switch interval). Stepping aside briefly lets
                # HTTP handlers run whole; it costs a burst ~5 % of its rate.
                time.sleep(_YIELD_S)
                busy_since = time.perf_counter()

    def _apply(
        self, frame: bytes | memoryview
    ) -> tuple[Any, msgspec.Struct | None, list[DroppedChunks]]:
        """Decode and apply one frame: the message, its reply, and the chunk maps the
        caller should free."""
        cluster = self.cluster
        try:
            msg = decode(frame)
        except BadRequest as exc:
            with cluster.lock:
                cluster.core.counters.malformed_frames += 1
            log.warning("skipped a malformed frame: %s", exc)
            return None, None, []
        if self._bridge is not None and isinstance(msg, _WORKER_MESSAGES):
            self._bridge(msg, bytes(frame))
            return msg, bridge_reply(msg), []
        staged = cluster.core.stage(msg)
        with cluster.lock:
            reply = cluster.core.handle(staged, cluster.clock())
            dropped = cluster.core.take_dropped()
        return msg, reply, dropped

    def _tell_to_resync(self, heartbeat: HeartbeatRequest) -> None:
        """A heartbeat that came over PULL cannot be answered; if it says where the worker
        listens, send it a ResyncCommand instead (off this thread, under the deadline)."""
        target = resync_target(heartbeat, self.cluster.clock())
        if target is None:
            return
        command = ResyncCommand(event_id=self.cluster.events.start("resync", finished=True))
        self.cluster.executor.submit(target, command)

    def _reap(self) -> None:
        cluster = self.cluster
        with cluster.lock:
            cluster.core.reap(cluster.clock())
            dropped = cluster.core.take_dropped()
        _free(dropped)


_WORKER_MESSAGES = (RegisterRequest, HeartbeatRequest, ChunkReport, DeregisterRequest)


def bridge_reply(msg: Any) -> msgspec.Struct | None:
    """What a bridging replica answers a worker at once, before the log has it: accepted
    (a refusal can only show in the replicas' logs and counters), heartbeats OK (an unknown
    worker hears from the lease holder, which asks it to resync)."""
    if type(msg) is RegisterRequest:
        return RegisterReply(ok=True)
    if type(msg) is HeartbeatRequest:
        return HeartbeatReply(status=HeartbeatStatus.OK)
    if type(msg) is DeregisterRequest:
        return DeregisterReply(ok=True)
    return None


def _free(dropped: list[DroppedChunks]) -> None:
    """Free dropped chunk maps now, outside the cluster lock (memory returns at once)."""
    for d in dropped:
        for chunks in d.maps:
            chunks.clear()
