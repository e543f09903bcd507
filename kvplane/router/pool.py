"""The router's backends: where each is, which instance it is, whether it is admitted,
how loaded. Pure: no I/O; the checker (:class:`kvplane.router.upstream.Checker`) feeds it what the
backends answer and the proxy what its requests do.

A backend is ejected after ``eject_after`` failures in a row (failed health checks, or
requests that could not connect) and readmitted by the first check it answers; a new
backend starts admitted only once a check has answered.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from kvplane.errors import ConfigError
from kvplane.router.scoring import Load

__all__ = ["Backend", "BackendSpec", "Pool", "parse_backend", "parse_load"]


class BackendSpec(NamedTuple):
    url: str  # without a trailing slash
    instance_id: str | None  # None: ask the controller which instance serves at url


def parse_backend(text: str) -> BackendSpec:
    """``[INSTANCE_ID=]URL`` (``--backend``); ConfigError unless the URL is http(s)."""
    # an "=" before the scheme's "://" separates the id; one after it is the URL's own
    instance_id, sep, url = text.partition("=") if "=" in text.split("://")[0] else ("", "", text)
    url = url.strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+", url):
        raise ConfigError(f"--backend {text!r}: expected [INSTANCE_ID=]http://host:port")
    if sep and not instance_id:
        raise ConfigError(f"--backend {text!r}: empty instance id before '='")
    return BackendSpec(url, instance_id or None)


@dataclass
class Backend:
    """One backend's state. Mutated only by :class:`Pool`."""

    url: str
    instance_id: str | None
    from_flag: bool
    admitted: bool = False
    failures: int = 0
    load: Load = field(default_factory=Load)
    in_flight: int = 0
    finished_since_check: int = 0  # the router's requests to it done since ``load`` came
    models: frozenset[str] = frozenset()
    last_error: str = ""

    @property
    def current_load(self) -> Load:
        """The backend's last /metrics, less the router's requests that finished since (up
        to a poll interval old, it still counts them running: with the router the only
        client, that stale count, not the router's own, decided where requests went), and
        the router's own count in flight."""
        done = self.finished_since_check
        running = max(0, self.load.running - done)
        waiting = max(0, self.load.waiting - max(0, done - self.load.running))
        return Load(running, waiting, self.load.kv_usage, self.in_flight)


@dataclass
class Pool:
    eject_after: int
    backends: dict[str, Backend] = field(default_factory=dict)  # by url

    def add(self, spec: BackendSpec, *, from_flag: bool) -> Backend:
        """Add a backend (or give an existing one its instance id, if it had none)."""
        known = self.backends.get(spec.url)
        if known is None:
            known = self.backends[spec.url] = Backend(spec.url, spec.instance_id, from_flag)
        elif known.instance_id is None:
            known.instance_id = spec.instance_id
        return known

    def sync_discovered(self, listed: Mapping[str, str]) -> None:
        """The controller's instances with a serving_url (``url -> instance_id``): add the
        new, name the flag backends it identifies, drop discovered ones it no longer lists
        (unless a request is still in flight to them)."""
        for url, instance_id in listed.items():
            self.add(BackendSpec(url, instance_id), from_flag=False)
        for url, b in list(self.backends.items()):
            if not b.from_flag and url not in listed and b.in_flight == 0:
                del self.backends[url]

    def check_answered(self, url: str, load: Load | None, models: Iterable[str] | None) -> None:
        b = self.backends.get(url)
        if b is None:
            return
        b.admitted, b.failures, b.last_error = True, 0, ""
        if load is not None:
            b.load, b.finished_since_check = load, 0
        if models is not None:
            b.models = frozenset(models)

    def failed(self, url: str, error: str) -> bool:
        """A failed check or connection; True when this ejects the backend."""
        b = self.backends.get(url)
        if b is None:
            return False
        b.failures += 1
        b.last_error = error
        if b.admitted and b.failures >= self.eject_after:
            b.admitted = False
            return True
        return False

    def admitted(self, model: str | None = None) -> list[Backend]:
        """The admitted backends (serving ``model``, if given), by URL."""
        found = [b for b in self.backends.values() if b.admitted]
        if model is not None:
            found = [b for b in found if model in b.models]
        return sorted(found, key=lambda b: b.url)

    def models(self) -> set[str]:
        return {m for b in self.backends.values() if b.admitted for m in b.models}

    def started(self, url: str) -> None:
        if url in self.backends:
            self.backends[url].in_flight += 1

    def finished(self, url: str) -> None:
        b = self.backends.get(url)
        if b is not None and b.in_flight > 0:
            b.in_flight -= 1
            b.finished_since_check += 1


#: The metric families a backend's /metrics shows its queue in: vLLM's, then kvplane
#: serve's (kvplane.metric_specs.SERVE_METRICS). Series with labels are summed.
_RUNNING = ("vllm:num_requests_running", "kvplane_serve_num_requests_running")
_WAITING = ("vllm:num_requests_waiting", "kvplane_serve_num_requests_waiting")
_USAGE = (
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
    "kvplane_serve_kv_cache_usage_perc",
)
_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_load(text: str) -> Load | None:
    """A backend's queue from its Prometheus text; None when it shows none of the
    families above (not a vLLM or kvplane serve /metrics)."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        m = _SAMPLE.match(line)
        if m is None or m.group(1) not in (*_RUNNING, *_WAITING, *_USAGE):
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        sums[m.group(1)] = sums.get(m.group(1), 0.0) + value
    if not sums:
        return None

    def first(names: tuple[str, ...]) -> float:
        return next((sums[n] for n in names if n in sums), 0.0)

    return Load(int(first(_RUNNING)), int(first(_WAITING)), first(_USAGE))
