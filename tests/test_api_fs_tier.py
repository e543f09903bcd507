"""Endpoints against an engine with a second tier (FSConnector, remote_url: fs://dir):
load-fs-chunks, freeze reading only the CPU tier, bypass of a lower tier."""

from pathlib import Path

import pytest

from kvplane.engine import chunk_files
from tests.api_client import TRANSPORTS, engine_serving


@pytest.fixture(params=TRANSPORTS)
def fs_engine(request, tmp_path):
    shared = tmp_path / "shared"
    with engine_serving(request.param, remote_url=f"fs://{shared}") as (runtime, client):
        yield runtime, client, shared


def checksums(client, slots):
    r = client.get("/cache/kvcache/check", params={"slot_mapping": slots, "chunk_size": 16})
    return r.json()["chunk_checksums"]


def store_in_both_tiers_then_drop_cpu(runtime, client, mock="0,40"):
    assert client.post("/cache/store", params={"tokens_mock": mock}).status_code == 200
    assert runtime.storage.flush(timeout=10)
    client.delete("/cache/clear", params={"locations": ["LocalCPUBackend"]})
    assert runtime.storage.cpu.keys() == []


def test_load_fs_chunks_warms_the_cpu_tier(fs_engine, tmp_path):
    runtime, client, shared = fs_engine
    original = checksums(client, "[0,39]")
    store_in_both_tiers_then_drop_cpu(runtime, client)
    cfg = tmp_path / "lmcache.yaml"
    cfg.write_text(f"chunk_size: 16\nremote_url: fs://{shared}\n")
    r = client.post("/cache/load-fs-chunks", json={"config_path": str(cfg), "max_chunks": 1})
    assert r.json() == {
        "status": "success",
        "loaded_chunks": 1,
        "total_files": 3,
        "failed_keys": [],
        "config_path": str(cfg),
    }
    r = client.post("/cache/load-fs-chunks", json={"config_path": str(cfg)})
    assert r.status_code == 200
    assert (r.json()["loaded_chunks"], r.json()["total_files"]) == (3, 3)
    assert len(runtime.storage.cpu.keys()) == 3
    # Served from the CPU tier alone: the FS tier is bypassed.
    client.put("/bypass/add", params={"backend_name": "FSConnector"})
    for cache in runtime.kv_caches:
        cache.zero_()
    r = client.post("/cache/retrieve", params={"tokens_mock": "0,40", "slot_mapping": "[60,99]"})
    assert r.json()["num_retrieved"] == 40
    assert checksums(client, "[60,99]") == original


def test_load_fs_chunks_reports_failed_keys(fs_engine, tmp_path):
    runtime, client, shared = fs_engine
    store_in_both_tiers_then_drop_cpu(runtime, client, "0,32")
    victim = next(f for f in chunk_files.scan(Path(shared)))
    victim.path.write_bytes(b"garbage")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"remote_url: fs://{shared}\n")
    body = client.post(
        "/cache/load-fs-chunks", json={"config_path": str(cfg), "max_failed_keys": 5}
    ).json()
    assert (body["loaded_chunks"], body["total_files"]) == (1, 2)
    assert body["failed_keys"] == [victim.key.to_str()]


def test_load_fs_chunks_errors(fs_engine, tmp_path):
    _, client, _ = fs_engine
    missing = str(tmp_path / "missing.yaml")
    r = client.post("/cache/load-fs-chunks", json={"config_path": missing})
    assert r.status_code == 400
    assert r.json() == {
        "error": "Failed to load chunks from FSConnector",
        "message": "Configuration file not found",
        "config_path": missing,
    }
    not_fs = tmp_path / "redis.yaml"
    not_fs.write_text("remote_url: redis://localhost:6379\n")
    r = client.post("/cache/load-fs-chunks", json={"config_path": str(not_fs)})
    assert r.status_code == 400 and r.json()["config_path"] == str(not_fs)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("no_such_key: 1\n")
    r = client.post("/cache/load-fs-chunks", json={"config_path": str(bad_yaml)})
    assert r.status_code == 400 and "no_such_key" in r.json()["message"]
    assert client.post("/cache/load-fs-chunks", json={}).status_code == 400
    r = client.post("/cache/load-fs-chunks", json={"config_path": ""})
    assert r.status_code == 400 and r.json()["error"] == "Invalid parameters"
    r = client.post("/cache/load-fs-chunks", json={"config_path": missing, "max_chunks": -1})
    assert r.status_code == 400
    r = client.post(
        "/cache/load-fs-chunks", content=b"{", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400


def test_freeze_reads_only_the_cpu_tier(fs_engine):
    runtime, client, _ = fs_engine
    store_in_both_tiers_then_drop_cpu(runtime, client, "0,32")
    assert runtime.cache_engine.lookup(list(range(32))) == 32  # from FSConnector
    client.put("/freeze/enable")
    assert runtime.cache_engine.lookup(list(range(32))) == 0
    r = client.post("/cache/retrieve", params={"tokens_mock": "0,32"})
    assert r.json()["num_retrieved"] == 0
    client.put("/freeze/disable")
    r = client.post("/cache/retrieve", params={"tokens_mock": "0,32"})
    assert r.json()["num_retrieved"] == 32


def test_bypass_a_lower_tier(fs_engine):
    runtime, client, _ = fs_engine
    fs = runtime.storage.backends["FSConnector"]
    assert client.get("/bypass/list").json()["all_backends"] == ["LocalCPUBackend", "FSConnector"]
    store_in_both_tiers_then_drop_cpu(runtime, client, "0,16")
    client.put("/bypass/add", params={"backend_name": "FSConnector"})
    assert runtime.cache_engine.lookup(list(range(16))) == 0  # contains skips it
    client.post("/cache/store", params={"tokens_mock": "200,216"})  # put skips it
    assert runtime.storage.flush(timeout=10)
    assert len(fs.keys()) == 1
    client.put("/bypass/remove", params={"backend_name": "FSConnector"})
    assert runtime.cache_engine.lookup(list(range(16))) == 16
