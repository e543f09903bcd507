"""GET /threads: every thread of the process with its current stack (for hang diagnosis)."""

from __future__ import annotations

import sys
import threading
import traceback

from fastapi import APIRouter
from pydantic import BaseModel

__all__ = ["ThreadInfo", "ThreadsResponse", "router"]

router = APIRouter()


class ThreadInfo(BaseModel):
    name: str
    ident: int | None
    native_id: int | None
    daemon: bool
    alive: bool
    stack: list[str]


class ThreadsResponse(BaseModel):
    count: int
    threads: list[ThreadInfo]


@router.get("/threads")
def get_threads() -> ThreadsResponse:
    frames = sys._current_frames()
    infos = []
    for thread in sorted(threading.enumerate(), key=lambda t: t.name):
        frame = frames.get(thread.ident) if thread.ident is not None else None
        stack = [line.rstrip() for line in traceback.format_stack(frame)] if frame else []
        infos.append(
            ThreadInfo(
                name=thread.name,
                ident=thread.ident,
                native_id=thread.native_id,
                daemon=thread.daemon,
                alive=thread.is_alive(),
                stack=stack,
            )
        )
    return ThreadsResponse(count=len(infos), threads=infos)
