"""Building the FastAPI app of one internal API server (one per process role)."""

from __future__ import annotations

from fastapi import Depends, FastAPI

import kvplane
from kvplane.api.context import ApiContext
from kvplane.api.deps import check_token
from kvplane.api.discovery import CATEGORIES, discover_routers
from kvplane.api.openapi import describe_process
from kvplane.web.errors import install_error_handlers
from kvplane.web.openapi import install_openapi

__all__ = ["build_app"]


def build_app(ctx: ApiContext, categories: tuple[str, ...] = CATEGORIES) -> FastAPI:
    """A fresh app for ``ctx``: discovered routers, the token guard (declared in the
    OpenAPI document when a token is set), the error handlers."""
    app = FastAPI(
        title=f"kvplane internal API ({ctx.role})",
        version=kvplane.__version__,
        dependencies=[Depends(check_token)],
        generate_unique_id_function=lambda route: route.name,
    )
    app.state.ctx = ctx
    install_error_handlers(app, "internal API")
    for found in discover_routers(categories):
        app.include_router(found.router, tags=[found.category])
    install_openapi(app, describe_process(ctx))
    return app
