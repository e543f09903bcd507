"""Forwarding a routed request: once to its backend, once more to the next best if the
first could not be reached or answered 503 before any byte, never again after bytes went
to the client. A streamed answer (``text/event-stream``) is relayed chunk by chunk as the
backend sends it; any other answer is read whole, so that a backend failing in the middle
becomes a clean 502. A client that goes away closes the upstream response, which is how
vLLM (and kvplane serve) learn to abort the request.

The answer goes to the client as raw ASGI messages (no framework's response objects: the
router's added latency is its hot path's CPU time).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import msgspec
from starlette.types import Receive, Send

from kvplane.errors import Unavailable
from kvplane.router.lean_http import Headers, LeanConnectError, LeanHttpError
from kvplane.router.pool import Backend
from kvplane.router.scoring import Reason
from kvplane.router.service import Route, Router
from kvplane.router.upstream import Reply
from kvplane.web.errors import openai_error_body

__all__ = ["forward", "send_error", "send_json"]

log = logging.getLogger("kvplane.router")

_encode = msgspec.json.Encoder().encode

#: Request headers not passed on: hop-by-hop ones, the body's framing (the client sets it),
#: and Accept-Encoding (answers are relayed as they come, uncompressed).
_DROP = frozenset(
    {
        b"host",
        b"content-length",
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"accept-encoding",
        b"te",
        b"upgrade",
    }
)
#: Answer headers passed back besides the ones the router sets.
_KEEP = frozenset({b"content-type", b"x-request-id", b"x-kvplane-ttft-s"})
_EVENT_STREAM = b"text/event-stream"


async def send_json(send: Send, status: int, body: Any, headers: Headers | None = None) -> None:
    """A whole JSON answer."""
    payload = _encode(body)
    framing = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))]
    await send(
        {"type": "http.response.start", "status": status, "headers": framing + (headers or [])}
    )
    await send({"type": "http.response.body", "body": payload})


async def send_error(send: Send, status: int, message: str, param: str | None = None) -> None:
    """OpenAI's error body."""
    await send_json(send, status, openai_error_body(status, message, param))


def _answer_headers(reply: Reply, backend: Backend, reason: Reason, matched: int) -> Headers:
    out = [(k, v) for k, v in reply.headers if k in _KEEP]
    out.append((b"x-kvplane-backend", backend.url.encode("latin-1")))
    out.append((b"x-kvplane-instance", (backend.instance_id or "").encode("latin-1")))
    out.append((b"x-kvplane-route-reason", reason.value.encode()))
    out.append((b"x-kvplane-matched-tokens", str(matched).encode()))
    return out


async def _client_gone(receive: Receive) -> None:
    """Returns when the client disconnects (the request's body is already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _relay(
    router: Router,
    backend: Backend,
    reply: Reply,
    headers: Headers,
    receive: Receive,
    send: Send,
) -> None:
    """Relay a streamed answer piece by piece. The upstream is closed and the request
    counted done however the relay ends: done, broken upstream (a 502 error event ends the
    stream), or the client's disconnect, which cancels this task where it waits (then it
    returns as if done)."""
    task = asyncio.current_task()
    assert task is not None
    live, gone = True, False

    def on_gone(watch: asyncio.Future[None]) -> None:
        nonlocal gone
        if live and not watch.cancelled() and watch.exception() is None:
            gone = True
            task.cancel()

    watch = asyncio.ensure_future(_client_gone(receive))
    watch.add_done_callback(on_gone)
    try:
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        try:
            async for piece in reply.pieces():
                await send({"type": "http.response.body", "body": piece, "more_body": True})
        except LeanHttpError as exc:
            router.metrics.errors.labels("mid_response").inc()
            message = f"backend {backend.url} failed mid-stream: {exc}"
            log.warning(message)
            event = b"data: " + _encode(openai_error_body(502, message)) + b"\n\n"
            await send({"type": "http.response.body", "body": event, "more_body": True})
    except asyncio.CancelledError:
        if not gone:
            raise
        task.uncancel()
        return
    finally:
        live = False
        watch.cancel()
        router.pool.finished(backend.url)
        reply.close()
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def forward(
    router: Router,
    route: Route,
    path: str,
    raw: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    session: str | None,
    receive: Receive,
    send: Send,
) -> None:
    """Send the request (``headers``: the client's, as ASGI gives them) and relay the
    answer through ``send``. Raises Unavailable, having sent nothing, when neither attempt
    reached a backend."""
    pool, metrics = router.pool, router.metrics
    attempts = route.backends[:2]
    sent_headers = [(k, v) for k, v in headers if k not in _DROP]
    failures: list[str] = []
    for n, backend in enumerate(attempts):
        last = n + 1 == len(attempts)
        url = backend.url
        pool.started(url)
        try:
            reply = await router.origin(url).send("POST", path, sent_headers, raw)
        except LeanConnectError as exc:
            pool.finished(url)
            if pool.failed(url, str(exc)):
                log.warning("backend %s ejected: %s", url, exc)
            metrics.errors.labels("connect").inc()
            failures.append(f"{url}: cannot connect ({exc})")
            continue
        except LeanHttpError as exc:
            pool.finished(url)
            metrics.errors.labels("mid_response").inc()
            await send_error(send, 502, f"backend {url} failed before answering: {exc}")
            return
        if reply.status == 503 and not last:
            reply.close()
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
        answer_headers = _answer_headers(reply, backend, reason, cost.hit_tokens)
        if (reply.header(b"content-type") or b"").startswith(_EVENT_STREAM):
            await _relay(router, backend, reply, answer_headers, receive, send)
            return
        try:
            content = await reply.read()
        except LeanHttpError as exc:
            metrics.errors.labels("mid_response").inc()
            await send_error(send, 502, f"backend {url} failed mid-response: {exc}")
            return
        finally:
            reply.close()
            pool.finished(url)
        answer_headers.append((b"content-length", b"%d" % len(content)))
        start = {"type": "http.response.start", "status": reply.status, "headers": answer_headers}
        await send(start)
        await send({"type": "http.response.body", "body": content})
        return
    metrics.errors.labels("no_backend").inc()
    raise Unavailable("no backend could take the request: " + "; ".join(failures))
