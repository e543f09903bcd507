"""/bypass/*: skip storage tiers at runtime (excluded from contains, put and get)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from kvplane.api.deps import Storage
from kvplane.api.responses import Success
from kvplane.engine.storage_manager import StorageManager
from kvplane.errors import BadRequest
from kvplane.web.openapi import CHOICES, error_responses, linked, query_link

__all__ = ["BypassChange", "BypassList", "router"]

router = APIRouter()


class BypassList(Success):
    bypassed_backends: list[str]
    all_backends: list[str]


class BypassChange(Success):
    backend_name: str
    bypassed: bool
    was_already_bypassed: bool | None = None
    was_bypassed: bool | None = None
    bypassed_backends: list[str]


def check_backend(storage: StorageManager, name: str) -> None:
    """400 "Unknown backend" naming the available ones."""
    if name not in storage.backends:
        raise BadRequest(
            f"Backend {name!r} not found. Available: {list(storage.backends)}",
            title="Unknown backend",
        )


# Links for schemathesis's stateful phase: from the tiers listed to bypassing one, from a
# bypass to lifting it.
_FIRST_TIER = "$response.body#/all_backends/0"


@router.get(
    "/bypass/list",
    responses=linked(
        BypassAdd=query_link("bypass_add", "bypass the first tier", backend_name=_FIRST_TIER),
        BypassRemove=query_link(
            "bypass_remove", "stop bypassing the first tier", backend_name=_FIRST_TIER
        ),
    ),
)
def bypass_list(storage: Storage) -> BypassList:
    return BypassList(bypassed_backends=storage.bypassed, all_backends=list(storage.backends))


BackendName = Annotated[
    str, Query(description="one of this engine's tiers", json_schema_extra={CHOICES: "backends"})
]


@router.put(
    "/bypass/add",
    response_model_exclude_none=True,
    responses={
        **error_responses(400),
        **linked(
            BypassRemove=query_link(
                "bypass_remove", "stop bypassing it", backend_name="$response.body#/backend_name"
            )
        ),
    },
)
def bypass_add(storage: Storage, backend_name: BackendName) -> BypassChange:
    check_backend(storage, backend_name)
    was = storage.bypass(backend_name)
    return BypassChange(
        backend_name=backend_name,
        bypassed=True,
        was_already_bypassed=was,
        bypassed_backends=storage.bypassed,
    )


@router.put("/bypass/remove", response_model_exclude_none=True, responses=error_responses(400))
def bypass_remove(storage: Storage, backend_name: BackendName) -> BypassChange:
    check_backend(storage, backend_name)
    was = storage.unbypass(backend_name)
    return BypassChange(
        backend_name=backend_name,
        bypassed=False,
        was_bypassed=was,
        bypassed_backends=storage.bypassed,
    )
