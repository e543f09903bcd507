"""Tier-internal figures as Prometheus gauges, read from each tier when scraped.

The storage manager counts what it sees (hits, misses, bytes, queue depth, dropped writes,
errors that reach it); what a tier absorbs itself (a corrupt file deleted, the remote
breaker open, a dead peer) only the tier knows. ``kvplane_tier_stat{tier, stat}`` shows
:meth:`StorageBackend.counters` of every tier.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvplane.engine.backends.base import StorageBackend
from kvplane.metric_specs import spec

__all__ = ["TierStatsCollector"]


class TierStatsCollector(Collector):
    def __init__(self, backends: Mapping[str, StorageBackend]) -> None:
        self._backends = backends

    def collect(self) -> Iterator[Metric]:
        s = spec("kvplane_tier_stat")
        family = GaugeMetricFamily(s.name, s.help, labels=list(s.labels))
        for name, backend in self._backends.items():
            for stat, value in sorted(backend.counters().items()):
                family.add_metric([name, stat], value)
        yield family
