"""GET/POST /conf: read and change the engine configuration (secrets always masked).

``POST /conf`` is the process's one runtime path to a new config:
:meth:`~kvplane.config.ConfigStore.update` validates it, swaps it in and tells the
subscribers (tier capacity, loggers, chunk statistics)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from kvplane.api.deps import Config, ConfigStoreDep
from kvplane.config import key_specs
from kvplane.errors import BadRequest
from kvplane.web.openapi import NAMES, error_responses

__all__ = ["ConfUpdate", "names_query", "router", "split_names"]

router = APIRouter()


def split_names(names: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]`` (spaces around a name are dropped, nothing else:
    :func:`kvplane.api.openapi.names_pattern` documents exactly this)."""
    return [n.strip(" ") for n in names.split(",") if n.strip(" ")]


def names_query(what: str) -> Any:
    """The ``names`` query parameter: comma-separated names of this process's ``what``."""
    return Query(
        description=f"comma-separated {what} names (default: all)",
        json_schema_extra={NAMES: what},
    )


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


@router.get("/conf", responses=error_responses(400))
def get_conf(
    config: Config, names: Annotated[str | None, names_query("config")] = None
) -> dict[str, Any]:
    return select(config.to_dict(), names, "config")


class ConfUpdate(BaseModel):
    """The answer of ``POST /conf``, 200 or (any key refused) 400."""

    updated: dict[str, Any] = Field(description="accepted keys and their new values")
    errors: dict[str, str] = Field(default_factory=dict, description="refused keys and why")


def _changes_schema() -> dict[str, Any]:
    """The body: runtime-mutable keys of the config table, each value parsed by its key's
    rule (the description); any other name is refused as "Unknown config" or "Config is not
    mutable at runtime"."""
    mutable = [spec for spec in key_specs() if spec.mutable]
    return {
        "type": "object",
        "description": "config names to new values (runtime-mutable keys only)",
        "properties": {
            spec.name: {"description": f"{spec.kind.name}: {spec.help}"} for spec in mutable
        },
        "additionalProperties": False,
        "examples": [{"min_retrieve_tokens": 32}],
    }


_CONF_UPDATE_REF = {"$ref": "#/components/schemas/ConfUpdate"}


@router.post(
    "/conf",
    response_model=ConfUpdate,
    responses={
        400: {
            "description": "some key refused (a ConfUpdate), or a body that is not a JSON object",
            "content": {
                "application/json": {
                    "schema": {
                        "anyOf": [_CONF_UPDATE_REF, {"$ref": "#/components/schemas/ErrorBody"}]
                    }
                }
            },
        }
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _changes_schema()}},
        }
    },
)
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
