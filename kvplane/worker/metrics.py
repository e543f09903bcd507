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

__all__ = ["COUNTER_HELP", "WorkerStatsCollector"]

#: The worker's counters (``ControllerWorker.stats`` keys), each exported as
#: ``kvplane_worker_<key>_total``.
COUNTER_HELP = {
    "registrations": "Registrations with the controller (the first one and every re-registration)",
    "resyncs": "Times the controller asked for a resync (unknown worker, sequence gap)",
    "reports_sent": "Chunk report batches handed to the controller's socket",
    "reports_dropped": "Chunk report batches dropped (socket full); the gap triggers a resync",
    "events_sent": "Admit/evict events in the reports sent (resynced keys included)",
    "event_overflows": "Times storage events were lost (the worker's event queue overflowed), "
    "each followed by a resync",
}


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
        for name, help_text in COUNTER_HELP.items():
            yield CounterMetricFamily(f"kvplane_worker_{name}", help_text, value=stats.get(name, 0))
        yield GaugeMetricFamily(
            "kvplane_worker_registered",
            "1 while the worker is registered with the controller",
            value=1 if self._registered() else 0,
        )
        yield GaugeMetricFamily(
            "kvplane_worker_pending_events",
            "Admit/evict events waiting for the next report (taken or not yet taken)",
            value=self._pending(),
        )
