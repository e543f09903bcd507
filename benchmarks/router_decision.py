"""The router's decision, measured: ``/lookup`` per request against an index replica held
in the router, and the score itself.

A real ``kvplane controller`` holds the chunks of two instances (the prompts' own plus
noise, ``--chunks`` in all, chunk size 256); the same chunks go into an in-process
:class:`~kvplane.controller.index.ChunkIndex`, which is what a replica fed by the
admit/evict stream would probe. For prompts of 1K, 4K and 8K tokens it times:

* ``/lookup``: the POST the router makes (its ControllerClient: a lean keep-alive client,
  msgspec JSON), as the router sees it, and the same POST through httpx.AsyncClient;
* the replica: hashing the prompt's chunks and probing the index in-process (what the
  router would do per request instead; the stream that keeps it current is not timed);
* the score: :func:`kvplane.router.scoring.choose` over 2 and 16 backends.

    python benchmarks/router_decision.py [--quick]

Writes benchmarks/results/router-decision-cpu-2core.txt; the last line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.controller import (  # noqa: E402
    CHUNK,
    LOC,
    Client,
    free_ports,
    machine,
    percentile,
    reports,
    send_in_process,
    wait_applied,
)
from benchmarks.vllm_ttft import cpu_times, steal_share  # noqa: E402
from kvplane.children import kvplane_args, start_child  # noqa: E402
from kvplane.controller.index import ChunkIndex  # noqa: E402
from kvplane.controller.registry import WorkerKey  # noqa: E402
from kvplane.keys import chunk_hashes  # noqa: E402
from kvplane.router.metrics import RouterMetrics  # noqa: E402
from kvplane.router.pool import Pool  # noqa: E402
from kvplane.router.scoring import Candidate, Load, Weights, choose  # noqa: E402
from kvplane.router.upstream import ControllerClient  # noqa: E402

SIZES = (1024, 4096, 8192)
RESULT = ROOT / "benchmarks" / "results" / "router-decision-cpu-2core.txt"


def prompts(rng: random.Random) -> dict[int, list[list[int]]]:
    return {n: [[rng.randrange(32000) for _ in range(n)] for _ in range(8)] for n in SIZES}


async def time_lookups(url: str, bodies: list[list[int]], n: int, *, lean: bool) -> list[float]:
    """``/lookup`` as the router calls it (its ControllerClient: the lean client, msgspec
    JSON), or through httpx.AsyncClient (``lean=False``), for comparison."""
    out = []
    async with httpx.AsyncClient(timeout=30) as client:
        ctl = ControllerClient(url, client, RouterMetrics(lambda: Pool(3)))
        for i in range(n + 20):
            tokens = bodies[i % len(bodies)]
            start = time.perf_counter()
            if lean:
                assert await ctl.lookup(tokens, 30.0) is not None
            else:
                (await client.post(f"{url}/lookup", json={"tokens": tokens})).json()
            if i >= 20:  # warm-up: connections, caches
                out.append(time.perf_counter() - start)
        ctl.close()
    return out


def time_replica(index: ChunkIndex, bodies: list[list[int]], n: int) -> list[float]:
    out = []
    for i in range(n):
        tokens = bodies[i % len(bodies)]
        start = time.perf_counter()
        hashes = chunk_hashes(np.asarray(tokens, dtype="<i4"), CHUNK)
        index.match({CHUNK: hashes}, len(tokens))
        out.append(time.perf_counter() - start)
    return out


def time_scores(backends: int, n: int) -> list[float]:
    rng = random.Random(backends)
    candidates = [
        Candidate(
            f"http://b{i}", f"inst-{i}", rng.randrange(8192), LOC, Load(rng.randrange(4), 0, 0.3)
        )
        for i in range(backends)
    ]
    holders = {c.instance_id or "": c.hit_tokens for c in candidates}
    weights = Weights()
    out = []
    for _ in range(n):
        start = time.perf_counter()
        choose(candidates, 8192, weights, holders=holders)
        out.append(time.perf_counter() - start)
    return out


def ms(values: list[float]) -> str:
    return f"p50 {percentile(values, 50) * 1e3:.3f} ms, p99 {percentile(values, 99) * 1e3:.3f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--chunks", type=int, default=200_000)
    args = parser.parse_args()
    n = 200 if args.quick else 1000
    noise = 20_000 if args.quick else args.chunks
    rng = random.Random(7)
    asked = prompts(rng)
    before = cpu_times()
    http, pull, reply = free_ports(3)
    tmp = Path("/tmp") / f"kvplane-router-decision-{http}"
    tmp.mkdir(exist_ok=True)
    ctl_args = ["controller", "--host", "127.0.0.1", "--port", str(http)]
    ctl_args += [
        "--monitor-ports",
        json.dumps({"pull": pull, "reply": reply}),
        "--log-level",
        "WARNING",
    ]
    child = start_child("controller", kvplane_args(ctl_args), tmp / "controller.log", cwd=ROOT)
    url = f"http://127.0.0.1:{http}"
    index = ChunkIndex()
    try:
        child.wait_healthy(f"{url}/healthz", timeout=60)
        client = Client(reply)
        total = 0
        for k, instance in enumerate(("inst-a", "inst-b")):
            client.register(instance, epoch=k + 1)
            index.add_worker(WorkerKey(instance, 0), CHUNK)
            own = [h for size in SIZES for p in asked[size][k::2] for h in chunk_hashes(p, CHUNK)]
            rand = np.random.default_rng(k).integers(1, 2**63, noise // 2, dtype=np.uint64)
            hashes = np.concatenate([np.asarray(own, dtype=np.uint64), rand])
            index.admit(WorkerKey(instance, 0), LOC, hashes.tolist())
            proc, _ = send_in_process(pull, reports(instance, k + 1, 1, hashes))
            proc.join()
            total += len(hashes)
        with httpx.Client(base_url=url, timeout=30) as h:
            wait_applied(h, total)
        lines = [
            f"router decision on {machine()}",
            f"index: {total} chunks over 2 instances, chunk size {CHUNK}; {n} requests per figure",
        ]
        results: dict[str, dict[str, float]] = {}
        for size in SIZES:
            remote = asyncio.run(time_lookups(url, asked[size], n, lean=True))
            via_httpx = asyncio.run(time_lookups(url, asked[size], n, lean=False))
            local = time_replica(index, asked[size], n)
            ratio = percentile(remote, 50) / percentile(local, 50)
            results[str(size)] = {
                "lookup_p50_ms": percentile(remote, 50) * 1e3,
                "lookup_p99_ms": percentile(remote, 99) * 1e3,
                "httpx_lookup_p50_ms": percentile(via_httpx, 50) * 1e3,
                "replica_p50_ms": percentile(local, 50) * 1e3,
                "replica_p99_ms": percentile(local, 99) * 1e3,
            }
            lines.append(
                f"{size:5d}-token prompt: /lookup {ms(remote)} (through httpx: "
                f"{ms(via_httpx)}); replica {ms(local)}; /lookup / replica at p50: {ratio:.1f}x"
            )
        for backends in (2, 16):
            scores = time_scores(backends, n)
            results[f"score_{backends}"] = {"p50_ms": percentile(scores, 50) * 1e3}
            lines.append(f"score over {backends:2d} backends: {ms(scores)}")
    finally:
        child.stop()
    stolen = steal_share(before, cpu_times())
    lines.append(
        f"CPU time stolen by the hypervisor during the run: {stolen:.0%} (other work on the machine shares its 2 cores)"
    )
    lines.append(json.dumps({"stolen": stolen, "results": results}))
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if not args.quick:
        RESULT.write_text(text)


if __name__ == "__main__":
    main()
