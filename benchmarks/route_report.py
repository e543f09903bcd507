"""``benchmarks/route.py``'s numbers, ratios, targets and picture; pure but for the PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.client import Outcome, percentile
from benchmarks.latency import LatencyRun

__all__ = ["Target", "latency_rows", "plot", "report", "summary", "targets"]

OTHERS = ("sglang", "vllm-router")
ORACLE_SLACK = 1.05


def summary(outcomes: Sequence[Outcome], wall: float, grew: dict[str, float]) -> dict[str, Any]:
    ttft = [o.ttft for o in outcomes]
    return {
        "requests": len(outcomes),
        "wall_s": wall,
        **{f"ttft_p{q}_s": percentile(ttft, q) for q in (50, 90, 99)},
        "requests_per_s": len(outcomes) / wall,
        "ttft_s": ttft,
        **{k: int(v) for k, v in grew.items()},
    }


def latency_rows(direct: LatencyRun, routed: LatencyRun) -> dict[str, Any]:
    """Percentiles in ms of the backend alone and through the router, and their difference."""
    row: dict[str, Any] = {"failures": routed.failures + direct.failures}
    for q in (50, 99):
        row[f"direct_p{q}_ms"] = percentile(direct.seconds, q) * 1e3
        row[f"routed_p{q}_ms"] = percentile(routed.seconds, q) * 1e3
        row[f"added_p{q}_ms"] = row[f"routed_p{q}_ms"] - row[f"direct_p{q}_ms"]
    row["requests"] = len(routed.seconds)
    row["client_lag_ms"] = max(direct.max_send_lag, routed.max_send_lag) * 1e3
    return row


class Target:
    """One ratio and its bound: met when ``value <= bound``."""

    def __init__(self, name: str, value: float | None, bound: float, why: str = "") -> None:
        self.name, self.value, self.bound, self.why = name, value, bound, why

    @property
    def met(self) -> bool | None:
        return None if self.value is None else self.value <= self.bound

    def line(self) -> str:
        if self.value is None:
            return f"  {self.name}: n/a ({self.why})"
        verdict = "MET" if self.met else "NOT MET"
        return f"  {self.name}: {self.value:.2f} (target <= {self.bound:g}) {verdict}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def targets(results: dict[str, Any]) -> list[Target]:
    """Issue 20's targets, each a ratio within this run."""
    out = []
    runs = results["runs"]
    for w, rows in runs.items():
        mine = rows.get("kvplane")
        why = "no kvplane router" if mine is None else "a router did not run"
        rr = rows.get("round-robin")
        others = [rows[o] for o in OTHERS if o in rows]
        key = "ttft_p99_s" if w == "hot-spot" else "ttft_p50_s"
        label = key.removeprefix("ttft_").removesuffix("_s")
        value = mine[key] if mine else None
        best = min((o[key] for o in others), default=None)
        out.append(Target(f"{w}: {label} vs round robin", _ratio(value, rr and rr[key]), 0.5, why))
        bound = 1.0 if w == "hot-spot" else 0.8
        out.append(Target(f"{w}: {label} vs best other router", _ratio(value, best), bound, why))
        computed = mine["computed"] if mine else None
        oracle = mine["oracle_computed"] if mine else None
        out.append(Target(f"{w}: computed vs oracle", _ratio(computed, oracle), ORACLE_SLACK, why))
    lat = results.get("latency", {}).get("kvplane")
    why = "no kvplane router"
    out.append(Target("added latency p50 (ms)", lat and lat["added_p50_ms"], 2.0, why))
    out.append(Target("added latency p99 (ms)", lat and lat["added_p99_ms"], 10.0, why))
    return out


def report(header: list[str], results: dict[str, Any]) -> list[str]:
    lines = list(header)
    w = results.get("weights")
    if w:
        t = w["ttft_s"]
        lines.append(
            f"\n== score weights (TTFT medians of {w['prompts']} prompts of {w['prompt_tokens']} "
            "tokens) =="
        )
        lines.append(
            "  "
            + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in t.items())
            + f"; computing costs {w['compute_ms_per_token']:.3f} ms per prompt token"
        )
        lines.append(
            "  weight per token loaded, as a share of computing it: "
            + ", ".join(f"{k} {v:.3f}" for k, v in w["weights"].items())
        )
    for workload, rows in results["runs"].items():
        lines.append(f"\n== {workload} ==")
        for name, r in rows.items():
            ratio = r["computed"] / r["oracle_computed"] if r["oracle_computed"] else 0.0
            lines.append(
                f"{name:12s} TTFT p50/p90/p99 {r['ttft_p50_s'] * 1e3:7.1f} {r['ttft_p90_s'] * 1e3:7.1f} "
                f"{r['ttft_p99_s'] * 1e3:7.1f} ms  {r['requests_per_s']:5.2f} req/s  "
                f"requests per instance {r['split']}"
            )
            lines.append(
                f"{'':12s} prompt tokens {r['prompt_tokens']}, computed {r['computed']} "
                f"(oracle {r['oracle_computed']}: {ratio:.2f}x); hits: vLLM's own "
                f"{r['hit_device']}, kvplane {r['hit_kvplane']} (chunks from CPU "
                f"{r['chunks_from_cpu']}, P2P {r['chunks_from_p2p']}); preemptions "
                f"{r['preemptions']}"
            )
            d = r.get("router") or {}
            if d.get("decision_count"):
                reasons = ", ".join(
                    f"{k.removeprefix('reason_')} {v:.0f}"
                    for k, v in d.items()
                    if k.startswith("reason_") and v
                )
                lookup = d["lookup_s_sum"] / d["lookup_count"] if d.get("lookup_count") else 0.0
                lines.append(
                    f"{'':12s} router: decisions by reason {reasons}; matched tokens "
                    f"{d['matched_tokens']:.0f}, to fetch by P2P {d['fetch_tokens']:.0f}; mean "
                    f"decision {d['decision_s_sum'] / d['decision_count'] * 1e3:.1f} ms "
                    f"(lookup {lookup * 1e3:.1f} ms)"
                )
        base = rows.get("round-robin")
        if base:
            lines.append("ratios against round robin of this run (TTFT p50, p99, requests/s):")
            for name, r in rows.items():
                lines.append(
                    f"  {name:12s} {r['ttft_p50_s'] / base['ttft_p50_s']:.2f}x "
                    f"{r['ttft_p99_s'] / base['ttft_p99_s']:.2f}x "
                    f"{r['requests_per_s'] / base['requests_per_s']:.2f}x"
                )
    if results.get("latency"):
        lines.append("\n== router latency against an instant backend at 200 requests/s ==")
        for name, r in results["latency"].items():
            lines.append(
                f"{name:12s} alone p50/p99 {r['direct_p50_ms']:.2f} {r['direct_p99_ms']:.2f} ms, "
                f"through the router {r['routed_p50_ms']:.2f} {r['routed_p99_ms']:.2f} ms: "
                f"added {r['added_p50_ms']:.2f} / {r['added_p99_ms']:.2f} ms ({r['requests']} "
                f"requests, {r['failures']} failed, client lag up to {r['client_lag_ms']:.0f} ms)"
            )
    lines.append("\n== targets (issue 20) ==")
    lines += [t.line() for t in targets(results)]
    return lines


def plot(path: Path, results: dict[str, Any], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    panels = len(runs) + (1 if results.get("latency") else 0)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 4.2), squeeze=False)
    names = sorted({n for rows in runs.values() for n in rows})
    colors = {n: f"C{i}" for i, n in enumerate(names)}
    for ax, (workload, rows) in zip(axes[0], runs.items(), strict=False):
        for name, r in rows.items():
            ttft = sorted(t * 1e3 for t in r["ttft_s"])
            share = [(i + 1) / len(ttft) for i in range(len(ttft))]
            ax.step(ttft, share, color=colors[name], where="post", label=name)
        ax.set(xscale="log", xlabel="TTFT (ms)", ylabel="share of requests")
        ax.set_title(f"TTFT distribution: {workload}", fontsize=10)
        ax.legend(fontsize=7)
    if results.get("latency"):
        ax = axes[0][-1]
        lat = results["latency"]
        xs = range(len(lat))
        ax.bar([x - 0.2 for x in xs], [r["added_p50_ms"] for r in lat.values()], 0.4, label="p50")
        ax.bar([x + 0.2 for x in xs], [r["added_p99_ms"] for r in lat.values()], 0.4, label="p99")
        ax.set_xticks(list(xs), list(lat), fontsize=8)
        ax.set(ylabel="added latency (ms)")
        ax.set_title("router's own latency, instant backend, 200/s", fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
