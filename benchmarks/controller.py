"""Controller benchmark: ingest rate, lookup latency/throughput, burst latency, deregister, RSS.

Runs a real ``kvplane controller`` process on loopback and drives it like workers and a
router would: admits arrive as packed ChunkReport batches through ZMQ PUSH from a separate
sender process (counted when *applied*, read from /metrics), lookups are real HTTP POSTs of
8K-token prompts (chunk_size 256) with keep-alive clients. The lookups/s figure comes from
4 client threads in this process, on the same machine as the controller; it prints how
busy the controller was meanwhile, so a client-bound figure shows as one.

    python benchmarks/controller.py            # 100K and 1M chunks across 16 instances
    python benchmarks/controller.py --quick    # smaller, for a smoke run
    python benchmarks/controller.py --no-ha    # without the replicas on NATS JetStream

The same run then measures the replicated controller (benchmarks/replicas.py): admits/s
through JetStream, a replica joining at ~1M chunks, /lookup on a replica against this
run's ZMQ controller.

The last line printed is one JSON object with the headline numbers.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

import httpx
import numpy as np
import psutil
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.vllm_ttft import cpu_times, steal_share  # noqa: E402
from kvplane.keys import chunk_hashes, key_scheme_fingerprint  # noqa: E402
from kvplane.protocol import (  # noqa: E402
    ChunkReport,
    DeregisterRequest,
    HeartbeatRequest,
    RegisterRequest,
    Segment,
    decode,
    encode,
)

CHUNK = 256
PROMPT_TOKENS = 8192
BATCH = 4096  # hashes per report: the worker's batch size (kvplane.worker.reports)
LOC = "LocalCPUBackend"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = psutil.virtual_memory().total / 2**30
    return f"{os.cpu_count()}-core {model}, {mem:.0f} GiB RAM, {platform.platform()}, Python {platform.python_version()}"


class Client:
    """Registers workers and sends requests on the controller's reply socket."""

    def __init__(self, reply_port: int) -> None:
        self.ctx = zmq.Context()
        self.reply_port = reply_port

    def request(self, msg: object, timeout: float = 30.0) -> object:
        sock = self.ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://127.0.0.1:{self.reply_port}")
        try:
            sock.send(encode(msg))  # type: ignore[arg-type]
            if not sock.poll(int(timeout * 1000)):
                raise TimeoutError("controller did not answer")
            return decode(sock.recv())
        finally:
            sock.close()

    def register(self, instance_id: str, epoch: int) -> None:
        reply = self.request(
            RegisterRequest(
                instance_id=instance_id,
                worker_id=0,
                ip="127.0.0.1",
                port=1,
                key_scheme=key_scheme_fingerprint(CHUNK),
                chunk_size=CHUNK,
                epoch=epoch,
            )
        )
        assert getattr(reply, "ok", False), reply


def reports(instance_id: str, epoch: int, first_seq: int, hashes: np.ndarray) -> list[bytes]:
    frames = []
    for i, start in enumerate(range(0, len(hashes), BATCH)):
        part = hashes[start : start + BATCH].astype("<u8").tobytes()
        frames.append(
            encode(
                ChunkReport(
                    instance_id=instance_id,
                    worker_id=0,
                    epoch=epoch,
                    seq=first_seq + i,
                    segments=[Segment(True, LOC, part)],
                )
            )
        )
    return frames


def _send(pull_port: int, frames: list[bytes], go: mp.synchronize.Event) -> None:
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, -1)
    push.connect(f"tcp://127.0.0.1:{pull_port}")
    go.wait()
    for frame in frames:
        push.send(frame, copy=False)
    push.close()
    ctx.term()


def send_in_process(pull_port: int, frames: list[bytes]) -> tuple[mp.Process, float]:
    """Start a sender process; returns it and the time it was let go (after connecting)."""
    go = mp.Event()
    proc = mp.Process(target=_send, args=(pull_port, frames, go), daemon=True)
    proc.start()
    time.sleep(0.5)  # forked and connected before the clock starts
    start = time.perf_counter()
    go.set()
    return proc, start


def metric(http: httpx.Client, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(f"kvplane_controller_{name}_total ") or line.startswith(
            f"kvplane_controller_{name} "
        ):
            return float(line.split()[-1])
    raise KeyError(name)


def wait_applied(http: httpx.Client, target: float, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while metric(http, "chunk_events_applied") < target:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {metric(http, 'chunk_events_applied')} of {target} applied")
        time.sleep(0.02)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


class LookupClient:
    """A lean keep-alive HTTP/1.1 client on a plain socket, so the client is not what is
    measured: it shares the VM's two cores with the controller, and http.client spent
    ~200 us of CPU per lookup (mostly parsing response headers) to this one's ~40 us.
    Requests are complete HTTP/1.1 POSTs; responses are read whole, status checked by
    :meth:`post` (:meth:`request` returns it)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None
        self.head = (
            f"POST /lookup HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
            "content-type: application/json\r\ncontent-length: "
        ).encode()

    def post(self, body: bytes) -> bytes:
        status, answer = self.request(body)
        if status != 200:
            raise RuntimeError(f"/lookup answered {status}: {answer[:200]!r}")
        return answer

    def request(self, body: bytes) -> tuple[int, bytes]:
        """POST ``body``; the status and the whole response body, whatever the status."""
        request = b"".join([self.head, str(len(body)).encode(), b"\r\n\r\n", body])
        try:
            return self._exchange(request)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, EOFError):
            self.close()  # the server closed an idle keep-alive connection: reconnect
            return self._exchange(request)

    def _exchange(self, request: bytes) -> tuple[int, bytes]:
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(request)
        data = b""
        while (end := data.find(b"\r\n\r\n")) < 0:
            data += self._recv()
        head, body = data[:end].decode("latin-1"), data[end + 4 :]
        status = int(head.split(" ", 2)[1])
        length = next(
            int(line.split(":", 1)[1])
            for line in head.split("\r\n")[1:]
            if line.lower().startswith("content-length:")
        )
        while len(body) < length:
            body += self._recv()
        return status, body

    def _recv(self) -> bytes:
        assert self.sock is not None  # connected by _exchange
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("the server closed the connection")
        return chunk

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def timed_lookups(client: LookupClient, bodies: list[bytes], n: int) -> list[float]:
    out = []
    for i in range(n):
        start = time.perf_counter()
        client.post(bodies[i % len(bodies)])
        out.append((time.perf_counter() - start) * 1000)
    return out


class Throughput(NamedTuple):
    rps: float
    server_busy: float  # the controller's CPU time over wall time (1.0 = one core)
    client_cpu_us: float  # this process's CPU time per lookup (all client threads)


def throughput(
    port: int, bodies: list[bytes], threads: int, seconds: float, pid: int
) -> Throughput:
    """Lookups/s from ``threads`` keep-alive clients in this process.

    Threads, not processes: the issue's "4 client threads" are 4 concurrent clients, and
    their shared GIL does not limit the rate while the client needs well under one core,
    which the returned CPU figures show (4 client processes measured no higher on the
    2-core VM). The controller handles requests on one event
    loop, so its busy share nears 1.0 when it is the limit.
    """
    server, me = psutil.Process(pid), psutil.Process()
    server_cpu = sum(server.cpu_times()[:2])
    client_cpu = sum(me.cpu_times()[:2])
    counts = [0] * threads
    stop = time.monotonic() + seconds

    def run(k: int) -> None:
        client = LookupClient(port)
        i = k
        while time.monotonic() < stop:
            client.post(bodies[i % len(bodies)])
            counts[k] += 1
            i += threads
        client.close()

    workers = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    start = time.monotonic()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.monotonic() - start
    done = sum(counts)
    return Throughput(
        done / elapsed,
        (sum(server.cpu_times()[:2]) - server_cpu) / elapsed,
        (sum(me.cpu_times()[:2]) - client_cpu) / max(done, 1) * 1e6,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=16)
    parser.add_argument("--small", type=int, default=100_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--burst", type=int, default=300_000)
    parser.add_argument("--lookups", type=int, default=2000)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--no-ha",
        action="store_true",
        help="skip the replicas on NATS JetStream (benchmarks/replicas.py)",
    )
    args = parser.parse_args()
    if args.quick:
        args.small, args.large, args.burst, args.lookups = 20_000, 100_000, 50_000, 300

    print(f"machine: {machine()}")
    cpu_before = cpu_times()
    http_port, pull, reply = free_ports(3)
    cmd = [
        sys.executable, "-m", "kvplane", "controller", "--host", "127.0.0.1",
        "--port", str(http_port), "--monitor-ports", json.dumps({"pull": pull, "reply": reply}),
        "--worker-timeout", "3600", "--log-level", "WARNING",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{http_port}"
    http = httpx.Client(base_url=url, timeout=30)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if http.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("controller did not start")
            time.sleep(0.1)
        results = run_benchmark(args, http, http_port, pull, reply, proc.pid)
        if not args.no_ha:
            results |= run_ha(args, http_port)
    finally:
        http.close()
        proc.terminate()
        proc.wait(20)
    stolen = steal_share(cpu_before, cpu_times())
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"CPU time stolen by the hypervisor during the run: {stolen:.0%}; load average at end {load}"
    )
    results["stolen"] = round(stolen, 3)
    print(json.dumps(results))


def run_ha(args: argparse.Namespace, zmq_http_port: int) -> dict[str, object]:
    """The replicas' figures (benchmarks/replicas.py), against this run's ZMQ controller."""
    from benchmarks.replicas import run_replicas

    prompt_hashes, bodies = make_prompts(np.random.default_rng(7))
    clients: dict[int, LookupClient] = {}

    def lookup(port: int, bodies: list[bytes], n: int) -> list[float]:
        return timed_lookups(clients.setdefault(port, LookupClient(port)), bodies, n)

    try:
        return run_replicas(
            ROOT,
            free_ports=free_ports,
            metric=metric,
            instances=args.instances,
            large=args.large,
            prompt_hashes=prompt_hashes,
            reports=reports,
            lookup=lookup,
            bodies=bodies,
            zmq_http_port=zmq_http_port,
            lookups=args.lookups,
            percentile=percentile,
        )
    finally:
        for c in clients.values():
            c.close()


def make_prompts(rng: np.random.Generator) -> tuple[list[list[int]], list[bytes]]:
    """64 prompts of 8K tokens: their chunk hashes and /lookup bodies."""
    prompts = [rng.integers(0, 128_000, PROMPT_TOKENS).tolist() for _ in range(64)]
    return [chunk_hashes(p, CHUNK) for p in prompts], [
        json.dumps({"tokens": p}).encode() for p in prompts
    ]


def run_benchmark(
    args: argparse.Namespace, http: httpx.Client, http_port: int, pull: int, reply: int, pid: int
) -> dict[str, object]:
    rng = np.random.default_rng(7)
    client = Client(reply)
    instances = [f"instance-{i:02d}" for i in range(args.instances)]
    epochs = {name: random.getrandbits(62) for name in instances}
    for name in instances:
        client.register(name, epochs[name])
    seqs = dict.fromkeys(instances, 1)

    # Real prompts (cached prefixes of 1..32 chunks on one instance each) inside random bulk.
    prompt_hashes, bodies = make_prompts(rng)

    def fill(total: int) -> float:
        """Admit ``total`` chunks spread over the instances; seconds until all applied."""
        per_instance: list[list[bytes]] = []
        per = total // len(instances)
        for k, name in enumerate(instances):
            own = [
                h
                for j, hs in enumerate(prompt_hashes)
                if j % len(instances) == k
                for h in hs[: (j * 7) % 32 + 1]
            ]
            bulk = rng.integers(1, 2**63, per - len(own), dtype=np.uint64)
            hashes = np.concatenate([np.array(own, dtype=np.uint64), bulk])
            batch = reports(name, epochs[name], seqs[name], hashes)
            seqs[name] += len(batch)
            per_instance.append(batch)
        # Interleave instances like real traffic; each worker's reports stay in order (one
        # PUSH socket per worker keeps order; a reordered report would be a sequence gap).
        frames = [f for group in itertools.zip_longest(*per_instance) for f in group if f]
        before = metric(http, "chunk_events_applied")
        sender, start = send_in_process(pull, frames)
        wait_applied(http, before + per * len(instances))
        elapsed = time.perf_counter() - start
        sender.join(30)
        return elapsed

    out: dict[str, object] = {}
    lookups = LookupClient(http_port)
    elapsed_small = fill(args.small)
    small_chunks = metric(http, "index_chunks")
    lat_small = timed_lookups(lookups, bodies, args.lookups)
    print(
        f"{small_chunks:.0f} chunks: ingest {args.small / elapsed_small / 1e6:.2f}M admits/s; "
        f"lookup p50 {statistics.median(lat_small):.2f} ms p99 {percentile(lat_small, 99):.2f} ms"
    )
    elapsed_large = fill(args.large - args.small)
    ingest_rate = (args.large - args.small) / elapsed_large
    chunks = metric(http, "index_chunks")
    rss = psutil.Process(pid).memory_info().rss / 2**20
    print(
        f"{chunks:.0f} chunks: ingest {ingest_rate / 1e6:.2f}M admits/s, controller RSS {rss:.0f} MB"
    )
    timed_lookups(lookups, bodies, 100)  # warm
    lat = timed_lookups(lookups, bodies, args.lookups)
    tp = throughput(http_port, bodies, threads=4, seconds=5, pid=pid)
    rps = tp.rps
    print(
        f"lookup at {chunks:.0f} chunks: p50 {statistics.median(lat):.2f} ms, "
        f"p99 {percentile(lat, 99):.2f} ms, {rps:.0f} lookups/s with 4 threads "
        f"(controller busy {tp.server_busy:.0%} of a core, client {tp.client_cpu_us:.0f} us "
        f"CPU per lookup)"
    )
    server_ms = lookup_server_ms(http)
    print(f"server-side lookup time (hash + probe), mean: {server_ms:.3f} ms")

    # Lookups while a burst of admits is being ingested.
    burst_name = instances[0]
    hashes = rng.integers(1, 2**63, args.burst, dtype=np.uint64)
    frames = reports(burst_name, epochs[burst_name], seqs[burst_name], hashes)
    seqs[burst_name] += len(frames)
    target = metric(http, "chunk_events_applied") + args.burst
    sender, _ = send_in_process(pull, frames)
    burst_lat: list[float] = []
    burst_start = time.perf_counter()
    while metric(http, "chunk_events_applied") < target:
        burst_lat.extend(timed_lookups(lookups, bodies, 20))
        if time.perf_counter() - burst_start > 120:
            raise TimeoutError("burst not applied")
    burst_s = time.perf_counter() - burst_start
    sender.join(30)
    burst_p99 = percentile(burst_lat, 99)
    print(
        f"during a {args.burst} admit burst ({burst_s:.2f} s, {len(burst_lat)} lookups): "
        f"lookup p99 {burst_p99:.2f} ms"
    )

    # Deregistering a worker that holds args.large chunks, and the memory that comes back;
    # twice, so a second round shows whether what stayed is reused or lost.
    controller = psutil.Process(pid)
    rss_rounds: list[tuple[int, int, int]] = []
    for _ in range(2):
        rss_before = controller.memory_info().rss
        epoch = random.getrandbits(62)
        client.register("dereg", epoch)
        hashes = rng.integers(1, 2**63, args.large, dtype=np.uint64)
        before = metric(http, "chunk_events_applied")
        send_in_process(pull, reports("dereg", epoch, 1, hashes))[0].join(120)
        wait_applied(http, before + args.large)
        rss_loaded = controller.memory_info().rss
        start = time.perf_counter()
        client.request(DeregisterRequest(instance_id="dereg", worker_id=0, epoch=epoch))
        dereg_ms = (time.perf_counter() - start) * 1000
        # The maps are freed after the reply; a later request answered means that is done.
        client.request(HeartbeatRequest(instance_id="dereg", worker_id=0, epoch=epoch))
        rss_rounds.append((rss_before, rss_loaded, controller.memory_info().rss))
        print(
            f"deregister a worker with {args.large} chunks: {dereg_ms:.2f} ms (request round trip)"
        )
    for n, (rss_before, rss_loaded, rss_after) in enumerate(rss_rounds, 1):
        print(
            f"round {n}: controller RSS {rss_before / 2**20:.0f} MB before that worker's admits, "
            f"{rss_loaded / 2**20:.0f} MB holding them, {rss_after / 2**20:.0f} MB after its "
            f"deregistration: {(rss_loaded - rss_after) / 2**20:.0f} of "
            f"{(rss_loaded - rss_before) / 2**20:.0f} MB returned"
        )
    held, back = rss_rounds[0][1] - rss_rounds[0][0], rss_rounds[0][1] - rss_rounds[0][2]
    kept_after_round_2 = rss_rounds[1][2] - rss_rounds[0][2]

    out.update(
        ingest_events_per_s=round(ingest_rate),
        lookup_p50_ms=round(statistics.median(lat), 3),
        lookup_p99_ms=round(percentile(lat, 99), 3),
        lookup_rps=round(rps),
        lookup_rps_controller_busy=round(tp.server_busy, 2),
        lookup_p99_during_burst_ms=round(burst_p99, 3),
        deregister_ms=round(dereg_ms, 3),
        deregister_rss_held_mb=round(held / 2**20, 1),
        deregister_rss_returned_mb=round(back / 2**20, 1),
        deregister_rss_growth_round_2_mb=round(kept_after_round_2 / 2**20, 1),
        rss_mb=round(rss, 1),
        index_chunks=int(chunks),
        instances=len(instances),
        lookup_p50_ms_100k=round(statistics.median(lat_small), 3),
        lookup_p99_ms_100k=round(percentile(lat_small, 99), 3),
        ingest_events_per_s_100k=round(args.small / elapsed_small),
    )
    return out


def lookup_server_ms(http: httpx.Client) -> float:
    total = count = 0.0
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("kvplane_controller_lookup_seconds_sum"):
            total = float(line.split()[-1])
        elif line.startswith("kvplane_controller_lookup_seconds_count"):
            count = float(line.split()[-1])
    return total / count * 1000 if count else 0.0


if __name__ == "__main__":
    main()
