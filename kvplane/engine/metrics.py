"""Prometheus metrics of one engine: a registry per engine, never the global one."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["EngineMetrics"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.stored_tokens = Counter("kvplane_stored_tokens", "Tokens stored", registry=r)
        self.stored_bytes = Counter("kvplane_stored_bytes", "KV bytes stored", registry=r)
        self.retrieved_tokens = Counter("kvplane_retrieved_tokens", "Tokens retrieved", registry=r)
        self.retrieved_bytes = Counter("kvplane_retrieved_bytes", "KV bytes retrieved", registry=r)
        self.lookup_hits = Counter("kvplane_chunk_hits", "Chunks found by retrieve", registry=r)
        self.lookup_misses = Counter(
            "kvplane_chunk_misses", "Retrieves that stopped at a missing chunk", registry=r
        )
        self.refused_stores = Counter(
            "kvplane_refused_stores",
            "Chunk stores refused (tier full of pinned/in-use)",
            registry=r,
        )
        self.evictions = Counter(
            "kvplane_evictions", "Chunks evicted or removed", ["tier"], registry=r
        )
        self.events_dropped = Counter(
            "kvplane_events_dropped",
            "Storage events a subscriber lost because its queue overflowed (it then resyncs)",
            ["subscriber"],
            registry=r,
        )
        self.store_seconds = Histogram(
            "kvplane_store_seconds", "Store latency", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.retrieve_seconds = Histogram(
            "kvplane_retrieve_seconds", "Retrieve latency", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.copy_seconds = Counter(
            "kvplane_copy_seconds",
            "Seconds spent copying KV between the paged caches and chunk pages (CPU caches)",
            ["op"],
            registry=r,
        )
        self.copied_bytes = Counter(
            "kvplane_copied_bytes", "KV bytes copied by those copies", ["op"], registry=r
        )
        self.tier_hits = Counter("kvplane_tier_hits", "Reads served", ["tier"], registry=r)
        self.tier_misses = Counter("kvplane_tier_misses", "Reads missed", ["tier"], registry=r)
        self.tier_bytes_read = Counter(
            "kvplane_tier_read_bytes", "Bytes read", ["tier"], registry=r
        )
        self.tier_bytes_written = Counter(
            "kvplane_tier_written_bytes", "Bytes written", ["tier"], registry=r
        )
        self.tier_errors = Counter("kvplane_tier_errors", "Tier call errors", ["tier"], registry=r)
        self.tier_dropped_writes = Counter(
            "kvplane_tier_dropped_writes", "Writes dropped (queue full)", ["tier"], registry=r
        )
        self.tier_queue_depth = Gauge(
            "kvplane_tier_queue_depth", "Pending asynchronous writes", ["tier"], registry=r
        )
