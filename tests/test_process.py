"""The composition root in this process: what each role builds and serves, and the wiring it
does that the services' constructors no longer do."""

from __future__ import annotations

import socket
import threading
from typing import Any

import httpx
import pytest

from kvplane.api.server import InternalApiService
from kvplane.config import EngineConfig, load_config
from kvplane.engine.engine import engine_metadata
from kvplane.engine.facts import EngineFacts
from kvplane.errors import ConfigError, Unavailable
from kvplane.process import EngineProcess
from tests.api_client import ENGINE_DEFAULTS, client_for
from tests.support import free_ports


def config(**overrides: Any) -> EngineConfig:
    return load_config(env={}, overrides={**ENGINE_DEFAULTS, **overrides})


def api_service(process: EngineProcess) -> InternalApiService:
    return next(s for s in process.services if isinstance(s, InternalApiService))


def test_a_scheduler_runs_only_the_internal_api_index_0_without_an_engine():
    (start,) = free_ports(1)
    cfg = config(
        internal_api_server_enabled=True,
        internal_api_server_port_start=start,
        enable_p2p=True,  # ignored: a scheduler has no engine to serve chunks from
        enable_controller=True,  # ignored: no engine, no worker
    )
    process = EngineProcess(cfg, role="scheduler")
    assert process.engine is None and process.p2p is None
    assert [s.name for s in process.services] == ["internal_api_server"]
    assert api_service(process).indices == [0]
    with pytest.raises(Unavailable):
        process.cache_engine  # noqa: B018
    process.start()
    try:
        with client_for(api_service(process), 0) as client:
            meta = client.get("/meta").json()
            assert (meta["role"], meta["has_engine"]) == ("scheduler", False)
            # the same engine facts as a worker process of this config shows, from one place
            worker = EngineProcess(config())
            try:
                assert worker.engine is not None
                facts = worker.engine.metadata()
            finally:
                worker.stop()
            shown = engine_metadata(EngineFacts.from_config(cfg), cfg)
            assert {k: meta[k] for k in facts} == facts == shown
            r = client.post("/cache/store", params={"tokens_mock": "0,4"})
            assert (r.status_code, r.json()["error"]) == (503, "Not available")
    finally:
        process.stop()
        process.stop()  # idempotent


@pytest.mark.parametrize(("worker_id", "indices"), [(0, [0, 1]), (1, [2]), (3, [4])])
def test_a_worker_serves_its_rank_index_and_rank_0_the_scheduler_index_too(worker_id, indices):
    cfg = config(internal_api_server_enabled=True, worker_id=worker_id, world_size=4)
    process = EngineProcess(cfg)
    try:
        assert process.role == "worker" and process.engine is not None
        assert api_service(process).indices == indices
    finally:
        process.stop()


def test_an_unknown_role_or_an_engine_for_a_scheduler_is_a_config_error():
    with pytest.raises(ConfigError, match="role 'leader'"):
        EngineProcess(config(), role="leader")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="no engine"):
        EngineProcess(config(), role="scheduler", kv_caches=[])
    with pytest.raises(ConfigError, match="no engine"):
        EngineProcess(config(), role="scheduler", scheduler_api=False)


@pytest.mark.parametrize(("worker_id", "indices"), [(0, [1]), (1, [2])])
def test_a_worker_beside_a_separate_scheduler_serves_only_its_rank_index(worker_id, indices):
    cfg = config(internal_api_server_enabled=True, worker_id=worker_id, world_size=2)
    process = EngineProcess(cfg, scheduler_api=False)
    try:
        assert api_service(process).indices == indices
    finally:
        process.stop()


def test_the_root_wires_the_api_to_the_engine_and_to_config_changes():
    process = EngineProcess(config(internal_api_server_enabled=True))
    try:
        api = api_service(process)
        api.statistics.start()
        process.cache_engine.lookup(list(range(32)))
        assert api.statistics.status().total_chunks == 2  # lookups reach the statistics
        process.config_store.update({"chunk_statistics_auto_exit_target_unique_chunks": 1})
        assert api.statistics.status().auto_exit_target_unique_chunks == 1
    finally:
        process.stop()


def test_a_handle_for_the_services_names_the_same_objects_as_the_process():
    process = EngineProcess(config())
    try:
        engine = process.engine
        assert engine is not None
        assert process.cache_engine is engine.cache_engine
        assert process.storage is engine.storage is engine.cache_engine.storage
        assert process.kv_caches is engine.kv_caches
        assert engine.metadata()["kv_shape"] == list(process.layout.chunk_shape(16))
    finally:
        process.stop()


def test_a_service_that_cannot_be_built_releases_the_p2p_port():
    (p2p,) = free_ports(1)
    with pytest.raises(ConfigError, match="controller_pull_url"):
        EngineProcess(
            config(
                enable_p2p=True,
                p2p_host="127.0.0.1",
                p2p_init_ports=[p2p],
                enable_controller=True,  # without controller_pull_url
            )
        )
    with socket.socket() as s:
        s.bind(("127.0.0.1", p2p))
    assert [t.name for t in threading.enumerate() if t.name.startswith("p2p")] == []


def test_http_client_sees_the_worker_role_of_rank_1():
    (start,) = free_ports(1)
    cfg = config(
        internal_api_server_enabled=True,
        internal_api_server_port_start=start - 2,  # rank 1 serves index 2
        worker_id=1,
        world_size=2,
    )
    process = EngineProcess(cfg)
    process.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{start}", timeout=10) as client:
            meta = client.get("/meta").json()
        assert (meta["role"], meta["index"], meta["has_engine"]) == ("worker_1", 2, True)
    finally:
        process.stop()
