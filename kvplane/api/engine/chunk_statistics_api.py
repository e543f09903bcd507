"""/chunk_statistics/*: count the chunks lookups see (total and distinct) while collecting."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from kvplane.api.deps import Ctx
from kvplane.api.responses import Success
from kvplane.engine.chunk_statistics import ChunkStatistics
from kvplane.errors import BadRequest
from kvplane.web.openapi import error_responses

__all__ = ["Message", "StatisticsStatusResponse", "router"]

router = APIRouter()


class Message(Success):
    message: str


class StatisticsStatusResponse(BaseModel):
    is_collecting: bool
    total_chunks: int
    unique_chunks: int
    timestamp: float
    auto_exit_enabled: bool
    auto_exit_timeout_hours: float
    auto_exit_target_unique_chunks: int


def _statistics(ctx: Ctx) -> ChunkStatistics:
    """The collector, fed by the engine's lookups; 400 where no engine feeds it."""
    if ctx.engine is None:
        raise BadRequest("Client does not support statistics.", title="Not available")
    return ctx.statistics


Stats = Annotated[ChunkStatistics, Depends(_statistics)]


# 400 "Not available" where no engine feeds the statistics (the seed's answer).
_NO_ENGINE = error_responses(400)


@router.post("/chunk_statistics/start", responses=_NO_ENGINE)
def start(stats: Stats) -> Message:
    stats.start()
    return Message(message="Started")


@router.post("/chunk_statistics/stop", responses=_NO_ENGINE)
def stop(stats: Stats) -> Message:
    stats.stop()
    return Message(message="Stopped")


@router.post("/chunk_statistics/reset", responses=_NO_ENGINE)
def reset(stats: Stats) -> Message:
    stats.reset()
    return Message(message="Reset")


@router.get("/chunk_statistics/status", responses=_NO_ENGINE)
def status(stats: Stats) -> StatisticsStatusResponse:
    return StatisticsStatusResponse(**stats.status()._asdict())
