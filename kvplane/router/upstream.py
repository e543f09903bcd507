"""The router's calls to others: the controller (``/lookup`` per request, ``/status`` for
the instances, ``/routers/heartbeat``, each with its ``controller_token`` when set) and the
backends' checks (``/health``, ``/metrics``, ``/v1/models``). Thin:
what comes back goes into the pure :class:`~kvplane.router.pool.Pool`; httpx's errors are
translated here and go no further.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, NamedTuple, Protocol

import httpx
import msgspec

from kvplane.router.lean_http import Headers, LeanClient, LeanConnectError, LeanHttpError
from kvplane.router.metrics import RouterMetrics
from kvplane.router.pool import BackendSpec, Pool, parse_load

__all__ = [
    "Checker",
    "ControllerClient",
    "Hits",
    "HttpxOrigin",
    "Origin",
    "Reply",
    "describe",
    "origin_for",
]

log = logging.getLogger("kvplane.router")

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


class Reply(Protocol):
    """An answer whose head is read (:class:`~kvplane.router.lean_http.Answer`'s
    interface): its body once, whole or piece by piece, then ``aclose``."""

    status: int
    headers: Headers

    def header(self, name: bytes) -> bytes | None: ...
    async def read(self) -> bytes: ...
    def pieces(self) -> AsyncIterator[bytes]: ...
    def close(self) -> None: ...


class Origin(Protocol):
    """Where a backend's requests go: :class:`LeanClient` for http, :class:`HttpxOrigin`
    for https. Raises LeanConnectError when nothing was sent, LeanHttpError otherwise."""

    async def send(
        self, method: str, path: str, headers: Iterable[tuple[bytes, bytes]], body: bytes
    ) -> Reply: ...
    def close(self) -> None: ...


def origin_for(url: str, client: httpx.AsyncClient, connect_s: float, read_s: float) -> Origin:
    """The lean client for an http ``url``, httpx for any other."""
    if url.startswith("http://"):
        return LeanClient(url, max_idle=256, connect_timeout=connect_s, read_timeout=read_s)
    return HttpxOrigin(client, url)


class HttpxOrigin:
    """An origin the lean client does not serve (https), through httpx, with its errors
    translated to the lean client's."""

    def __init__(self, client: httpx.AsyncClient, base_url: str) -> None:
        self._client = client
        self._base = base_url

    async def send(
        self, method: str, path: str, headers: Iterable[tuple[bytes, bytes]], body: bytes
    ) -> Reply:
        request = self._client.build_request(
            method, self._base + path, content=body, headers=list(headers)
        )
        try:
            return _HttpxReply(await self._client.send(request, stream=True))
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise LeanConnectError(repr(exc)) from None
        except httpx.HTTPError as exc:
            raise LeanHttpError(repr(exc)) from None

    def close(self) -> None:
        """Nothing of its own: the shared httpx client is closed by the app."""


class _HttpxReply:
    def __init__(self, resp: httpx.Response) -> None:
        self._resp = resp
        self.status = resp.status_code
        self.headers: Headers = [(k.lower(), v) for k, v in resp.headers.raw]

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)

    async def read(self) -> bytes:
        try:
            return await self._resp.aread()
        except httpx.HTTPError as exc:
            raise LeanHttpError(repr(exc)) from None

    async def pieces(self) -> AsyncIterator[bytes]:
        try:
            async for piece in self._resp.aiter_raw():
                yield piece
        except httpx.HTTPError as exc:
            raise LeanHttpError(repr(exc)) from None

    def close(self) -> None:
        """Closed by a task of its own: the caller may be a cancelled one."""
        closing = asyncio.ensure_future(self._resp.aclose())
        _closing.add(closing)
        closing.add_done_callback(_closing.discard)


_closing: set[asyncio.Future[None]] = set()  # httpx answers being closed


class Hits(NamedTuple):
    """The index's answer for one prompt: instance -> (tier, tokens held from token 0)."""

    by_instance: dict[str, tuple[str, int]]

    def tokens(self) -> dict[str, int]:
        return {i: n for i, (_, n) in self.by_instance.items()}


class ControllerClient:
    """The controller's HTTP API at one URL or several (replicas of one index,
    ``kvplane controller --nats``). Each call goes to the replica that answered last; one
    that cannot be reached, answers an error or runs out of time is passed over for the
    next at once, within the same deadline, and the first to answer becomes the current
    one. Single-threaded: for one event loop's tasks."""

    def __init__(
        self,
        urls: Sequence[str],
        client: httpx.AsyncClient,
        metrics: RouterMetrics,
        token: str | None = None,
    ) -> None:
        if not urls:
            raise ValueError("a controller client needs at least one URL")
        self.urls = tuple(u.rstrip("/") for u in urls)
        self._client = client
        self._metrics = metrics
        self._auth = {"authorization": f"Bearer {token}"} if token else {}
        self._lean = {
            u: LeanClient(u, headers=self._auth) for u in self.urls if u.startswith("http://")
        }
        self._current = 0

    @property
    def current(self) -> str:
        """The URL the next call goes to first."""
        return self.urls[self._current]

    def _order(self) -> list[int]:
        n = len(self.urls)
        return [(self._current + i) % n for i in range(n)]

    def _failed(self, index: int, what: str) -> None:
        """``urls[index]`` failed ``what``; the next one becomes current (if it was)."""
        url = self.urls[index]
        log.warning("controller %s failed: %s", url, what)
        if len(self.urls) > 1 and index == self._current:
            self._current = (index + 1) % len(self.urls)
            self._metrics.controller_failovers.labels(url).inc()
            log.warning("controller calls go to %s now", self.current)

    async def lookup(self, tokens: Sequence[int], timeout: float) -> Hits | None:
        """The index's hits for ``tokens`` from the first controller to answer; None when
        none answers within ``timeout`` seconds (the request is then routed by load)."""
        start = time.perf_counter()
        body = _encode({"tokens": tokens})
        try:
            for index in self._order():
                left = timeout - (time.perf_counter() - start)
                if left <= 0:
                    return None
                try:
                    hits = await self._lookup_at(self.urls[index], body, left)
                except _ControllerFailed as exc:
                    self._failed(index, f"/lookup {exc}")
                    continue
                self._current = index
                return hits
            return None
        finally:
            self._metrics.lookup_seconds.observe(time.perf_counter() - start)

    async def _lookup_at(self, url: str, body: bytes, timeout: float) -> Hits:
        lean = self._lean.get(url)
        try:
            if lean is not None:
                status, answer = await lean.post("/lookup", body, timeout)
            else:
                resp = await self._client.post(
                    f"{url}/lookup",
                    content=body,
                    headers={"content-type": "application/json", **self._auth},
                    timeout=timeout,
                )
                status, answer = resp.status_code, resp.content
        except (httpx.HTTPError, LeanHttpError, TimeoutError) as exc:
            raise _ControllerFailed(repr(exc)) from None
        if status != 200:
            raise _ControllerFailed(f"answered {status}: {answer[:200]!r}")
        try:
            layout = _decode(answer)["layout_info"]
            return Hits({str(i): (str(loc), int(n)) for i, (loc, n) in layout.items()})
        except (msgspec.DecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _ControllerFailed(f"answered an unexpected body: {exc!r}") from None

    def close(self) -> None:
        for lean in self._lean.values():
            lean.close()

    async def serving_urls(self, timeout: float) -> dict[str, str] | None:
        """``serving_url -> instance_id`` of every registered instance that has one (its
        lowest rank's), from the first controller to answer ``/status``; None when none
        does."""
        for index in self._order():
            try:
                resp = await self._client.get(
                    f"{self.urls[index]}/status", headers=self._auth, timeout=timeout
                )
                resp.raise_for_status()
                found = _serving_urls(resp.json()["instances"])
            except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError) as exc:
                self._failed(index, f"/status {exc!r}")
                continue
            self._current = index
            return found
        return None

    async def heartbeat(self, body: dict[str, Any], timeout: float) -> str | None:
        """POST the router's heartbeat to every controller (each replica keeps its own table
        of routers); None when all took it, else what went wrong at each that did not (its
        status and error message, or the failure)."""

        async def one(url: str) -> str | None:
            try:
                resp = await self._client.post(
                    f"{url}/routers/heartbeat", json=body, headers=self._auth, timeout=timeout
                )
            except httpx.HTTPError as exc:
                return f"{url}: {exc!r}"
            if resp.status_code == 200:
                return None
            return f"{url}: {resp.status_code} {resp.text[:200]}"

        problems = [p for p in await asyncio.gather(*(one(u) for u in self.urls)) if p]
        return "; ".join(problems) or None


def _serving_urls(instances: Any) -> dict[str, str]:
    found: dict[str, str] = {}
    for inst in instances:
        urls = [w.get("serving_url") for w in inst.get("workers", [])]
        url = next((u for u in urls if u), None)
        if url:
            found[str(url).rstrip("/")] = str(inst["instance_id"])
    return found


class _ControllerFailed(Exception):
    pass


class Checker:
    """Keeps the pool current: every ``interval`` seconds each backend's ``/health`` and
    ``/metrics`` (its models when it is (re)admitted and every tenth round), and every
    ``discovery_interval`` seconds the controller's instances."""

    def __init__(
        self,
        pool: Pool,
        client: httpx.AsyncClient,
        controller: ControllerClient | None,
        *,
        flags: Sequence[BackendSpec],
        discover: bool,
        interval: float,
        discovery_interval: float,
        timeout: float,
    ) -> None:
        self.pool = pool
        self._client = client
        self._controller = controller
        self._flags = list(flags)
        self._discover = discover
        self._interval = interval
        self._discovery_interval = discovery_interval
        self._timeout = timeout
        self._round = 0

    async def discover(self) -> None:
        """Name the flag backends the controller knows; add the instances it lists."""
        if self._controller is None:
            return
        listed = await self._controller.serving_urls(self._timeout)
        if listed is None:
            return
        for spec in self._flags:
            if spec.instance_id is None and spec.url in listed:
                self.pool.add(BackendSpec(spec.url, listed[spec.url]), from_flag=True)
        if self._discover:
            self.pool.sync_discovered(listed)

    async def check_all(self) -> None:
        models_round = self._round % 10 == 0
        self._round += 1
        await asyncio.gather(*(self._check(url, models_round) for url in list(self.pool.backends)))

    async def _check(self, url: str, models_round: bool) -> None:
        backend = self.pool.backends.get(url)
        if backend is None:
            return
        want_models = models_round or not backend.admitted or not backend.models
        try:
            health = await self._client.get(f"{url}/health", timeout=self._timeout)
            if health.status_code != 200:
                raise _CheckFailed(f"/health answered {health.status_code}")
            metrics = await self._client.get(f"{url}/metrics", timeout=self._timeout)
            load = parse_load(metrics.text) if metrics.status_code == 200 else None
            models = None
            if want_models:
                listed = await self._client.get(f"{url}/v1/models", timeout=self._timeout)
                models = [str(m["id"]) for m in listed.json()["data"]]
        except (httpx.HTTPError, _CheckFailed, ValueError, KeyError, TypeError) as exc:
            if self.pool.failed(url, repr(exc)):
                log.warning(
                    "backend %s ejected after %d failed checks: %r", url, backend.failures, exc
                )
            return
        if not backend.admitted:
            log.info("backend %s admitted (instance %s)", url, backend.instance_id)
        self.pool.check_answered(url, load, models)

    async def run(self) -> None:
        """Check forever (cancel to stop)."""
        last_discovery = -1e9
        while True:
            now = time.monotonic()
            if now - last_discovery >= self._discovery_interval:
                last_discovery = now
                await self.discover()
            await self.check_all()
            await asyncio.sleep(self._interval)


class _CheckFailed(Exception):
    pass


def describe(pool: Pool) -> list[dict[str, Any]]:
    """The backends as the router's /health shows them."""
    return [
        {
            "url": b.url,
            "instance_id": b.instance_id,
            "admitted": b.admitted,
            "failures": b.failures,
            "in_flight": b.in_flight,
            "models": sorted(b.models),
            "load": b.load._asdict(),
            "last_error": b.last_error,
        }
        for b in sorted(pool.backends.values(), key=lambda b: b.url)
    ]
