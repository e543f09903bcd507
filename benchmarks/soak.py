"""Soak: minutes of lookups, admits and evicts on loopback while workers join and leave and
the controller restarts; then an exact audit of the controller's index.

Real processes: one ``kvplane controller`` and ``--engines`` stable ``kvplane engine``
processes (synthetic KV caches, a small CPU tier so its LRU evicts all the time), plus a
churn engine that joins, stores and leaves (SIGTERM: it deregisters; SIGKILL: it is reaped,
or replaced by a restart under the same instance id before that). Meanwhile:

* lookup threads POST /lookup of prompts the engines store (shared prefixes: each prompt is
  a prefix of a longer one of its family), with a keep-alive client;
* one thread per engine stores prompts through its internal API (``POST /cache/store``)
  and now and then clears its CPU tier (``DELETE /cache/clear``);
* an operator loop runs controller ``/clear`` and ``/health`` on the stable engines, and
  restarts the controller on the same ports (SIGKILL and SIGTERM in turn) at 1/4, 1/2 and
  3/4 of the run;
* a sampler reads the RSS of the controller and the stable engines and the index size.

At the end, with the load stopped and after a settle, the controller's index
(``POST /query_chunks``) must equal each engine's own key list (``GET /cache/keys``)
exactly, per tier; the churn engine must be gone from the controller. Checks: that audit, zero 5xx
anywhere, no request timed out, every process alive, and RSS flat: the median of the last
minute within 5% of the second minute's, for the controller (one incarnation after
another: each restart resyncs the same load) and for each stable engine.

    python benchmarks/soak.py                 # 10 minutes
    python benchmarks/soak.py --minutes 2     # a short run while developing

Prints a table per minute and a verdict line, exits 1 if a check fails; the last line is one
JSON object with the headline numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.controller import LookupClient, free_ports, machine, percentile  # noqa: E402
from kvplane.keys import chunk_hashes  # noqa: E402

CHUNK = 16
HEARTBEAT = 1.0  # engines' heartbeat interval, seconds
WORKER_TIMEOUT = 5.0  # the controller reaps a worker silent this long
API_INDEX_PORT = 7000  # internal_api_server_port_start 6999 + index 1 (worker 0)
FAMILIES = 64  # prompt families: tokens [f * 100_000, f * 100_000 + n) for n in LENGTHS
LENGTHS = (128, 256, 512, 1024)


def prompt(rng: random.Random) -> tuple[int, int]:
    start = rng.randrange(FAMILIES) * 100_000
    return start, start + rng.choice(LENGTHS)


class Stats:
    """Counts and lookup latencies per minute of the run, shared by every thread."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.lock = threading.Lock()
        self.latency: dict[int, list[float]] = defaultdict(list)
        self.counts: dict[int, Counter[str]] = defaultdict(Counter)
        self.events: dict[int, list[str]] = defaultdict(list)
        self.samples: list[dict[str, float]] = []

    def minute(self) -> int:
        return int((time.monotonic() - self.t0) // 60)

    def count(self, what: str, n: int = 1) -> None:
        with self.lock:
            self.counts[self.minute()][what] += n

    def lookup(self, ms: float, hit: bool) -> None:
        with self.lock:
            m = self.minute()
            self.latency[m].append(ms)
            self.counts[m]["lookups"] += 1
            self.counts[m]["hits"] += hit

    def event(self, text: str) -> None:
        with self.lock:
            self.events[self.minute()].append(text)
        print(f"  {time.monotonic() - self.t0:6.1f}s {text}", file=sys.stderr, flush=True)

    def status(self, source: str, code: int) -> None:
        """Count an HTTP answer by class: ``{source}_2xx`` ... ``{source}_5xx``."""
        self.count(f"{source}_{code // 100}xx")

    def total(self, what: str) -> int:
        with self.lock:
            return sum(c[what] for c in self.counts.values())


class Engine(NamedTuple):
    name: str
    proc: subprocess.Popen[bytes]
    api: httpx.Client
    log: Path


class Cluster:
    """The controller and engine processes of one soak, all on loopback, stopped by PID."""

    def __init__(self, tmp: Path, stats: Stats) -> None:
        self.tmp, self.stats = tmp, stats
        self.http, self.pull, self.reply = free_ports(3)
        self.url = f"http://127.0.0.1:{self.http}"
        self.env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        for name in ("KVPLANE_CONFIG_FILE", "LMCACHE_CONFIG_FILE"):
            self.env.pop(name, None)
        self.controller: subprocess.Popen[bytes] | None = None
        self.spawned: list[subprocess.Popen[bytes]] = []  # every process, to stop by PID
        self.incarnation = 0
        self.crashed: list[str] = []

    def _spawn(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "kvplane", *args],
                cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.spawned.append(proc)
        return proc

    def stop_all(self) -> None:
        """SIGTERM, then SIGKILL, each process still running, by PID."""
        for proc in self.spawned:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.spawned:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def start_controller(self) -> None:
        self.incarnation += 1
        args = [
            "controller", "--host", "127.0.0.1", "--port", str(self.http),
            "--monitor-ports", json.dumps({"pull": self.pull, "reply": self.reply}),
            "--worker-timeout", str(WORKER_TIMEOUT), "--health-check-interval", "0.5",
            "--command-timeout", "5", "--log-level", "WARNING",
        ]  # fmt: skip
        self.controller = self._spawn(args, self.tmp / "controller.log")
        wait(
            lambda: httpx.get(self.url + "/healthz", timeout=2).status_code == 200,
            60,
            "controller up",
        )

    def stop_controller(self, sig: signal.Signals) -> None:
        proc = self.controller
        assert proc is not None
        if proc.poll() is not None:
            self.crashed.append(f"controller exited by itself with {proc.returncode}")
        proc.send_signal(sig)
        proc.wait(30)
        if sig == signal.SIGTERM and proc.returncode != 0:
            self.crashed.append(f"controller's SIGTERM exit code {proc.returncode}")

    def start_engine(self, name: str) -> Engine:
        prefix = self.tmp / f"api-{name}"
        sock = Path(f"{prefix}_{API_INDEX_PORT}")
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()  # a killed engine leaves its socket file behind
        cfg = {
            "chunk_size": CHUNK, "kv_num_layers": 2, "kv_num_heads": 2, "kv_head_size": 16,
            "kv_block_size": 16, "kv_num_blocks": 128, "max_local_cpu_size": 0.004,
            "enable_controller": True, "lmcache_instance_id": name,
            "controller_pull_url": f"127.0.0.1:{self.pull}",
            "controller_reply_url": f"127.0.0.1:{self.reply}",
            "lmcache_worker_ports": free_ports(1), "lmcache_worker_heartbeat_time": HEARTBEAT,
            "controller_timeout_s": 2.0, "internal_api_server_enabled": True,
            "internal_api_server_socket_path_prefix": str(prefix),
        }  # fmt: skip
        path = self.tmp / f"{name}.yaml"
        path.write_text(json.dumps(cfg))  # JSON is YAML
        log = self.tmp / f"{name}.log"
        proc = self._spawn(["engine", "--config", str(path)], log)
        wait(lambda: sock.exists() or proc.poll() is not None, 120, f"{name} API socket")
        if proc.poll() is not None:
            raise RuntimeError(f"engine {name} exited with {proc.returncode}; see {log}")
        api = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://engine", timeout=30
        )
        return Engine(name, proc, api, log)

    def registered(self, name: str) -> bool:
        try:
            resp = httpx.post(
                self.url + "/query_worker_info", json={"instance_id": name}, timeout=5
            )
        except httpx.TransportError:
            return False
        return resp.status_code == 200

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response | None:
        """A controller call, counted by status class (``ops_*``); None if unreachable."""
        try:
            resp = httpx.post(self.url + path, json=body, timeout=30)
        except httpx.TimeoutException:
            self.stats.count("ops_timeouts")
            return None
        except httpx.TransportError:
            self.stats.count("ops_unreachable")
            return None
        self.stats.status("ops", resp.status_code)
        if resp.status_code >= 500:
            self.stats.event(f"{path} answered {resp.status_code}: {resp.text[:200]}")
        return resp

    def metric(self, name: str) -> float | None:
        try:
            text = httpx.get(self.url + "/metrics", timeout=5).text
        except httpx.TransportError:
            return None
        for line in text.splitlines():
            if line.startswith(f"kvplane_controller_{name} "):
                return float(line.split()[-1])
        return None


def wait(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.TransportError):
            if check():
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


def stop_engine(engine: Engine, sig: signal.Signals) -> int | None:
    engine.api.close()
    engine.proc.send_signal(sig)
    try:
        return engine.proc.wait(30)
    except subprocess.TimeoutExpired:
        engine.proc.kill()
        engine.proc.wait(10)
        return None


# --- load ---------------------------------------------------------------------------------


def lookup_prompts() -> list[tuple[int, int]]:
    """(first token, length) of each prompt looked up: the stored ones, and 700 tokens of the
    1024-token one (a last partial chunk)."""
    return [(f * 100_000, n) for f in range(FAMILIES) for n in (*LENGTHS, 700)]


def lookup_loop(port: int, stats: Stats, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    bodies = [json.dumps({"tokens": list(range(s, s + n))}).encode() for s, n in lookup_prompts()]
    client = LookupClient(port)
    while not stop.is_set():
        body = rng.choice(bodies)
        start = time.perf_counter()
        try:
            status, answer = client.request(body)
        except TimeoutError:
            client.close()
            stats.count("lookup_timeouts")
            continue
        except OSError:  # refused or reset: the controller is restarting
            client.close()
            stats.count("lookup_unreachable")
            stop.wait(0.05)
            continue
        ms = (time.perf_counter() - start) * 1000
        stats.status("lookup", status)
        if status == 200:
            stats.lookup(ms, b'"layout_info":{}' not in answer)
        elif status >= 500:
            stats.event(f"/lookup answered {status}: {answer[:200]!r}")
        stop.wait(0.004)
    client.close()


def store_loop(engine: Engine, stats: Stats, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    n = 0
    while not stop.is_set():
        n += 1
        try:
            if n % 400 == 0:
                resp = engine.api.delete("/cache/clear", params={"locations": "LocalCPUBackend"})
            else:
                start, end = prompt(rng)
                resp = engine.api.post("/cache/store", params={"tokens_mock": f"{start},{end}"})
        except httpx.TimeoutException:
            stats.count("engine_timeouts")
            continue
        except httpx.TransportError:
            if engine.proc.poll() is not None:
                return  # a churn engine that was stopped
            stats.count("engine_unreachable")
            stop.wait(0.1)
            continue
        stats.status("engine", resp.status_code)
        if resp.status_code == 200 and n % 400:
            stats.count("stores")
        elif resp.status_code >= 400:
            stats.event(
                f"{engine.name} {resp.request.url.path} {resp.status_code}: {resp.text[:200]}"
            )
        stop.wait(0.03)


def churn_loop(cluster: Cluster, stats: Stats, stop: threading.Event, until: float) -> None:
    """Join, store, leave; SIGTERM, SIGKILL then reaped, SIGKILL then rejoin at once."""
    modes = [signal.SIGTERM, signal.SIGKILL, signal.SIGKILL]
    life = max(10.0, (until - time.monotonic()) / 8)
    k = 0
    while not stop.is_set() and time.monotonic() < until - life:
        engine = cluster.start_engine("soak-churn")
        stats.event("churn engine joins")
        loader_stop = threading.Event()
        loader = threading.Thread(target=store_loop, args=(engine, stats, loader_stop, 1000 + k))
        loader.start()
        stop.wait(life)
        sig = modes[k % len(modes)]
        loader_stop.set()
        loader.join(60)
        code = stop_engine(engine, sig)
        if sig == signal.SIGTERM and code != 0:
            cluster.crashed.append(f"churn engine's SIGTERM exit code {code}")
        stats.event(f"churn engine leaves ({sig.name})")
        if k % len(modes) != 2:  # after the third kind, rejoin before the reap
            stop.wait(life / 2)
        k += 1


def sample(cluster: Cluster, engines: list[Engine], stats: Stats) -> None:
    row: dict[str, float] = {"t": time.monotonic() - stats.t0}
    proc = cluster.controller
    if proc is not None and proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            row["controller"] = psutil.Process(proc.pid).memory_info().rss / 2**20
    for e in engines:
        with contextlib.suppress(psutil.Error):
            row[e.name] = psutil.Process(e.proc.pid).memory_info().rss / 2**20
    chunks = cluster.metric("index_chunks")
    if chunks is not None:
        row["index_chunks"] = chunks
    with stats.lock:
        stats.samples.append(row)


# --- the audit ----------------------------------------------------------------------------


def engine_keys(engine: Engine) -> dict[str, set[int]]:
    resp = engine.api.get("/cache/keys")
    resp.raise_for_status()
    return {loc: set(hs) for loc, hs in resp.json()["chunk_hashes"].items() if hs}


def index_keys(cluster: Cluster, name: str) -> dict[str, set[int]] | None:
    resp = httpx.post(cluster.url + "/query_chunks", json={"instance_id": name}, timeout=30)
    if resp.status_code != 200:
        return None
    return {loc: set(hs) for loc, hs in resp.json()["chunk_hashes"]["0"].items() if hs}


def lookups_agree(cluster: Cluster, held: dict[str, set[int]]) -> list[str]:
    """Every lookup the soak sent, answered now, against what ``held`` (instance -> its chunk
    hashes in any tier) says: the instances holding a prefix and its length in tokens."""
    wrong = []
    for start, n in lookup_prompts():
        tokens = list(range(start, start + n))
        expect = {}
        for name, hashes in held.items():
            k = 0
            for h in chunk_hashes(tokens, CHUNK):
                if h not in hashes:
                    break
                k += 1
            if k:
                expect[name] = ["LocalCPUBackend", min(k * CHUNK, n)]
        resp = httpx.post(cluster.url + "/lookup", json={"tokens": tokens}, timeout=30)
        got = resp.json().get("layout_info") if resp.status_code == 200 else resp.status_code
        if got != expect:
            wrong.append(f"/lookup of [{start}, {start + n}): {got} instead of {expect}")
    return wrong


def audit(cluster: Cluster, engines: list[Engine], timeout: float) -> tuple[bool, list[str]]:
    """Until the index equals every engine's own key list, the churn engine is gone and every
    lookup agrees with the key lists (or ``timeout``); returns whether they did and what
    differs or matches."""
    deadline = time.monotonic() + timeout
    while True:
        lines, ok = [], True
        held: dict[str, set[int]] = {}
        for e in engines:
            try:
                mine, index = engine_keys(e), index_keys(cluster, e.name)
            except httpx.HTTPError as exc:
                ok = False
                lines.append(f"{e.name}: its key list or the index could not be read: {exc!r}")
                continue
            held[e.name] = set().union(*mine.values())
            if index == mine:
                n = sum(len(s) for s in mine.values())
                lines.append(f"{e.name}: index == engine's own key list ({n} chunks)")
                continue
            ok = False
            if index is None:
                lines.append(f"{e.name}: not registered with the controller")
                continue
            for loc in sorted(set(mine) | set(index)):
                a, b = mine.get(loc, set()), index.get(loc, set())
                lines.append(
                    f"{e.name} {loc}: engine {len(a)}, index {len(b)}, "
                    f"missing from index {len(a - b)}, extra in index {len(b - a)}"
                )
        if cluster.registered("soak-churn"):
            ok = False
            lines.append("soak-churn: still registered after it left")
        if ok:
            wrong = lookups_agree(cluster, held)
            ok = not wrong
            lines.append(
                f"{len(lookup_prompts())} lookups agree with the engines' key lists"
                if ok
                else f"{len(wrong)} lookups disagree with the engines' key lists, e.g. {wrong[0]}"
            )
        if ok or time.monotonic() > deadline:
            return ok, lines
        time.sleep(1.0)


# --- the report ---------------------------------------------------------------------------


def log_errors(tmp: Path) -> list[str]:
    """Each process log's lines at ERROR or above and tracebacks: a check that fails on any."""
    lines = []
    for log in sorted(tmp.glob("*.log")):
        bad = [
            line
            for line in log.read_text(errors="replace").splitlines()
            if " ERROR " in line or " CRITICAL " in line or line.startswith(("ERROR", "Traceback"))
        ]
        if bad:
            lines.append(f"FAIL {log.name}: {len(bad)} error lines, first: {bad[0][:200]}")
    return lines or ["ok no ERROR lines or tracebacks in the process logs"]


def rss_by_minute(samples: list[dict[str, float]], name: str) -> dict[int, float]:
    per: dict[int, list[float]] = defaultdict(list)
    for row in samples:
        if name in row:
            per[int(row["t"] // 60)].append(row[name])
    return {m: statistics.median(v) for m, v in per.items()}


def report(
    args: argparse.Namespace, stats: Stats, engines: list[Engine]
) -> tuple[list[str], dict[str, Any]]:
    """The per-minute table and the RSS checks (lines that fail start with ``FAIL``)."""
    names = ["controller", *(e.name for e in engines)]
    rss = {n: rss_by_minute(stats.samples, n) for n in names}
    chunks = rss_by_minute(stats.samples, "index_chunks")
    print(
        f"{'min':>3} {'lookups':>8} {'hit%':>5} {'p50 ms':>7} {'p99 ms':>7} {'5xx':>4} {'4xx':>4}"
        f" {'unreach':>7} {'stores':>6} {'index':>7} {'ctl MB':>7} {'eng MB':>7}  events"
    )
    for m in range(args.minutes):
        c, lat = stats.counts[m], stats.latency[m]
        eng = [rss[e.name][m] for e in engines if m in rss[e.name]]
        p50 = f"{statistics.median(lat):7.2f}" if lat else f"{'-':>7}"
        p99 = f"{percentile(lat, 99):7.2f}" if lat else f"{'-':>7}"
        fives = sum(c[f"{s}_5xx"] for s in ("lookup", "ops", "engine"))
        fours = sum(c[f"{s}_4xx"] for s in ("lookup", "ops", "engine"))
        unreach = c["lookup_unreachable"] + c["ops_unreachable"]
        hit = 100 * c["hits"] / c["lookups"] if c["lookups"] else 0.0
        print(
            f"{m + 1:>3} {c['lookups']:>8} {hit:5.1f} {p50} {p99} {fives:>4} {fours:>4}"
            f" {unreach:>7} {c['stores']:>6} {chunks.get(m, 0):>7.0f}"
            f" {rss['controller'].get(m, 0):>7.1f} {max(eng, default=0):>7.1f}"
            f"  {'; '.join(stats.events[m])}"
        )
    lines = []
    flat: dict[str, float] = {}
    second, last = 1, args.minutes - 1
    for n in names:
        a, b = rss[n].get(second), rss[n].get(last)
        if a is None or b is None:
            lines.append(f"FAIL RSS of {n}: no samples in minute {second + 1} or {last + 1}")
            continue
        change = (b - a) / a
        flat[n] = round(change, 4)
        verdict = "ok" if abs(change) <= 0.05 else "FAIL"
        lines.append(
            f"{verdict} RSS of {n}: minute {second + 1} {a:.1f} MB, minute {last + 1} {b:.1f} MB"
            f" ({change:+.1%}; flat means within 5%)"
        )
    return lines, flat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=int, default=10, help="length of the run (>= 2)")
    parser.add_argument("--engines", type=int, default=3, help="stable engine processes")
    parser.add_argument("--lookup-threads", type=int, default=2)
    args = parser.parse_args()
    if args.minutes < 2:
        parser.error("--minutes must be at least 2 (the RSS check compares minute 2 with the last)")

    load0, cpu0 = os.getloadavg(), psutil.cpu_times()
    print(f"machine: {machine()}; nproc {os.cpu_count()}")
    print(
        f"soak: {args.minutes} min, {args.engines} stable engines + 1 churn engine, "
        f"{args.lookup_threads} lookup threads, chunk_size {CHUNK}, heartbeat {HEARTBEAT} s, "
        f"worker timeout {WORKER_TIMEOUT} s; load average at start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}",
        flush=True,
    )
    tmp = Path(tempfile.mkdtemp(prefix="kvplane-soak-"))
    t0 = time.monotonic()
    stats = Stats(t0)
    cluster = Cluster(tmp, stats)
    engines: list[Engine] = []
    stop = threading.Event()
    threads: list[threading.Thread] = []
    try:
        cluster.start_controller()
        for i in range(args.engines):
            engines.append(cluster.start_engine(f"soak-{i}"))
        for e in engines:
            wait(lambda e=e: cluster.registered(e.name), 60, f"{e.name} registered")
        stats.t0 = t0 = time.monotonic()  # the run's clock starts with everything up
        end = t0 + args.minutes * 60
        for k in range(args.lookup_threads):
            threads.append(
                threading.Thread(target=lookup_loop, args=(cluster.http, stats, stop, k))
            )
        for i, e in enumerate(engines):
            threads.append(threading.Thread(target=store_loop, args=(e, stats, stop, 100 + i)))
        churn = threading.Thread(target=churn_loop, args=(cluster, stats, stop, end - 15))
        for t in [*threads, churn]:
            t.start()
        restarts = [t0 + args.minutes * 60 * k / 4 for k in (1, 2, 3)]
        rng = random.Random(7)
        next_op = t0 + 10
        k = 0
        while (now := time.monotonic()) < end:
            sample(cluster, engines, stats)
            if restarts and now >= restarts[0]:
                restarts.pop(0)
                sig = signal.SIGKILL if k % 2 == 0 else signal.SIGTERM
                began = time.monotonic()
                cluster.stop_controller(sig)
                cluster.start_controller()
                up = time.monotonic() - began
                for e in engines:
                    wait(lambda e=e: cluster.registered(e.name), 60, f"{e.name} re-registered")
                stats.event(
                    f"controller restarted ({sig.name}; down {up:.1f} s, every stable engine "
                    f"registered again {time.monotonic() - began - up:.1f} s later)"
                )
                k += 1
            elif now >= next_op:
                name = rng.choice(engines).name
                cluster.post("/health", {"instance_id": name})
                if rng.random() < 0.3:
                    cluster.post("/clear", {"instance_id": name, "location": "LocalCPUBackend"})
                next_op = now + 5
            time.sleep(max(0.0, min(5.0, end - time.monotonic())))
        stop.set()
        for t in [*threads, churn]:
            t.join(120)
        stats.event("load stopped; settling")
        audited, audit_lines = audit(cluster, engines, timeout=WORKER_TIMEOUT + 60)
        for e in engines:
            if e.proc.poll() is not None:
                cluster.crashed.append(f"{e.name} exited with {e.proc.returncode}")
        if cluster.controller is not None and cluster.controller.poll() is not None:
            cluster.crashed.append(f"controller exited with {cluster.controller.returncode}")
    finally:
        stop.set()
        for e in engines:
            e.api.close()
        cluster.stop_all()

    elapsed = time.monotonic() - t0
    cpu1 = psutil.cpu_times()
    busy = (sum(cpu1[:3]) - sum(cpu0[:3])) / elapsed / (os.cpu_count() or 1)
    rss_lines, flat = report(args, stats, engines)
    fives = sum(stats.total(f"{s}_5xx") for s in ("lookup", "ops", "engine"))
    timeouts = sum(stats.total(f"{s}_timeouts") for s in ("lookup", "ops", "engine"))
    all_lat = [x for v in stats.latency.values() for x in v]
    load1 = os.getloadavg()
    print(
        f"machine busy {busy:.0%} of its {os.cpu_count()} cores over the run; load average at end "
        f"{load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}"
    )
    print(
        f"totals: {len(all_lat)} lookups ({stats.total('hits')} with a hit), "
        f"{stats.total('stores')} stores, 5xx {fives}, timeouts {timeouts}, 4xx "
        f"{sum(stats.total(f'{s}_4xx') for s in ('lookup', 'ops', 'engine'))}, "
        f"unreachable during restarts: lookups {stats.total('lookup_unreachable')}, "
        f"ops {stats.total('ops_unreachable')}, engine API {stats.total('engine_unreachable')}"
    )
    checks = [
        *(("ok " if audited else "FAIL ") + line for line in audit_lines),
        *rss_lines,
        f"{'ok' if fives == 0 else 'FAIL'} 5xx answers: {fives}",
        f"{'ok' if timeouts == 0 else 'FAIL'} requests that timed out: {timeouts}",
        *(f"FAIL {c}" for c in cluster.crashed),
        *log_errors(tmp),
    ]
    for line in checks:
        print(line)
    failed = [c for c in checks if c.startswith("FAIL")]
    print(
        f"verdict: {'PASS' if not failed else 'FAIL'} ({len(checks) - len(failed)} of "
        f"{len(checks)} checks ok; logs in {tmp})"
    )
    p99s = {
        m + 1: round(percentile(v, 99), 2)
        for m, v in sorted(stats.latency.items())
        if v and m < args.minutes
    }
    print(
        json.dumps(
            {
                "minutes": args.minutes,
                "lookups": len(all_lat),
                "lookup_p99_ms_by_minute": p99s,
                "stores": stats.total("stores"),
                "errors_5xx": fives,
                "timeouts": timeouts,
                "index_exact": audited,
                "rss_change_last_vs_second_minute": flat,
                "machine_busy": round(busy, 2),
                "passed": not failed,
            }
        )
    )
    sys.exit(0 if not failed else 1)


if __name__ == "__main__":
    main()
