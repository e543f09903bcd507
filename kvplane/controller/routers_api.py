"""``POST /routers/heartbeat`` (each ``kvplane router`` reports itself every
``discovery_interval_s``) and ``GET /routers`` (the live ones, as the dashboard shows them).

The heartbeat changes the controller's state, so with ``api_token`` it needs the token;
``GET /routers`` is a read. Both run on the event loop, the table's one thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter
from pydantic import BaseModel, Field, StrictBool

from kvplane.controller.routers import RouterBackend, RouterEntry, RouterReport, RouterTable
from kvplane.web.openapi import JSON_INTEGER, error_responses

__all__ = [
    "RouterBackendModel",
    "RouterHeartbeat",
    "RouterHeartbeatResponse",
    "RouterView",
    "RoutersResponse",
    "build_routers_router",
    "report_of",
    "router_view",
]

Text = Annotated[str, Field(min_length=1, max_length=2048)]
Count = Annotated[int, Field(ge=0, le=2**53), JSON_INTEGER]
# At most an hour between heartbeats: a router that says more is still forgotten in time.
Interval = Annotated[float, Field(ge=0.01, le=3600, allow_inf_nan=False, strict=True)]
Seconds = Annotated[float, Field(ge=0, le=1e12, allow_inf_nan=False, strict=True)]


class RouterBackendModel(BaseModel):
    url: Text = Field(examples=["http://127.0.0.1:8000"])
    instance_id: Text | None = Field(
        None, description="its kvplane instance; null while the router does not know it"
    )
    admitted: StrictBool = Field(description="the router sends it requests (false: ejected)")
    in_flight: Count = Field(description="the router's requests in flight to it")


class RouterHeartbeat(BaseModel):
    router_id: Annotated[str, Field(min_length=1, max_length=256)] = Field(
        examples=["router-host:8080"]
    )
    url: Text = Field(description="the router's own URL", examples=["http://router-host:8080"])
    interval_s: Interval = Field(
        description="seconds to its next heartbeat; the controller forgets it after "
        "3 intervals of silence"
    )
    uptime_s: Seconds
    backends: list[RouterBackendModel] = Field(max_length=1024)
    requests: dict[Annotated[str, Field(min_length=1, max_length=64)], Count] = Field(
        default_factory=dict,
        max_length=64,
        description="requests routed since the router started, by decision reason",
    )


class RouterHeartbeatResponse(BaseModel):
    router_id: str
    forget_after_s: float = Field(description="silence after which it is forgotten")
    routers: int = Field(description="routers this controller tracks")


class RouterView(BaseModel):
    router_id: str
    url: str
    interval_s: float
    uptime_s: float = Field(description="as the router said in its last heartbeat")
    backends: list[RouterBackendModel]
    requests: dict[str, int]
    requests_total: int
    heartbeats: int = Field(description="heartbeats since this controller first heard it")
    first_seen: float
    last_heartbeat_time: float
    heartbeat_age_s: float
    forget_after_s: float


class RoutersResponse(BaseModel):
    routers: list[RouterView] = Field(description="by router_id")


def report_of(body: RouterHeartbeat) -> RouterReport:
    backends = tuple(
        RouterBackend(b.url, b.instance_id, b.admitted, b.in_flight) for b in body.backends
    )
    return RouterReport(
        body.router_id, body.url, body.interval_s, body.uptime_s, backends, dict(body.requests)
    )


def router_view(entry: RouterEntry, now: float) -> RouterView:
    r = entry.report
    return RouterView(
        router_id=r.router_id,
        url=r.url,
        interval_s=r.interval_s,
        uptime_s=r.uptime_s,
        backends=[RouterBackendModel(**b._asdict()) for b in r.backends],
        requests=dict(r.requests),
        requests_total=sum(r.requests.values()),
        heartbeats=entry.heartbeats,
        first_seen=entry.first_seen,
        last_heartbeat_time=entry.last_seen,
        heartbeat_age_s=max(0.0, now - entry.last_seen),
        forget_after_s=entry.forget_after_s,
    )


def build_routers_router(table: RouterTable, clock: Callable[[], float]) -> APIRouter:
    router = APIRouter(tags=["routers"])

    @router.post(
        "/routers/heartbeat",
        response_model=RouterHeartbeatResponse,
        responses=error_responses(400, 409),
    )
    async def router_heartbeat(body: RouterHeartbeat) -> RouterHeartbeatResponse:
        """A router's report of itself; a new router while the table is full is 409."""
        entry = table.heartbeat(report_of(body), clock())
        return RouterHeartbeatResponse(
            router_id=body.router_id, forget_after_s=entry.forget_after_s, routers=len(table)
        )

    @router.get("/routers", response_model=RoutersResponse)
    async def routers() -> RoutersResponse:
        """The routers that reported within their last 3 heartbeat intervals."""
        now = clock()
        return RoutersResponse(routers=[router_view(e, now) for e in table.routers(now)])

    return router
