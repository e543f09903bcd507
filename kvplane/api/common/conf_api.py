"""GET/POST /conf: read and change the engine configuration (secrets always masked).

``POST /conf`` is the process's one runtime path to a new config:
:meth:`~kvplane.config.ConfigStore.update` validates it, swaps it in and tells the
subscribers (tier capacity, loggers, chunk statistics)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from kvplane.api.deps import Config, ConfigStoreDep
from kvplane.errors import BadRequest

__all__ = ["router", "split_names"]

router = APIRouter()


def split_names(names: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [n.strip() for n in names.split(",") if n.strip()]


def select(values: dict[str, Any], names: str | None, what: str) -> dict[str, Any]:
    """``values`` restricted to the comma-separated ``names``; unknown names are a 400."""
    if names is None:
        return values
    wanted = split_names(names)
    unknown = [n for n in wanted if n not in values]
    if unknown:
        raise BadRequest(
            f"Unknown {what} name(s) {unknown}; known: {sorted(values)}", title=f"Unknown {what}"
        )
    return {n: values[n] for n in wanted}


@router.get("/conf")
def get_conf(config: Config, names: str | None = None) -> dict[str, Any]:
    return select(config.to_dict(), names, "config")


@router.post("/conf")
async def post_conf(request: Request, store: ConfigStoreDep) -> JSONResponse:
    """Each key is applied or refused alone; any refusal makes the answer a 400."""
    try:
        changes = await request.json()
    except ValueError:
        raise BadRequest("The request body is not valid JSON", title="Invalid JSON") from None
    if not isinstance(changes, dict):
        raise BadRequest("The body must be a JSON object of config names to values")
    # Subscribers may resize tiers or reconfigure loggers: keep them off the event loop.
    result = await run_in_threadpool(store.update, changes)
    masked = result.config.to_dict()
    body: dict[str, Any] = {"updated": {name: masked[name] for name in result.updated}}
    if result.errors:
        body["errors"] = result.errors
        return JSONResponse(body, status_code=400)
    return JSONResponse(body)
