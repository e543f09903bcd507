"""The router's HTTP front: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``,
``/health``, ``/metrics``. Every error has OpenAI's body (``{"error": {...}}``); the
checker and the heartbeat to the controller run beside the server for the app's lifetime."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

import kvplane
from kvplane.errors import BadRequest, KvplaneError
from kvplane.router.heartbeat import Reporter
from kvplane.router.metrics import RouterMetrics
from kvplane.router.pool import Pool, parse_backend
from kvplane.router.proxy import forward
from kvplane.router.service import Router
from kvplane.router.settings import RouterConfig, weights_of
from kvplane.router.upstream import Checker, ControllerClient, describe
from kvplane.web.errors import openai_error_body

__all__ = ["create_app"]

log = logging.getLogger("kvplane.router")


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(openai_error_body(status, message, param), status_code=status)


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def create_app(config: RouterConfig) -> FastAPI:
    specs = [parse_backend(b) for b in config.backends]
    pool = Pool(config.eject_after)
    for spec in specs:
        pool.add(spec, from_flag=True)
    metrics = RouterMetrics(lambda: pool)
    timeout = httpx.Timeout(config.request_timeout_s, connect=config.connect_timeout_s)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    client = httpx.AsyncClient(timeout=timeout, limits=limits)
    controller = (
        ControllerClient(config.controller, client, metrics, config.controller_token)
        if config.controller
        else None
    )
    reporter = Reporter(controller, pool, metrics, config) if controller is not None else None
    router = Router(config, pool, controller, client, metrics, weights_of(config))
    checker = Checker(
        pool,
        client,
        controller,
        flags=specs,
        discover=config.discover,
        interval=config.poll_interval_s,
        discovery_interval=config.discovery_interval_s,
        timeout=max(config.connect_timeout_s, 1.0),
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await checker.discover()
        await checker.check_all()
        tasks = [asyncio.create_task(checker.run(), name="kvplane-router-checker")]
        if reporter is not None:
            tasks.append(asyncio.create_task(reporter.run(), name="kvplane-router-heartbeat"))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await client.aclose()
            if controller is not None:
                controller.close()

    app = FastAPI(title="kvplane router", version=kvplane.__version__, lifespan=lifespan)
    app.state.router = router

    @app.exception_handler(KvplaneError)
    async def _domain_error(_: Request, exc: KvplaneError) -> JSONResponse:
        param = "model" if exc.status_code == 404 else None
        return _error(exc.status_code, str(exc), param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    async def _route(request: Request, kind: str, path: str) -> Response:
        raw = await request.body()
        body = _parse(raw)
        session = router.session_of(request.headers, body)
        route = await router.decide(kind, body, session)
        return await forward(router, route, path, raw, request.headers, session)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _route(request, "completions", "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _route(request, "chat", "/v1/chat/completions")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        cards = [{"id": m, "object": "model", "owned_by": "kvplane"} for m in sorted(pool.models())]
        return {"object": "list", "data": cards}

    @app.get("/health")
    async def health() -> JSONResponse:
        up = bool(pool.admitted())
        body = {
            "ok": up,
            "controller": controller.current if controller is not None else None,
            "backends": describe(pool),
        }
        return JSONResponse(body, status_code=200 if up else 503)

    @app.get("/metrics")
    async def metrics_page() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
