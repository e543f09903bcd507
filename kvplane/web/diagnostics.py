"""``GET /threads`` and ``GET /loglevel``, the same on every kvplane HTTP server.

``/threads``: ``{"count", "threads": [{name, ident, native_id, daemon, alive, stack}]}``,
sorted by name (for hang diagnosis). ``/loglevel``: without parameters every logger's
effective level (``{"loggers": {name: level}}``); with ``logger_name`` that logger's
``{logger_name, level, effective_level}`` (404 "Unknown logger" for a name never used);
with ``level`` too, set it (``{"status": "success", ...}``; 400 "Bad level" for an unknown
one). Setting mutates the process although the seed uses GET, so a server may guard it.
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
from pydantic import BaseModel

from kvplane.errors import BadRequest, NotFound
from kvplane.web.openapi import case_insensitive_pattern, error_responses

__all__ = [
    "LEVELS",
    "LEVEL_PATTERN",
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


def loglevel_router(guard: Callable[[Request], None] | None = None) -> APIRouter:
    """``guard(request)`` runs before a level is set and raises to refuse it (the internal
    API's bearer token); None: anyone may set levels."""
    router = APIRouter()
    codes = (400, 401, 404) if guard is not None else (400, 404)

    @router.get("/loglevel", responses=error_responses(*codes))
    def loglevel(
        request: Request,
        logger_name: Annotated[
            str | None, Query(description="a logger's name; 'root' for the root logger")
        ] = None,
        level: Annotated[
            str | None,
            Query(
                description=f"set this level (needs logger_name): one of {list(LEVELS)}, any case",
                json_schema_extra={"pattern": LEVEL_PATTERN},
            ),
        ] = None,
    ) -> dict[str, Any]:
        if level is not None:
            if guard is not None:
                guard(request)
            if re.fullmatch(LEVEL_PATTERN, level) is None:
                raise BadRequest(
                    f"Unknown level {level!r}; valid: {list(LEVELS)}", title="Bad level"
                )
            if not logger_name:  # logging.getLogger("") would be the root logger in disguise
                raise BadRequest(
                    "Setting a level needs logger_name (use 'root' for the root logger)"
                )
            wanted = level.upper()
            logger = logging.getLogger(None if logger_name == "root" else logger_name)
            logger.setLevel(wanted)
            return {"status": "success", **_describe(logger_name, logger)}
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

    return router
