"""Dependencies of the internal API's routes, as ``Annotated`` aliases.

Everything a route needs comes from ``request.app.state.ctx`` (an :class:`ApiContext`), so
one process can serve several apps (scheduler and worker roles) without globals.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from kvplane.api.context import ApiContext, SlotRecording
from kvplane.config import EngineConfig
from kvplane.engine.chunk_statistics import ChunkStatistics
from kvplane.errors import Unauthorized, Unavailable

if TYPE_CHECKING:
    from kvplane.engine.runtime import EngineRuntime

__all__ = [
    "SAFE_METHODS",
    "Config",
    "Ctx",
    "Runtime",
    "SlotRecordingDep",
    "Statistics",
    "check_token",
    "require_token",
]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def get_context(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.ctx
    return ctx


Ctx = Annotated[ApiContext, Depends(get_context)]


def get_config(ctx: Ctx) -> EngineConfig:
    return ctx.config


def get_runtime(ctx: Ctx) -> EngineRuntime:
    if ctx.runtime is None:
        raise Unavailable("This process has no cache engine", title="Not available")
    return ctx.runtime


def get_statistics(ctx: Ctx) -> ChunkStatistics:
    return ctx.statistics


def get_slot_recording(ctx: Ctx) -> SlotRecording:
    return ctx.slot_recording


Config = Annotated[EngineConfig, Depends(get_config)]
Runtime = Annotated["EngineRuntime", Depends(get_runtime)]
Statistics = Annotated[ChunkStatistics, Depends(get_statistics)]
SlotRecordingDep = Annotated[SlotRecording, Depends(get_slot_recording)]


def require_token(request: Request, config: Config) -> None:
    """Refuse the call with 401 unless it carries the configured bearer token (if any)."""
    token = config.internal_api_server_token
    if not token:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip(), token):
        raise Unauthorized("This endpoint requires 'Authorization: Bearer <token>'")


def check_token(request: Request, config: Config) -> None:
    """App-wide guard: every call with a mutating method needs the token. Routes that
    mutate on GET (``/loglevel?level=``) depend on :func:`require_token` themselves."""
    if request.method not in SAFE_METHODS:
        require_token(request, config)
