"""Operational endpoints of the controller: /metrics, /healthz, /conf, /threads, /loglevel."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from kvplane.controller.cluster import Cluster
from kvplane.controller.settings import ControllerConfig
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
            workers = len(cluster.core.registry)
            instances = len(cluster.core.registry.instances())
        for name, value in counts.items():
            metric = CounterMetricFamily(f"kvplane_controller_{name}", name.replace("_", " "))
            metric.add_metric([], value)
            yield metric
        for name, value, doc in (
            ("index_chunks", chunks, "chunks in the index (one per worker and tier)"),
            ("workers", workers, "registered workers"),
            ("instances", instances, "instances with a registered worker"),
        ):
            gauge = GaugeMetricFamily(f"kvplane_controller_{name}", doc)
            gauge.add_metric([], value)
            yield gauge


def build_ops_router(cluster: Cluster, settings: ControllerConfig) -> tuple[APIRouter, Histogram]:
    """The router, and the lookup-latency histogram the cluster routes observe."""
    registry = CollectorRegistry()
    registry.register(_CoreCollector(cluster))  # type: ignore[arg-type]
    latency = Histogram(
        "kvplane_controller_lookup_seconds",
        "Time to answer /lookup (hashing + index probe)",
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
