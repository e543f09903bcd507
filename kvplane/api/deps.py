"""Dependencies of the internal API's routes, as ``Annotated`` aliases.

Everything a route needs comes from ``request.app.state.ctx`` (an :class:`ApiContext`), so
one process can serve several apps (scheduler and worker roles) without globals.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from kvplane.api.context import ApiContext, SlotRecording
from kvplane.config import ConfigStore, EngineConfig
from kvplane.engine.backends.cpu import LocalCPUBackend
from kvplane.engine.cache_engine import CacheEngine
from kvplane.engine.engine import Engine as EngineHandle
from kvplane.engine.storage_manager import StorageManager
from kvplane.errors import BadRequest, Unavailable
from kvplane.web.auth import SAFE_METHODS, check_bearer

__all__ = [
    "Config",
    "ConfigStoreDep",
    "CpuTier",
    "Ctx",
    "Engine",
    "EngineDep",
    "SlotRecordingDep",
    "Storage",
    "check_token",
    "engine_of",
    "require_token",
]


def get_context(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.ctx
    return ctx


Ctx = Annotated[ApiContext, Depends(get_context)]


def get_config(ctx: Ctx) -> EngineConfig:
    return ctx.config


def get_config_store(ctx: Ctx) -> ConfigStore:
    return ctx.config_store


def engine_of(ctx: ApiContext) -> EngineHandle:
    """The process's engine handle; 503 in a process that has none."""
    if ctx.engine is None:
        raise Unavailable("This process has no cache engine", title="Not available")
    return ctx.engine


def get_engine_handle(ctx: Ctx) -> EngineHandle:
    return engine_of(ctx)


def get_cache_engine(ctx: Ctx) -> CacheEngine:
    return engine_of(ctx).cache_engine


def get_storage(ctx: Ctx) -> StorageManager:
    return engine_of(ctx).storage


def get_cpu_tier(ctx: Ctx) -> LocalCPUBackend:
    cpu = engine_of(ctx).storage.cpu
    if cpu is None:
        raise BadRequest(
            "This engine has no LocalCPUBackend (local_cpu: false)", title="Not available"
        )
    return cpu


def get_slot_recording(ctx: Ctx) -> SlotRecording:
    return ctx.slot_recording


# ``Config``: the config when the request came in (one consistent view for the whole route);
# ``ConfigStoreDep``: where it changes (``POST /conf``).
Config = Annotated[EngineConfig, Depends(get_config)]
ConfigStoreDep = Annotated[ConfigStore, Depends(get_config_store)]
# ``Engine`` is the cache engine (the name routes used before the handle existed);
# ``EngineDep`` the whole handle: kv caches, layout, storage, metrics and metadata too.
Engine = Annotated[CacheEngine, Depends(get_cache_engine)]
EngineDep = Annotated[EngineHandle, Depends(get_engine_handle)]
Storage = Annotated[StorageManager, Depends(get_storage)]
CpuTier = Annotated[LocalCPUBackend, Depends(get_cpu_tier)]
SlotRecordingDep = Annotated[SlotRecording, Depends(get_slot_recording)]


def require_token(request: Request, config: Config) -> None:
    """Refuse the call unless it carries the configured bearer token (if any): 401 without
    one, 403 with another (:func:`kvplane.web.auth.check_bearer`)."""
    token = config.internal_api_server_token
    if token:
        check_bearer(request.headers.get("authorization"), token)


def check_token(request: Request, config: Config) -> None:
    """App-wide guard: every call with a mutating method needs the token. Routes that
    mutate on GET (``/loglevel?level=``) depend on :func:`require_token` themselves."""
    if request.method not in SAFE_METHODS:
        require_token(request, config)
