"""The router's HTTP front: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``,
``/health``, ``/metrics``. Every error has OpenAI's body (``{"error": {...}}``); the
checker and the heartbeat to the controller run beside the server for the app's lifetime.

The two POST routes are served by :class:`CompletionRoutes`, raw ASGI in front of FastAPI:
its routing, request and response objects and middleware cost more CPU per request than the
router's whole decision; everything else is FastAPI's."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

import kvplane
from kvplane.errors import BadRequest, KvplaneError
from kvplane.router.heartbeat import Reporter
from kvplane.router.metrics import RouterMetrics
from kvplane.router.pool import Pool, parse_backend
from kvplane.router.proxy import forward, send_error
from kvplane.router.service import Router
from kvplane.router.settings import RouterConfig, weights_of
from kvplane.router.upstream import Checker, ControllerClient, describe
from kvplane.web.asgi import receive_body
from kvplane.web.errors import openai_error_body

__all__ = ["create_app"]

log = logging.getLogger("kvplane.router")


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(openai_error_body(status, message, param), status_code=status)


_decode = msgspec.json.Decoder().decode


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        body = _decode(raw)
    except msgspec.DecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


#: The routes :class:`CompletionRoutes` serves: path -> the request's kind.
_KINDS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}


class CompletionRoutes:
    """ASGI: ``POST /v1/completions`` and ``POST /v1/chat/completions`` decided and
    forwarded by ``router``; anything else (other methods on them included) to ``app``."""

    def __init__(self, app: ASGIApp, router: Router) -> None:
        self.app = app
        self.router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = _KINDS.get(scope["path"]) if scope["type"] == "http" else None
        if kind is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        raw = await receive_body(receive)
        if raw is None:  # the client went away
            return
        router, headers = self.router, scope["headers"]
        try:
            body = _parse(raw)
            session = router.session_of(headers, body)
            route = await router.decide(kind, body, session)
            await forward(router, route, scope["path"], raw, headers, session, receive, send)
        except KvplaneError as exc:  # raised before any byte of the answer went out
            param = "model" if exc.status_code == 404 else None
            await send_error(send, exc.status_code, str(exc), param)


def create_app(config: RouterConfig) -> ASGIApp:
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
            router.close()
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

    @app.post("/v1/completions")
    @app.post("/v1/chat/completions")
    async def completions() -> None:
        """Served by :class:`CompletionRoutes` (declared for the 405 of other methods)."""
        raise AssertionError("POST completions are served in front of FastAPI")

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

    return CompletionRoutes(app, router)
