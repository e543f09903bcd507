"""A ``kvplane engine`` process for tests: its config from keyword arguments, its internal
API (worker 0's index) on a free loopback port, helpers for the calls tests make.

Starting is split from waiting (:meth:`EngineProc.launch` / :meth:`EngineProc.wait_ready`)
so a test can start several engines side by side; every process is stopped by PID.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support import REPO_ROOT, free_port, kvplane_env, stop_process, wait_until

__all__ = ["SMALL_KV", "EngineProc"]

#: a small synthetic model: 256 bytes of bfloat16 KV per token
SMALL_KV: dict[str, Any] = {
    "kv_num_layers": 2,
    "kv_num_heads": 2,
    "kv_head_size": 16,
    "kv_block_size": 16,
    "kv_num_blocks": 256,
}


class EngineProc:
    def __init__(self, tmp: Path, name: str, **config: Any) -> None:
        self.name = name
        self.api_port = free_port()
        self.log = tmp / f"{name}.log"
        self.config_path = tmp / f"{name}.yaml"
        settings = {
            "lmcache_instance_id": name,
            "internal_api_server_enabled": True,
            "internal_api_server_port_start": self.api_port - 1,  # worker 0 is index 1
            "internal_api_server_include_index_list": [1],
            **config,
        }
        self.config_path.write_text(json.dumps(settings))  # JSON is YAML
        self.proc: subprocess.Popen[bytes] | None = None
        self.api = httpx.Client(base_url=f"http://127.0.0.1:{self.api_port}", timeout=30)

    def launch(self) -> EngineProc:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kvplane", "engine", "--config", str(self.config_path)],
                cwd=REPO_ROOT,
                env=kvplane_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return self

    def wait_ready(self, timeout: float = 120) -> EngineProc:
        def ready() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            return b" ready" in self.log.read_bytes()

        wait_until(ready, timeout=timeout, what=f"engine {self.name} ready")
        return self

    def terminate(self) -> None:
        """Ask it to stop (SIGTERM) without waiting: :meth:`stop` waits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
        self.api.close()

    def __enter__(self) -> EngineProc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the internal API --------------------------------------------------------------------

    def call(self, method: str, path: str, **params: Any) -> dict[str, Any]:
        resp = self.api.request(method, path, params=params)
        assert resp.status_code == 200, f"{method} {path}: {resp.status_code} {resp.text}"
        body: dict[str, Any] = resp.json()
        return body

    def store(self, start: int, end: int, slots: str | None = None) -> int:
        """Store tokens start..end-1 (KV from ``slots``, default 0..n-1); tokens held."""
        params = {"tokens_mock": f"{start},{end}"} | ({"slot_mapping": slots} if slots else {})
        return int(self.call("POST", "/cache/store", **params)["num_stored_tokens"])

    def retrieve(self, start: int, end: int, slots: str | None = None) -> int:
        """Load tokens start..end-1 into ``slots``; how many leading tokens were loaded."""
        params = {"tokens_mock": f"{start},{end}"} | ({"slot_mapping": slots} if slots else {})
        return int(self.call("POST", "/cache/retrieve", **params)["num_retrieved"])

    def checksums(self, slots: str, chunk_size: int) -> list[str]:
        body = self.call("GET", "/cache/kvcache/check", slot_mapping=slots, chunk_size=chunk_size)
        return list(body["chunk_checksums"])

    def clear(self, *locations: str) -> int:
        return int(self.call("DELETE", "/cache/clear", locations=list(locations))["num_removed"])

    def chunks(self) -> dict[str, list[int]]:
        """``GET /cache/keys``: this engine's own chunk hashes per tier."""
        return dict(self.call("GET", "/cache/keys")["chunk_hashes"])

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of ``/metrics``: (name, sorted labels) -> value."""
        resp = self.api.get("/metrics")
        assert resp.status_code == 200, resp.text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(resp.text)
            for s in family.samples
        }

    def tier_stat(self, tier: str, stat: str) -> float:
        """``kvplane_tier_stat{tier, stat}``."""
        return self.metrics()[("kvplane_tier_stat", (("stat", stat), ("tier", tier)))]

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)
