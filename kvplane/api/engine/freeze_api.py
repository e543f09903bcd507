"""/freeze/*: while frozen, stores are skipped, only the CPU tier is read and no admit/evict
events leave the engine (protects the CPU hot cache from changes); evictions meanwhile (a
clear) are held and reported when freeze is lifted."""

from __future__ import annotations

from fastapi import APIRouter

from kvplane.api.context import ApiContext
from kvplane.api.deps import get_storage
from kvplane.api.switch import add_switch_routes

__all__ = ["router"]

router = APIRouter()


def _read(ctx: ApiContext) -> bool:
    return get_storage(ctx).frozen


def _write(ctx: ApiContext, value: bool) -> None:
    get_storage(ctx).frozen = value


add_switch_routes(router, "/freeze", field="freeze", label="Freeze mode", read=_read, write=_write)
