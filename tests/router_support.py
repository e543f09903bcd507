"""A fleet for the router's tests: a controller, ``kvplane serve`` instances with kvplane's
worker and P2P, and ``kvplane router`` in front, each a real process on loopback."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from kvplane.children import Child, free_ports, kvplane_args, start_child
from tests.controller_client import controller_args, wait_controller_up
from tests.support import REPO_ROOT, kvplane_env, wait_until

__all__ = ["CHUNK", "Fleet", "events", "metric"]

CHUNK = 64
STARTUP_S = 300  # an outer bound: model loads on a busy 2-core machine


def metric(url: str, name: str, labels: str = "") -> float:
    """The sum of sample ``name``'s values on ``url``/metrics whose label set contains
    ``labels`` (0 when absent)."""
    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        head = line.split(" ")[0]
        if head.split("{")[0] == name and labels in head:
            total += float(line.rsplit(" ", 1)[1])
    return total


def events(lines: Iterator[str]) -> Iterator[str]:
    """The data of each server-sent event, as it arrives."""
    return (line.removeprefix("data: ") for line in lines if line.startswith("data: "))


class Fleet:
    """Starts and stops the processes; ``serve[name]`` is each instance's base URL."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        http, self.pull, self.reply = free_ports(3)
        self.controller = f"http://127.0.0.1:{http}"
        self._controller_port = http
        self.serve: dict[str, str] = {}
        self._children: dict[str, Child] = {}
        self.router = ""
        self.headers: dict[str, str] = {}  # the controller's token, where it has one

    def _start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Child:
        child = start_child(
            name, kvplane_args(args), self.tmp / f"{name}.log", env=env, cwd=REPO_ROOT
        )
        self._children[name] = child
        return child

    def start_controller(self, *extra: str) -> None:
        args = controller_args(
            self._controller_port, self.pull, self.reply, worker_timeout=3.0,
            health_check_interval=0.2,
        )  # fmt: skip
        self._start("controller", [*args, *extra])
        wait_controller_up(self.controller)

    def start_serve(self, name: str, port: int | None = None, p2p_port: int | None = None) -> None:
        """``kvplane serve`` as instance ``name`` (its ports kept for a restart)."""
        if port is None:
            port, p2p_port = free_ports(2)
        cfg = {
            "chunk_size": CHUNK, "max_local_cpu_size": 0.05, "enable_controller": True,
            "lmcache_instance_id": name, "controller_pull_url": f"127.0.0.1:{self.pull}",
            "controller_reply_url": f"127.0.0.1:{self.reply}",
            "lmcache_worker_heartbeat_time": 0.3, "controller_timeout_s": 1.0,
            "enable_p2p": True, "p2p_host": "127.0.0.1", "p2p_init_ports": [p2p_port],
        }  # fmt: skip
        path = self.tmp / f"{name}.yaml"
        path.write_text(json.dumps(cfg))
        env = kvplane_env(OMP_NUM_THREADS="1")
        args = ["serve", "--port", str(port), "--max-model-len", "1024", "--config", str(path)]
        child = self._start(name, args, env)
        self.serve[name] = f"http://127.0.0.1:{port}"
        self._ports = getattr(self, "_ports", {})
        self._ports[name] = (port, p2p_port)
        child.wait_healthy(f"{self.serve[name]}/health", timeout=STARTUP_S)

    def wait_registered(self, name: str) -> None:
        def listed() -> bool:
            body = {"instance_id": name}
            resp = httpx.post(
                f"{self.controller}/query_worker_info", json=body, headers=self.headers, timeout=5
            )
            return resp.status_code == 200

        wait_until(listed, timeout=60, what=f"{name} registered with the controller")

    def restart_serve(self, name: str) -> None:
        port, p2p_port = self._ports[name]
        self.start_serve(name, port, p2p_port)

    def kill(self, name: str) -> None:
        """kill -9 the instance's whole process group."""
        child = self._children.pop(name)
        os.killpg(child.pid, signal.SIGKILL)
        child.proc.wait(timeout=30)

    def start_router(self, *extra: str, name: str = "router") -> str:
        """``kvplane router`` as child ``name``; its URL (also ``self.router`` for the
        first)."""
        port = free_ports(1)[0]
        args = ["router", "--host", "127.0.0.1", "--port", str(port)]
        args += ["--controller", self.controller, *extra]
        child = self._start(name, args)
        url = f"http://127.0.0.1:{port}"
        self.router = self.router or url
        child.wait_healthy(f"{url}/health", timeout=60)
        return url

    def stop_child(self, name: str) -> None:
        """Stop one child (SIGTERM to its group, then SIGKILL)."""
        self._children.pop(name).stop()

    def router_health(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.router}/health", timeout=10).json())

    def backend(self, name: str) -> dict[str, Any]:
        url = self.serve[name]
        return next(b for b in self.router_health()["backends"] if b["url"] == url)

    def wait_idle(self) -> None:
        """Until the router sees every backend idle (its last /metrics and its own count),
        so that a routing assertion is about the prefix, not a previous test's tail."""

        def idle() -> bool:
            found = self.router_health()["backends"]
            return all(
                b["in_flight"] == 0 and b["load"]["running"] == 0 and b["load"]["waiting"] == 0
                for b in found
            )

        wait_until(idle, timeout=60, what="every backend idle as the router sees it")

    def lookup(self, tokens: list[int]) -> dict[str, Any]:
        body = {"tokens": tokens}
        resp = httpx.post(f"{self.controller}/lookup", json=body, headers=self.headers, timeout=10)
        return dict(resp.json()["layout_info"])

    def stop(self) -> None:
        for child in reversed(list(self._children.values())):
            child.stop()
        self._children.clear()

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")
