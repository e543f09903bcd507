"""GET /cache/keys: the chunks this engine rank holds, per tier.

The same set the controller worker resends when it (re)registers, so it is what the
controller's index should say about this rank: operators and tests compare the two.
"""

from __future__ import annotations

from fastapi import APIRouter

from kvplane.api.deps import EngineDep
from kvplane.api.responses import Success

__all__ = ["KeysResponse", "router"]

router = APIRouter()


class KeysResponse(Success):
    model_name: str
    worker_id: int
    chunk_size: int
    #: tier name -> the chained prefix hashes (:func:`kvplane.keys.chunk_hashes`) of the
    #: chunks of this model and rank it holds; every tier, in order, even when empty
    chunk_hashes: dict[str, list[int]]


@router.get("/cache/keys")
def keys(engine: EngineDep) -> KeysResponse:
    return KeysResponse(
        model_name=engine.facts.model_name,
        worker_id=engine.facts.worker_id,
        chunk_size=engine.config.chunk_size,
        chunk_hashes=engine.own_chunks(),
    )
