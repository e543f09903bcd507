"""GET /meta: who this engine is (model, rank, KV shape, role of this server)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from kvplane.api.common.conf_api import select
from kvplane.api.context import ApiContext
from kvplane.api.deps import Ctx

__all__ = ["engine_metadata", "router"]

router = APIRouter()


def engine_metadata(ctx: ApiContext) -> dict[str, Any]:
    cfg = ctx.config
    kv_pairs = 1 if cfg.use_mla else 2
    kv_heads = 1 if cfg.use_mla else cfg.kv_num_heads
    return {
        "model_name": cfg.model_name,
        "world_size": cfg.world_size,
        "worker_id": cfg.worker_id,
        "is_first_rank": cfg.worker_id == 0,
        "instance_id": cfg.lmcache_instance_id,
        "kv_dtype": cfg.kv_dtype,
        "use_mla": cfg.use_mla,
        "chunk_size": cfg.chunk_size,
        # The original's kv_shape: (layers, K/V, tokens per chunk, heads, head size).
        "kv_shape": [cfg.kv_num_layers, kv_pairs, cfg.chunk_size, kv_heads, cfg.kv_head_size],
        "role": ctx.role,
        "index": ctx.index,
        "has_engine": ctx.runtime is not None,
    }


@router.get("/meta")
def get_meta(ctx: Ctx, names: str | None = None) -> dict[str, Any]:
    return select(engine_metadata(ctx), names, "metadata")
