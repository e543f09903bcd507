"""/cache/kvcache/*: inspect the engine's paged KV caches (checksums, shapes) and switch
slot-mapping logging of store/retrieve calls."""

from __future__ import annotations

import re
from typing import Annotated

import torch
from fastapi import APIRouter, Query
from pydantic import BaseModel

from kvplane.api.deps import EngineDep, SlotRecordingDep
from kvplane.api.responses import Success
from kvplane.api.slot_syntax import SLOT_MAPPING_PATTERN, parse_slot_mapping, to_ranges
from kvplane.engine.kv.checksums import kv_checksums
from kvplane.errors import BadRequest
from kvplane.web.openapi import case_insensitive_pattern, error_responses, pair

__all__ = ["CheckResponse", "InfoResponse", "LayerInfo", "RecordSlotResponse", "router"]

router = APIRouter()


_SLOT = {"type": "integer", "minimum": 0}


class CheckResponse(Success):
    slot_mapping_ranges: list[
        Annotated[tuple[int, int], pair(_SLOT, _SLOT, "[first, last] slots of a run, inclusive")]
    ]
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


BOOL_PATTERN = case_insensitive_pattern(("true", "false"))


@router.get("/cache/kvcache/check", responses=error_responses(400))
def check(
    engine: EngineDep,
    slot_mapping: Annotated[
        str,
        Query(
            description='e.g. "1,2,3,[9,12],17"',
            json_schema_extra={"pattern": SLOT_MAPPING_PATTERN},
            examples=["0,1,[2,15]"],
        ),
    ],
    chunk_size: Annotated[int, Query(ge=1)],
    layerwise: bool = False,
) -> CheckResponse:
    """MD5 of the KV at the slots, per chunk of ``chunk_size`` slots (per layer if asked)."""
    slots = parse_slot_mapping(slot_mapping, limit=engine.layout.num_slots)
    checksums = kv_checksums(
        engine.layout,
        engine.kv_caches,
        torch.tensor(slots, dtype=torch.long),
        chunk_size,
        layerwise,
    )
    return CheckResponse(
        slot_mapping_ranges=to_ranges(slots),
        chunk_size=chunk_size,
        num_chunks=-(-len(slots) // chunk_size),
        chunk_checksums=checksums,
        layerwise=layerwise,
    )


@router.post("/cache/kvcache/record_slot", responses=error_responses(400))
def record_slot(
    recording: SlotRecordingDep,
    enabled: Annotated[
        str | None,
        Query(description="true or false, any case", json_schema_extra={"pattern": BOOL_PATTERN}),
    ] = None,
) -> RecordSlotResponse:
    """``enabled=true|false`` switches logging; without it, reports the current state."""
    if enabled is not None:
        if re.fullmatch(BOOL_PATTERN, enabled) is None:
            raise BadRequest(f"enabled must be 'true' or 'false', got {enabled!r}")
        recording.set(enabled.lower() == "true")
    return RecordSlotResponse(kvcache_check_log_enabled=recording.enabled)


@router.get("/cache/kvcache/info")
def info(engine: EngineDep) -> InfoResponse:
    layers = {
        f"layer_{i}": LayerInfo(shape=list(t.shape), dtype=str(t.dtype), device=str(t.device))
        for i, t in enumerate(engine.kv_caches)
    }
    return InfoResponse(num_layers=len(layers), num_slots=engine.layout.num_slots, layers=layers)
