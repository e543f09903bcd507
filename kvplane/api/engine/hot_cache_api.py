"""/hot_cache/*: the CPU tier on or off; off drops its entries and keeps no new ones."""

from __future__ import annotations

from fastapi import APIRouter

from kvplane.api.context import ApiContext
from kvplane.api.deps import get_cpu_tier
from kvplane.api.switch import add_switch_routes
from kvplane.web.openapi import error_responses

__all__ = ["router"]

router = APIRouter()


def _read(ctx: ApiContext) -> bool:
    return get_cpu_tier(ctx).hot_cache


def _write(ctx: ApiContext, value: bool) -> None:
    get_cpu_tier(ctx).set_hot_cache(value)


add_switch_routes(
    router,
    "/hot_cache",
    field="hot_cache",
    label="Hot cache",
    read=_read,
    write=_write,
    responses=error_responses(400),  # an engine without a CPU tier
)
