"""The controller's HTTP API: the seeds' cluster endpoints plus /metrics, /healthz, the
common diagnostic endpoints and the dashboard (:mod:`kvplane.controller.dashboard`).
Request/response models sit next to their routes; errors get the body every kvplane API
uses (:mod:`kvplane.web.errors`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI
from pydantic import AliasChoices, BaseModel, Field, StrictBool

import kvplane
from kvplane.controller.cluster import Cluster
from kvplane.controller.dashboard.routes import Dashboard
from kvplane.controller.executor import EventStatus
from kvplane.controller.fast_lookup import LookupRoute, Tokens, build_lookup, document_lookup
from kvplane.controller.ops_api import build_ops_router
from kvplane.controller.routers import RouterTable
from kvplane.controller.routers_api import build_routers_router
from kvplane.controller.settings import ControllerConfig
from kvplane.controller.status_api import build_status_router
from kvplane.protocol import COMPRESSION_METHODS
from kvplane.web.auth import SAFE_METHODS, BearerGuard, bearer_refinement, check_bearer
from kvplane.web.errors import install_error_handlers, serves
from kvplane.web.openapi import (
    NONEMPTY_STRING,
    JsonInt,
    OneOf,
    error_responses,
    install_openapi,
    link,
    linked,
    pair,
)

__all__ = ["ALWAYS_OPEN", "READ_POSTS", "Access", "create_app"]


# --- models (/lookup's are kvplane.controller.fast_lookup's) --------------------------------

Method = Annotated[str, OneOf(COMPRESSION_METHODS)]

# An instance id or a tier name: never empty (an empty one names nothing).
Name = Annotated[str, Field(min_length=1)]
TierName = Annotated[str, Field(min_length=1, examples=["LocalCPUBackend"])]
Position = Annotated[
    tuple[Name, Name],
    pair(NONEMPTY_STRING, NONEMPTY_STRING, "[instance_id, location]"),
    Field(examples=[["inst-a", "LocalCPUBackend"]]),
]


class ClearRequest(BaseModel):
    instance_id: str = Field(examples=["inst-a"])
    location: TierName | None = Field(None, description="a tier name; null clears every tier")


class PinRequest(BaseModel):
    instance_id: str = Field(examples=["inst-a"])
    location: TierName | None = Field(None, description="a tier name; null: the CPU tier")
    tokens: Tokens


class CompressRequest(BaseModel):
    instance_id: str = Field(examples=["inst-a"])
    method: Method
    location: TierName
    tokens: Tokens | None = None


class MoveRequest(BaseModel):
    old_position: Position
    new_position: Position
    tokens: Tokens | None = None
    should_copy: StrictBool = Field(
        False,
        validation_alias=AliasChoices("should_copy", "copy"),
        description="keep the source copy (false: the source copy is removed)",
    )


class NumTokensResponse(BaseModel):
    event_id: str
    num_tokens: int


class HealthRequest(BaseModel):
    instance_id: str = Field(examples=["inst-a"])


class HealthResponse(BaseModel):
    event_id: str
    error_codes: dict[int, int] = Field(description="worker_id -> code (0 = healthy)")


class CheckFinishRequest(BaseModel):
    event_id: str


class CheckFinishResponse(BaseModel):
    status: EventStatus


class QueryWorkerInfoRequest(BaseModel):
    instance_id: str = Field(examples=["inst-a"])
    worker_ids: list[JsonInt] | None = None


class WorkerInfo(BaseModel):
    """The seeds' fields of a registered worker, read off its registry record."""

    instance_id: str
    worker_id: int
    ip: str
    port: int
    peer_init_url: str | None
    registration_time: float
    last_heartbeat_time: float
    serving_url: str | None = Field(
        None, description="the OpenAI URL the instance serves on (config key serving_url)"
    )


class QueryWorkerInfoResponse(BaseModel):
    event_id: str
    worker_infos: list[WorkerInfo]


class QueryChunksRequest(BaseModel):
    instance_id: str = Field(examples=["inst-a"])
    worker_ids: list[JsonInt] | None = None


class QueryChunksResponse(BaseModel):
    event_id: str
    chunk_hashes: dict[int, dict[str, list[int]]] = Field(
        description="worker_id -> location -> the chunk hashes (unsigned 64-bit, "
        "kvplane.keys.chunk_hashes) the index credits to that worker, sorted"
    )


class QueryInstanceRequest(BaseModel):
    ip: str = Field(examples=["127.0.0.1"])
    event_id: str | None = Field(None, description="accepted for old clients and ignored")


class QueryInstanceResponse(BaseModel):
    event_id: str
    res: str


# --- routes --------------------------------------------------------------------------------


# Where the links of the documented answers take their values from (OpenAPI runtime
# expressions): the event an answer names, the instance of a worker it lists, the instance a
# request named.
_EVENT = "$response.body#/event_id"
_LISTED_INSTANCE = "$response.body#/worker_infos/0/instance_id"
_ASKED_INSTANCE = "$request.body#/instance_id"


def _check_finish(kind: str) -> dict[str, Any]:
    """The link from an answer that names an event to ``/check_finish`` of that event."""
    return link("check_finish", f"the state of this {kind}", event_id=_EVENT)


def _then_check_finish(kind: str) -> dict[int | str, dict[str, Any]]:
    return linked(CheckFinish=_check_finish(kind))


# Commands fan out to an instance's workers: unknown instance 404, and each worker's refusal
# (every failing rank alike) as the worker raised it: a value it cannot use 400, a tier the
# instance lacks 404, a move it cannot do as set up (no P2P) 409; failed or silent ones 503.
_COMMAND_ERRORS = error_responses(400, 404, 409, 503)


def build_cluster_router(cluster: Cluster) -> APIRouter:
    """The seeds' cluster calls but /lookup, which :class:`LookupRoute` answers."""
    router = APIRouter(tags=["cluster"])

    @router.post(
        "/clear",
        response_model=NumTokensResponse,
        responses={**_COMMAND_ERRORS, **_then_check_finish("clear")},
    )
    def clear(body: ClearRequest) -> NumTokensResponse:
        return NumTokensResponse(**cluster.clear(body.instance_id, body.location)._asdict())

    @router.post(
        "/pin",
        response_model=NumTokensResponse,
        responses={**_COMMAND_ERRORS, **_then_check_finish("pin")},
    )
    def pin(body: PinRequest) -> NumTokensResponse:
        done = cluster.pin(body.instance_id, body.location, body.tokens)
        return NumTokensResponse(**done._asdict())

    @router.post(
        "/compress",
        response_model=NumTokensResponse,
        responses={**_COMMAND_ERRORS, **_then_check_finish("compression")},
    )
    def compress(body: CompressRequest) -> NumTokensResponse:
        done = cluster.compress(body.instance_id, body.method, body.location, body.tokens)
        return NumTokensResponse(**done._asdict())

    @router.post(
        "/decompress",
        response_model=NumTokensResponse,
        responses={**_COMMAND_ERRORS, **_then_check_finish("decompression")},
    )
    def decompress(body: CompressRequest) -> NumTokensResponse:
        done = cluster.compress(
            body.instance_id, body.method, body.location, body.tokens, decompress=True
        )
        return NumTokensResponse(**done._asdict())

    @router.post(
        "/move",
        response_model=NumTokensResponse,
        responses={**_COMMAND_ERRORS, **_then_check_finish("move")},
    )
    def move(body: MoveRequest) -> NumTokensResponse:
        done = cluster.move(body.old_position, body.new_position, body.tokens, body.should_copy)
        return NumTokensResponse(**done._asdict())

    @router.post(
        "/health",
        response_model=HealthResponse,
        responses={
            **error_responses(400, 404),
            **linked(
                CheckFinish=_check_finish("health check"),
                QueryWorkerInfo=link(
                    "query_worker_info",
                    "the workers of the instance checked",
                    instance_id=_ASKED_INSTANCE,
                ),
            ),
        },
    )
    def health(body: HealthRequest) -> HealthResponse:
        event_id, codes = cluster.health(body.instance_id)
        return HealthResponse(event_id=event_id, error_codes=codes)

    @router.post(
        "/check_finish", response_model=CheckFinishResponse, responses=error_responses(400)
    )
    def check_finish(body: CheckFinishRequest) -> CheckFinishResponse:
        return CheckFinishResponse(status=cluster.check_finish(body.event_id))

    @router.post(
        "/query_worker_info",
        response_model=QueryWorkerInfoResponse,
        responses={
            **error_responses(400, 404),
            **linked(
                CheckFinish=_check_finish("query"),
                Health=link("health", "the health of this instance", instance_id=_LISTED_INSTANCE),
                QueryChunks=link(
                    "query_chunks",
                    "the chunks the index credits to the first worker listed",
                    instance_id=_LISTED_INSTANCE,
                    worker_ids=["$response.body#/worker_infos/0/worker_id"],
                ),
                QueryInstance=link(
                    "query_instance",
                    "the instance at the first worker's ip",
                    ip="$response.body#/worker_infos/0/ip",
                ),
            ),
        },
    )
    def query_worker_info(body: QueryWorkerInfoRequest) -> QueryWorkerInfoResponse:
        workers = cluster.workers(body.instance_id, body.worker_ids)
        infos = [WorkerInfo.model_validate(w, from_attributes=True) for w in workers]
        event_id = cluster.events.start("query_worker_info", finished=True)
        return QueryWorkerInfoResponse(event_id=event_id, worker_infos=infos)

    @router.post(
        "/query_chunks",
        response_model=QueryChunksResponse,
        responses={**error_responses(400, 404), **_then_check_finish("query")},
    )
    def query_chunks(body: QueryChunksRequest) -> QueryChunksResponse:
        """The index's chunk hashes per worker and tier, to audit it against the engines'
        own key lists (benchmarks/soak.py does); the copy is O(chunks held)."""
        found = cluster.chunks(body.instance_id, body.worker_ids)
        event_id = cluster.events.start("query_chunks", finished=True)
        return QueryChunksResponse(event_id=event_id, chunk_hashes=found)

    @router.post(
        "/query_instance",
        response_model=QueryInstanceResponse,
        responses={
            **error_responses(400, 404),
            **linked(
                CheckFinish=_check_finish("query"),
                QueryWorkerInfo=link(
                    "query_worker_info",
                    "the workers of this instance",
                    instance_id="$response.body#/res",
                ),
            ),
        },
    )
    def query_instance(body: QueryInstanceRequest) -> QueryInstanceResponse:
        instance_id = cluster.instance_by_ip(body.ip)
        event_id = cluster.events.start("query_instance", finished=True)
        return QueryInstanceResponse(event_id=event_id, res=instance_id)

    return router


# --- the app -------------------------------------------------------------------------------


#: POST routes that only read: the seeds' API posts its queries.
READ_POSTS = frozenset(
    {
        "/lookup",
        "/health",
        "/check_finish",
        "/query_worker_info",
        "/query_chunks",
        "/query_instance",
    }
)
#: Open even with ``protect_reads`` (as is the dashboard's shell): liveness probes and the
#: API's own description.
ALWAYS_OPEN = frozenset({"/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


def _dashboard_shell(path: str) -> bool:
    """The dashboard's page and static files: no cluster data (that is /dashboard/data,
    which the page fetches with the token from its URL fragment, ``#token=...``)."""
    if path in ("/", "/dashboard"):
        return True
    return path.startswith("/dashboard/") and path != "/dashboard/data"


class Access:
    """Who may call what, from ``api_token`` and ``protect_reads``: with a token, every call
    that may change state (any method but GET/HEAD/OPTIONS, except :data:`READ_POSTS`)
    needs it; with ``protect_reads`` every other call too, but :data:`ALWAYS_OPEN`.

    Only calls that ``served(method, path)`` says something serves are guarded: any other
    (an unknown path, a method its path lacks) runs nothing, and the app answers it 404 or
    405 (with ``Allow``) with or without the token, as the OpenAPI document says."""

    def __init__(
        self, token: str | None, protect_reads: bool, served: Callable[[str, str], bool]
    ) -> None:
        self.token = token
        self.protect_reads = protect_reads
        # Matching walks every route (~0.2 ms): remembered for the few calls clients make,
        # bounded against clients that make up paths.
        self._served = functools.lru_cache(maxsize=1024)(served)

    def needs_token(self, method: str, path: str) -> bool:
        if self.token is None or path in ALWAYS_OPEN or _dashboard_shell(path):
            return False
        if not self.protect_reads and (method in SAFE_METHODS or path in READ_POSTS):
            return False
        return self._served(method, path)

    def check(self, method: str, path: str, authorization: str | None) -> None:
        """Raise Unauthorized/Forbidden unless the call may go ahead."""
        if self.token is not None and self.needs_token(method, path):
            check_bearer(authorization, self.token)


def create_app(cluster: Cluster, settings: ControllerConfig) -> FastAPI:
    """The controller's FastAPI app over a running cluster (OpenAPI at /docs)."""
    routers = RouterTable()
    dashboard = Dashboard(cluster, routers=routers)
    app = FastAPI(
        title="kvplane controller",
        description="KV-aware routing lookups and cluster operations over kvplane workers; "
        "a live dashboard at /dashboard.",
        version=kvplane.__version__,
        generate_unique_id_function=lambda route: route.name,
        lifespan=lambda _app: dashboard.lifespan(),
    )
    ops_router, latency = build_ops_router(cluster, settings)
    app.include_router(build_cluster_router(cluster))
    app.include_router(ops_router)
    app.include_router(build_status_router(cluster))
    app.include_router(build_routers_router(routers, cluster.clock))
    app.include_router(dashboard.router)
    app.add_middleware(LookupRoute, answer=build_lookup(cluster, latency))
    routes = app.router.routes
    access = Access(
        settings.api_token,
        settings.protect_reads,
        lambda method, path: LookupRoute.serves(method, path) or serves(routes, method, path),
    )
    # Added last, so outermost: a refused call is answered before any body is read.
    app.add_middleware(BearerGuard, check=access.check)
    install_error_handlers(app, "controller")
    guarded = [bearer_refinement(access.needs_token)] if settings.api_token is not None else []
    install_openapi(app, document_lookup({"CheckFinish": _check_finish("lookup")}), *guarded)
    return app
