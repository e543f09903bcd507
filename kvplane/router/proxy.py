"""Forwarding a routed request: once to its backend, once more to the next best if the
first could not be reached or answered 503 before any byte, never again after bytes went
to the client. A streamed answer (``text/event-stream``) is relayed chunk by chunk as the
backend sends it; any other answer is read whole, so that a backend failing in the middle
becomes a clean 502. A client that goes away closes the upstream response, which is how
vLLM (and kvplane serve) learn to abort the request.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio
import httpx
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from kvplane.errors import Unavailable
from kvplane.router.pool import Backend
from kvplane.router.scoring import Reason
from kvplane.router.service import Route, Router
from kvplane.web.errors import openai_error_body

__all__ = ["forward"]

log = logging.getLogger("kvplane.router")

#: Request headers not passed on: hop-by-hop ones, the body's framing (httpx sets it), and
#: Accept-Encoding (answers are relayed as they come, uncompressed).
_DROP = frozenset(
    {
        "host",
        "content-length",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "accept-encoding",
        "te",
        "upgrade",
    }
)
#: Answer headers passed back besides the ones the router sets.
_KEEP = ("content-type", "x-request-id", "x-kvplane-ttft-s")


def _request_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in _DROP}


def _answer_headers(
    resp: httpx.Response, backend: Backend, reason: Reason, matched: int
) -> dict[str, str]:
    out = {k: resp.headers[k] for k in _KEEP if k in resp.headers}
    out["x-kvplane-backend"] = backend.url
    out["x-kvplane-instance"] = backend.instance_id or ""
    out["x-kvplane-route-reason"] = reason.value
    out["x-kvplane-matched-tokens"] = str(matched)
    return out


class _Relay(StreamingResponse):
    """A streamed answer whose upstream response is closed (and its in-flight count
    dropped) however the relay ends: done, broken upstream, or cancelled by the client's
    disconnect."""

    def __init__(
        self, router: Router, backend: Backend, upstream: httpx.Response, **kw: Any
    ) -> None:
        self._router, self._backend, self._upstream = router, backend, upstream
        super().__init__(self._chunks(), **kw)

    async def _chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._upstream.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            self._router.metrics.errors.labels("mid_response").inc()
            message = f"backend {self._backend.url} failed mid-stream: {exc!r}"
            log.warning(message)
            body = openai_error_body(502, message)
            yield b"data: " + JSONResponse(body).body + b"\n\n"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # counted done first: a cancelled task (the client left) is cancelled again at
            # its next await, which the close is shielded from
            self._router.pool.finished(self._backend.url)
            with anyio.CancelScope(shield=True):
                await self._upstream.aclose()


async def forward(
    router: Router,
    route: Route,
    path: str,
    raw: bytes,
    headers: Mapping[str, str],
    session: str | None,
) -> Response:
    """Send the request; the answer to give the client. Raises Unavailable when neither
    attempt reached a backend."""
    pool, metrics = router.pool, router.metrics
    client = router.client
    attempts = route.backends[:2]
    sent_headers = _request_headers(headers)
    failures: list[str] = []
    for n, backend in enumerate(attempts):
        last = n + 1 == len(attempts)
        url = backend.url
        pool.started(url)
        try:
            request = client.build_request("POST", url + path, content=raw, headers=sent_headers)
            upstream = await client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            pool.finished(url)
            if pool.failed(url, repr(exc)):
                log.warning("backend %s ejected: %r", url, exc)
            metrics.errors.labels("connect").inc()
            failures.append(f"{url}: cannot connect ({exc})")
            continue
        except httpx.HTTPError as exc:
            pool.finished(url)
            metrics.errors.labels("mid_response").inc()
            message = f"backend {url} failed before answering: {exc!r}"
            return JSONResponse(openai_error_body(502, message), status_code=502)
        if upstream.status_code == 503 and not last:
            await upstream.aclose()
            pool.finished(url)
            metrics.errors.labels("refused_503").inc()
            failures.append(f"{url}: 503")
            continue
        reason = Reason.RETRY if n else route.decision.reason
        cost = route.decision.costs[url]
        metrics.requests.labels(reason.value).inc()
        metrics.prompt_tokens.inc(route.prompt_tokens)
        metrics.matched_tokens.inc(cost.hit_tokens)
        metrics.fetch_tokens.inc(cost.fetched)
        metrics.backend_requests.labels(url).inc()
        router.remember(session, url)
        router.sent(route, url)
        answer_headers = _answer_headers(upstream, backend, reason, cost.hit_tokens)
        if upstream.headers.get("content-type", "").startswith("text/event-stream"):
            return _Relay(
                router, backend, upstream, status_code=upstream.status_code, headers=answer_headers
            )
        try:
            content = await upstream.aread()
        except httpx.HTTPError as exc:
            metrics.errors.labels("mid_response").inc()
            message = f"backend {url} failed mid-response: {exc!r}"
            return JSONResponse(openai_error_body(502, message), status_code=502)
        finally:
            await upstream.aclose()
            pool.finished(url)
        return Response(content, status_code=upstream.status_code, headers=answer_headers)
    metrics.errors.labels("no_backend").inc()
    raise Unavailable("no backend could take the request: " + "; ".join(failures))
