"""The engine-facing contract: the store policy (which prefix of a request to store) and the
engine's side of it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvplane.config import EngineConfig
from kvplane.engine.kv_api import StorePolicy, store_boundary
from kvplane.process import EngineProcess

CHUNK = 8


@pytest.mark.parametrize(
    ("computed", "prompt", "saved", "unfull", "decode", "expected"),
    [
        (20, 30, 0, True, False, 16),  # chunked prefill: the chunks reached so far
        (30, 30, 16, True, False, 30),  # the whole prompt: its partial chunk too
        (30, 30, 16, False, False, 24),  # ... unless save_unfull_chunk is off
        (40, 30, 30, True, False, None),  # decode tokens: not without save_decode_cache
        (40, 30, 30, True, True, 40),
        (39, 30, 30, True, True, 32),  # decode tokens in whole chunks only
        (33, 30, 32, True, True, None),  # nothing new since the last store
        (30, 30, 0, False, False, 24),
        (7, 7, 0, False, False, None),  # a prompt shorter than a chunk, unfull off
    ],
)
def test_store_boundary(
    computed: int, prompt: int, saved: int, unfull: bool, decode: bool, expected: int | None
) -> None:
    policy = StorePolicy(CHUNK, save_unfull_chunk=unfull, save_decode_cache=decode)
    assert store_boundary(computed, prompt, saved, policy) == expected


def test_the_engine_store_policy_follows_the_config_at_run_time() -> None:
    config = EngineConfig(chunk_size=CHUNK, max_local_cpu_size=0.01, kv_block_size=4)
    rt = EngineProcess(config)
    try:
        engine = rt.cache_engine
        assert engine.store_policy == StorePolicy(CHUNK, True, False)
        rt.config_store.update({"save_decode_cache": True, "save_unfull_chunk": False})
        assert engine.store_policy == StorePolicy(CHUNK, False, True)
        tokens = list(range(12))
        # the engine itself never keeps a partial chunk while save_unfull_chunk is off
        result = engine.store(tokens, rt.kv_caches, torch.arange(12))
        assert (result.num_tokens, result.num_chunks) == (8, 1)
        assert engine.lookup(tokens) == 8
    finally:
        rt.stop()


def test_the_policy_imports_without_torch() -> None:
    # vLLM's scheduler-side planner uses it and has no KV of its own
    code = "import sys, kvplane.engine.kv_api; sys.exit('torch' in sys.modules)"
    root = Path(__file__).resolve().parent.parent
    assert subprocess.run([sys.executable, "-c", code], cwd=root, check=False).returncode == 0
