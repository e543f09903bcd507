"""The controller worker's counters on the engine's ``/metrics``, read when scraped.

The worker counts in a plain dict on its own thread (no lock on the reporting path); this
collector turns a snapshot of it into Prometheus families, so the engine's registry shows
whether the worker is registered, how often it (re)registered and resynced, and how many
reports and chunk events reached the controller's socket or were dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvplane.metric_specs import WORKER_COUNTERS, spec

__all__ = ["WorkerStatsCollector"]


class WorkerStatsCollector(Collector):
    def __init__(
        self,
        stats: Callable[[], Mapping[str, int]],
        registered: Callable[[], bool],
        pending: Callable[[], int],
    ) -> None:
        self._stats, self._registered, self._pending = stats, registered, pending

    def collect(self) -> Iterator[Metric]:
        stats = dict(self._stats())
        for name, help_text in WORKER_COUNTERS.items():
            yield CounterMetricFamily(f"kvplane_worker_{name}", help_text, value=stats.get(name, 0))
        registered = spec("kvplane_worker_registered")
        yield GaugeMetricFamily(
            registered.name, registered.help, value=1 if self._registered() else 0
        )
        pending = spec("kvplane_worker_pending_events")
        yield GaugeMetricFamily(pending.name, pending.help, value=self._pending())
