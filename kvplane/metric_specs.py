"""Every Prometheus metric kvplane exports, declared once: name, type, labels, meaning.

The engine's registry (:mod:`kvplane.engine.metrics`), its scrape-time collectors (tier
figures, the controller worker's counters) and the controller's ``/metrics`` build their
families from these specs, and ``python -m kvplane.docs`` renders docs/metrics.md from them;
a test scrapes a running controller and engine and compares what they export with this table.

Names follow Prometheus conventions: base units in the name (``_seconds``, ``_bytes``),
counters exported with ``_total`` (``name`` here is the family name, without it; the
client library appends it), histograms expose ``_bucket``, ``_sum`` and ``_count``.
Pure: no prometheus_client, no torch, so the controller and the docs read it freely.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = [
    "CONTROLLER_COUNTERS",
    "CONTROLLER_METRICS",
    "COPY_OPS",
    "ENGINE_METRICS",
    "ROUTER_METRICS",
    "ROUTER_REASONS",
    "SERVE_METRICS",
    "TIER_STATS",
    "WORKER_COUNTERS",
    "MetricKind",
    "MetricSpec",
    "spec",
]


class MetricKind(Enum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: MetricKind
    help: str
    labels: tuple[str, ...] = ()

    @property
    def exposed(self) -> tuple[str, ...]:
        """The sample names a scrape shows for this family."""
        if self.kind is MetricKind.COUNTER:
            return (self.name + "_total",)
        if self.kind is MetricKind.HISTOGRAM:
            return tuple(self.name + s for s in ("_bucket", "_sum", "_count"))
        return (self.name,)


def _c(name: str, help: str, *labels: str) -> MetricSpec:
    return MetricSpec(name, MetricKind.COUNTER, help, labels)


def _g(name: str, help: str, *labels: str) -> MetricSpec:
    return MetricSpec(name, MetricKind.GAUGE, help, labels)


def _h(name: str, help: str, *labels: str) -> MetricSpec:
    return MetricSpec(name, MetricKind.HISTOGRAM, help, labels)


#: The controller worker's counters (``ControllerWorker.stats`` keys), each exported as
#: ``kvplane_worker_<key>_total``.
WORKER_COUNTERS = {
    "registrations": "Registrations with the controller (the first one and every re-registration)",
    "resyncs": "Times the controller asked for a resync (unknown worker, sequence gap)",
    "reports_sent": "Chunk report batches handed to the controller's socket",
    "reports_dropped": "Chunk report batches dropped (socket full); the gap triggers a resync",
    "events_sent": "Admit/evict events in the reports sent (resynced keys included)",
    "event_overflows": "Times storage events were lost (the worker's event queue overflowed), "
    "each followed by a resync",
    "control_failures": "Rounds of the worker's control loop that raised, each logged and "
    "followed by a resync (the loop goes on)",
}

#: What ``kvplane_tier_stat{tier, stat}`` shows, by tier (``StorageBackend.counters``).
TIER_STATS = {
    "LocalCPUBackend": {
        "chunks": "chunks held",
        "used_bytes": "bytes of chunk data held",
        "capacity_bytes": "bytes the tier may hold",
        "evictions": "chunks evicted to make room",
        "refused_stores": "stores refused (every page pinned or in use)",
    },
    "LocalDiskBackend": {
        "chunks": "chunk files held",
        "used_bytes": "bytes of chunk files held",
        "capacity_bytes": "bytes the tier may hold (`max_local_disk_size`)",
        "evictions": "chunk files evicted to make room",
        "corrupt": "unreadable chunk files dropped",
        "write_errors": "chunk files that could not be written",
    },
    "RemoteBackend": {
        "breaker_open": "1 while the circuit breaker is open or half-open (calls skipped)",
        "breaker_times_opened": "times the breaker opened",
        "errors": "failed Redis calls",
        "dropped_puts": "stores skipped while the breaker was open",
        "skipped_gets": "reads skipped while the breaker was open",
        "corrupt": "unreadable values dropped",
    },
    "FSConnector": {
        "corrupt": "unreadable chunk files dropped",
        "write_errors": "chunk files that could not be written",
    },
    "P2PBackend": {"fetch_errors": "fetches from a peer that failed"},
}

#: The ``op`` label values of ``kvplane_copy_seconds`` and ``kvplane_copied_bytes``.
COPY_OPS = ("store", "retrieve")

ENGINE_METRICS = (
    _c("kvplane_stored_tokens", "Tokens whose KV was stored"),
    _c("kvplane_stored_bytes", "KV bytes stored"),
    _c("kvplane_retrieved_tokens", "Tokens whose KV was loaded into the paged caches"),
    _c("kvplane_retrieved_bytes", "KV bytes retrieved"),
    _c("kvplane_chunk_hits", "Chunks found by retrieve"),
    _c("kvplane_chunk_misses", "Retrieves that stopped at a missing chunk"),
    _c("kvplane_refused_stores", "Chunk stores refused (tier full of pinned/in-use chunks)"),
    _c("kvplane_evictions", "Chunks evicted or removed, by tier", "tier"),
    _c(
        "kvplane_events_dropped",
        "Storage events a subscriber lost because its queue overflowed (it then resyncs)",
        "subscriber",
    ),
    _h("kvplane_store_seconds", "Store latency (gather from the paged caches + tier writes)"),
    _h("kvplane_retrieve_seconds", "Retrieve latency (tier reads + scatter into the caches)"),
    _c(
        "kvplane_copy_seconds",
        "Seconds spent copying KV between the paged caches and chunk pages (CPU caches), "
        f"by op ({', '.join(COPY_OPS)})",
        "op",
    ),
    _c("kvplane_copied_bytes", "KV bytes copied by those copies, by op", "op"),
    _c("kvplane_tier_hits", "Chunk reads a tier served (P2PBackend: chunks from peers)", "tier"),
    _c("kvplane_tier_misses", "Chunk reads a tier missed", "tier"),
    _c(
        "kvplane_tier_read_bytes",
        "Bytes read from a tier (P2PBackend: received from peers)",
        "tier",
    ),
    _c("kvplane_tier_written_bytes", "Bytes written to a tier", "tier"),
    _c("kvplane_tier_errors", "Tier calls that raised", "tier"),
    _c("kvplane_tier_dropped_writes", "Asynchronous writes dropped (queue full)", "tier"),
    _g("kvplane_tier_queue_depth", "Asynchronous writes pending", "tier"),
    _g(
        "kvplane_tier_stat",
        "Tier-internal figures read when scraped: chunks and bytes held, capacity, evictions, "
        "corrupt chunks dropped, the remote tier's circuit breaker (see the table of stats)",
        "tier",
        "stat",
    ),
    *(_c(f"kvplane_worker_{key}", text) for key, text in WORKER_COUNTERS.items()),
    _g("kvplane_worker_registered", "1 while the worker is registered with the controller"),
    _g(
        "kvplane_worker_pending_events",
        "Admit/evict events waiting for the next report (taken or not yet taken)",
    ),
)

#: The controller's monotonic counts, each exported as ``kvplane_controller_<key>_total``:
#: the core's ``Counters`` fields, then the lookup totals (``Cluster.lookup_stats``).
CONTROLLER_COUNTERS = {
    "chunk_events_applied": "Admit and evict events applied to the index",
    "admits_applied": "Chunk admits applied to the index",
    "evicts_applied": "Chunk evicts applied to the index",
    "reports_applied": "Report batches applied",
    "reports_stale": "Report batches dropped as duplicates or older than the last applied",
    "reports_unknown_worker": "Report batches from an unknown worker or an old incarnation",
    "sequence_gaps": "Report batches that showed lost batches (the worker is asked to resync)",
    "resyncs_requested": "Resyncs asked of workers (sequence gaps, unknown workers)",
    "unknown_heartbeats": "Heartbeats from workers the controller does not know",
    "unknown_messages": "Well-formed messages of a type the controller does not handle",
    "malformed_frames": "Frames that did not decode",
    "foreign_messages": "Event-log messages skipped: a kind, or a subject, that does not belong there",
    "registrations": "Worker registrations accepted",
    "registrations_refused": "Worker registrations refused (protocol or key scheme mismatch)",
    "deregistrations": "Workers that deregistered",
    "reaped_workers": "Workers dropped for missing heartbeats",
    "chunks_dropped": "Index entries dropped with a deregistered, reaped or replaced worker",
    "auth_failures": "Failed CURVE handshakes on the worker ports (no CURVE, a key not "
    "allowed, a wrong controller key); a refused client retries about every 100 ms",
    "lookup_tokens": "Tokens asked in /lookup requests",
    "lookup_matched_tokens": "Tokens of /lookup requests matched by the best instance's prefix "
    "(hit ratio = rate of this / rate of lookup_tokens)",
}

CONTROLLER_METRICS = (
    *(_c(f"kvplane_controller_{key}", text) for key, text in CONTROLLER_COUNTERS.items()),
    _g("kvplane_controller_index_chunks", "Chunks in the index (one per worker and tier)"),
    _g("kvplane_controller_workers", "Registered workers"),
    _g("kvplane_controller_instances", "Instances with a registered worker"),
    _g(
        "kvplane_controller_instance_chunks",
        "Chunks an instance holds, by tier (summed over its ranks)",
        "instance_id",
        "location",
    ),
    _h("kvplane_controller_lookup_seconds", "Time to answer /lookup (hashing + index probe)"),
)

#: ``kvplane serve``'s own ``/metrics`` (on its OpenAI port): its queue, under names that
#: mirror vLLM's ``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
#: ``vllm:kv_cache_usage_perc`` and its aborted requests, so a router reads both alike.
SERVE_METRICS = (
    _g("kvplane_serve_num_requests_running", "Requests generating (the server runs one at a time)"),
    _g("kvplane_serve_num_requests_waiting", "Requests queued behind the running one"),
    _g("kvplane_serve_kv_cache_usage_perc", "Share of the paged KV cache's blocks in use, 0 to 1"),
    _c("kvplane_serve_request_aborts", "Requests stopped because their client went away"),
)

#: The ``reason`` label values of ``kvplane_router_requests`` (kvplane.router.scoring.Reason).
ROUTER_REASONS = ("prefix", "load", "affinity", "fallback", "retry")

#: ``kvplane router``'s ``/metrics``.
ROUTER_METRICS = (
    _c(
        "kvplane_router_requests",
        f"Requests routed, by why their backend was chosen ({', '.join(ROUTER_REASONS)})",
        "reason",
    ),
    _c("kvplane_router_prompt_tokens", "Prompt tokens of the requests routed"),
    _c(
        "kvplane_router_matched_tokens",
        "Prompt tokens the chosen backend held itself (the index's hit) when routed",
    ),
    _c(
        "kvplane_router_fetch_tokens",
        "Prompt tokens the chosen backend was expected to fetch from another instance by P2P",
    ),
    _h(
        "kvplane_router_decision_seconds",
        "Time from a request's body to its backend chosen (tokenize + /lookup + score)",
    ),
    _h("kvplane_router_lookup_seconds", "Time of the controller's /lookup, as the router sees it"),
    _c(
        "kvplane_router_controller_failovers",
        "Times a controller failed and the router's calls moved to the next --controller, "
        "by the one that failed",
        "controller",
    ),
    _c(
        "kvplane_router_errors",
        "Requests that failed at a backend, by kind (connect, refused_503, mid_response, "
        "no_backend)",
        "kind",
    ),
    _g(
        "kvplane_router_backend_in_flight",
        "Requests the router has in flight, by backend",
        "backend",
    ),
    _g("kvplane_router_backend_up", "1 while a backend is admitted, 0 while ejected", "backend"),
    _c("kvplane_router_backend_requests", "Requests sent, by backend", "backend"),
)

_BY_NAME = {
    s.name: s for s in (*ENGINE_METRICS, *CONTROLLER_METRICS, *SERVE_METRICS, *ROUTER_METRICS)
}


def spec(name: str) -> MetricSpec:
    """The spec of family ``name``; KeyError for a metric nobody declared."""
    return _BY_NAME[name]
