"""The connector's scheduler side without vLLM: internal API index 0 runs in its process,
and a ``POST /conf`` there changes the store policy its planner applies."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from kvplane.config import EngineConfig
from kvplane.engine.facts import EngineFacts
from kvplane.integrations.vllm.scheduler import SchedulerSide
from tests.support import free_port


def test_post_conf_on_index_0_changes_the_planners_store_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLLM_RPC_BASE_PATH", str(tmp_path))
    port = free_port()
    config = EngineConfig(
        chunk_size=8,
        internal_api_server_enabled=True,
        internal_api_server_port_start=port,
    )
    side = SchedulerSide(
        config,
        EngineFacts.from_config(config),
        engine_id="conf-test",
        dp_rank=0,
        block_size=4,
        kv_consumer_only=False,
        publish_events=False,
    )
    side.start_api()
    try:
        assert not side.planner.policy.save_decode_cache
        resp = httpx.post(
            f"http://127.0.0.1:{port}/conf",
            json={"save_decode_cache": True, "min_retrieve_tokens": 16},
            timeout=10,
        )
        assert resp.status_code == 200, resp.text
        assert side.planner.policy.save_decode_cache
        assert side.planner.policy.min_retrieve_tokens == 16
        assert side.planner.policy.chunk_size == 8 and side.planner.policy.block_size == 4
        bad = httpx.post(f"http://127.0.0.1:{port}/conf", json={"chunk_size": 16}, timeout=10)
        assert side.planner.policy.chunk_size == 8, bad.text  # not mutable: unchanged
    finally:
        side.shutdown()
