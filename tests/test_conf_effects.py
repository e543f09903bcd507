"""POST /conf changes what the engine does, not only the config object: one test per mutable
key, and a guard that fails when a key becomes mutable without such a test."""

from __future__ import annotations

from kvplane.api.server import InternalApiService
from kvplane.config import key_specs
from kvplane.serve.cli import build_instance
from kvplane.serve.generator import SamplingParams
from kvplane.serve.launch import ServeOptions
from tests import test_api_engine
from tests.api_client import client_for
from tests.support import free_port

# Each runtime-mutable key and the test that shows an engine behaving differently after it
# was changed over HTTP.
EFFECT_TESTS = {
    "max_local_cpu_size": test_api_engine.test_conf_post_max_local_cpu_size_resizes_the_cpu_tier,
    "min_retrieve_tokens": test_api_engine.test_conf_post_really_changes_engine_behaviour,
    "save_unfull_chunk": test_api_engine.test_conf_post_really_changes_engine_behaviour,
    "log_level": test_api_engine.test_conf_post_really_changes_engine_behaviour,
    "chunk_statistics_auto_exit_target_unique_chunks": (
        test_api_engine.test_chunk_statistics_auto_exit_from_config_and_conf_post
    ),
    "chunk_statistics_auto_exit_timeout_hours": (
        test_api_engine.test_chunk_statistics_auto_exit_from_config_and_conf_post
    ),
}


def test_every_mutable_key_has_an_effect_test():
    mutable = {s.name for s in key_specs() if s.mutable}
    assert mutable == set(EFFECT_TESTS) | {"save_decode_cache"}  # tested below


def test_conf_post_save_decode_cache_stores_generated_tokens_kv(tmp_path):
    cfg = tmp_path / "kvplane.yaml"
    cfg.write_text("chunk_size: 16\nmax_local_cpu_size: 0.01\nkv_block_size: 16\n")
    overrides = {
        "internal_api_server_enabled": True,
        "internal_api_server_include_index_list": [0],
        "internal_api_server_port_start": free_port(),
    }
    runtime, served = build_instance(
        ServeOptions(max_model_len=256, device="cpu"), str(cfg), overrides
    )
    runtime.start()
    try:
        service = next(s for s in runtime.services if isinstance(s, InternalApiService))
        engine = runtime.cache_engine
        params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
        with client_for(service, 0) as client:
            first = served.generator.generate(list(range(40, 72)), params)
            seq = (
                first.prompt_tokens + first.output_tokens[:-1]
            )  # the tokens whose KV the caches hold
            assert engine.lookup(seq) == 32  # prompt only: decode KV is not stored by default
            r = client.post("/conf", json={"save_decode_cache": True})
            assert r.json() == {"updated": {"save_decode_cache": True}}
            second = served.generator.generate(list(range(100, 132)), params)
            seq = second.prompt_tokens + second.output_tokens[:-1]
            # decode KV in whole chunks (kvplane.engine.kv_api.store_boundary): 48 of 51
            assert len(seq) == 51 and engine.lookup(seq) == 48
    finally:
        runtime.stop()
