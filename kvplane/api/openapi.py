"""What one internal API server's OpenAPI document says about its own process.

The routers are shared by every app, but some values only this process knows: the names of
its tiers (``backend_name``, ``locations``), of its config keys and metadata (``names``),
whether a bearer token guards it, whether it has an engine at all. A route marks such a
parameter with ``json_schema_extra={CHOICES: "backends"}`` (or ``NAMES``; both markers
are defined in :mod:`kvplane.web.openapi`), and
:func:`describe_process` writes this process's values into the served document: an ``enum``
for a choice, a ``pattern`` for a comma-separated list of names. The routes check the same
values, so the document and the server agree.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from kvplane.api.common.meta_api import server_metadata
from kvplane.api.context import ApiContext
from kvplane.web.auth import SAFE_METHODS, declare_bearer
from kvplane.web.openapi import CHOICES, NAMES, ErrorBody, OpenApi, operations

__all__ = ["describe_process", "names_pattern"]


def names_pattern(names: Iterable[str]) -> str:
    """A regex for ``names`` as :func:`kvplane.api.common.conf_api.split_names` reads a
    list: comma-separated, spaces around an item allowed, empty items skipped."""
    one = "(?:" + "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)) + ")"
    item = f"[ ]*(?:{one}[ ]*)?"
    return f"^{item}(?:,{item})*$"


def _values(ctx: ApiContext) -> dict[str, list[str]]:
    backends = list(ctx.engine.storage.backends) if ctx.engine is not None else []
    return {
        "backends": backends,
        "config": sorted(ctx.config.to_dict()),
        "metadata": sorted(server_metadata(ctx)),
    }


def _strings(schema: dict[str, Any]) -> Iterable[dict[str, Any]]:
    """The string schemas in ``schema``: itself, array items, ``anyOf`` branches."""
    if schema.get("type") == "string":
        yield schema
    if isinstance(schema.get("items"), dict):
        yield from _strings(schema["items"])
    for branch in schema.get("anyOf", []):
        yield from _strings(branch)


def describe_process(ctx: ApiContext) -> Callable[[OpenApi], None]:
    """The refinement :func:`kvplane.web.openapi.install_openapi` applies for ``ctx``."""

    def refine(document: OpenApi) -> None:
        values = _values(ctx)
        if ctx.config.internal_api_server_token:
            declare_bearer(document, lambda method, path: method not in SAFE_METHODS)
        for _, _, operation in operations(document):
            for parameter in operation.get("parameters", []):
                schema = parameter.get("schema", {})
                choices = schema.pop(CHOICES, None)
                names = schema.pop(NAMES, None)
                for string in _strings(schema):
                    if choices is not None:
                        string["enum"] = values[choices]
                    if names is not None:
                        string["pattern"] = names_pattern(values[names])
            responses = operation["responses"]
            if ctx.engine is None and "engine" in operation.get("tags", ()):
                responses.setdefault("503", _error("This process has no cache engine"))

    return refine


def _error(description: str) -> dict[str, Any]:
    schema = {"$ref": f"#/components/schemas/{ErrorBody.__name__}"}
    return {"description": description, "content": {"application/json": {"schema": schema}}}
