"""A protocol-level worker for controller tests: real ZMQ sockets, real frames; and the
controller process those tests talk to (its command line, readiness, HTTP handle).

It speaks the wire protocol directly (no engine), so controller tests can send exact
batches, gaps and unknown frames. The real worker is tested against engines elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import msgspec
import zmq

from kvplane.curve import make_client
from kvplane.keys import key_scheme_fingerprint
from kvplane.protocol import (
    ChunkReport,
    CommandReply,
    DeregisterRequest,
    HeartbeatRequest,
    HeartbeatStatus,
    RegisterReply,
    RegisterRequest,
    Segment,
    decode,
    encode,
    pack_hashes,
)
from kvplane.worker.link import ClientCurve
from tests.support import wait_until


def controller_args(
    http: int,
    pull: int,
    reply: int,
    *,
    worker_timeout: float | None = None,
    health_check_interval: float | None = None,
    command_timeout: float | None = None,
) -> list[str]:
    """``kvplane controller`` argv on 127.0.0.1 with these HTTP/pull/reply ports; the timing
    flags are passed only where given (else the controller's defaults)."""
    args = ["controller", "--host", "127.0.0.1", "--port", str(http)]
    args += ["--monitor-ports", json.dumps({"pull": pull, "reply": reply})]
    for flag, value in (
        ("--worker-timeout", worker_timeout),
        ("--health-check-interval", health_check_interval),
        ("--command-timeout", command_timeout),
    ):
        if value is not None:
            args += [flag, str(value)]
    return args


def wait_controller_up(url: str, timeout: float = 30.0) -> None:
    """Until ``GET {url}/healthz`` answers 200; TimeoutError after ``timeout`` seconds."""
    wait_until(
        lambda: httpx.get(url + "/healthz", timeout=1).status_code == 200,
        timeout=timeout,
        what=f"controller {url}/healthz",
    )


class ControllerProc(NamedTuple):
    """A controller process a test started: its HTTP URL, ZMQ ports and log file."""

    url: str
    pull: int
    reply: int
    log: Path

    def post(self, path: str, body: Any) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=15)

    def lookup(self, tokens: list[int]) -> dict[str, list[Any]]:
        resp = self.post("/lookup", {"tokens": tokens})
        assert resp.status_code == 200, resp.text
        return resp.json()["layout_info"]

    def metric(self, name: str) -> float:
        """``kvplane_controller_<name>`` (or ``..._total``) from /metrics."""
        text = httpx.get(self.url + "/metrics", timeout=10, verify=False).text
        for line in text.splitlines():
            if line.startswith(f"kvplane_controller_{name} ") or line.startswith(
                f"kvplane_controller_{name}_total "
            ):
                return float(line.split()[-1])
        raise KeyError(name)


class ProtoWorker:
    def __init__(
        self,
        pull_port: int,
        reply_port: int,
        instance_id: str,
        worker_id: int = 0,
        *,
        chunk_size: int = 4,
        port: int = 1,
        curve: ClientCurve | None = None,
    ) -> None:
        """``curve``: connect as this CURVE client (None: plain sockets)."""
        self.ctx = zmq.Context()
        self.instance_id, self.worker_id = instance_id, worker_id
        self.chunk_size, self.port = chunk_size, port
        self.reply_port = reply_port
        self.curve = curve
        self.push = self._socket(zmq.PUSH)
        self.push.connect(f"tcp://127.0.0.1:{pull_port}")
        self.epoch = random.getrandbits(62)
        self.seq = 0
        self._server: threading.Thread | None = None
        self._beater: threading.Thread | None = None
        self._stop = threading.Event()

    def _socket(self, kind: int) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            make_client(sock, self.curve.keys, self.curve.controller)
        return sock

    def request(self, msg: msgspec.Struct, timeout: float = 5.0) -> Any:
        sock = self._socket(zmq.REQ)
        sock.connect(f"tcp://127.0.0.1:{self.reply_port}")
        try:
            sock.send(encode(msg))
            if not sock.poll(int(timeout * 1000)):
                raise TimeoutError("controller did not answer")
            return decode(sock.recv())
        finally:
            sock.close()

    def register(self, timeout: float = 5.0, **overrides: Any) -> RegisterReply:
        self.epoch = random.getrandbits(62)
        self.seq = 0
        fields = {
            "instance_id": self.instance_id,
            "worker_id": self.worker_id,
            "ip": "127.0.0.1",
            "port": self.port,
            "peer_init_url": f"127.0.0.1:{self.port + 1}",
            "key_scheme": key_scheme_fingerprint(self.chunk_size),
            "chunk_size": self.chunk_size,
            "epoch": self.epoch,
        }
        fields.update(overrides)
        reply = self.request(RegisterRequest(**fields), timeout)
        assert isinstance(reply, RegisterReply)
        return reply

    def heartbeat(self) -> HeartbeatStatus:
        reply = self.request(
            HeartbeatRequest(
                instance_id=self.instance_id, worker_id=self.worker_id, epoch=self.epoch
            )
        )
        return HeartbeatStatus(reply.status)

    def deregister(self) -> bool:
        req = DeregisterRequest(
            instance_id=self.instance_id, worker_id=self.worker_id, epoch=self.epoch
        )
        return bool(self.request(req).ok)

    def report(
        self,
        hashes: Sequence[int],
        *,
        admit: bool = True,
        location: str = "LocalCPUBackend",
        seq: int | None = None,
        flags: int = 0,
    ) -> None:
        """``flags``: of the send (``zmq.NOBLOCK`` raises zmq.Again with no peer to take it)."""
        self.seq = self.seq + 1 if seq is None else seq
        msg = ChunkReport(
            instance_id=self.instance_id,
            worker_id=self.worker_id,
            epoch=self.epoch,
            seq=self.seq,
            segments=[Segment(admit, location, pack_hashes(list(hashes)))],
        )
        self.push.send(encode(msg), flags)

    def keep_alive(self, interval: float = 0.2) -> None:
        """Heartbeat on a thread until :meth:`close` (its own context: sockets are per thread)."""

        def loop() -> None:
            while not self._stop.wait(interval):
                with contextlib.suppress(TimeoutError):
                    self.heartbeat()

        self._beater = threading.Thread(target=loop, daemon=True)
        self._beater.start()

    def send_raw(self, frame: bytes) -> None:
        self.push.send(frame)

    def serve_commands(self, answer: Callable[[Any], CommandReply | None]) -> None:
        """Answer commands on ``self.port``; ``answer`` returning None means "hang"."""
        rep = self.ctx.socket(zmq.REP)
        rep.setsockopt(zmq.LINGER, 0)
        rep.bind(f"tcp://127.0.0.1:{self.port}")

        def loop() -> None:
            while not self._stop.is_set():
                if not rep.poll(50):
                    continue
                reply = answer(decode(rep.recv()))
                if reply is None:
                    self._stop.wait()
                    break
                rep.send(encode(reply))
            rep.close()

        self._server = threading.Thread(target=loop, daemon=True)
        self._server.start()

    def close(self) -> None:
        self._stop.set()
        for thread in (self._server, self._beater):
            if thread is not None:
                thread.join(5)
        self.push.close()
        self.ctx.term()
