"""GET /loglevel: list loggers, read one logger's level, or set it (``level=``); the route
every kvplane server shares (:mod:`kvplane.web.diagnostics`), here guarded by the bearer
token when ``internal_api_server_token`` is set."""

from __future__ import annotations

from fastapi import Request

from kvplane.api.deps import get_context, require_token
from kvplane.web.diagnostics import loglevel_router

__all__ = ["router"]


def _require_token(request: Request) -> None:
    require_token(request, get_context(request).config)


router = loglevel_router(guard=_require_token)
