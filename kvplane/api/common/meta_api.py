"""GET /meta: who this engine is (model, rank, KV shape, role of this server)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter

from kvplane.api.common.conf_api import names_query, select
from kvplane.api.context import ApiContext
from kvplane.api.deps import Ctx
from kvplane.engine.engine import engine_metadata
from kvplane.web.openapi import error_responses

__all__ = ["router", "server_metadata"]

router = APIRouter()


def server_metadata(ctx: ApiContext) -> dict[str, Any]:
    """The engine's metadata (from the process's facts without an engine) plus this
    server's role."""
    if ctx.engine is not None:
        meta = ctx.engine.metadata()
    else:
        meta = engine_metadata(ctx.facts, ctx.config)
    return {**meta, "role": ctx.role, "index": ctx.index, "has_engine": ctx.engine is not None}


@router.get("/meta", responses=error_responses(400))
def get_meta(
    ctx: Ctx, names: Annotated[str | None, names_query("metadata")] = None
) -> dict[str, Any]:
    return select(server_metadata(ctx), names, "metadata")
