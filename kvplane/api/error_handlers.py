"""One place that turns exceptions into the seeds' JSON error bodies."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from kvplane.api.responses import error_body
from kvplane.errors import KvplaneError, Unauthorized

__all__ = ["install_error_handlers"]

log = logging.getLogger(__name__)


def install_error_handlers(app: FastAPI) -> None:
    """Domain errors keep their status code; bad parameters are 400; the rest is 500."""

    @app.exception_handler(KvplaneError)
    async def kvplane_error(request: Request, exc: KvplaneError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
        return JSONResponse(error_body(exc), status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', 'invalid')}"
            for err in exc.errors()
        )
        return JSONResponse({"error": "Invalid parameters", "message": problems}, status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(
            {"error": exc.detail, "message": f"{request.method} {request.url.path}: {exc.detail}"},
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal API %s %s failed", request.method, request.url.path)
        return JSONResponse(
            {"error": "Internal error", "message": f"{type(exc).__name__}: {exc}"},
            status_code=500,
        )
