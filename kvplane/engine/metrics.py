"""Prometheus metrics of one engine: a registry per engine, never the global one.

Names, help and labels come from :mod:`kvplane.metric_specs` (docs/metrics.md). A labelled
series only appears once its labels are used, so each one whose label values are known
ahead (every configured tier, each copy op, each event subscriber) is created at 0 when they
become known: a dashboard then shows 0, not "No data", for a tier that has seen nothing yet.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kvplane.metric_specs import COPY_OPS, spec

__all__ = ["EngineMetrics"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self._labelled: list[tuple[tuple[str, ...], Counter | Gauge]] = []

        def counter(name: str) -> Counter:
            s = spec(name)
            family = Counter(s.name, s.help, s.labels, registry=r)
            self._labelled.append((s.labels, family))
            return family

        def histogram(name: str) -> Histogram:
            s = spec(name)
            return Histogram(s.name, s.help, s.labels, buckets=_LATENCY_BUCKETS, registry=r)

        self.stored_tokens = counter("kvplane_stored_tokens")
        self.stored_bytes = counter("kvplane_stored_bytes")
        self.retrieved_tokens = counter("kvplane_retrieved_tokens")
        self.retrieved_bytes = counter("kvplane_retrieved_bytes")
        self.lookup_hits = counter("kvplane_chunk_hits")
        self.lookup_misses = counter("kvplane_chunk_misses")
        self.refused_stores = counter("kvplane_refused_stores")
        self.evictions = counter("kvplane_evictions")
        self.events_dropped = counter("kvplane_events_dropped")
        self.store_seconds = histogram("kvplane_store_seconds")
        self.retrieve_seconds = histogram("kvplane_retrieve_seconds")
        self.copy_seconds = counter("kvplane_copy_seconds")
        self.copied_bytes = counter("kvplane_copied_bytes")
        self.tier_hits = counter("kvplane_tier_hits")
        self.tier_misses = counter("kvplane_tier_misses")
        self.tier_bytes_read = counter("kvplane_tier_read_bytes")
        self.tier_bytes_written = counter("kvplane_tier_written_bytes")
        self.tier_errors = counter("kvplane_tier_errors")
        self.tier_dropped_writes = counter("kvplane_tier_dropped_writes")
        queue = spec("kvplane_tier_queue_depth")
        self.tier_queue_depth = Gauge(queue.name, queue.help, queue.labels, registry=r)
        self._labelled.append((queue.labels, self.tier_queue_depth))
        self.start_series("op", COPY_OPS)

    def start_series(self, label: str, values: Iterable[str]) -> None:
        """Create, at 0, the series of ``values`` in every family labelled by ``label``
        alone (a series that exists already keeps its value)."""
        values = tuple(values)
        for labels, family in self._labelled:
            if labels == (label,):
                for value in values:
                    family.labels(value)
