"""The /lookup hot path: its body parser and a lean ASGI route in front of the FastAPI app.

A router asks the controller about every prompt it schedules, so ``POST /lookup`` is the
request whose cost matters: ~50 KB of JSON (8K token ids) in, a few instances out. On a
small VM two costs dominated it, each about as large as hashing and probing the index:

* turning the JSON into int32 token bytes: a checked ``list[int]`` decode, then a numpy
  conversion that walked the list again. :func:`parse_tokens` decodes unchecked and packs
  the ints with one ``struct`` call, which range-checks them on the way; only a body that
  fails there is decoded again with the checks, whose message the client gets as before;
* FastAPI and Starlette's per-request machinery (middleware layers, routing, dependency
  solving, response objects). :class:`LookupRoute` answers ``POST /lookup`` before it and
  passes every other request, and every other method on ``/lookup``, to the app unchanged.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Annotated, Any

import msgspec
import numpy as np

from kvplane.errors import BadRequest

__all__ = ["MAX_TOKEN", "LookupAnswer", "LookupRoute", "parse_tokens"]

MAX_TOKEN = 2**31 - 1

_Scope = MutableMapping[str, Any]
_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]
_App = Callable[[_Scope, _Receive, _Send], Awaitable[None]]

LookupAnswer = Callable[[bytes], tuple[int, bytes]]
"""A /lookup body -> (HTTP status, JSON response body); errors are answered, not raised."""


class _Body(msgspec.Struct):
    tokens: list[int]


class _CheckedBody(msgspec.Struct):
    tokens: list[Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKEN)]]


_decode_fast = msgspec.json.Decoder(_Body).decode
_decode_checked = msgspec.json.Decoder(_CheckedBody).decode


def parse_tokens(body: bytes) -> np.ndarray:
    """A ``{"tokens": [...]}`` body as a little-endian int32 array of token ids in
    ``[0, MAX_TOKEN]``. Raises BadRequest naming the offending field."""
    try:
        tokens = _decode_fast(body).tokens
        # "I": unsigned 32-bit, so a negative or too large id raises here; ids in
        # [2**31, 2**32) read back negative as int32 and are caught below.
        packed = struct.pack(f"<{len(tokens)}I", *tokens)
    except (msgspec.MsgspecError, struct.error):
        pass
    else:
        arr = np.frombuffer(packed, dtype="<i4")
        if not arr.size or int(arr.min()) >= 0:
            return arr
    try:
        checked = _decode_checked(body).tokens
    except msgspec.MsgspecError as exc:
        raise BadRequest(f"body: {exc}") from None
    return np.asarray(checked, dtype="<i4")  # unreachable unless the two decoders disagree


_HEADERS = [(b"content-type", b"application/json")]


class LookupRoute:
    """ASGI middleware: answers ``POST /lookup`` with ``answer``; anything else goes to
    ``app``. The app keeps its own /lookup route, which documents the endpoint in the
    OpenAPI schema and answers the same way."""

    def __init__(self, app: _App, answer: LookupAnswer) -> None:
        self.app = app
        self.answer = answer

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/lookup" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        status, payload = self.answer(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        headers = [*_HEADERS, (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
