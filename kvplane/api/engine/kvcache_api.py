"""/cache/kvcache/*: inspect the engine's paged KV caches (checksums, shapes) and switch
slot-mapping logging of store/retrieve calls."""

from __future__ import annotations

from typing import Annotated

import torch
from fastapi import APIRouter, Query
from pydantic import BaseModel

from kvplane.api.deps import EngineDep, SlotRecordingDep
from kvplane.api.responses import Success
from kvplane.api.slot_syntax import parse_slot_mapping, to_ranges
from kvplane.engine.kv_layout import kv_checksums
from kvplane.errors import BadRequest

__all__ = ["CheckResponse", "InfoResponse", "LayerInfo", "RecordSlotResponse", "router"]

router = APIRouter()


class CheckResponse(Success):
    slot_mapping_ranges: list[tuple[int, int]]
    chunk_size: int
    num_chunks: int
    chunk_checksums: list[str] | dict[str, list[str]]
    layerwise: bool


class RecordSlotResponse(Success):
    kvcache_check_log_enabled: bool


class LayerInfo(BaseModel):
    shape: list[int]
    dtype: str
    device: str


class InfoResponse(Success):
    num_layers: int
    num_slots: int
    layers: dict[str, LayerInfo]


@router.get("/cache/kvcache/check")
def check(
    engine: EngineDep,
    slot_mapping: Annotated[str, Query(description='e.g. "1,2,3,[9,12],17"')],
    chunk_size: Annotated[int, Query(ge=1)],
    layerwise: bool = False,
) -> CheckResponse:
    """MD5 of the KV at the slots, per chunk of ``chunk_size`` slots (per layer if asked)."""
    slots = parse_slot_mapping(slot_mapping, limit=engine.layout.num_slots)
    checksums = kv_checksums(
        engine.kv_caches,
        torch.tensor(slots, dtype=torch.long),
        chunk_size,
        layerwise,
        layout=engine.layout,
    )
    return CheckResponse(
        slot_mapping_ranges=to_ranges(slots),
        chunk_size=chunk_size,
        num_chunks=-(-len(slots) // chunk_size),
        chunk_checksums=checksums,
        layerwise=layerwise,
    )


@router.post("/cache/kvcache/record_slot")
def record_slot(recording: SlotRecordingDep, enabled: str | None = None) -> RecordSlotResponse:
    """``enabled=true|false`` switches logging; without it, reports the current state."""
    if enabled is not None:
        value = enabled.strip().lower()
        if value not in ("true", "false"):
            raise BadRequest(f"enabled must be 'true' or 'false', got {enabled!r}")
        recording.set(value == "true")
    return RecordSlotResponse(kvcache_check_log_enabled=recording.enabled)


@router.get("/cache/kvcache/info")
def info(engine: EngineDep) -> InfoResponse:
    layers = {
        f"layer_{i}": LayerInfo(shape=list(t.shape), dtype=str(t.dtype), device=str(t.device))
        for i, t in enumerate(engine.kv_caches)
    }
    return InfoResponse(num_layers=len(layers), num_slots=engine.layout.num_slots, layers=layers)
