"""One error body for kvplane's HTTP APIs, and the handlers that produce it.

A :class:`~kvplane.errors.KvplaneError` becomes ``{"error": title, "message": text,
**details}`` with its status code (the seeds' shape: ``title`` such as "Unknown backend",
``details`` such as a failed command's ``event_id`` and ``error_codes``); a body or query
that does not validate becomes 400 "Invalid parameters" naming each field; an unmatched
route or method keeps its status; anything else is a logged 500 "Internal error".
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match

from kvplane.errors import KvplaneError, Unauthorized

__all__ = [
    "HTTP_METHODS",
    "INVALID",
    "allowed_methods",
    "error_body",
    "install_error_handlers",
    "openai_error_body",
    "route_error_body",
    "serves",
    "validation_message",
]

log = logging.getLogger(__name__)


def error_body(exc: KvplaneError) -> dict[str, Any]:
    """``{"error": title, "message": text, **details}``."""
    return {"error": exc.title, "message": str(exc), **exc.details}


def openai_error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """The error body of the OpenAI-compatible servers (kvplane serve, kvplane router), as
    vLLM writes it: ``{"error": {"message", "type", "param", "code"}}``, ``type`` named
    after the status (``BadRequestError``, ``NotFoundError``, ``ServiceUnavailableError``)."""
    try:
        kind = HTTPStatus(status).phrase.replace(" ", "").replace("-", "")
    except ValueError:
        kind = "Unknown"
    kind = kind if kind.endswith("Error") else kind + "Error"
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def route_error_body(detail: str, method: str, path: str) -> dict[str, Any]:
    """The error body of a call no route serves as asked (404, 405), ``detail`` its title."""
    return {"error": detail, "message": f"{method} {path}: {detail}"}


#: The title of a 400 for a request that does not validate.
INVALID = "Invalid parameters"


def validation_message(errors: Iterable[Mapping[str, Any]], within: tuple[str, ...] = ()) -> str:
    """Each of pydantic's ``errors`` as ``field.path: what is wrong``, joined by ``; ``;
    ``within`` goes before each path (``("body",)``, as FastAPI writes a body's)."""
    problems = "; ".join(
        f"{'.'.join(str(p) for p in (*within, *err.get('loc', ())))}: {err.get('msg', 'invalid')}"
        for err in errors
    )
    return problems or "invalid request"


#: The methods a 405's ``Allow`` can name.
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")


def serves(routes: Sequence[BaseRoute], method: str, path: str) -> bool:
    """Whether one of ``routes`` serves ``method`` on ``path``. Asked of each route's own
    ``matches``, which sees into included routers (FastAPI keeps those as one route each,
    with no ``methods`` of their own)."""
    scope = {"type": "http", "method": method, "path": path}
    return any(route.matches(scope)[0] is Match.FULL for route in routes)


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app serves on the request's path. Starlette's 405 names
    only the first route that matched the path, so ``GET /conf`` hid ``POST /conf``."""
    routes = request.app.router.routes
    return [m for m in HTTP_METHODS if serves(routes, m, request.url.path)]


def install_error_handlers(app: FastAPI, what: str) -> None:
    """Map exceptions to the error body on ``app``; ``what`` names the API in the log line
    of an unexpected failure ("internal API", "controller")."""

    @app.exception_handler(KvplaneError)
    async def kvplane_error(request: Request, exc: KvplaneError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
        return JSONResponse(error_body(exc), status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        body = {"error": INVALID, "message": validation_message(exc.errors())}
        return JSONResponse(body, status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(request))
        body = route_error_body(exc.detail, request.method, request.url.path)
        return JSONResponse(body, status_code=exc.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s %s failed", what, request.method, request.url.path)
        return JSONResponse(
            {"error": "Internal error", "message": f"{type(exc).__name__}: {exc}"},
            status_code=500,
        )
