"""A kvplane fleet on this machine for the benchmarks (``benchmarks/vllm_ttft.py``,
``benchmarks/route.py``): one controller and vLLM instances with kvplane's connector, P2P
on between them, each with its own config file, internal API and log."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from kvplane.children import consecutive_free_ports, free_ports
from kvplane.integrations.vllm.launch import VllmServer, controller_process, vllm_server

__all__ = ["CONNECTOR", "Instance", "Spec", "empty_caches", "kvplane_fleet", "write_config"]

CONNECTOR = {
    "kv_connector": "KvplaneConnector",
    "kv_connector_module_path": "kvplane.integrations.vllm",
    "kv_role": "kv_both",
}


def write_config(path: Path, **keys: Any) -> Path:
    """A kvplane YAML config file of ``keys`` (JSON values are YAML)."""
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in keys.items()))
    return path


@dataclass(frozen=True)
class Spec:
    """What one instance adds to the fleet's common config: kvplane keys, environment
    variables and ``vllm serve`` arguments."""

    keys: Mapping[str, Any] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    args: Sequence[str] = ()


@dataclass(frozen=True)
class Instance:
    """A running instance: its vLLM server, kvplane instance id, and the URL of its rank-0
    worker's internal API (``/metrics``, ``/cache/clear``)."""

    name: str
    server: VllmServer
    worker: str


@contextlib.contextmanager
def kvplane_fleet(
    model: Path,
    folder: Path,
    specs: Mapping[str, Spec],
    common: Mapping[str, Any],
    extra_args: Sequence[str] = (),
) -> Iterator[tuple[str, list[Instance]]]:
    """The controller's URL and one instance per entry of ``specs`` (its name is its
    ``lmcache_instance_id``); ``common`` keys go into every config before the spec's own.
    The instances start side by side; everything stops on exit, instances first."""
    http, pull, reply = free_ports(3)
    base = {
        **common,
        "enable_controller": True,
        "controller_pull_url": f"127.0.0.1:{pull}",
        "controller_reply_url": f"127.0.0.1:{reply}",
        "enable_p2p": True,
        "p2p_host": "127.0.0.1",
        "internal_api_server_enabled": True,
    }
    with contextlib.ExitStack() as stack:
        controller = stack.enter_context(
            controller_process(http, pull, reply, log_path=folder / "controller.log")
        )
        starting = []
        for name, spec in specs.items():
            api = consecutive_free_ports(2)  # the scheduler's API, then rank 0's
            keys = {**base, "lmcache_instance_id": name, "internal_api_server_port_start": api}
            path = write_config(folder / f"{name}.yaml", **{**keys, **spec.keys})
            env = {"VLLM_SERVER_DEV_MODE": "1", "KVPLANE_CONFIG_FILE": str(path), **spec.env}
            args = ["--kv-transfer-config", json.dumps(CONNECTOR), *extra_args, *spec.args]
            log = folder / f"{name}.log"
            server = vllm_server(model, env_extra=env, extra_args=args, log_path=log)
            starting.append((name, api, server))
        # Started side by side (a server mostly waits for its engine's start-up); each one
        # that came up is stopped on exit even when another failed.
        with ThreadPoolExecutor(len(starting)) as pool:
            futures = [pool.submit(server.__enter__) for _, _, server in starting]
        instances = []
        for (name, api, server), future in zip(starting, futures, strict=True):
            if future.exception() is None:
                stack.push(server.__exit__)
                instances.append(Instance(name, future.result(), f"http://127.0.0.1:{api + 1}"))
        for future in futures:
            if (error := future.exception()) is not None:
                raise error
        yield controller, instances


def empty_caches(instances: Sequence[Instance], controller: str, timeout: float = 20.0) -> None:
    """Empty every instance's vLLM prefix cache and kvplane tiers, then wait until the
    controller's index is empty too (the evictions reach it asynchronously). Raises
    RuntimeError if it is not within ``timeout`` seconds."""
    for inst in instances:
        httpx.post(f"{inst.server.base_url}/reset_prefix_cache", timeout=30).raise_for_status()
        httpx.delete(f"{inst.worker}/cache/clear", timeout=30).raise_for_status()
    deadline = time.monotonic() + timeout
    left = 0.0
    while time.monotonic() < deadline:
        left = _index_chunks(controller)
        if left == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"the controller still indexes {left:.0f} chunks after a clear")


def _index_chunks(controller: str) -> float:
    for line in httpx.get(f"{controller}/metrics", timeout=10).text.splitlines():
        if line.startswith("kvplane_controller_index_chunks"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
