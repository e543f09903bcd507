"""Helpers for the raw ASGI routes that answer hot calls in front of FastAPI (the
controller's ``/lookup``, the router's completions)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["receive_body"]


async def receive_body(receive: Callable[[], Awaitable[MutableMapping[str, Any]]]) -> bytes | None:
    """The request's whole body; None when the client went away first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
