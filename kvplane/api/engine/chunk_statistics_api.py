"""/chunk_statistics/*: count the chunks lookups see (total and distinct) while collecting."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from kvplane.api.deps import Ctx
from kvplane.api.responses import Success
from kvplane.engine.chunk_statistics import ChunkStatistics
from kvplane.errors import BadRequest

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


@router.post("/chunk_statistics/start")
def start(stats: Stats) -> Message:
    stats.start()
    return Message(message="Started")


@router.post("/chunk_statistics/stop")
def stop(stats: Stats) -> Message:
    stats.stop()
    return Message(message="Stopped")


@router.post("/chunk_statistics/reset")
def reset(stats: Stats) -> Message:
    stats.reset()
    return Message(message="Reset")


@router.get("/chunk_statistics/status")
def status(stats: Stats) -> StatisticsStatusResponse:
    return StatisticsStatusResponse(**stats.status()._asdict())
