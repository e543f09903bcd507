"""On/off features with the seeds' enable/disable/status shape (freeze, hot cache).

``PUT {prefix}/enable``, ``PUT {prefix}/disable`` and ``GET {prefix}/status`` answer
``{"status": "success", <field>: bool, "message": "<Label> enabled successfully"}``
(status: ``"<Label> is enabled"``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter

from kvplane.api.context import ApiContext
from kvplane.api.deps import Ctx
from kvplane.api.responses import success

__all__ = ["add_switch_routes"]


def add_switch_routes(
    router: APIRouter,
    prefix: str,
    *,
    field: str,
    label: str,
    read: Callable[[ApiContext], bool],
    write: Callable[[ApiContext, bool], None],
    responses: dict[int | str, dict[str, Any]] | None = None,
) -> None:
    """Add the three routes of one switch to ``router``; ``responses``: the error answers
    ``read`` and ``write`` may give, for the OpenAPI document."""

    def answer(value: bool, message: str) -> dict[str, Any]:
        return success(**{field: value}, message=message)

    def state(value: bool) -> str:
        return "enabled" if value else "disabled"

    @router.put(f"{prefix}/enable", name=f"{field}_enable", responses=responses)
    def enable(ctx: Ctx) -> dict[str, Any]:
        write(ctx, True)
        return answer(True, f"{label} enabled successfully")

    @router.put(f"{prefix}/disable", name=f"{field}_disable", responses=responses)
    def disable(ctx: Ctx) -> dict[str, Any]:
        write(ctx, False)
        return answer(False, f"{label} disabled successfully")

    @router.get(f"{prefix}/status", name=f"{field}_status", responses=responses)
    def status(ctx: Ctx) -> dict[str, Any]:
        value = read(ctx)
        return answer(value, f"{label} is {state(value)}")
