"""One routing decision: the request's tokens, the index's hits, the backends' load, the
score. The I/O it needs (``/tokenize``, ``/lookup``) is the only I/O here; the choice is
:func:`kvplane.router.scoring.choose`.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, NamedTuple

import httpx

from kvplane.errors import NotFound, Unavailable
from kvplane.router.metrics import RouterMetrics
from kvplane.router.pool import Backend, Pool
from kvplane.router.recent import RecentPrompts, prefix_keys
from kvplane.router.scoring import Candidate, Decision, Weights, choose
from kvplane.router.settings import RouterConfig
from kvplane.router.tokens import LocalTokenizer, TokenCache, tokenize_body
from kvplane.router.upstream import ControllerClient, Hits, Origin, origin_for

__all__ = ["Route", "Router"]

log = logging.getLogger("kvplane.router")

_SESSIONS = 65536  # sessions remembered for affinity, least recently seen dropped first


class Route(NamedTuple):
    decision: Decision
    backends: list[Backend]  # in the decision's order
    prompt_tokens: int
    seconds: float  # to decide, tokenizing and the lookup included
    keys: list[int]  # the prompt's block keys (:func:`prefix_keys`), for :meth:`Router.sent`


class Router:
    def __init__(
        self,
        config: RouterConfig,
        pool: Pool,
        controller: ControllerClient | None,
        client: httpx.AsyncClient,
        metrics: RouterMetrics,
        weights: Weights,
    ) -> None:
        self.config = config
        self.pool = pool
        self.controller = controller
        self.metrics = metrics
        self.weights = weights
        self.client = client
        self._tokens = TokenCache(config.tokenize_cache_size)
        self._local = LocalTokenizer(config.tokenizer) if config.tokenizer else None
        self._local_checked = False
        self._recent = RecentPrompts(config.recent_block, config.recent_s)
        self._sessions: OrderedDict[str, str] = OrderedDict()
        self._origins: dict[str, Origin] = {}
        header = config.affinity_header
        self._affinity_header = header.lower().encode("latin-1") if header else None

    def origin(self, url: str) -> Origin:
        """Where requests to backend ``url`` go (one keep-alive client per backend)."""
        found = self._origins.get(url)
        if found is None:
            found = self._origins[url] = origin_for(
                url, self.client, self.config.connect_timeout_s, self.config.request_timeout_s
            )
        return found

    def close(self) -> None:
        for origin in self._origins.values():
            origin.close()
        self._origins.clear()

    def session_of(
        self, headers: Iterable[tuple[bytes, bytes]], body: dict[str, Any]
    ) -> str | None:
        """The request's session: its affinity header (``headers`` as ASGI gives them),
        else the body's ``user``."""
        name = self._affinity_header
        if name is not None:
            value = next((v for k, v in headers if k == name), None)
            if value:
                return value.decode("latin-1")
        user = body.get("user") if self.config.affinity_user else None
        return str(user) if isinstance(user, str) and user else None

    def remember(self, session: str | None, url: str) -> None:
        if session is None:
            return
        self._sessions[session] = url
        self._sessions.move_to_end(session)
        while len(self._sessions) > _SESSIONS:
            self._sessions.popitem(last=False)

    def sent(self, route: Route, url: str) -> None:
        """The request went to ``url``: its prompt counts as held there for ``recent_s``."""
        if self.config.recent_s > 0 and route.keys:
            self._recent.add(url, route.keys, time.monotonic())

    def backends_for(self, model: Any) -> list[Backend]:
        """The admitted backends serving ``model`` (any, if the request names none).
        Raises NotFound for a model no admitted backend serves, Unavailable when none is
        admitted."""
        up = self.pool.admitted()
        if not up:
            raise Unavailable("no backend is up: every backend failed its health checks")
        if model is None:
            return up
        serving = [b for b in up if str(model) in b.models]
        if not serving:
            raise NotFound(f"The model `{model}` does not exist.")
        return serving

    async def tokens(
        self, kind: str, body: dict[str, Any], backends: list[Backend]
    ) -> list[int] | None:
        """The prompt's token ids as the backends compute them; None when the request has
        none to give or no backend tokenized it in time."""
        wanted = tokenize_body(kind, body)
        if wanted is None or isinstance(wanted, list):
            return wanted
        key = TokenCache.key(str(body.get("model")), wanted)
        cached = self._tokens.get(key)
        if cached is not None:
            return cached
        local = self._local.encode(wanted) if self._local is not None else None
        if local is not None and self._local_checked:
            self._tokens.put(key, local)
            return local
        remote = await self._remote_tokens(wanted, backends)
        if local is not None and remote is not None:
            self._check_local(local, remote)
        if remote is not None:
            self._tokens.put(key, remote)
        return remote

    def _check_local(self, local: list[int], remote: list[int]) -> None:
        """The first prompt both tokenized: the local tokenizer is kept only if it agrees
        with the backend (other ids would key other chunks: every lookup would miss)."""
        self._local_checked = True
        if local != remote:
            pairs = enumerate(zip(local, remote, strict=False))
            first = next((i for i, (a, b) in pairs if a != b), min(len(local), len(remote)))
            log.warning(
                "local tokenizer %s disagrees with the backend's /tokenize (%d ids against "
                "%d, first difference at %d): not used",
                self.config.tokenizer,
                len(local),
                len(remote),
                first,
            )
            self._local = None

    async def _remote_tokens(
        self, wanted: dict[str, Any], backends: list[Backend]
    ) -> list[int] | None:
        for backend in backends[:2]:
            try:
                resp = await self.client.post(
                    f"{backend.url}/tokenize", json=wanted, timeout=self.config.lookup_timeout_s
                )
                if resp.status_code != 200:
                    return None  # the backend cannot tokenize this (kvplane serve: chat)
                tokens = [int(t) for t in resp.json()["tokens"]]
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                log.warning("/tokenize on %s failed: %r", backend.url, exc)
                continue
            return tokens
        return None

    async def decide(self, kind: str, body: dict[str, Any], session: str | None) -> Route:
        start = time.perf_counter()
        backends = self.backends_for(body.get("model"))
        tokens = await self.tokens(kind, body, backends)
        hits: Hits | None = None
        if tokens and self.controller is not None:
            hits = await self.controller.lookup(tokens, self.config.lookup_timeout_s)
        found = hits.by_instance if hits is not None else {}
        keys: list[int] = []
        recent: dict[str, int] = {}
        if tokens and self.config.recent_s > 0:
            keys = prefix_keys(tokens, self.config.recent_block)
            recent = self._recent.held(keys, time.monotonic())
        candidates = []
        for b in backends:
            location, held = found.get(b.instance_id or "", (None, 0))
            if held == 0 and recent.get(b.url):  # sent there, not yet indexed
                location, held = None, recent[b.url]
            candidates.append(Candidate(b.url, b.instance_id, held, location, b.current_load))
        affinity = self._sessions.get(session) if session is not None else None
        decision = choose(
            candidates,
            len(tokens or ()),
            self.weights,
            holders=hits.tokens() if hits is not None else None,
            affinity=affinity,
        )
        by_url = {b.url: b for b in backends}
        seconds = time.perf_counter() - start
        self.metrics.decision_seconds.observe(seconds)
        ranked = [by_url[u] for u in decision.ranking]
        return Route(decision, ranked, len(tokens or ()), seconds, keys)
