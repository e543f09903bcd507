"""Operational endpoints of the controller: /metrics, /healthz, /conf, /threads, /loglevel
(levels are set by ``POST /loglevel``; a GET never changes them here)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from kvplane.controller.cluster import Cluster
from kvplane.controller.overview import by_instance, copy_workers
from kvplane.controller.settings import ControllerConfig
from kvplane.metric_specs import CONTROLLER_COUNTERS, spec
from kvplane.web.diagnostics import loglevel_router, threads_router

__all__ = ["build_ops_router"]


class _CoreCollector:
    """Reads the core's counters and sizes at scrape time (under the cluster lock)."""

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster

    def collect(self) -> Iterator[Metric]:
        cluster = self._cluster
        with cluster.lock:
            counts = cluster.core.counters.as_dict()
            chunks = cluster.core.index.num_chunks()
            copied = copy_workers(cluster.core)
            workers = len(cluster.core.registry)
            instances = len(cluster.core.registry.instances())
        _, asked, matched, _ = cluster.lookup_stats.totals()
        counts |= {"lookup_tokens": asked, "lookup_matched_tokens": matched}
        for name, value in counts.items():
            yield CounterMetricFamily(
                f"kvplane_controller_{name}", CONTROLLER_COUNTERS[name], value=value
            )
        for name, value in (
            ("kvplane_controller_index_chunks", chunks),
            ("kvplane_controller_workers", workers),
            ("kvplane_controller_instances", instances),
        ):
            yield GaugeMetricFamily(name, spec(name).help, value=value)
        s = spec("kvplane_controller_instance_chunks")
        family = GaugeMetricFamily(s.name, s.help, labels=list(s.labels))
        for inst in by_instance(copied.workers, copied.tier_counts):
            for location, n in sorted(inst.chunks.items()):
                family.add_metric([inst.instance_id, location], n)
        yield family


def build_ops_router(cluster: Cluster, settings: ControllerConfig) -> tuple[APIRouter, Histogram]:
    """The router, and the lookup-latency histogram the cluster routes observe."""
    registry = CollectorRegistry()
    registry.register(_CoreCollector(cluster))  # type: ignore[arg-type]
    s = spec("kvplane_controller_lookup_seconds")
    latency = Histogram(
        s.name,
        s.help,
        buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0),
        registry=registry,
    )
    router = APIRouter(tags=["ops"])

    @router.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @router.get("/healthz")
    def healthz() -> dict[str, Any]:
        with cluster.lock:
            workers = len(cluster.core.registry)
        return {"status": "ok", "workers": workers}

    @router.get("/conf")
    def conf() -> dict[str, Any]:
        return settings.to_dict()

    router.include_router(threads_router())
    router.include_router(loglevel_router())

    return router, latency
