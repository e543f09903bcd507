"""GET /meta: who this engine is (model, rank, KV shape, role of this server)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from kvplane.api.common.conf_api import select
from kvplane.api.context import ApiContext
from kvplane.api.deps import Ctx
from kvplane.engine.kv_layout import KVLayout

__all__ = ["engine_metadata", "router"]

router = APIRouter()


def engine_metadata(ctx: ApiContext) -> dict[str, Any]:
    """The engine's own metadata (config-derived without an engine) plus this server's role."""
    cfg = ctx.config
    if ctx.engine is not None:
        meta = ctx.engine.metadata()
    else:
        meta = {
            "model_name": cfg.model_name,
            "world_size": cfg.world_size,
            "worker_id": cfg.worker_id,
            "instance_id": cfg.lmcache_instance_id,
            "kv_dtype": cfg.kv_dtype,
            "kv_shape": list(KVLayout.from_config(cfg).chunk_shape(cfg.chunk_size)),
            "chunk_size": cfg.chunk_size,
            "use_mla": cfg.use_mla,
            "is_first_rank": cfg.worker_id == 0,
        }
    return {**meta, "role": ctx.role, "index": ctx.index, "has_engine": ctx.engine is not None}


@router.get("/meta")
def get_meta(ctx: Ctx, names: str | None = None) -> dict[str, Any]:
    return select(engine_metadata(ctx), names, "metadata")
