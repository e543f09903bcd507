"""The dashboard's HTTP side: ``GET /`` and ``GET /dashboard`` (pages), their assets, and
``GET /dashboard/data`` (the JSON the page polls, in the OpenAPI). Read-only: nothing here
changes the cluster.

The pages and their script and stylesheet ship inside the package
(``kvplane/controller/dashboard/static/``) and are read once at start-up: no CDN, no build
step, so the page works on a machine with no way out. A background task on the event loop
samples the controller's totals every ``interval_s`` for the rate plots.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from kvplane.controller.cluster import Cluster
from kvplane.controller.dashboard.history import History
from kvplane.controller.dashboard.snapshot import (
    ClusterView,
    DashboardData,
    build_snapshot,
    sample_of,
)
from kvplane.controller.overview import by_instance, copy_workers
from kvplane.controller.routers import RouterTable
from kvplane.controller.routers_api import router_view
from kvplane.errors import NotFound

__all__ = ["Dashboard", "capture"]

_ASSETS = {  # name under /dashboard/ -> media type
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
_NO_CACHE = {"Cache-Control": "no-cache"}


def _static(name: str) -> str:
    return (files("kvplane.controller.dashboard") / "static" / name).read_text("utf-8")


def capture(cluster: Cluster) -> ClusterView:
    """Copy what the dashboard shows out of the cluster, holding its lock only for the
    registry and index reads."""
    now = cluster.clock()
    operations = cluster.events.recent_operations()
    lookups = cluster.lookup_stats.totals()
    core = cluster.core
    with cluster.lock:
        copied = copy_workers(core)
        counters = core.counters.as_dict()
    return ClusterView(
        now=now,
        worker_timeout_s=core.registry.timeout_s,
        instances=by_instance(copied.workers, copied.tier_counts),
        counters=counters,
        lookups=lookups,
        operations=operations,
    )


class Dashboard:
    """The dashboard of one cluster: its router, and the sampler to run while serving
    (:meth:`lifespan`)."""

    def __init__(
        self,
        cluster: Cluster,
        *,
        routers: RouterTable | None = None,
        interval_s: float = 2.0,
        capacity: int = 151,
        started: Callable[[], float] = time.time,
    ) -> None:
        self.cluster = cluster
        self.routers = RouterTable() if routers is None else routers
        self.history = History(interval_s, capacity)
        self.started = started()
        self._pages = {name: _static(name) for name in ("index.html", "dashboard.html")}
        self._assets = {name: _static(name) for name in _ASSETS}
        self.router = self._build_router()

    def sample(self) -> ClusterView:
        """Capture the cluster now, and keep a history sample if one is due. Called on the
        event loop only (the history has one writer)."""
        view = capture(self.cluster)
        if self.history.due(view.now):
            self.history.add(sample_of(view))
        return view

    def data(self) -> DashboardData:
        view = self.sample()
        return build_snapshot(
            view,
            self.history.points(),
            routers=[router_view(e, view.now) for e in self.routers.routers(view.now)],
            started=self.started,
            sample_interval_s=self.history.interval_s,
            history_span_s=self.history.span_s,
        )

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Sample every ``interval_s`` while the app serves."""

        async def run() -> None:
            while True:
                self.sample()
                await asyncio.sleep(self.history.interval_s)

        task = asyncio.create_task(run(), name="kvplane-dashboard-sampler")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _build_router(self) -> APIRouter:
        router = APIRouter(tags=["dashboard"])

        @router.get("/", include_in_schema=False)
        async def root_page() -> HTMLResponse:
            return HTMLResponse(self._pages["index.html"], headers=_NO_CACHE)

        @router.get("/dashboard", include_in_schema=False)
        async def dashboard_page() -> HTMLResponse:
            return HTMLResponse(self._pages["dashboard.html"], headers=_NO_CACHE)

        # On the event loop (async), like /lookup, the history's other writer.
        @router.get("/dashboard/data", response_model=DashboardData)
        async def dashboard_data() -> DashboardData:
            """The live dashboard's state: instances, workers, chunks and bytes per tier,
            lookup and ingest totals and rates over the last minutes, recent operations,
            the routers that report here."""
            return self.data()

        @router.get("/dashboard/{name}", include_in_schema=False)
        async def dashboard_asset(name: str) -> Response:
            text = self._assets.get(name)
            if text is None:
                raise NotFound(f"no dashboard asset {name!r}; there are {sorted(_ASSETS)}")
            return Response(text, media_type=_ASSETS[name], headers=_NO_CACHE)

        return router
