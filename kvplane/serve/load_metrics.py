"""``kvplane serve``'s ``/metrics``: its queue in Prometheus' text format, under the
names :data:`kvplane.metric_specs.SERVE_METRICS` declares. Pure: a :class:`Load` in, text
out."""

from __future__ import annotations

from kvplane.metric_specs import SERVE_METRICS
from kvplane.serve.generator import Load

__all__ = ["METRICS_TYPE", "render_load"]

METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def render_load(load: Load) -> str:
    running, waiting, usage, aborts = SERVE_METRICS
    values = {
        running.name: float(load.running),
        waiting.name: float(load.waiting),
        usage.name: load.kv_usage,
        aborts.name: float(load.aborts),
    }
    lines = []
    for spec in SERVE_METRICS:
        lines += [
            f"# HELP {spec.exposed[0]} {spec.help}",
            f"# TYPE {spec.exposed[0]} {spec.kind.value}",
        ]
        lines.append(f"{spec.exposed[0]} {values[spec.name]!r}")
    return "\n".join(lines) + "\n"
