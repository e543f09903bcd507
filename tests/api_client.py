"""Helpers for the internal API tests: a real uvicorn server on TCP or a Unix socket."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import httpx

from kvplane.api.server import InternalApiService
from kvplane.config import ConfigStore, EngineConfig, load_config
from kvplane.engine.facts import EngineFacts
from tests.support import free_port

TRANSPORTS = ("tcp", "uds")


def api_config(**overrides: Any) -> EngineConfig:
    return load_config(env={}, overrides={"internal_api_server_enabled": True, **overrides})


def api_service(config: EngineConfig, **kwargs: Any) -> InternalApiService:
    """The internal API service of an engine-less process with ``config``."""
    return InternalApiService(ConfigStore(config), EngineFacts.from_config(config), **kwargs)


@contextlib.contextmanager
def short_tmpdir() -> Iterator[str]:
    """A short directory name: Unix socket paths are limited to ~107 bytes."""
    path = tempfile.mkdtemp(prefix="kvp", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def client_for(service: InternalApiService, index: int) -> httpx.Client:
    server = service.servers[index]
    if server.address.uds:
        return httpx.Client(
            base_url="http://kvplane-api",
            transport=httpx.HTTPTransport(uds=server.address.uds),
            timeout=10.0,
        )
    return httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=10.0)


@contextlib.contextmanager
def serving(
    transport: str,
    config: EngineConfig | None = None,
    engine: Any = None,
    index: int = 0,
    **service_kwargs: Any,
) -> Iterator[tuple[InternalApiService, httpx.Client]]:
    """Start the API for ``index`` over ``transport`` and yield it with a client. The
    service's config is ``config`` on a free address; ``service.config`` is the current one
    (``POST /conf`` changes it)."""
    config = config or api_config()
    with short_tmpdir() as tmp:
        if transport == "uds":
            if config.internal_api_server_socket_path_prefix is None:
                config = dataclasses.replace(
                    config, internal_api_server_socket_path_prefix=f"{tmp}/api"
                )
        else:
            config = dataclasses.replace(config, internal_api_server_port_start=free_port() - index)
        facts = engine.facts if engine is not None else EngineFacts.from_config(config)
        service = InternalApiService(
            ConfigStore(config), facts, engine, indices=[index], **service_kwargs
        )
        service.start()
        try:
            with client_for(service, index) as client:
                yield service, client
        finally:
            service.stop()


ENGINE_DEFAULTS: dict[str, Any] = dict(
    chunk_size=16,
    kv_block_size=4,
    kv_num_blocks=64,
    kv_num_layers=2,
    kv_num_heads=2,
    kv_head_size=16,
    max_local_cpu_size=0.01,
)


@contextlib.contextmanager
def engine_serving(
    transport: str, device: str = "cpu", **overrides: Any
) -> Iterator[tuple[Any, httpx.Client]]:
    """A real EngineProcess whose own internal API service (index 0) serves over
    ``transport``; yields the process and a client."""
    from kvplane.process import EngineProcess

    with short_tmpdir() as tmp:
        settings = {**ENGINE_DEFAULTS, "internal_api_server_include_index_list": [0], **overrides}
        if transport == "uds":
            settings["internal_api_server_socket_path_prefix"] = f"{tmp}/api"
        else:
            settings["internal_api_server_port_start"] = free_port()
        runtime = EngineProcess(api_config(**settings), device=device)
        runtime.start()
        try:
            service = next(s for s in runtime.services if isinstance(s, InternalApiService))
            with client_for(service, 0) as client:
                yield runtime, client
        finally:
            runtime.stop()
