"""The common endpoints over real HTTP: /conf, /meta, /threads, /loglevel, /run_script,
/metrics and the version endpoints."""

import logging
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import kvplane
from kvplane.api.engine.version_api import COMMIT_ENV
from tests.api_client import TRANSPORTS, api_config, engine_serving, serving


@pytest.fixture(params=TRANSPORTS)
def transport(request):
    return request.param


def test_conf_get_all_filtered_and_unknown(transport):
    with serving(transport) as (_, client):
        conf = client.get("/conf").json()
        assert conf["chunk_size"] == 256
        assert conf["internal_api_server_host"] == "127.0.0.1"
        r = client.get("/conf", params={"names": "min_retrieve_tokens,save_decode_cache"})
        assert r.json() == {"min_retrieve_tokens": 0, "save_decode_cache": False}
        r = client.get("/conf", params={"names": "chunk_size,nope"})
        assert r.status_code == 400
        assert r.json()["error"] == "Unknown config"
        assert "nope" in r.json()["message"]


def test_conf_never_shows_secrets(transport):
    cfg = api_config(
        remote_url="redis://:hunter2@localhost:6379", internal_api_server_token="tok3n"
    )
    with serving(transport, cfg) as (_, client):
        r = client.get("/conf")
        assert "hunter2" not in r.text and "tok3n" not in r.text
        assert r.json()["remote_url"] == "redis://***@localhost:6379"
        assert r.json()["internal_api_server_token"] == "***"


def test_conf_post_success_partial_failure_and_bad_bodies(transport):
    cfg = api_config()
    with serving(transport, cfg) as (service, client):
        r = client.post("/conf", json={"min_retrieve_tokens": 512, "save_decode_cache": True})
        assert (r.status_code, r.json()) == (
            200,
            {"updated": {"min_retrieve_tokens": 512, "save_decode_cache": True}},
        )
        now = service.config
        assert now.min_retrieve_tokens == 512 and now.save_decode_cache is True
        assert cfg.min_retrieve_tokens == 0  # a config never changes: a new one replaced it
        r = client.post(
            "/conf", json={"min_retrieve_tokens": 7, "unknown_key": 1, "chunk_size": 16}
        )
        assert r.status_code == 400
        assert r.json() == {
            "updated": {"min_retrieve_tokens": 7},
            "errors": {
                "unknown_key": "Unknown config",
                "chunk_size": "Config is not mutable at runtime",
            },
        }
        r = client.post("/conf", json={"min_retrieve_tokens": "lots"})
        assert r.status_code == 400
        assert "min_retrieve_tokens" in r.json()["errors"]
        assert service.config.min_retrieve_tokens == 7
        assert client.get("/conf", params={"names": "min_retrieve_tokens"}).json() == {
            "min_retrieve_tokens": 7
        }
        r = client.post("/conf", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400
        assert r.json()["error"] == "Invalid JSON"
        assert client.post("/conf", json=[1, 2]).status_code == 400


def test_conf_post_calls_the_config_subscribers(transport):
    seen = []
    with serving(transport) as (service, client):
        service.config_store.subscribe(
            lambda config, changed: seen.append((sorted(changed), config.save_unfull_chunk))
        )
        client.post("/conf", json={"save_unfull_chunk": False})
        client.post("/conf", json={"chunk_size": 1})  # refused: no new config, no call
    assert seen == [(["save_unfull_chunk"], False)]


def test_meta_all_and_filtered(transport):
    cfg = api_config(model_name="m", worker_id=0, kv_num_layers=3, kv_num_heads=2)
    with serving(transport, cfg, index=1) as (_, client):
        meta = client.get("/meta").json()
        assert meta["model_name"] == "m"
        assert meta["role"] == "worker_0" and meta["index"] == 1
        assert meta["kv_shape"] == [3, 2, 256, 2, 64]  # [layers, K/V, tokens, heads, head size]
        r = client.get("/meta", params={"names": "worker_id,model_name"})
        assert r.json() == {"worker_id": 0, "model_name": "m"}
        assert client.get("/meta", params={"names": "bogus"}).status_code == 400


def test_threads_lists_the_server_thread_with_stacks(transport):
    with serving(transport) as (_, client):
        body = client.get("/threads").json()
        assert body["count"] == len(body["threads"])
        names = [t["name"] for t in body["threads"]]
        assert any(n.startswith("kvplane-api-") for n in names)
        main = next(t for t in body["threads"] if t["name"] == "MainThread")
        assert main["alive"] and main["stack"]


def test_loglevel_get_all_get_one_set(transport):
    logging.getLogger("kvplane.test_api_common.child").setLevel(logging.WARNING)
    with serving(transport) as (_, client):
        all_levels = client.get("/loglevel").json()["loggers"]
        assert all_levels["kvplane.test_api_common.child"] == "WARNING"
        assert "root" in all_levels
        r = client.get("/loglevel", params={"logger_name": "kvplane.test_api_common.child"})
        assert r.json()["level"] == "WARNING"
        r = client.get(
            "/loglevel", params={"logger_name": "kvplane.test_api_common.child", "level": "debug"}
        )
        assert r.json()["status"] == "success" and r.json()["level"] == "DEBUG"
        assert logging.getLogger("kvplane.test_api_common.child").level == logging.DEBUG
        r = client.get("/loglevel", params={"logger_name": "no.such.logger.x"})
        assert (r.status_code, r.json()["error"]) == (404, "Unknown logger")
        r = client.get("/loglevel", params={"logger_name": "kvplane", "level": "LOUD"})
        assert r.status_code == 400
        assert client.get("/loglevel", params={"level": "DEBUG"}).status_code == 400
        root_level = logging.getLogger().level
        r = client.get("/loglevel", params={"logger_name": "", "level": "CRITICAL"})
        assert r.status_code == 400 and logging.getLogger().level == root_level


def test_loglevel_post_sets_a_level(transport):
    name = "kvplane.test_api_common.posted"
    logging.getLogger(name).setLevel(logging.WARNING)
    with serving(transport) as (_, client):
        r = client.post("/loglevel", json={"logger_name": name, "level": "info"})
        assert r.status_code == 200, r.text
        assert r.json() == {
            "status": "success",
            "logger_name": name,
            "level": "INFO",
            "effective_level": "INFO",
        }
        assert logging.getLogger(name).level == logging.INFO
        r = client.post("/loglevel", json={"logger_name": name, "level": "LOUD"})
        assert (r.status_code, r.json()["error"]) == (400, "Bad level")
        r = client.post("/loglevel", json={"level": "DEBUG"})
        assert r.status_code == 400 and "logger_name" in r.json()["message"]
        assert logging.getLogger(name).level == logging.INFO


SCRIPT = b"""
ctx = app.state.ctx
ctx.config_store.update({"min_retrieve_tokens": 33})
result = {"role": ctx.role, "chunk_size": ctx.config.chunk_size, "squares": [i * i for i in range(4)]}
"""


def test_run_script_refused_by_default(transport):
    cfg = api_config()
    with serving(transport, cfg) as (service, client):
        r = client.post("/run_script", files={"script": ("s.py", SCRIPT)})
        assert r.status_code == 403
        assert set(r.json()) == {"error", "message"}
        assert service.config.min_retrieve_tokens == 0
        # The policy answers before the body is looked at: no part, or no form at all.
        for bad in (
            {},
            {"files": {"other": ("s.py", SCRIPT)}},
            {
                "content": b"--x\r\nnot multipart",
                "headers": {"content-type": "multipart/form-data"},
            },
            {"json": {"script": "result = 1"}},
        ):
            r = client.post("/run_script", **bad)
            assert (r.status_code, r.json()["error"]) == (403, "Run script disabled"), bad


def test_run_script_when_allowed(transport):
    cfg = api_config(internal_api_server_allow_run_script=True)
    with serving(transport, cfg) as (service, client):
        r = client.post("/run_script", files={"script": ("s.py", SCRIPT)})
        assert r.status_code == 200
        assert r.json() == {"role": "scheduler", "chunk_size": 256, "squares": [0, 1, 4, 9]}
        assert service.config.min_retrieve_tokens == 33
        r = client.post("/run_script", files={"script": ("bad.py", b"result = 1 / 0")})
        assert (r.status_code, r.json()["error"]) == (400, "Script failed")
        assert "ZeroDivisionError" in r.json()["message"]
        r = client.post("/run_script", files={"script": ("s.py", b"x = 1")})
        assert r.json() is None
        r = client.post("/run_script")  # no script part
        assert (r.status_code, r.json()["error"]) == (400, "Invalid parameters")
        assert "script" in r.json()["message"]
        r = client.post(
            "/run_script", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data"}
        )
        assert (r.status_code, r.json()["error"]) == (400, "Invalid parameters")


def test_run_script_needs_the_token_too(transport):
    cfg = api_config(internal_api_server_allow_run_script=True, internal_api_server_token="t")
    with serving(transport, cfg) as (_, client):
        r = client.post("/run_script", files={"script": ("s.py", b"result = 1")})
        assert r.status_code == 401
        r = client.post(
            "/run_script",
            files={"script": ("s.py", b"result = 1")},
            headers={"Authorization": "Bearer t"},
        )
        assert r.json() == 1


def test_version_endpoints(transport, monkeypatch):
    head = subprocess.run(
        ["git", "-C", str(Path(kvplane.__file__).parent), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with serving(transport) as (_, client):
        r = client.get("/lmc_version")
        assert r.headers["content-type"].startswith("text/plain")
        assert r.text == kvplane.__version__
        assert client.get("/commit_id").text == head  # the source checkout's HEAD
        assert client.get("/version").text == f"{kvplane.__version__}-{head}"
        monkeypatch.setenv(COMMIT_ENV, "0123abcd")  # what a package build sets
        assert client.get("/commit_id").text == "0123abcd"
        assert client.get("/version").text == f"{kvplane.__version__}-0123abcd"
        body = client.get("/inference_version").json()
        assert "vllm_version" in body and body["inference_engine"] == "kvplane"
        info = client.get("/inference_info", params={"format": "json"}).json()
        assert info["kvplane"]["version"] == kvplane.__version__
        assert info["kvplane"]["commit_id"] == "0123abcd"
        assert info["model"]["model_name"] == "kvplane/synthetic"


def test_metrics_is_prometheus_text(transport):
    with serving(transport) as (_, client):  # no engine: a valid, empty exposition
        r = client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        assert list(text_string_to_metric_families(r.text)) == []
    with engine_serving(transport) as (_, client):
        client.post("/cache/store", params={"tokens_mock": "0,40"})  # 3 chunks, 40 tokens
        client.post("/cache/retrieve", params={"tokens_mock": "0,40"})
        r = client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(r.text)}
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in families.values()
            for s in f.samples
        }
    assert families["kvplane_stored_tokens"].type == "counter"
    assert samples["kvplane_stored_tokens_total", ()] == 40
    assert samples["kvplane_retrieved_tokens_total", ()] == 40
    assert samples["kvplane_chunk_hits_total", ()] == 3
    assert samples["kvplane_chunk_misses_total", ()] == 0
    assert families["kvplane_store_seconds"].type == "histogram"
    assert samples["kvplane_store_seconds_count", ()] == 1
    assert samples["kvplane_tier_hits_total", (("tier", "LocalCPUBackend"),)] == 3
