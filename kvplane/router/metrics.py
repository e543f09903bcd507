"""The router's Prometheus families, built from :data:`kvplane.metric_specs.ROUTER_METRICS`;
per-backend gauges are read from the pool at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from kvplane.metric_specs import ROUTER_REASONS, spec
from kvplane.router.pool import Pool

__all__ = ["RouterMetrics"]

_DECISION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1, 1.0)


class _PoolCollector:
    def __init__(self, pool: Callable[[], Pool]) -> None:
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        backends = list(self._pool().backends.values())
        for name, value in (
            ("kvplane_router_backend_in_flight", lambda b: b.in_flight),
            ("kvplane_router_backend_up", lambda b: int(b.admitted)),
        ):
            s = spec(name)
            family = GaugeMetricFamily(s.name, s.help, labels=list(s.labels))
            for b in backends:
                family.add_metric([b.url], value(b))
            yield family


class RouterMetrics:
    """The families, in one registry of their own (the router's ``/metrics``)."""

    def __init__(self, pool: Callable[[], Pool]) -> None:
        self.registry = CollectorRegistry()

        def counter(name: str) -> Counter:
            s = spec(name)
            return Counter(s.name, s.help, list(s.labels), registry=self.registry)

        def histogram(name: str) -> Histogram:
            s = spec(name)
            return Histogram(s.name, s.help, buckets=_DECISION_BUCKETS, registry=self.registry)

        self.requests = counter("kvplane_router_requests")
        for reason in ROUTER_REASONS:
            self.requests.labels(reason)
        self.prompt_tokens = counter("kvplane_router_prompt_tokens")
        self.matched_tokens = counter("kvplane_router_matched_tokens")
        self.fetch_tokens = counter("kvplane_router_fetch_tokens")
        self.decision_seconds = histogram("kvplane_router_decision_seconds")
        self.lookup_seconds = histogram("kvplane_router_lookup_seconds")
        self.controller_failovers = counter("kvplane_router_controller_failovers")
        self.errors = counter("kvplane_router_errors")
        self.backend_requests = counter("kvplane_router_backend_requests")
        self.registry.register(_PoolCollector(pool))  # type: ignore[arg-type]

    def requests_by_reason(self) -> dict[str, int]:
        """``kvplane_router_requests_total`` now, by reason (every reason, 0 included)."""
        counts: dict[str, int] = {}
        for family in self.requests.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counts[sample.labels["reason"]] = int(sample.value)
        return counts
