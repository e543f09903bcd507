"""GET /loglevel: list loggers, read one logger's level; POST /loglevel sets one. The routes
every kvplane server shares (:mod:`kvplane.web.diagnostics`), with one exception kept for
the seeds: here ``GET /loglevel?logger_name=..&level=..`` sets a level too, under the same
bearer token as every mutating call when ``internal_api_server_token`` is set."""

from __future__ import annotations

from fastapi import Request

from kvplane.api.deps import get_context, require_token
from kvplane.web.diagnostics import loglevel_router

__all__ = ["router"]


def _require_token(request: Request) -> None:
    require_token(request, get_context(request).config)


router = loglevel_router(get_sets=_require_token)
