"""The controller worker: a service inside each engine process (one per rank).

Two threads, each owning its sockets:

* ``kvplane-worker``: registers (instance, rank, ip, command port, peer URL, key scheme),
  heartbeats every ``lmcache_worker_heartbeat_time`` from registration on, streams the
  storage events as numbered :class:`ChunkReport` batches over PUSH, and deregisters on
  stop. Told "unknown worker" (controller restarted or reaped us) or "resync" (a sequence
  gap), it waits a random jitter, registers again and resends its full key set.
* ``kvplane-worker-cmd``: answers controller commands on the command port.

Every request carries a deadline (``controller_timeout_s``), sockets have LINGER 0, and a
report that cannot be queued is dropped but still numbered, so the controller sees the gap
and asks for a resync instead of silently drifting.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec
import zmq

from kvplane.engine.backends.base import ChunkAdmitted
from kvplane.errors import ConfigError
from kvplane.keys import key_scheme_fingerprint
from kvplane.protocol import (
    ChunkReport,
    CommandReply,
    DeregisterRequest,
    ErrorCode,
    HeartbeatRequest,
    HeartbeatStatus,
    PeerLookupReply,
    PeerLookupRequest,
    RegisterReply,
    RegisterRequest,
    decode,
    encode,
    pack_hashes,
)
from kvplane.worker.commands import CommandHandlers
from kvplane.worker.metrics import COUNTER_HELP, WorkerStatsCollector
from kvplane.worker.reports import ReportBuffer

if TYPE_CHECKING:
    from kvplane.config import EngineConfig
    from kvplane.engine.backends.base import StorageEvent
    from kvplane.engine.engine import Engine
    from kvplane.engine.tiers import P2PNode
    from kvplane.keys import CacheKey

__all__ = ["ControllerWorker", "local_ip_towards", "zmq_url"]

log = logging.getLogger(__name__)

_FLUSH_S = 0.02  # how long an event may wait before it is sent


def zmq_url(address: str) -> str:
    """``host:port`` (the seeds' form) or a full ``tcp://`` URL."""
    return address if "://" in address else f"tcp://{address}"


def local_ip_towards(url: str) -> str:
    """The local address that routes to ``url``'s host (a UDP connect sends nothing)."""
    host = url.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    try:
        family = socket.getaddrinfo(host, None)[0][0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"


class ControllerWorker:
    """Reports one rank's chunks to the controller and runs its commands."""

    name = "controller worker"

    def __init__(self, config: EngineConfig, engine: Engine, *, p2p: P2PNode | None = None) -> None:
        """``p2p``: this process's peer node, if any: its URL is registered as the
        ``peer_init_url``. The constructor subscribes to nothing: whoever builds the worker
        feeds it the engine's storage events (:meth:`on_event`) and, with p2p, makes
        :meth:`locate_peer` the p2p tier's locator."""
        if not config.controller_pull_url:
            raise ConfigError("enable_controller needs controller_pull_url (host:port)")
        self.config = config
        self.engine = engine
        self.instance_id = config.lmcache_instance_id
        self.worker_id = config.worker_id
        self.pull_url = zmq_url(config.controller_pull_url)
        self.reply_url = (
            zmq_url(config.controller_reply_url) if config.controller_reply_url else None
        )
        self.ip = local_ip_towards(self.pull_url)
        self.p2p = p2p
        self.port: int | None = _configured(config.lmcache_worker_ports, config.worker_id)
        self.heartbeat_s = config.lmcache_worker_heartbeat_time
        self.timeout_s = config.controller_timeout_s
        self.buffer = ReportBuffer()
        self.registered = threading.Event()
        self._resync_requested = threading.Event()
        self.handlers = CommandHandlers(
            engine.cache_engine, config.chunk_size, self._resync_requested.set
        )
        self.stats = dict.fromkeys(COUNTER_HELP, 0)  # written by the control thread only
        self._epoch = 0
        self._seq = 0
        self._ctx = zmq.Context()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._cmd_sock: zmq.Socket[bytes] | None = None

    def metrics_collector(self) -> WorkerStatsCollector:
        """This worker's counters for a Prometheus registry (the engine's ``/metrics``)."""
        return WorkerStatsCollector(lambda: self.stats, self.registered.is_set, self.buffer.__len__)

    @property
    def peer_init_url(self) -> str | None:
        """The chunk server's ``host:port`` (known once the p2p node started), else the
        configured ``p2p_host:p2p_init_ports[worker_id]``, else None."""
        if self.p2p is not None:
            return self.p2p.url
        return _peer_url(self.config)

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Bind the command port (reported at registration), then start both threads."""
        sock: zmq.Socket[bytes] = self._ctx.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        if ":" in self.ip:
            sock.setsockopt(zmq.IPV6, 1)
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        try:
            if self.port is None:
                self.port = sock.bind_to_random_port(f"tcp://{host}")
            else:
                sock.bind(f"tcp://{host}:{self.port}")
        except zmq.ZMQError as exc:
            sock.close()
            raise ConfigError(f"worker command port {host}:{self.port}: {exc}") from None
        self._cmd_sock = sock
        for target, name in (
            (self._control_loop, "kvplane-worker"),
            (self._command_loop, "kvplane-worker-cmd"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info(
            "worker %s/%d: command port %s:%d, controller %s (reply %s)",
            self.instance_id,
            self.worker_id,
            self.ip,
            self.port,
            self.pull_url,
            self.reply_url,
        )

    def stop(self) -> None:
        """Deregister (so this rank's chunks leave lookups at once) and stop the threads."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout_s + 5)
        self._threads = []
        self._ctx.term()

    # --- events from the engine --------------------------------------------------------------

    def on_event(self, event: StorageEvent) -> None:
        """Queue one storage event of this rank for the next report (any thread)."""
        admit = isinstance(event, ChunkAdmitted)
        if event.key.worker_id == self.worker_id:
            self.buffer.record(admit, event.location, event.key.chunk_hash)

    def _snapshot(self) -> Iterable[tuple[str, list[int]]]:
        c = self.config
        for name, backend in self.engine.storage.backends.items():
            hashes = [
                k.chunk_hash
                for k in backend.keys()
                if k.worker_id == self.worker_id and k.model_name == c.model_name
            ]
            yield name, hashes

    # --- the control thread ------------------------------------------------------------------

    def _control_loop(self) -> None:
        push: zmq.Socket[bytes] = self._ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.setsockopt(zmq.SNDHWM, 10_000)
        push.connect(self.pull_url)
        next_register = time.monotonic()
        next_beat = float("inf")
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if not self.registered.is_set() and now >= next_register:
                    if self._register(push):
                        next_beat = now + self.heartbeat_s
                    else:
                        next_register = now + min(1.0, self.heartbeat_s)
                status: HeartbeatStatus | None = None
                if self.registered.is_set() and now >= next_beat:
                    next_beat = now + self.heartbeat_s
                    status = self._heartbeat(push)
                if self._resync_requested.is_set():  # by command (pull-only mode)
                    self._resync_requested.clear()
                    status = HeartbeatStatus.RESYNC if self.registered.is_set() else status
                if status in (HeartbeatStatus.UNKNOWN_WORKER, HeartbeatStatus.RESYNC):
                    log.info(
                        "worker %s/%d: controller says %s; re-registering and resyncing",
                        self.instance_id,
                        self.worker_id,
                        status.name,
                    )
                    self.registered.clear()
                    self.buffer.close()
                    self.stats["resyncs"] += 1
                    next_register = now + random.uniform(0, min(1.0, self.heartbeat_s / 2))
                self._flush(push)
                self._stop.wait(_FLUSH_S)
            self._flush(push)
            self._deregister(push)
        except Exception:  # the engine must go on serving even if reporting breaks
            log.exception("worker control loop failed")
        finally:
            push.close(linger=0)

    def _register(self, push: zmq.Socket[bytes]) -> bool:
        epoch = random.getrandbits(62)
        req = RegisterRequest(
            instance_id=self.instance_id,
            worker_id=self.worker_id,
            ip=self.ip,
            port=self.port or 0,
            peer_init_url=self.peer_init_url,
            key_scheme=key_scheme_fingerprint(self.config.chunk_size),
            chunk_size=self.config.chunk_size,
            epoch=epoch,
        )
        reply = self._request(req, push)
        if self.reply_url is not None:
            if not isinstance(reply, RegisterReply):
                return False
            if not reply.ok:
                log.error(
                    "worker %s/%d: controller refused registration: %s",
                    self.instance_id,
                    self.worker_id,
                    reply.reason,
                )
                return False
        self._epoch, self._seq = epoch, 0
        resent = self.buffer.restart(self._snapshot)
        self.registered.set()
        self.stats["registrations"] += 1
        log.info(
            "worker %s/%d registered with the controller%s",
            self.instance_id,
            self.worker_id,
            f"; resyncing {resent} chunks" if resent else "",
        )
        return True

    def _heartbeat(self, push: zmq.Socket[bytes]) -> HeartbeatStatus | None:
        req = HeartbeatRequest(
            instance_id=self.instance_id,
            worker_id=self.worker_id,
            epoch=self._epoch,
            ip=self.ip,
            port=self.port,
        )
        # Never wait past the next beat: after a controller restart the lost request must
        # not delay the heartbeat that learns of it.
        reply = self._request(req, push, timeout=min(self.timeout_s, self.heartbeat_s))
        status = getattr(reply, "status", None)
        return None if status is None else HeartbeatStatus(status)

    def _deregister(self, push: zmq.Socket[bytes]) -> None:
        if self.registered.is_set():
            req = DeregisterRequest(
                instance_id=self.instance_id, worker_id=self.worker_id, epoch=self._epoch
            )
            self._request(req, push, timeout=min(self.timeout_s, 2.0))
            self.registered.clear()

    def _flush(self, push: zmq.Socket[bytes]) -> None:
        if not len(self.buffer) or not self.registered.is_set():
            return
        for segments in self.buffer.drain():
            self._seq += 1
            report = ChunkReport(
                instance_id=self.instance_id,
                worker_id=self.worker_id,
                epoch=self._epoch,
                seq=self._seq,
                segments=segments,
            )
            try:
                push.send(encode(report), zmq.NOBLOCK)
                self.stats["reports_sent"] += 1
                self.stats["events_sent"] += sum(len(s.hashes) // 8 for s in segments)
            except zmq.Again:  # the numbered gap makes the controller ask for a resync
                self.stats["reports_dropped"] += 1

    def _request(
        self, msg: msgspec.Struct, push: zmq.Socket[bytes] | None, timeout: float | None = None
    ) -> Any:
        """Send a request and wait for its reply under a deadline; None on timeout.

        Without a reply URL (the seeds' pull-only mode) the request goes over PUSH and no
        reply is awaited. A fresh REQ socket per request keeps a lost reply from wedging it.
        """
        if self.reply_url is None:
            if push is not None:
                with contextlib.suppress(zmq.Again):
                    push.send(encode(msg), zmq.NOBLOCK)
            return None
        sock: zmq.Socket[bytes] = self._ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(self.reply_url)
            sock.send(encode(msg))
            if not sock.poll(int((timeout or self.timeout_s) * 1000)):
                log.warning(
                    "worker %s/%d: controller %s did not answer %s within %.1fs",
                    self.instance_id,
                    self.worker_id,
                    self.reply_url,
                    type(msg).__name__,
                    timeout or self.timeout_s,
                )
                return None
            return decode(sock.recv())
        except Exception as exc:
            log.warning("worker request %s failed: %s", type(msg).__name__, exc)
            return None
        finally:
            sock.close(linger=0)

    # --- peer lookups (called from engine threads) ---------------------------------------------

    def locate_peer(self, keys: Sequence[CacheKey]) -> str | None:
        """The chunk-server URL of another instance's same rank holding ``keys`` from the
        first one on, per the controller; None when none does or it does not answer within
        ``p2p_timeout_s``."""
        if self.reply_url is None or not keys or not self.registered.is_set():
            return None
        req = PeerLookupRequest(
            instance_id=self.instance_id,
            worker_id=self.worker_id,
            hashes=pack_hashes([k.chunk_hash for k in keys]),
            chunk_size=self.config.chunk_size,
        )
        reply = self._request(req, None, timeout=self.config.p2p_timeout_s)
        if not isinstance(reply, PeerLookupReply) or not reply.num_chunks:
            return None
        return reply.peer_init_url

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


def _configured(ports: list[int] | None, worker_id: int) -> int | None:
    if not ports:
        return None
    if worker_id >= len(ports):
        raise ConfigError(
            f"lmcache_worker_ports has {len(ports)} port(s), none for worker_id {worker_id}"
        )
    return ports[worker_id]


def _peer_url(config: EngineConfig) -> str | None:
    port = _configured(config.p2p_init_ports, config.worker_id)
    return f"{config.p2p_host}:{port}" if port is not None else None
