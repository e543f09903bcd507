"""POST /conf changes what the engine does, not only the config object.

One effect per runtime-mutable key of the config table, run by one test parametrized by
key name: each starts a real engine process, observes the behaviour the key governs, posts
the key through ``POST /conf`` and observes the behaviour change. The guard reads that
parametrization, so a key made mutable without an effect here fails it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvplane.api.server import InternalApiService
from kvplane.config import key_specs
from kvplane.serve.cli import build_instance
from kvplane.serve.generator import SamplingParams
from kvplane.serve.launch import ServeOptions
from tests.api_client import client_for, engine_serving
from tests.support import free_port


def post_conf(client: httpx.Client, key: str, value: Any) -> None:
    r = client.post("/conf", json={key: value})
    assert r.status_code == 200, r.text
    assert r.json() == {"updated": {key: value}}


def stored(client: httpx.Client, start: int, end: int) -> int:
    r = client.post("/cache/store", params={"tokens_mock": f"{start},{end}"})
    assert r.status_code == 200, r.text
    return int(r.json()["num_stored_tokens"])


def retrieved(client: httpx.Client, start: int, end: int) -> int:
    r = client.post("/cache/retrieve", params={"tokens_mock": f"{start},{end}"})
    assert r.status_code == 200, r.text
    return int(r.json()["num_retrieved"])


def statistics(client: httpx.Client) -> dict[str, Any]:
    r = client.get("/chunk_statistics/status")
    assert r.status_code == 200, r.text
    return dict(r.json())


def max_local_cpu_size(tmp_path: Path) -> None:
    with engine_serving("tcp") as (runtime, client):
        cpu = runtime.storage.cpu
        page = runtime.layout.chunk_nbytes(16)
        assert stored(client, 0, 64) == 64
        post_conf(client, "max_local_cpu_size", 2 * page / 2**30)
        assert cpu.capacity_bytes == 2 * page
        # the least recently used chunks went first
        assert cpu.keys() == runtime.cache_engine.keys_for(list(range(64)))[2:]
        assert runtime.cache_engine.lookup(list(range(64))) == 0
        assert stored(client, 100, 164) == 32  # two pages: the third chunk is refused
        post_conf(client, "max_local_cpu_size", 0.01)
        assert stored(client, 100, 164) == 64
        r = client.post("/conf", json={"max_local_cpu_size": "nan"})
        assert r.status_code == 400 and "finite" in r.json()["errors"]["max_local_cpu_size"]


def min_retrieve_tokens(tmp_path: Path) -> None:
    with engine_serving("tcp") as (_runtime, client):
        assert stored(client, 0, 32) == 32
        assert retrieved(client, 0, 32) == 32
        post_conf(client, "min_retrieve_tokens", 1000)
        assert retrieved(client, 0, 32) == 0  # a hit shorter than the minimum is not loaded
        post_conf(client, "min_retrieve_tokens", 32)
        assert retrieved(client, 0, 32) == 32


def save_unfull_chunk(tmp_path: Path) -> None:
    with engine_serving("tcp") as (_runtime, client):
        assert stored(client, 0, 40) == 40  # the default stores the partial last chunk
        post_conf(client, "save_unfull_chunk", False)
        assert stored(client, 500, 540) == 32
        assert retrieved(client, 500, 540) == 32


def save_decode_cache(tmp_path: Path) -> None:
    """Decode KV is stored only after the key is set (the serving path's generator)."""
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
            seq = first.prompt_tokens + first.output_tokens[:-1]  # the tokens with KV
            assert engine.lookup(seq) == 32  # prompt only: decode KV is not stored by default
            post_conf(client, "save_decode_cache", True)
            second = served.generator.generate(list(range(100, 132)), params)
            seq = second.prompt_tokens + second.output_tokens[:-1]
            # decode KV in whole chunks (kvplane.engine.kv_api.store_boundary): 48 of 51
            assert len(seq) == 51 and engine.lookup(seq) == 48
    finally:
        runtime.stop()


def log_level(tmp_path: Path) -> None:
    logger = logging.getLogger("kvplane")
    before = logger.level
    try:
        with engine_serving("tcp") as (_runtime, client):
            post_conf(client, "log_level", "WARNING")
            assert not logger.isEnabledFor(logging.INFO)
            post_conf(client, "log_level", "DEBUG")
            assert logger.isEnabledFor(logging.DEBUG)
    finally:
        logger.setLevel(before)


def chunk_statistics_auto_exit_target_unique_chunks(tmp_path: Path) -> None:
    with engine_serving("tcp") as (runtime, client):
        client.post("/chunk_statistics/start")
        runtime.cache_engine.lookup(list(range(64)))  # 4 distinct chunks, no target yet
        assert (statistics(client)["is_collecting"], statistics(client)["unique_chunks"]) == (
            True,
            4,
        )
        client.post("/chunk_statistics/reset")
        post_conf(client, "chunk_statistics_auto_exit_target_unique_chunks", 2)
        runtime.cache_engine.lookup(list(range(64)))  # stops after 2 distinct
        status = statistics(client)
        assert status["auto_exit_target_unique_chunks"] == 2
        assert (status["is_collecting"], status["unique_chunks"]) == (False, 2)


def chunk_statistics_auto_exit_timeout_hours(tmp_path: Path) -> None:
    with engine_serving("tcp") as (runtime, client):
        client.post("/chunk_statistics/start")
        post_conf(client, "chunk_statistics_auto_exit_timeout_hours", 24.0)
        runtime.cache_engine.lookup(list(range(32)))
        status = statistics(client)
        assert (status["is_collecting"], status["auto_exit_enabled"]) == (True, True)
        # 3.6 microseconds: already past since the start, two HTTP round trips ago
        post_conf(client, "chunk_statistics_auto_exit_timeout_hours", 1e-9)
        status = statistics(client)
        assert (status["is_collecting"], status["total_chunks"]) == (False, 2)
        runtime.cache_engine.lookup(list(range(100, 132)))
        assert statistics(client)["total_chunks"] == 2  # no longer counting


EFFECTS: dict[str, Callable[[Path], None]] = {
    f.__name__: f
    for f in (
        max_local_cpu_size,
        min_retrieve_tokens,
        save_unfull_chunk,
        save_decode_cache,
        log_level,
        chunk_statistics_auto_exit_target_unique_chunks,
        chunk_statistics_auto_exit_timeout_hours,
    )
}


@pytest.mark.parametrize("key", list(EFFECTS))
def test_conf_post_changes_the_engine(key: str, tmp_path: Path) -> None:
    EFFECTS[key](tmp_path)


def test_every_mutable_key_has_an_effect_test() -> None:
    """The keys the effect test is parametrized with are exactly the mutable keys."""
    marks = test_conf_post_changes_the_engine.pytestmark  # type: ignore[attr-defined]
    (parametrize,) = [m for m in marks if m.name == "parametrize"]
    assert parametrize.args[0] == "key"
    assert set(parametrize.args[1]) == {s.name for s in key_specs() if s.mutable}
