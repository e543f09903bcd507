"""The routers ``benchmarks/route.py`` compares, each started as a child process on a free
loopback port in front of a list of backends, and stopped with its process group.

* ``round-robin``: :mod:`benchmarks.fake_openai`'s proxy (each request to the next backend);
* ``sglang``: sglang-router's ``cache_aware`` (PyPI ``sglang-router``, the ``bench`` extra);
* ``vllm-router``: vllm-router (PyPI ``vllm-router``) with ``--policy`` from
  :data:`VLLM_ROUTER_POLICY`; its ``kv_aware`` policy reads vLLM's KV events
  (``--kv-events-config`` on each instance, ``--kv-event-source`` here);
* ``kvplane``: ``kvplane router --controller URL --backend ID=URL ... --tokenizer DIR``
  (the model's tokenizer in the router; without it, each decision waits for a busy
  backend's /tokenize).

sglang-router reads ``prompt`` as a string or a list of strings only (a list of token ids
is refused with 422), so every router is sent text.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from kvplane.children import PACKAGE_ROOT, Child, free_ports, kvplane_args, start_child

__all__ = ["ROUTERS", "VLLM_ROUTER_POLICY", "Backend", "router_process"]

ROUTERS = ("round-robin", "sglang", "vllm-router", "kvplane")
#: vllm-router's policy in the comparison (see docs/router.md for why this one).
VLLM_ROUTER_POLICY = "kv_aware"
STARTUP_TIMEOUT = 60.0


@dataclass(frozen=True)
class Backend:
    """One backend: kvplane's instance id, its OpenAI base URL and, where it publishes
    them, its vLLM KV-event endpoint (``tcp://host:port``)."""

    instance_id: str
    url: str
    events: str | None = None


def _bin(name: str) -> str:
    """A console script of this python's environment."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name) or name


def _command(
    name: str,
    port: int,
    metrics_port: int,
    backends: Sequence[Backend],
    controller: str | None,
    model: str | None,
    tokenizer: Path | None,
) -> list[str]:
    urls = [b.url for b in backends]
    if name == "round-robin":
        proxy = [sys.executable, "-m", "benchmarks.fake_openai", "proxy", "--port", str(port)]
        return [*proxy, "--backend", *urls]
    common = ["--host", "127.0.0.1", "--port", str(port), "--worker-urls", *urls]
    common += ["--prometheus-port", str(metrics_port), "--log-level"]
    if name == "sglang":
        launch = [sys.executable, "-m", "sglang_router.launch_router", *common, "warn"]
        return [*launch, "--policy", "cache_aware"]
    if name == "vllm-router":
        args = [_bin("vllm-router"), *common, "warning", "--policy", VLLM_ROUTER_POLICY]
        if VLLM_ROUTER_POLICY == "kv_aware":
            for b in backends:
                if b.events:
                    args += ["--kv-event-source", f"{b.url}={b.events}"]
            if any(b.events for b in backends):
                args += ["--kv-event-block-size", "128", "--kv-event-model", model or ""]
        return args
    if name == "kvplane":
        if controller is None:
            raise ValueError("kvplane router needs the controller's URL")
        args = ["router", "--host", "127.0.0.1", "--port", str(port), "--controller", controller]
        for b in backends:
            args += ["--backend", f"{b.instance_id}={b.url}"]
        if tokenizer is not None:
            args += ["--tokenizer", str(tokenizer)]
        return kvplane_args(args)
    raise ValueError(f"unknown router {name!r}; choose from {', '.join(ROUTERS)}")


@contextlib.contextmanager
def router_process(
    name: str,
    backends: Sequence[Backend],
    log_path: Path,
    *,
    controller: str | None = None,
    model: str | None = None,
    tokenizer: Path | None = None,
    env: Mapping[str, str] | None = None,
    profile: Path | None = None,
) -> Iterator[str]:
    """Router ``name`` in front of ``backends`` serving ``model``; yields its base URL once
    ``/health`` answers 200. ``tokenizer``: the model's tokenizer.json or folder, for
    ``kvplane router --tokenizer``; ``profile``: run it under :mod:`benchmarks.profiled`,
    which writes its cProfile there when it stops (kvplane's only). Raises with the log's
    tail if it exits or does not come up."""
    port, metrics_port = free_ports(2)
    args = _command(name, port, metrics_port, backends, controller, model, tokenizer)
    if profile is not None:
        if args[1:3] != ["-m", "kvplane"]:
            raise ValueError(f"router {name}: only kvplane's router can be profiled")
        args = [args[0], "-m", "benchmarks.profiled", str(profile), *args[2:]]
    child = start_child(name, args, log_path, env=env, cwd=PACKAGE_ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        child.wait_healthy(f"{url}/health", timeout=STARTUP_TIMEOUT, interval=0.2)
        if name in ("sglang", "vllm-router"):
            _wait_for_workers(child, url, backends)
        yield url
    except Exception as exc:
        raise RuntimeError(
            f"router {name}: {exc}; last lines of {log_path}:\n{child.log_tail(30)}"
        ) from exc
    finally:
        child.stop(10.0)


def _wait_for_workers(child: Child, url: str, backends: Sequence[Backend]) -> None:
    """Until the router's ``GET /workers`` lists every backend as healthy: both Rust routers
    answer ``/health`` before they have registered their workers (a request sent then is
    refused with 503 "no available workers")."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    want = {b.url for b in backends}
    while time.monotonic() < deadline:
        child.check_alive()
        with contextlib.suppress(httpx.HTTPError, ValueError):
            workers = httpx.get(f"{url}/workers", timeout=5).json().get("workers", [])
            if want <= {w.get("url") for w in workers if w.get("is_healthy")}:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url}/workers did not list {sorted(want)} as healthy")
