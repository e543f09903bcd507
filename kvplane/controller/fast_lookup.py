"""The /lookup hot path: its body parser and a lean ASGI route in front of the FastAPI app.

A router asks the controller about every prompt it schedules, so ``POST /lookup`` is the
request whose cost matters: ~50 KB of JSON (8K token ids) in, a few instances out. On a
small VM two costs dominated it, each several times that of hashing and probing the index:

* turning the JSON into int32 token bytes: a checked decode made a Python int per token,
  then a numpy conversion walked that list again. :class:`TokenParser` has simdjson parse
  the usual body straight into a 64-bit int buffer; any other body goes through the checked
  decoder, which answers as before, its 400 messages included;
* FastAPI and Starlette's per-request machinery (middleware layers, routing, dependency
  solving, response objects). :class:`LookupRoute` answers ``POST /lookup`` before it and
  passes every other request, and every other method on ``/lookup``, to the app unchanged.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Annotated, Any

import msgspec
import numpy as np
import simdjson

from kvplane.errors import BadRequest
from kvplane.keys import MAX_TOKEN_ID

__all__ = ["LookupAnswer", "LookupRoute", "TokenParser"]

_Scope = MutableMapping[str, Any]
_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]
_App = Callable[[_Scope, _Receive, _Send], Awaitable[None]]

LookupAnswer = Callable[[bytes], tuple[int, bytes]]
"""A /lookup body -> (HTTP status, JSON response body); errors are answered, not raised."""


_TokenId = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKEN_ID)]


class _Body(msgspec.Struct):
    tokens: list[_TokenId]


class _Numbers(msgspec.Struct):
    tokens: list[_TokenId | float]


_decode_checked = msgspec.json.Decoder(_Body).decode
_decode_numbers = msgspec.json.Decoder(_Numbers).decode


def _integral(body: bytes) -> list[int] | None:
    """The ids of a body whose floats are all integral ids (``1.0``: an ``integer`` to JSON
    Schema, as the OpenAPI document says); None for any other body."""
    try:
        numbers = _decode_numbers(body).tokens
    except msgspec.MsgspecError:
        return None
    if all(isinstance(n, int) or (n.is_integer() and 0 <= n <= MAX_TOKEN_ID) for n in numbers):
        return [int(n) for n in numbers]
    return None


class TokenParser:
    """Parses /lookup bodies. Thread-safe: each thread gets its own simdjson parser, kept
    so its buffers are reused (a fresh parser allocates them anew on every call)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def parse(self, body: bytes) -> np.ndarray:
        """A ``{"tokens": [...]}`` body as a little-endian int32 array of token ids in
        ``[0, MAX_TOKEN_ID]`` (:data:`kvplane.keys.TOKEN_ID_RANGE`). Raises BadRequest naming the offending field."""
        fast = self._parse_plain(body)
        if fast is not None:
            return fast
        try:
            tokens: list[int] | None = _decode_checked(body).tokens
        except msgspec.MsgspecError as exc:
            tokens = _integral(body)
            if tokens is None:
                raise BadRequest(f"body: {exc}") from None
        return np.asarray(tokens, dtype="<i4")

    def _parse_plain(self, body: bytes) -> np.ndarray | None:
        """The body clients send, ``{"tokens": [ints in range]}`` and nothing else,
        parsed by simdjson straight into 64-bit ints (no Python int per token); None for any
        other body, which the checked decoder then answers, errors included.

        The checks keep the two paths' answers identical: one key (the checked decoder
        takes the last of duplicate keys, simdjson the first), no ``[`` but the array's own
        (``as_buffer`` flattens nested arrays), and every id in range. The parsed document
        must be gone before the parser parses again, so nothing of it outlives this call.
        """
        parser = getattr(self._local, "parser", None)
        if parser is None:
            parser = self._local.parser = simdjson.Parser()
        try:
            doc = parser.parse(body)
            if type(doc) is not simdjson.Object or len(doc) != 1:
                return None
            array = doc["tokens"]
            if type(array) is not simdjson.Array or body.find(b"[", body.find(b"[") + 1) >= 0:
                return None
            # Unsigned: a negative id fails here, so one max() checks the range.
            ids = np.frombuffer(array.as_buffer(of_type="u"), dtype="<u8")
        # Not JSON, no "tokens", not all non-negative ints; RuntimeError: beyond 64 bits.
        except (KeyError, TypeError, ValueError, RuntimeError):
            return None
        if ids.size and int(ids.max()) > MAX_TOKEN_ID:
            return None
        return ids.astype("<i4")


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
