"""The vLLM connector's config and facts without vLLM: what vLLM decides (model, ranks, block
size, the KV tensors' shape) becomes the engine's facts record, never config overrides."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from kvplane.config import load_config
from kvplane.errors import ConfigError
from kvplane.integrations.vllm.scheduler import SchedulerSide
from kvplane.integrations.vllm.settings import connector_config
from kvplane.integrations.vllm.worker import WorkerSide
from tests.support import free_port
from tests.vllm_support import fake_facts

BLOCK, BLOCKS = 4, 16
FACTS = fake_facts(
    model_name="org/served", world_size=2, rank=1, block_size=BLOCK, engine_id="facts-test"
)
EXTRA = {"kvplane.chunk_size": 2 * BLOCK, "max_local_cpu_size": 0.01}


@pytest.fixture(autouse=True)
def _no_config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("KVPLANE_CONFIG_FILE", "LMCACHE_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VLLM_RPC_BASE_PATH", str(tmp_path))


def test_the_config_is_the_users_and_the_facts_are_vllms() -> None:
    config = connector_config(FACTS, EXTRA)
    assert config == load_config(env={}, overrides={"chunk_size": 8, "max_local_cpu_size": 0.01})
    facts = FACTS.engine_facts(config)  # the scheduler's: no KV tensors of its own
    assert (facts.model_name, facts.world_size, facts.worker_id) == ("org/served", 2, 1)
    assert facts.kv.block_size == BLOCK and facts.kv.num_layers == config.kv_num_layers
    with pytest.raises(ConfigError, match="multiple of vLLM's block size 4"):
        connector_config(FACTS, {"chunk_size": 6})


@pytest.fixture
def worker() -> Iterator[WorkerSide]:
    side = WorkerSide(connector_config(FACTS, EXTRA), FACTS)
    views = {f"layer.{i}": torch.randn(BLOCKS, 2, BLOCK, 16) for i in range(3)}
    side.register(views)
    try:
        yield side
    finally:
        side.shutdown()


def test_a_worker_ranks_engine_takes_its_facts_from_vllm_and_its_tensors(
    worker: WorkerSide,
) -> None:
    process = worker.process
    facts = process.facts
    assert (facts.model_name, facts.world_size, facts.worker_id) == ("org/served", 2, 1)
    assert (facts.kv.num_layers, facts.kv.num_kv_heads, facts.kv.head_size) == (3, 2, 8)
    assert (facts.kv.block_size, facts.kv.num_blocks, facts.kv.dtype) == (BLOCK, BLOCKS, "float32")
    assert process.config == worker.config  # nothing written back into the config
    assert process.config.model_name == "kvplane/synthetic"
    key = process.cache_engine.keys_for(list(range(8)))[0]
    assert (key.model_name, key.world_size, key.worker_id) == ("org/served", 2, 1)
    meta = process.engine.metadata()
    assert (meta["model_name"], meta["worker_id"], meta["is_first_rank"]) == (
        "org/served",
        1,
        False,
    )


def test_the_scheduler_api_shows_vllms_facts() -> None:
    port = free_port()
    extra = {
        **EXTRA,
        "internal_api_server_enabled": True,
        "internal_api_server_port_start": port,
    }
    config = connector_config(FACTS, extra)
    side = SchedulerSide(
        config,
        FACTS.engine_facts(config),
        engine_id=FACTS.engine_id,
        dp_rank=0,
        block_size=BLOCK,
        kv_consumer_only=False,
        publish_events=False,
    )
    side.start_api()
    try:
        meta = httpx.get(f"http://127.0.0.1:{port}/meta", timeout=10).json()
        assert (meta["model_name"], meta["world_size"], meta["role"]) == (
            "org/served",
            2,
            "scheduler",
        )
        conf = httpx.get(f"http://127.0.0.1:{port}/conf", timeout=10).json()
        assert (conf["model_name"], conf["world_size"]) == ("kvplane/synthetic", 1)
    finally:
        side.shutdown()
