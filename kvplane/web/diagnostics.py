"""``GET /threads`` and ``/loglevel``, the same on every kvplane HTTP server.

``/threads``: ``{"count", "threads": [{name, ident, native_id, daemon, alive, stack}]}``,
sorted by name (for hang diagnosis). ``GET /loglevel``: without parameters every logger's
effective level (``{"loggers": {name: level}}``); with ``logger_name`` that logger's
``{logger_name, level, effective_level}`` (404 "Unknown logger" for a name never used).
``POST /loglevel`` with ``{"logger_name", "level"}`` sets a level (``{"status": "success",
...}``; 400 "Bad level" for an unknown one); a server that guards mutating calls guards it.

Only the internal API server also sets a level on ``GET /loglevel?logger_name=..&level=..``
(the seeds document it there), behind its own token when it has one; elsewhere a GET never
changes state, and one with ``level`` is refused naming ``POST /loglevel``.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from kvplane.errors import BadRequest, NotFound
from kvplane.web.openapi import case_insensitive_pattern, error_responses

__all__ = [
    "LEVELS",
    "LEVEL_PATTERN",
    "SetLevelRequest",
    "ThreadInfo",
    "ThreadsResponse",
    "loglevel_router",
    "threads_router",
]

LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG", "NOTSET")
# What ``level`` accepts, in any letter case; the route checks it with this very pattern, so
# the OpenAPI document and the server agree on every string.
LEVEL_PATTERN = case_insensitive_pattern(LEVELS)


class ThreadInfo(BaseModel):
    name: str
    ident: int | None
    native_id: int | None
    daemon: bool
    alive: bool
    stack: list[str]


class ThreadsResponse(BaseModel):
    count: int
    threads: list[ThreadInfo]


def threads_router() -> APIRouter:
    router = APIRouter()

    @router.get("/threads")
    def get_threads() -> ThreadsResponse:
        frames = sys._current_frames()
        infos = []
        for thread in sorted(threading.enumerate(), key=lambda t: t.name):
            frame = frames.get(thread.ident) if thread.ident is not None else None
            stack = [line.rstrip() for line in traceback.format_stack(frame)] if frame else []
            infos.append(
                ThreadInfo(
                    name=thread.name,
                    ident=thread.ident,
                    native_id=thread.native_id,
                    daemon=thread.daemon,
                    alive=thread.is_alive(),
                    stack=stack,
                )
            )
        return ThreadsResponse(count=len(infos), threads=infos)

    return router


def _known_loggers() -> dict[str, logging.Logger]:
    loggers = {
        name: obj
        for name, obj in logging.Logger.manager.loggerDict.items()
        if isinstance(obj, logging.Logger)
    }
    loggers["root"] = logging.getLogger()
    return loggers


def _describe(name: str, logger: logging.Logger) -> dict[str, str]:
    return {
        "logger_name": name,
        "level": logging.getLevelName(logger.level),
        "effective_level": logging.getLevelName(logger.getEffectiveLevel()),
    }


_LOGGER_NAME = "a logger's name; 'root' for the root logger"
LoggerName = Annotated[str | None, Query(min_length=1, description=_LOGGER_NAME)]


class SetLevelRequest(BaseModel):
    logger_name: str = Field(min_length=1, description=_LOGGER_NAME)
    level: str = Field(
        description=f"one of {list(LEVELS)}, any case",
        json_schema_extra={"pattern": LEVEL_PATTERN},
    )


def _set_level(logger_name: str | None, level: str) -> dict[str, Any]:
    """Set a level; 400 "Bad level" for an unknown one (checked by the pattern the
    documents declare), 400 without ``logger_name``."""
    if re.fullmatch(LEVEL_PATTERN, level) is None:
        raise BadRequest(f"Unknown level {level!r}; valid: {list(LEVELS)}", title="Bad level")
    if not logger_name:  # logging.getLogger("") would be the root logger in disguise
        raise BadRequest("Setting a level needs logger_name (use 'root' for the root logger)")
    wanted = level.upper()
    logger = logging.getLogger(None if logger_name == "root" else logger_name)
    logger.setLevel(wanted)
    return {"status": "success", **_describe(logger_name, logger)}


def loglevel_router(get_sets: Callable[[Request], None] | None = None) -> APIRouter:
    """``GET`` and ``POST /loglevel``. ``get_sets``: None, a GET with ``level`` is refused;
    else the guard (raising to refuse) under which a GET with ``level`` sets it (the
    internal API's seed-compatible form)."""
    router = APIRouter()

    @router.post("/loglevel", responses=error_responses(400))
    def set_loglevel(body: SetLevelRequest) -> dict[str, Any]:
        return _set_level(body.logger_name, body.level)

    def read(logger_name: str | None) -> dict[str, Any]:
        loggers = _known_loggers()
        if logger_name is None:
            return {
                "loggers": {
                    name: _describe(name, logger)["effective_level"]
                    for name, logger in sorted(loggers.items())
                }
            }
        if logger_name not in loggers:
            raise NotFound(f"No logger named {logger_name!r}", title="Unknown logger")
        return _describe(logger_name, loggers[logger_name])

    if get_sets is None:
        # ``level`` is no parameter here, so the document offers no GET that would set one;
        # a client that sends it anyway is told where to go, not silently ignored.
        @router.get("/loglevel", responses=error_responses(400, 404))
        def loglevel_read(request: Request, logger_name: LoggerName = None) -> dict[str, Any]:
            if "level" in request.query_params:
                raise BadRequest(
                    "GET /loglevel does not change levels here; send POST /loglevel with "
                    '{"logger_name": ..., "level": ...}',
                    title="Use POST",
                )
            return read(logger_name)

        return router

    @router.get("/loglevel", responses=error_responses(400, 401, 403, 404))
    def loglevel(
        request: Request,
        logger_name: LoggerName = None,
        level: Annotated[
            str | None,
            Query(
                description=f"set this level (needs logger_name): one of {list(LEVELS)}, any case",
                json_schema_extra={"pattern": LEVEL_PATTERN},
            ),
        ] = None,
    ) -> dict[str, Any]:
        if level is None:
            return read(logger_name)
        get_sets(request)
        return _set_level(logger_name, level)

    return router
