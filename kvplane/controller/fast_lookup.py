"""POST /lookup: its schema, its handler, and the lean ASGI route that serves it.

A router asks the controller about every prompt it schedules, so ``POST /lookup`` is the
request whose cost matters: ~50 KB of JSON (8K token ids) in, a few instances out. On a
small VM two costs dominated it, each several times that of hashing and probing the index:

* turning the JSON into int32 token bytes: validating it made a Python int per token, then
  a numpy conversion walked that list again. :class:`TokenParser` has simdjson parse the
  usual body straight into a 64-bit int buffer; any other body is validated by
  :class:`LookupRequest`, the schema the OpenAPI document gives, and refused as every
  route's body is (400 "Invalid parameters" naming the field);
* FastAPI and Starlette's per-request machinery (middleware layers, routing, dependency
  solving, response objects). :class:`LookupRoute` answers every call to ``/lookup``
  before it (POST with the handler, any other method 405) and passes all else to the app.

So no FastAPI route serves /lookup: its OpenAPI entry is written from the same two models
(:func:`document_lookup`), and the test suite checks the answers against it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Annotated, Any

import msgspec
import numpy as np
import simdjson
from fastapi.responses import JSONResponse
from prometheus_client import Histogram
from pydantic import BaseModel, Field, ValidationError

from kvplane.controller.cluster import Cluster
from kvplane.errors import BadRequest, KvplaneError
from kvplane.keys import MAX_TOKEN_ID, TOKEN_ID_RANGE
from kvplane.web.asgi import receive_body
from kvplane.web.errors import INVALID, error_body, route_error_body, validation_message
from kvplane.web.openapi import JSON_INTEGER, NONEMPTY_STRING, Refine, pair, unrouted_operation

__all__ = [
    "PATH",
    "LookupAnswer",
    "LookupRequest",
    "LookupResponse",
    "LookupRoute",
    "TokenId",
    "TokenParser",
    "Tokens",
    "build_lookup",
    "document_lookup",
]

PATH = "/lookup"

TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID), JSON_INTEGER]
Tokens = Annotated[list[TokenId], Field(description=f"token ids, each in {TOKEN_ID_RANGE}")]
Placement = Annotated[
    tuple[str, int],
    pair(
        NONEMPTY_STRING,
        {"type": "integer", "minimum": 0},
        "[location, matched_prefix_len]: the tier holding the prefix, then its length in tokens",
    ),
]


class LookupRequest(BaseModel):
    tokens: Tokens = Field(examples=[[1, 2, 3, 4]])


class LookupResponse(BaseModel):
    event_id: str
    layout_info: dict[str, Placement] = Field(
        description="instance_id -> [location, matched_prefix_len in tokens]"
    )


class TokenParser:
    """Parses /lookup bodies. Thread-safe: each thread gets its own simdjson parser, kept
    so its buffers are reused (a fresh parser allocates them anew on every call)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def parse(self, body: bytes) -> np.ndarray:
        """The tokens of a body :class:`LookupRequest` takes, as a little-endian int32 array.
        Raises BadRequest ("Invalid parameters", naming each offending field) for any other."""
        fast = self._parse_plain(body)
        if fast is not None:
            return fast
        try:
            tokens = LookupRequest.model_validate_json(body).tokens
        except ValidationError as exc:
            raise BadRequest(validation_message(exc.errors(), ("body",)), title=INVALID) from None
        return np.asarray(tokens, dtype="<i4")

    def _parse_plain(self, body: bytes) -> np.ndarray | None:
        """The body clients send, ``{"tokens": [ints in range]}`` and nothing else,
        parsed by simdjson straight into 64-bit ints (no Python int per token); None for any
        other body, which the model then answers, errors included.

        The checks keep the two paths' answers identical: one key (the model takes the
        last of duplicate keys, simdjson the first), no ``[`` but the array's own
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


LookupAnswer = Callable[[bytes], tuple[int, bytes]]
"""A /lookup body -> (HTTP status, JSON response body); errors are answered, not raised."""

_encoder = msgspec.json.Encoder()


def build_lookup(cluster: Cluster, latency: Histogram) -> LookupAnswer:
    """The /lookup handler: a :class:`LookupResponse`, encoded without building one."""
    parse_tokens = TokenParser().parse
    stats = cluster.lookup_stats

    def answer(body: bytes) -> tuple[int, bytes]:
        # The probe runs on the event loop, holding the cluster lock only for the index
        # walk; the gate asks the ingest thread to step aside meanwhile.
        with cluster.gate.reading():
            start = time.perf_counter()
            try:
                tokens = parse_tokens(body)
            except KvplaneError as exc:
                return exc.status_code, _encoder.encode(error_body(exc))
            event_id, found = cluster.lookup(tokens)
            seconds = time.perf_counter() - start
            latency.observe(seconds)
            stats.record(
                len(tokens), max((m.num_tokens for m in found.values()), default=0), seconds
            )
            layout = {i: (m.location, m.num_tokens) for i, m in found.items()}
            return 200, _encoder.encode({"event_id": event_id, "layout_info": layout})

    return answer


def document_lookup(links: dict[str, Any]) -> Refine:
    """The ``install_openapi`` step that writes POST /lookup into the document, first among
    the paths (where its route was), its 200 answer with ``links``."""
    return unrouted_operation(
        PATH,
        "post",
        operation_id="lookup",
        tag="cluster",
        request=LookupRequest,
        response=LookupResponse,
        errors=(400,),
        links=links,
    )


_Scope = MutableMapping[str, Any]
_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]
_App = Callable[[_Scope, _Receive, _Send], Awaitable[None]]

_HEADERS = [(b"content-type", b"application/json")]
_NOT_ALLOWED = HTTPStatus.METHOD_NOT_ALLOWED


class LookupRoute:
    """ASGI middleware: answers ``POST /lookup`` with ``answer`` and any other method on
    /lookup with 405 (``Allow: POST``, the app's error body); anything else goes to
    ``app``."""

    def __init__(self, app: _App, answer: LookupAnswer) -> None:
        self.app = app
        self.answer = answer

    @staticmethod
    def serves(method: str, path: str) -> bool:
        """Whether this route runs the handler for ``method`` on ``path``."""
        return method == "POST" and path == PATH

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH:
            await self.app(scope, receive, send)
            return
        if scope["method"] != "POST":
            body = route_error_body(_NOT_ALLOWED.phrase, scope["method"], PATH)
            refusal = JSONResponse(body, status_code=_NOT_ALLOWED, headers={"Allow": "POST"})
            await refusal(scope, receive, send)
            return
        raw = await receive_body(receive)
        if raw is None:  # the client went away
            return
        status, payload = self.answer(raw)
        headers = [*_HEADERS, (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
