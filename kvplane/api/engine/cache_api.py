"""/cache/clear, /cache/store, /cache/retrieve: drive the engine with mock or given tokens.

Store and retrieve drive the engine's own paged KV caches through the same contract as every
host (:class:`kvplane.engine.kv_api.KVApi`). Tokens come from ``tokens_mock``
(``"start,end"``: tokens start..end-1) or ``tokens_input`` (comma-separated token ids); the
KV goes to / comes from ``slot_mapping`` (the slot syntax of ``/cache/kvcache/check``),
by default slots 0..n-1.
"""

from __future__ import annotations

import re
from typing import Annotated

import torch
from fastapi import APIRouter, Query

from kvplane.api.context import ApiContext
from kvplane.api.deps import Ctx, EngineDep, Storage, engine_of
from kvplane.api.engine.bypass_api import check_backend
from kvplane.api.responses import Success
from kvplane.api.slot_syntax import SLOT_MAPPING_PATTERN, parse_slot_mapping
from kvplane.errors import BadRequest
from kvplane.keys import MAX_TOKEN_ID, TOKEN_ID_RANGE
from kvplane.web.openapi import CHOICES, error_responses, linked, query_link

__all__ = [
    "ClearResponse",
    "RetrieveResponse",
    "StoreResponse",
    "parse_tokens",
    "router",
]


router = APIRouter()


class ClearResponse(Success):
    num_removed: int


class StoreResponse(Success):
    num_tokens: int  # tokens asked for
    num_stored_tokens: int  # leading tokens whose chunks are now held
    num_new_chunks: int


class RetrieveResponse(Success):
    num_tokens: int  # tokens asked for
    num_retrieved: int  # leading tokens loaded into the KV caches


_ID = "[ ]*[0-9]+[ ]*"
TOKENS_MOCK_PATTERN = f"^{_ID},{_ID}$"
TOKENS_INPUT_PATTERN = f"^{_ID}(?:,{_ID})*$"
"""What ``tokens_mock`` and ``tokens_input`` look like; the parser checks these very patterns,
so the OpenAPI document and the server agree on every string."""


def parse_tokens(
    tokens_mock: str | None, tokens_input: str | None, *, limit: int | None = None
) -> list[int]:
    """The request's tokens. Raises BadRequest for none, both, a malformed value, a token id
    outside :data:`~kvplane.keys.TOKEN_ID_RANGE`, or more than ``limit`` tokens (checked before a mock range is built)."""
    if (tokens_mock is None) == (tokens_input is None):
        raise BadRequest(
            "Must specify either tokens_input or tokens_mock", title="Missing parameters"
        )
    if tokens_mock is not None:
        if re.fullmatch(TOKENS_MOCK_PATTERN, tokens_mock) is None:
            raise BadRequest(
                f"tokens_mock must be two comma-separated integers 'start,end', got {tokens_mock!r}"
            )
        start, end = (int(p) for p in tokens_mock.split(","))
        if not 0 <= start < end <= MAX_TOKEN_ID + 1:
            raise BadRequest(
                f"tokens_mock needs 0 <= start < end <= {MAX_TOKEN_ID + 1}, got {tokens_mock!r}"
            )
        _check_count(end - start, limit)
        return list(range(start, end))
    text = tokens_input or ""
    if re.fullmatch(TOKENS_INPUT_PATTERN, text) is None:
        raise BadRequest(
            f"tokens_input must be comma-separated token ids in {TOKEN_ID_RANGE}, "
            f"got {tokens_input!r}"
        )
    tokens = [int(t) for t in text.split(",")]
    beyond = next((t for t in tokens if t > MAX_TOKEN_ID), None)
    if beyond is not None:  # before numpy, which would take it for a float
        raise BadRequest(f"tokens_input: token ids must be in {TOKEN_ID_RANGE}, got {beyond}")
    _check_count(len(tokens), limit)
    return tokens


def _check_count(num_tokens: int, limit: int | None) -> None:
    if limit is not None and num_tokens > limit:
        raise BadRequest(f"{num_tokens} tokens do not fit the paged cache ({limit} slots)")


def slots_for(ctx: ApiContext, slot_mapping: str | None, num_tokens: int) -> torch.Tensor:
    """The slots of ``num_tokens`` tokens: ``slot_mapping`` or 0..n-1."""
    num_slots = engine_of(ctx).layout.num_slots
    if slot_mapping is None:
        if num_tokens > num_slots:
            raise BadRequest(f"{num_tokens} tokens do not fit the paged cache ({num_slots} slots)")
        return torch.arange(num_tokens)
    slots = parse_slot_mapping(slot_mapping, limit=num_slots)
    if len(slots) != num_tokens:
        raise BadRequest(f"slot_mapping names {len(slots)} slots for {num_tokens} tokens")
    return torch.tensor(slots, dtype=torch.long)


TokensMock = Annotated[
    str | None,
    Query(
        description='"start,end": tokens start..end-1 (either this or tokens_input)',
        json_schema_extra={"pattern": TOKENS_MOCK_PATTERN},
        examples=["0,32"],
    ),
]
TokensInput = Annotated[
    str | None,
    Query(
        description=f"comma-separated token ids in {TOKEN_ID_RANGE} (either this or tokens_mock)",
        json_schema_extra={"pattern": TOKENS_INPUT_PATTERN},
    ),
]
SlotMapping = Annotated[
    str | None,
    Query(
        description='e.g. "0,1,[8,15]": one slot per token (default 0..n-1)',
        json_schema_extra={"pattern": SLOT_MAPPING_PATTERN},
    ),
]


# A store or retrieve the engine cannot do: tokens or slots it has no room for, a frozen engine.
_RUN_ERRORS = error_responses(400, 409)


@router.delete("/cache/clear", responses=error_responses(400, 409))
def clear(
    storage: Storage,
    locations: Annotated[
        list[str] | None,
        Query(description="tiers to clear (default: all)", json_schema_extra={CHOICES: "backends"}),
    ] = None,
) -> ClearResponse:
    for name in locations or []:
        check_backend(storage, name)
    return ClearResponse(num_removed=storage.clear(locations or None).num_chunks)


def _request_tokens(
    ctx: ApiContext, tokens_mock: str | None, tokens_input: str | None, slot_mapping: str | None
) -> tuple[list[int], torch.Tensor]:
    """The tokens a store/retrieve request names and the slots they use (400 if unusable)."""
    tokens = parse_tokens(tokens_mock, tokens_input, limit=engine_of(ctx).layout.num_slots)
    return tokens, slots_for(ctx, slot_mapping, len(tokens))


@router.post(
    "/cache/store",
    responses={
        **_RUN_ERRORS,
        **linked(
            Retrieve=query_link(
                "retrieve",
                "load the stored tokens back into the same slots",
                tokens_input="$request.query.tokens_input",
                slot_mapping="$request.query.slot_mapping",
            )
        ),
    },
)
def store(
    ctx: Ctx,
    engine: EngineDep,
    tokens_mock: TokensMock = None,
    tokens_input: TokensInput = None,
    slot_mapping: SlotMapping = None,
) -> StoreResponse:
    tokens, slots = _request_tokens(ctx, tokens_mock, tokens_input, slot_mapping)
    result = engine.cache_engine.store(tokens, engine.kv_caches, slots)
    return StoreResponse(
        num_tokens=len(tokens),
        num_stored_tokens=result.num_tokens,
        num_new_chunks=result.num_chunks,
    )


@router.post("/cache/retrieve", responses=_RUN_ERRORS)
def retrieve(
    ctx: Ctx,
    engine: EngineDep,
    tokens_mock: TokensMock = None,
    tokens_input: TokensInput = None,
    slot_mapping: SlotMapping = None,
) -> RetrieveResponse:
    tokens, slots = _request_tokens(ctx, tokens_mock, tokens_input, slot_mapping)
    result = engine.cache_engine.retrieve(tokens, engine.kv_caches, slots)
    return RetrieveResponse(num_tokens=len(tokens), num_retrieved=result.num_tokens)
