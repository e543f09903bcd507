"""Finding the internal API's routers: every ``*_api.py`` module of a category package.

Adding a file adds endpoints. Modules are imported in sorted order so that route order (and
therefore which of two clashing routes wins) is the same on every machine; a module that
does not define ``router = APIRouter()`` stops start-up instead of being skipped.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import NamedTuple

from fastapi import APIRouter

from kvplane.errors import KvplaneError

__all__ = ["CATEGORIES", "DiscoveredRouter", "discover_routers"]

CATEGORIES = ("kvplane.api.common", "kvplane.api.engine")


class DiscoveredRouter(NamedTuple):
    category: str
    module: str
    router: APIRouter


def discover_routers(categories: tuple[str, ...] = CATEGORIES) -> list[DiscoveredRouter]:
    """The router of every ``*_api`` module of each category package, sorted by module."""
    found: list[DiscoveredRouter] = []
    for category in categories:
        package = importlib.import_module(category)
        names = sorted(
            info.name
            for info in pkgutil.iter_modules(package.__path__)
            if info.name.endswith("_api")
        )
        for name in names:
            module_name = f"{category}.{name}"
            router = getattr(importlib.import_module(module_name), "router", None)
            if not isinstance(router, APIRouter):
                raise KvplaneError(
                    f"internal API module {module_name} must define 'router = APIRouter()'"
                )
            found.append(DiscoveredRouter(category.rsplit(".", 1)[-1], module_name, router))
    return found
