"""``kvplane router`` with several ``--controller`` URLs, all real processes: a nats-server,
two controller replicas (``kvplane controller --nats``), two ``kvplane serve`` instances
reporting to the log, and the router in front. Killing the replica the router asks first
moves its lookups to the other at once (still routed by prefix, a failover counted);
with both replicas gone it routes by load, and nothing fails. Plus the flag's parsing."""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvplane.children import Child, free_ports, kvplane_args, start_child
from kvplane.errors import ConfigError
from kvplane.router.cli import add_parser, config_from_args
from kvplane.serve.tokenizer import ByteTokenizer
from tests.nats_support import NatsServer, Replica, start_replica
from tests.router_support import metric
from tests.support import REPO_ROOT, kvplane_env, wait_until

CHUNK = 64
PROMPT = "the failover prefix: " + " ".join(f"word{i}" for i in range(60))


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return parser.parse_args(["router", *argv])


def test_controller_flags_repeat_or_comma_separate_and_replace_the_file(tmp_path: Path) -> None:
    config = config_from_args(
        _parse("--controller", "http://a:1", "--controller", "http://b:2/,http://c:3")
    )
    assert config.controller == ("http://a:1", "http://b:2", "http://c:3")
    yaml = tmp_path / "router.yaml"
    yaml.write_text("controller: http://file:9000\n")
    assert config_from_args(_parse("--config", str(yaml))).controller == ("http://file:9000",)
    replaced = config_from_args(_parse("--config", str(yaml), "--controller", "http://x:1"))
    assert replaced.controller == ("http://x:1",)
    with pytest.raises(ConfigError, match=r"controller: invalid value 'ftp://x'"):
        config_from_args(_parse("--controller", "ftp://x"))
    with pytest.raises(ConfigError, match="needs --controller"):
        config_from_args(_parse())


def test_a_bad_controller_url_is_a_clear_cli_error() -> None:
    proc = subprocess.run(
        kvplane_args(["router", "--controller", "localhost:9000"]),
        cwd=REPO_ROOT,
        env=kvplane_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "controller: invalid value 'localhost:9000'" in proc.stderr
    assert "Traceback" not in proc.stderr


class _Cluster:
    def __init__(self, tmp: Path, stack: contextlib.ExitStack) -> None:
        self.tmp = tmp
        self.stack = stack
        self.nats = NatsServer(tmp, "nats").start()
        stack.callback(self.nats.stop)
        self.replicas = [start_replica(tmp, f"r{i}", self.nats.url) for i in range(2)]
        for r in self.replicas:
            stack.callback(r.stop)
        self.serve: dict[str, str] = {}
        self.router = ""

    def _start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Child:
        child = start_child(
            name, kvplane_args(args), self.tmp / f"{name}.log", env=env, cwd=REPO_ROOT
        )
        self.stack.callback(child.stop)
        return child

    def start_serve(self, name: str) -> None:
        port = free_ports(1)[0]
        cfg = {
            "lmcache_instance_id": name, "chunk_size": CHUNK, "max_local_cpu_size": 0.05,
            "enable_controller": True, "controller_nats_url": self.nats.url,
            "lmcache_worker_heartbeat_time": 0.5,
        }  # fmt: skip
        path = self.tmp / f"{name}.yaml"
        path.write_text(json.dumps(cfg))
        args = ["serve", "--host", "127.0.0.1", "--port", str(port)]
        args += ["--max-model-len", "1024", "--config", str(path)]
        child = self._start(name, args, kvplane_env(OMP_NUM_THREADS="1"))
        self.serve[name] = f"http://127.0.0.1:{port}"
        child.wait_healthy(f"{self.serve[name]}/health", timeout=300)

    def start_router(self) -> None:
        port = free_ports(1)[0]
        config = self.tmp / "router.yaml"
        config.write_text(json.dumps({"p2p": False, "poll_interval_s": 0.2}))
        args = ["router", "--host", "127.0.0.1", "--port", str(port), "--config", str(config)]
        for r in self.replicas:
            args += ["--controller", r.url]
        child = self._start("router", args)
        self.router = f"http://127.0.0.1:{port}"
        child.wait_healthy(f"{self.router}/health", timeout=60)

    def health(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.router}/health", timeout=10).json())

    def complete(self, text: str) -> httpx.Response:
        body = {"prompt": text, "max_tokens": 2, "temperature": 0}
        return httpx.post(f"{self.router}/v1/completions", json=body, timeout=60)


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[_Cluster]:
    with contextlib.ExitStack() as stack:
        yield _Cluster(tmp_path, stack)


def _held(replica: Replica, instance: str, tokens: list[int]) -> int:
    layout = replica.post("/lookup", {"tokens": tokens}).json()["layout_info"]
    return int(layout.get(instance, [None, 0])[1])


@pytest.mark.slow
def test_router_fails_over_between_controller_replicas(cluster: _Cluster) -> None:
    for name in ("inst-a", "inst-b"):
        cluster.start_serve(name)
    cluster.start_router()
    first, second = cluster.replicas
    wait_until(
        lambda: (
            {b["instance_id"] for b in cluster.health()["backends"] if b["admitted"]}
            == {"inst-a", "inst-b"}
        ),
        timeout=60,
        what="the router to find both instances through the replicas",
    )
    assert cluster.health()["controller"] == first.url
    body = {"prompt": PROMPT, "max_tokens": 1}
    assert httpx.post(f"{cluster.serve['inst-b']}/v1/completions", json=body, timeout=60).is_success
    tokens = ByteTokenizer().encode(PROMPT)
    whole = len(tokens) // CHUNK * CHUNK
    for r in cluster.replicas:
        wait_until(
            lambda r=r: _held(r, "inst-b", tokens) >= whole,
            timeout=30,
            what=f"{r.replica_id} crediting inst-b with the prompt",
        )

    def routed(text: str) -> tuple[str, str]:
        resp = cluster.complete(text)
        assert resp.status_code == 200, resp.text
        return resp.headers["x-kvplane-instance"], resp.headers["x-kvplane-route-reason"]

    assert routed(PROMPT + " one") == ("inst-b", "prefix")
    failovers = "kvplane_router_controller_failovers_total"
    assert metric(cluster.router, failovers) == 0

    first.kill()
    assert routed(PROMPT + " two") == ("inst-b", "prefix")  # the lookup answered by r1
    assert cluster.health()["controller"] == second.url
    assert metric(cluster.router, failovers, f'controller="{first.url}"') == 1
    assert routed(PROMPT + " three") == ("inst-b", "prefix")
    assert metric(cluster.router, failovers) == 1  # it stays with the one that answers

    second.kill()
    instance, reason = routed(PROMPT + " four")  # no index left: load alone, still served
    assert reason == "fallback" and instance in ("inst-a", "inst-b")
    router_log = (cluster.tmp / "router.log").read_text()
    assert f"controller calls go to {second.url} now" in router_log
