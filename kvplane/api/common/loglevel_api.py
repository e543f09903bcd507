"""GET /loglevel: list loggers, read one logger's level, or set it (``level=``)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request

from kvplane.api.deps import Config, require_token
from kvplane.errors import BadRequest, NotFound

__all__ = ["LEVELS", "router"]

router = APIRouter()

LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG", "NOTSET")


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


@router.get("/loglevel")
def loglevel(
    request: Request, config: Config, logger_name: str | None = None, level: str | None = None
) -> dict[str, Any]:
    if level is not None:
        # Setting a level mutates the process although the seed uses GET.
        require_token(request, config)
        if not logger_name:  # logging.getLogger("") would be the root logger in disguise
            raise BadRequest("Setting a level needs logger_name (use 'root' for the root logger)")
        wanted = level.strip().upper()
        if wanted not in LEVELS:
            raise BadRequest(f"Unknown level {level!r}; valid: {list(LEVELS)}", title="Bad level")
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
