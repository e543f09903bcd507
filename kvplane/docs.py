"""Generate docs/configuration.md and docs/metrics.md (``--write``), or check them (``--check``).

docs/configuration.md renders both key tables: the engine's (:class:`kvplane.config.EngineConfig`)
and the controller's (:class:`kvplane.controller.settings.ControllerConfig`); docs/metrics.md
renders the metric specs (:mod:`kvplane.metric_specs`). ``--check`` also checks that
docs/controller.md names every controller flag and docs/router.md every router key and flag.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

from kvplane.config import key_specs
from kvplane.controller.settings import controller_keys
from kvplane.metric_specs import (
    CONTROLLER_METRICS,
    ENGINE_METRICS,
    ROUTER_METRICS,
    SERVE_METRICS,
    TIER_STATS,
    MetricKind,
    MetricSpec,
)
from kvplane.router.settings import router_keys
from kvplane.settings_table import KeySpec

__all__ = [
    "missing_controller_flags",
    "missing_router_keys",
    "render_configuration_md",
    "render_metrics_md",
]

DOCS = Path(__file__).resolve().parent.parent / "docs"
DOC_PATH = DOCS / "configuration.md"
CONTROLLER_DOC_PATH = DOCS / "controller.md"
METRICS_DOC_PATH = DOCS / "metrics.md"
ROUTER_DOC_PATH = DOCS / "router.md"


def _help(s: KeySpec) -> str:
    extra = []
    if s.choices:
        extra.append("one of " + ", ".join(f"`{c}`" for c in s.choices))
    if s.aliases:
        extra.append("alias " + ", ".join(f"`{a}`" for a in s.aliases))
    if s.secret:
        extra.append("masked in `GET /conf`")
    return s.help + (f" ({'; '.join(extra)})" if extra else "")


def _kind(s: KeySpec) -> str:
    return s.kind.name.replace("|", "\\|")


def _engine_rows(specs: Iterable[KeySpec]) -> list[str]:
    return [
        f"| `{s.name}` | {_kind(s)} | `{s.default!r}` | {'yes' if s.mutable else 'no'} | {_help(s)} |"
        for s in specs
    ]


def _controller_rows(specs: Iterable[KeySpec]) -> list[str]:
    rows = []
    for s in specs:
        flags = ", ".join(f"`{f}`" for f in s.flags) or "`--monitor-ports`"
        rows.append(f"| `{s.name}` | {flags} | {_kind(s)} | `{s.default!r}` | {_help(s)} |")
    return rows


def render_configuration_md() -> str:
    lines = [
        "# Configuration",
        "",
        "Generated from the key tables (`kvplane/config.py`, `kvplane/controller/settings.py`)",
        "by `python -m kvplane.docs --write`; do not edit.",
        "",
        "## Engine",
        "",
        "Keys load from the YAML file named by `KVPLANE_CONFIG_FILE` (alias `LMCACHE_CONFIG_FILE`),",
        "then from the environment as `KVPLANE_<KEY>` or `LMCACHE_<KEY>`, then from explicit",
        "overrides. An unknown key, a wrong type or an out-of-range value stops the load with an",
        "error naming the key. Keys marked mutable can be changed at runtime with `POST /conf`.",
        "",
        "| key | type | default | mutable | description |",
        "|---|---|---|---|---|",
        *_engine_rows(key_specs()),
        "",
        "## Controller",
        "",
        "`kvplane controller` takes these keys from the YAML file named by `--config`, then from",
        "its flags (a flag wins). `monitor_ports` in the file, like `--monitor-ports`, is a mapping",
        '`{"pull": ..., "reply": ..., "heartbeat": ...}` that sets the three `*_port` keys; the',
        "deprecated `--monitor-port N` means pull port N and no reply port. A bad value is an",
        "error naming the flag or key (exit code 2). `GET /conf` on the controller shows them all.",
        "",
        "| key | flags | type | default | description |",
        "|---|---|---|---|---|",
        *_controller_rows(controller_keys()),
    ]
    return "\n".join(lines) + "\n"


def _metric_rows(specs: Iterable[MetricSpec]) -> list[str]:
    rows = []
    for s in specs:
        name = s.exposed[0] if s.kind is MetricKind.COUNTER else s.name
        labels = ", ".join(f"`{label}`" for label in s.labels) or "none"
        rows.append(f"| `{name}` | {s.kind.value} | {labels} | {s.help} |")
    return rows


def render_metrics_md() -> str:
    tier_rows = [
        f"| `{tier}` | `{stat}` | {text} |"
        for tier, stats in TIER_STATS.items()
        for stat, text in stats.items()
    ]
    lines = [
        "# Metrics",
        "",
        "Generated from `kvplane/metric_specs.py` by `python -m kvplane.docs --write`; do not",
        "edit. `tests/test_operate.py` scrapes a running controller, engine and router and checks",
        "that they export exactly these families, and that every metric the Grafana dashboard",
        "(`deploy/grafana/kvplane.json`) queries is among them.",
        "",
        "Counters end in `_total`; a histogram `NAME` exposes `NAME_bucket{le}`, `NAME_sum` and",
        "`NAME_count`. Durations are in seconds, sizes in bytes.",
        "",
        "**Grafana**: have Prometheus scrape the controller, every engine's internal API and",
        "each `kvplane router`, then *Dashboards -> New -> Import* `deploy/grafana/kvplane.json`",
        "and choose that Prometheus for its `DS_PROMETHEUS` input. Panels: lookup rate, latency",
        "and hit ratio, ingest, workers, sequence gaps / resyncs / reaped workers, chunks per",
        "instance and tier (controller) and per tier (engines), bytes per tier, evictions, tier",
        "hit ratio, write queues, store/retrieve throughput and latency, P2P transfers, the Redis",
        "circuit breaker; the router's requests by reason, decision time, matched and fetched",
        "tokens, in flight and requests per backend, backends up and errors.",
        "",
        "## Engine",
        "",
        "Each engine process serves these on its internal API (`GET /metrics` on index 0 and",
        "on each worker index; see [internal_api.md](internal_api.md)). Tier names are the",
        "backends' (`LocalCPUBackend`, `LocalDiskBackend`, `RemoteBackend`, `FSConnector`,",
        "`P2PBackend`). Every series labelled by a configured tier, a copy `op` or an event",
        '`subscriber` exists from start-up, at 0 (a panel shows 0 rather than "No data").',
        "",
        "| metric | type | labels | meaning |",
        "|---|---|---|---|",
        *_metric_rows(ENGINE_METRICS),
        "",
        "### `kvplane_tier_stat` by tier",
        "",
        "| tier | stat | meaning |",
        "|---|---|---|",
        *tier_rows,
        "",
        "## Controller",
        "",
        "`GET /metrics` on the controller's HTTP port (9000 by default). The one labelled",
        "family, `kvplane_controller_instance_chunks`, has a series for each tier an instance",
        "has reported chunks in (a tier emptied since stays, at 0).",
        "",
        "| metric | type | labels | meaning |",
        "|---|---|---|---|",
        *_metric_rows(CONTROLLER_METRICS),
        "",
        "## kvplane serve",
        "",
        "`GET /metrics` on the reference server's OpenAI port: its queue, named after vLLM's",
        "`vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`",
        "(what `kvplane router` reads from each backend, of either kind).",
        "",
        "| metric | type | labels | meaning |",
        "|---|---|---|---|",
        *_metric_rows(SERVE_METRICS),
        "",
        "## kvplane router",
        "",
        "`GET /metrics` on the router's port (see [router.md](router.md)). Every `reason`",
        "series exists from start-up, at 0; `backend` is a backend's URL.",
        "",
        "| metric | type | labels | meaning |",
        "|---|---|---|---|",
        *_metric_rows(ROUTER_METRICS),
    ]
    return "\n".join(lines) + "\n"


def missing_controller_flags() -> list[str]:
    """Controller flags that docs/controller.md does not name."""
    text = CONTROLLER_DOC_PATH.read_text() if CONTROLLER_DOC_PATH.exists() else ""
    flags = [f for s in controller_keys() for f in s.flags]
    return [f for f in [*flags, "--monitor-ports", "--monitor-port", "--config"] if f not in text]


def missing_router_keys() -> list[str]:
    """Router keys and flags that docs/router.md does not name (as `key` or `--flag`)."""
    text = ROUTER_DOC_PATH.read_text() if ROUTER_DOC_PATH.exists() else ""
    names = [f"`{s.name}`" for s in router_keys()]
    flags = [f for s in router_keys() for f in s.flags] + ["--backend", "--config"]
    return [n for n in [*names, *flags] if n not in text]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", action="store_true")
    group.add_argument("--check", action="store_true")
    args = parser.parse_args()
    generated = {DOC_PATH: render_configuration_md(), METRICS_DOC_PATH: render_metrics_md()}
    if args.write:
        for path, text in generated.items():
            path.parent.mkdir(exist_ok=True)
            path.write_text(text)
        return 0
    status = 0
    for path, text in generated.items():
        if not path.exists() or path.read_text() != text:
            print(
                f"docs/{path.name} is stale: run `python -m kvplane.docs --write`", file=sys.stderr
            )
            status = 1
    missing = missing_controller_flags()
    if missing:
        print(f"docs/controller.md does not name the flags {missing}", file=sys.stderr)
        status = 1
    missing = missing_router_keys()
    if missing:
        print(f"docs/router.md does not name {missing}", file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
