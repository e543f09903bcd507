"""Engine endpoints over real HTTP against a real EngineProcess: shapes, errors, effects."""

import logging

import pytest
import torch

from kvplane.engine.engine import Engine
from kvplane.engine.events import ChunkAdmitted
from kvplane.engine.kv.copies import gather
from tests.api_client import TRANSPORTS, engine_serving


@pytest.fixture(params=TRANSPORTS)
def transport(request):
    return request.param


@pytest.fixture
def engine(transport):
    with engine_serving(transport) as (runtime, client):
        yield runtime, client


def lookup(runtime, start, end):
    return runtime.cache_engine.lookup(list(range(start, end)))


def test_store_and_retrieve_shapes_and_effect(engine):
    runtime, client = engine
    r = client.post("/cache/store", params={"tokens_mock": "0,40"})
    assert r.status_code == 200
    assert r.json() == {
        "status": "success",
        "num_tokens": 40,
        "num_stored_tokens": 40,
        "num_new_chunks": 3,
    }
    assert lookup(runtime, 0, 40) == 40
    r = client.post("/cache/retrieve", params={"tokens_mock": "0,48"})
    assert r.json() == {"status": "success", "num_tokens": 48, "num_retrieved": 32}
    r = client.post("/cache/store", params={"tokens_input": "5,6,7", "slot_mapping": "[100,102]"})
    assert r.json()["num_stored_tokens"] == 3
    assert runtime.cache_engine.lookup([5, 6, 7]) == 3


@pytest.mark.parametrize("path", ["/cache/store", "/cache/retrieve"])
def test_store_retrieve_errors(engine, path):
    _, client = engine
    r = client.post(path)
    assert r.status_code == 400
    assert r.json() == {
        "error": "Missing parameters",
        "message": "Must specify either tokens_input or tokens_mock",
    }
    for params in (
        {"tokens_mock": "5"},
        {"tokens_mock": "a,b"},
        {"tokens_mock": "9,3"},
        {"tokens_input": "1,x"},
        {"tokens_mock": "0,10", "tokens_input": "1"},
        {"tokens_mock": "0,10", "slot_mapping": "0,1"},  # 2 slots for 10 tokens
        {"tokens_mock": "0,2", "slot_mapping": "0,99999"},  # beyond the cache
        {"tokens_mock": "0,100000"},  # more tokens than slots
    ):
        r = client.post(path, params=params)
        assert r.status_code == 400, params
        assert set(r.json()) == {"error", "message"}


def test_kvcache_check_equal_for_stored_and_retrieved_kv(engine):
    runtime, client = engine
    client.post("/cache/store", params={"tokens_mock": "0,40", "slot_mapping": "[0,39]"})
    stored = client.get(
        "/cache/kvcache/check", params={"slot_mapping": "[0,39]", "chunk_size": 16}
    ).json()
    assert stored["status"] == "success"
    assert stored["slot_mapping_ranges"] == [[0, 39]]
    assert stored["num_chunks"] == 3 and len(stored["chunk_checksums"]) == 3
    assert stored["layerwise"] is False
    for cache in runtime.kv_caches:  # clear the paged cache
        cache.zero_()
    cleared = client.get(
        "/cache/kvcache/check", params={"slot_mapping": "[0,39]", "chunk_size": 16}
    ).json()
    assert cleared["chunk_checksums"] != stored["chunk_checksums"]
    # Retrieve into other slots, given with the mixed syntax.
    slots = "[100,119],120,[121,139]"
    r = client.post("/cache/retrieve", params={"tokens_mock": "0,40", "slot_mapping": slots})
    assert r.json()["num_retrieved"] == 40
    got = client.get("/cache/kvcache/check", params={"slot_mapping": slots, "chunk_size": 16})
    assert got.json()["slot_mapping_ranges"] == [[100, 139]]
    assert got.json()["chunk_checksums"] == stored["chunk_checksums"]
    a = torch.arange(0, 40)
    b = torch.arange(100, 140)
    assert torch.equal(
        gather(runtime.layout, runtime.kv_caches, a),
        torch.zeros_like(gather(runtime.layout, runtime.kv_caches, a)),
    )
    assert not torch.equal(
        gather(runtime.layout, runtime.kv_caches, b), gather(runtime.layout, runtime.kv_caches, a)
    )


def test_kvcache_check_layerwise_and_errors(engine):
    runtime, client = engine
    r = client.get(
        "/cache/kvcache/check",
        params={"slot_mapping": "0,1,2,3", "chunk_size": 2, "layerwise": "true"},
    )
    body = r.json()
    assert body["layerwise"] is True and body["num_chunks"] == 2
    assert sorted(body["chunk_checksums"]) == ["layer_0", "layer_1"]
    assert all(len(v) == 2 for v in body["chunk_checksums"].values())
    r = client.get(
        "/cache/kvcache/check", params={"slot_mapping": "0,1,2,3", "chunk_size": 2}
    ).json()
    assert r["slot_mapping_ranges"] == [[0, 3]]
    assert len(r["chunk_checksums"]) == 2
    for params in (
        {"slot_mapping": "0,1"},  # chunk_size missing
        {"slot_mapping": "0,[3,1]", "chunk_size": 2},
        {"slot_mapping": "0,,1", "chunk_size": 2},
        {"slot_mapping": "0", "chunk_size": 0},
        {"slot_mapping": f"{runtime.layout.num_slots}", "chunk_size": 1},
    ):
        resp = client.get("/cache/kvcache/check", params=params)
        assert resp.status_code == 400, params
        assert set(resp.json()) == {"error", "message"}


def test_kvcache_info(engine):
    runtime, client = engine
    body = client.get("/cache/kvcache/info").json()
    assert body["status"] == "success"
    assert body["num_layers"] == 2
    assert body["layers"]["layer_0"] == {
        "shape": list(runtime.kv_caches[0].shape),
        "dtype": "torch.bfloat16",
        "device": "cpu",
    }


def test_record_slot_toggles_and_logs(engine, caplog):
    _, client = engine
    r = client.post("/cache/kvcache/record_slot")
    assert r.json() == {"status": "success", "kvcache_check_log_enabled": False}
    assert client.post("/cache/kvcache/record_slot", params={"enabled": "true"}).json()[
        "kvcache_check_log_enabled"
    ]
    with caplog.at_level(logging.INFO, logger="kvplane.api.kvcache"):
        client.post("/cache/store", params={"tokens_mock": "0,8", "slot_mapping": "[10,17]"})
    assert "store slot_mapping=[10,17]" in caplog.text
    r = client.post("/cache/kvcache/record_slot", params={"enabled": "false"})
    assert r.json()["kvcache_check_log_enabled"] is False
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kvplane.api.kvcache"):
        client.post("/cache/store", params={"tokens_mock": "0,8"})
    assert "slot_mapping" not in caplog.text
    assert client.post("/cache/kvcache/record_slot", params={"enabled": "yes"}).status_code == 400


def test_record_slot_logs_the_serving_path_too(engine, caplog):
    runtime, client = engine
    client.post("/cache/kvcache/record_slot", params={"enabled": "true"})
    tokens = list(range(500, 520))
    slots = torch.arange(100, 120)
    with caplog.at_level(logging.INFO, logger="kvplane.api.kvcache"):
        runtime.cache_engine.store(tokens, runtime.kv_caches, slots)  # not through the API
        runtime.cache_engine.retrieve(tokens, runtime.kv_caches, slots)
    assert "store slot_mapping=[100,119]" in caplog.text
    assert "retrieve slot_mapping=[100,119]" in caplog.text


def test_cache_clear_all_and_by_location(engine):
    runtime, client = engine
    client.post("/cache/store", params={"tokens_mock": "0,40"})
    r = client.delete("/cache/clear", params={"locations": ["LocalCPUBackend"]})
    assert r.json() == {"status": "success", "num_removed": 3}
    assert lookup(runtime, 0, 40) == 0
    client.post("/cache/store", params={"tokens_mock": "0,20"})
    assert client.delete("/cache/clear").json() == {"status": "success", "num_removed": 2}
    r = client.delete("/cache/clear", params={"locations": ["FooBackend"]})
    assert r.status_code == 400
    assert r.json()["error"] == "Unknown backend"
    assert "LocalCPUBackend" in r.json()["message"]


def test_freeze_really_skips_stores_and_events(engine):
    runtime, client = engine
    events = runtime.storage.subscribe("test")
    assert client.get("/freeze/status").json() == {
        "status": "success",
        "freeze": False,
        "message": "Freeze mode is disabled",
    }
    assert client.put("/freeze/enable").json() == {
        "status": "success",
        "freeze": True,
        "message": "Freeze mode enabled successfully",
    }
    assert client.get("/freeze/status").json()["message"] == "Freeze mode is enabled"
    r = client.post("/cache/store", params={"tokens_mock": "0,32"})
    assert r.json()["num_stored_tokens"] == 0
    assert lookup(runtime, 0, 32) == 0
    assert runtime.storage.cpu.keys() == []
    assert events.take_events() == []
    assert client.put("/freeze/disable").json() == {
        "status": "success",
        "freeze": False,
        "message": "Freeze mode disabled successfully",
    }
    client.post("/cache/store", params={"tokens_mock": "0,32"})
    assert lookup(runtime, 0, 32) == 32
    assert [type(e) for e in events.take_events()] == [ChunkAdmitted, ChunkAdmitted]


def test_hot_cache_disable_really_empties_the_cpu_tier(engine):
    runtime, client = engine
    client.post("/cache/store", params={"tokens_mock": "0,32"})
    assert len(runtime.storage.cpu.keys()) == 2
    assert client.get("/hot_cache/status").json() == {
        "status": "success",
        "hot_cache": True,
        "message": "Hot cache is enabled",
    }
    assert client.put("/hot_cache/disable").json() == {
        "status": "success",
        "hot_cache": False,
        "message": "Hot cache disabled successfully",
    }
    assert runtime.storage.cpu.keys() == []
    client.post("/cache/store", params={"tokens_mock": "0,32"})
    assert runtime.storage.cpu.keys() == []  # no new data written
    assert client.get("/hot_cache/status").json()["hot_cache"] is False
    assert client.put("/hot_cache/enable").json()["message"] == "Hot cache enabled successfully"
    client.post("/cache/store", params={"tokens_mock": "0,32"})
    assert lookup(runtime, 0, 32) == 32


def test_hot_cache_without_a_cpu_tier_is_not_available(transport):
    with engine_serving(transport, local_cpu=False) as (_, client):
        r = client.get("/hot_cache/status")
        assert (r.status_code, r.json()["error"]) == (400, "Not available")


def test_bypass_list_add_remove_and_effect(engine):
    runtime, client = engine
    assert client.get("/bypass/list").json() == {
        "status": "success",
        "bypassed_backends": [],
        "all_backends": ["LocalCPUBackend"],
    }
    client.post("/cache/store", params={"tokens_mock": "0,16"})
    r = client.put("/bypass/add", params={"backend_name": "LocalCPUBackend"})
    assert r.json() == {
        "status": "success",
        "backend_name": "LocalCPUBackend",
        "bypassed": True,
        "was_already_bypassed": False,
        "bypassed_backends": ["LocalCPUBackend"],
    }
    r = client.put("/bypass/add", params={"backend_name": "LocalCPUBackend"})
    assert r.json()["was_already_bypassed"] is True
    assert lookup(runtime, 0, 16) == 0  # contains skips it
    assert (
        client.post("/cache/retrieve", params={"tokens_mock": "0,16"}).json()["num_retrieved"] == 0
    )  # get skips it
    client.post("/cache/store", params={"tokens_mock": "100,116"})  # put skips it
    assert len(runtime.storage.cpu.keys()) == 1
    r = client.put("/bypass/remove", params={"backend_name": "LocalCPUBackend"})
    assert r.json() == {
        "status": "success",
        "backend_name": "LocalCPUBackend",
        "bypassed": False,
        "was_bypassed": True,
        "bypassed_backends": [],
    }
    assert lookup(runtime, 0, 16) == 16
    assert lookup(runtime, 100, 116) == 0


@pytest.mark.parametrize("path", ["/bypass/add", "/bypass/remove"])
def test_bypass_unknown_or_missing_backend(engine, path):
    _, client = engine
    r = client.put(path, params={"backend_name": "FooBackend"})
    assert r.status_code == 400
    assert r.json() == {
        "error": "Unknown backend",
        "message": "Backend 'FooBackend' not found. Available: ['LocalCPUBackend']",
    }
    assert client.put(path).status_code == 400


def test_chunk_statistics_lifecycle(engine):
    runtime, client = engine
    status = client.get("/chunk_statistics/status").json()
    assert set(status) == {
        "is_collecting",
        "total_chunks",
        "unique_chunks",
        "timestamp",
        "auto_exit_enabled",
        "auto_exit_timeout_hours",
        "auto_exit_target_unique_chunks",
    }
    assert status["is_collecting"] is False and status["auto_exit_enabled"] is False
    assert client.post("/chunk_statistics/start").json() == {
        "status": "success",
        "message": "Started",
    }
    client.post("/cache/store", params={"tokens_mock": "0,32"})
    client.post("/cache/retrieve", params={"tokens_mock": "0,32"})  # 2 chunks
    runtime.cache_engine.lookup(list(range(48)))  # 3 chunks, 2 seen before
    status = client.get("/chunk_statistics/status").json()
    assert (status["is_collecting"], status["total_chunks"], status["unique_chunks"]) == (
        True,
        5,
        3,
    )
    assert client.post("/chunk_statistics/stop").json()["message"] == "Stopped"
    runtime.cache_engine.lookup(list(range(16)))
    assert client.get("/chunk_statistics/status").json()["total_chunks"] == 5
    assert client.post("/chunk_statistics/reset").json()["message"] == "Reset"
    status = client.get("/chunk_statistics/status").json()
    assert (status["total_chunks"], status["unique_chunks"]) == (0, 0)


def test_chunk_statistics_auto_exit_from_config_and_conf_post(transport):
    with engine_serving(transport, chunk_statistics_auto_exit_timeout_hours=24.0) as (
        runtime,
        client,
    ):
        status = client.get("/chunk_statistics/status").json()
        assert status["auto_exit_enabled"] and status["auto_exit_timeout_hours"] == 24.0
        client.post("/chunk_statistics/start")
        r = client.post("/conf", json={"chunk_statistics_auto_exit_target_unique_chunks": 2})
        assert r.status_code == 200
        runtime.cache_engine.lookup(list(range(64)))  # 4 chunks: stops after 2 distinct
        status = client.get("/chunk_statistics/status").json()
        assert status["auto_exit_target_unique_chunks"] == 2
        assert (status["is_collecting"], status["unique_chunks"]) == (False, 2)


def test_meta_and_metrics_come_from_the_engine(engine):
    runtime, client = engine
    meta = client.get("/meta").json()
    assert meta["kv_shape"] == list(runtime.layout.chunk_shape(16))
    assert meta["role"] == "scheduler" and meta["has_engine"] is True
    client.post("/cache/store", params={"tokens_mock": "0,32"})
    text = client.get("/metrics").text
    assert "kvplane_stored_tokens_total 32.0" in text
    info = client.get("/inference_info").json()
    assert info["kvplane"]["backends"] == ["LocalCPUBackend"]


def test_engine_endpoints_without_an_engine(transport):
    from tests.api_client import serving

    with serving(transport) as (_, client):
        r = client.post("/chunk_statistics/start")
        assert r.json() == {
            "error": "Not available",
            "message": "Client does not support statistics.",
        }
        assert r.status_code == 400
        for method, path in (
            ("GET", "/freeze/status"),
            ("GET", "/bypass/list"),
            ("POST", "/cache/store?tokens_mock=0,4"),
            ("GET", "/cache/kvcache/info"),
        ):
            r = client.request(method, path)
            assert (r.status_code, r.json()["error"]) == (503, "Not available"), path


def test_inference_info_failure_is_a_500_with_the_seed_error(engine, monkeypatch):
    _runtime, client = engine

    def broken_metadata(self):
        raise RuntimeError("metadata exploded")

    monkeypatch.setattr(Engine, "metadata", broken_metadata)  # fault injection on the handle
    r = client.get("/inference_info")
    assert r.status_code == 500
    assert r.json() == {"error": "Failed to get inference info", "message": "metadata exploded"}


def test_check_store_clear_retrieve_on_each_device(device):
    """The same HTTP round trip with the paged caches on CPU and (when present) CUDA."""
    with engine_serving("tcp", device=device) as (runtime, client):
        info = client.get("/cache/kvcache/info").json()
        assert info["layers"]["layer_0"]["device"].startswith(device)
        client.post("/cache/store", params={"tokens_mock": "0,40", "slot_mapping": "[0,39]"})
        params = {"slot_mapping": "[0,39]", "chunk_size": 16, "layerwise": "true"}
        stored = client.get("/cache/kvcache/check", params=params).json()["chunk_checksums"]
        for cache in runtime.kv_caches:
            cache.zero_()
        r = client.post("/cache/retrieve", params={"tokens_mock": "0,40", "slot_mapping": "[0,39]"})
        assert r.json()["num_retrieved"] == 40
        assert client.get("/cache/kvcache/check", params=params).json()["chunk_checksums"] == stored


@pytest.mark.parametrize("path", ["/cache/store", "/cache/retrieve"])
def test_huge_or_out_of_range_tokens_are_a_clean_400(engine, path):
    runtime, client = engine
    for params in (
        {"tokens_mock": "0,100000000000"},  # refused before the range is built
        {"tokens_mock": "0,99999999999999999999999"},
        {"tokens_mock": "2147483647,2147483649"},  # token ids beyond int32
        {"tokens_input": "1,4294967297"},  # would wrap to token 1 as int32
        {"tokens_input": "5,-1"},  # token ids are never negative (kvplane.keys.TOKEN_ID_RANGE)
    ):
        r = client.post(path, params=params)
        assert r.status_code == 400, (params, r.text)
        assert set(r.json()) == {"error", "message"}
        if "tokens_input" in params:
            assert "[0, 2147483647]" in r.json()["message"]
    assert runtime.storage.cpu.keys() == []
    assert client.post(path, params={"tokens_input": "1,2147483647"}).status_code == 200


def test_cache_keys_lists_this_ranks_chunks_per_tier(tmp_path):
    from kvplane.engine import chunk_files
    from kvplane.keys import chunk_hashes
    from tests.tier_cases import make_chunk, make_key

    shared = tmp_path / "shared"
    shared.mkdir()
    # another model's chunk in the shared directory is not this engine's
    chunk_files.write_chunk_file(shared, make_key(1, model="other/model"), make_chunk(1))
    with engine_serving("tcp", remote_url=f"fs://{shared}") as (runtime, client):
        client.post("/cache/store", params={"tokens_mock": "0,40"})
        assert runtime.storage.flush(10)
        client.delete("/cache/clear", params={"locations": ["LocalCPUBackend"]})
        client.post("/cache/store", params={"tokens_mock": "100,116"})
        assert runtime.storage.flush(10)
        body = client.get("/cache/keys").json()
    assert body["model_name"] == "kvplane/synthetic" and body["worker_id"] == 0
    assert body["chunk_size"] == 16
    tiers = body["chunk_hashes"]
    assert list(tiers) == ["LocalCPUBackend", "FSConnector"]
    assert tiers["LocalCPUBackend"] == chunk_hashes(list(range(100, 116)), 16)
    assert sorted(tiers["FSConnector"]) == sorted(
        chunk_hashes(list(range(40)), 16) + chunk_hashes(list(range(100, 116)), 16)
    )
