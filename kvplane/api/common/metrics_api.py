"""GET /metrics: the engine's Prometheus registry in the text exposition format."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from kvplane.api.deps import Ctx

__all__ = ["router"]

router = APIRouter()


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(ctx: Ctx) -> Response:
    registry = ctx.engine.metrics.registry if ctx.engine is not None else CollectorRegistry()
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
