"""The requests ``make demo-ha`` keeps running while it kills things (kvplane/demo/ha.py):
completions through ``kvplane router``, and ``/lookup`` on every live replica, on one
thread. Completions are counted under the phase they were sent in, lookups by replica."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from typing import Any, NamedTuple

from kvplane.errors import Unavailable

__all__ = ["Traffic", "call", "prompt"]

#: Shared prefixes (a system prompt each, ~200 tokens with the byte tokenizer): the
#: requests of one go to the instance holding it, as long as the router has an index.
DOCS = 4
_WORDS = ("alpha", "beta", "gamma", "delta", "kappa", "sigma", "omega", "theta")


def call(method: str, url: str, body: Any = None, timeout: float = 10.0) -> Any:
    """The JSON answer of one HTTP call; Unavailable for an error status or no answer."""
    return call_with_headers(method, url, body, timeout)[0]


def call_with_headers(
    method: str, url: str, body: Any = None, timeout: float = 10.0
) -> tuple[Any, dict[str, str]]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as reply:
            headers = {k.lower(): v for k, v in reply.headers.items()}
            return json.loads(reply.read() or b"null"), headers
    except urllib.error.HTTPError as exc:
        raise Unavailable(f"{method} {url}: {exc.code} {exc.read()[:200]!r}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise Unavailable(f"{method} {url}: {exc}") from None


def prompt(n: int) -> str:
    """Request ``n``'s prompt: shared prefix ``n % DOCS``, then a question of its own."""
    doc = n % DOCS
    system = " ".join(_WORDS[(doc * 7 + i * i) % len(_WORDS)] for i in range(36))
    return f"document {doc}: {system}. question {n}: what comes next?"


class Sent(NamedTuple):
    phase: str
    ok: bool
    instance: str  # the router's x-kvplane-instance ("" when it failed)
    reason: str  # the router's x-kvplane-route-reason


class Traffic:
    """Sends request after request until :meth:`stop`: one completion through the router,
    then a ``/lookup`` of its prompt on each replica not in :attr:`dead`. ``phase`` (set
    by the demo) labels what is sent from then on."""

    def __init__(
        self, router_url: str, tokenize_url: str, replica_urls: dict[str, str], pause: float
    ) -> None:
        self.router_url = router_url
        self.tokenize_url = tokenize_url  # an engine's /tokenize: the ids the index keys
        self.replica_urls = replica_urls
        self.phase = "steady"
        self.dead: set[str] = set()
        self.sent: list[Sent] = []
        self.lookups: Counter[tuple[str, str]] = Counter()  # (replica, answered|failed|found)
        self._pause = pause
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-ha-traffic", daemon=True)

    def start(self) -> Traffic:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(self._pause):
            text = prompt(n)
            self._complete(text)
            try:
                tokens = call("POST", self.tokenize_url, {"prompt": text})["tokens"]
            except Unavailable:
                continue  # the engines are never stopped: this does not happen in the demo
            for name, url in self.replica_urls.items():
                if name not in self.dead:
                    self._lookup(name, url, tokens)
            n += 1

    def _complete(self, text: str) -> None:
        phase = self.phase
        body = {"prompt": text, "max_tokens": 2, "temperature": 0}
        try:
            _, headers = call_with_headers("POST", f"{self.router_url}/v1/completions", body, 30)
        except Unavailable:
            self.sent.append(Sent(phase, False, "", ""))
            return
        instance = headers.get("x-kvplane-instance", "")
        self.sent.append(Sent(phase, True, instance, headers.get("x-kvplane-route-reason", "")))

    def _lookup(self, name: str, url: str, tokens: list[int]) -> None:
        try:
            layout = call("POST", f"{url}/lookup", {"tokens": tokens})["layout_info"]
        except Unavailable:
            self.lookups[name, "failed"] += 1
            return
        self.lookups[name, "answered"] += 1
        if any(held > 0 for _, held in layout.values()):
            self.lookups[name, "found"] += 1

    def completion_rows(self, phases: Sequence[str], instances: Sequence[str]) -> list[list[str]]:
        """Per phase: sent, failed, how many went to each instance, why the router chose
        them with the index's answer, and how many it routed without one (fallback)."""
        rows = []
        for phase in phases:
            mine = [s for s in self.sent if s.phase == phase]
            to = Counter(s.instance for s in mine if s.ok)
            reasons = Counter(s.reason for s in mine if s.ok)
            blind = reasons.pop("fallback", 0)
            shown = ", ".join(f"{r} {c}" for r, c in sorted(reasons.items()))
            rows.append(
                [phase, str(len(mine)), str(sum(not s.ok for s in mine))]
                + [str(to[i]) for i in instances]
                + [shown or "-", str(blind)]
            )
        return rows

    def lookup_rows(self) -> list[list[str]]:
        def n(name: str, what: str) -> str:
            return str(self.lookups[name, what])

        return [
            [name, n(name, "answered"), n(name, "found"), n(name, "failed")]
            for name in self.replica_urls
        ]
