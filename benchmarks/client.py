"""The client side of the workload benchmarks (``benchmarks/fleet.py``,
``benchmarks/route.py``): send a workload's requests to one OpenAI endpoint (a vLLM server
or a router in front of several), streamed, and time each one; read Prometheus counters.
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import httpx

from benchmarks.workload import Request, poisson_arrivals

__all__ = [
    "KVPLANE_COUNTERS",
    "VLLM_COUNTERS",
    "Outcome",
    "counters",
    "percentile",
    "run_workload",
    "stream",
]

#: vLLM's own counters (its ``/metrics``): prompt tokens, what it computed, its hits by source.
VLLM_COUNTERS = {
    "prompt_tokens": ("vllm:prompt_tokens_total", ""),
    "computed": ("vllm:prompt_tokens_by_source_total", 'source="local_compute"'),
    "hit_device": ("vllm:prompt_tokens_cached_by_source_total", 'source="device"'),
    "hit_host": ("vllm:prompt_tokens_cached_by_source_total", 'source="host"'),
    "hit_disk": ("vllm:prompt_tokens_cached_by_source_total", 'source="disk"'),
    "hit_external": (
        "vllm:prompt_tokens_cached_by_source_total",
        'source="external_unspecified"',
    ),
    "preemptions": ("vllm:num_preemptions_total", ""),
    "requests": ("vllm:request_success_total", ""),
    "steps": ("vllm:iteration_tokens_total_count", ""),
}
#: kvplane's chunk reads by tier (the worker's ``/metrics``; P2PBackend: chunks from peers).
KVPLANE_COUNTERS = {
    "chunks_from_cpu": ("kvplane_tier_hits_total", 'tier="LocalCPUBackend"'),
    "chunks_from_disk": ("kvplane_tier_hits_total", 'tier="LocalDiskBackend"'),
    "chunks_from_p2p": ("kvplane_tier_hits_total", 'tier="P2PBackend"'),
    # the time kvplane's copies take in vLLM's worker (seconds; stores run inside the step,
    # loads too unless asynchronous)
    "store_s": ("kvplane_store_seconds_sum", ""),
    "stores": ("kvplane_store_seconds_count", ""),
    "retrieve_s": ("kvplane_retrieve_seconds_sum", ""),
}


@dataclass
class Outcome:
    """One request as the client saw it (seconds from the run's start)."""

    index: int
    round: int
    sent: float = 0.0
    ttft: float = 0.0
    done: float = 0.0
    gaps: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between the closest ranks; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def stream(
    client: httpx.Client,
    base_url: str,
    model: str,
    request: Request,
    out: Outcome,
    prompt: str | None = None,
) -> None:
    """Send ``request`` (its token ids, or ``prompt`` as text) and fill ``out`` from the
    streamed chunks."""
    body = {
        "model": model,
        "prompt": prompt if prompt is not None else list(request.prompt),
        "max_tokens": request.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "return_token_ids": True,
    }
    start = time.perf_counter()
    last = start
    with client.stream("POST", f"{base_url}/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            resp.read()
            raise RuntimeError(f"request {request.index}: {resp.status_code} {resp.text[:300]}")
        for line in resp.iter_lines():
            if not line.startswith("data:") or line.endswith("[DONE]"):
                continue
            choices = json.loads(line[5:]).get("choices") or [{}]
            ids = choices[0].get("token_ids") or []
            if not ids:
                continue
            now = time.perf_counter()
            if out.tokens:
                out.gaps += [(now - last) / len(ids)] * len(ids)
            else:
                out.ttft = now - start
            out.tokens += ids
            last = now
    if len(out.tokens) != request.max_tokens:
        raise RuntimeError(f"request {request.index}: {len(out.tokens)} tokens streamed")


def run_workload(
    base_url: str,
    model: str,
    requests: Sequence[Request],
    concurrency: int,
    rate: float | None = None,
    seed: int = 0,
    texts: Mapping[int, str] | None = None,
) -> tuple[list[Outcome], float]:
    """Every request of ``requests`` (each after its ``after``), ``concurrency`` at a time
    or arriving at ``rate`` per second, sent as its text in ``texts`` (by index) where
    given; the outcomes and the wall time from the first send to the last token."""
    outcomes = [Outcome(r.index, r.round) for r in requests]
    slot = {r.index: i for i, r in enumerate(requests)}
    finished = {r.index: threading.Event() for r in requests}
    errors: list[BaseException] = []
    origin = time.perf_counter()

    def one(client: httpx.Client, r: Request, at: float = 0.0) -> None:
        if r.after is not None:
            finished[r.after].wait()
        time.sleep(max(0.0, at - (time.perf_counter() - origin)))
        out = outcomes[slot[r.index]]
        out.sent = time.perf_counter() - origin
        try:
            if not errors:
                stream(client, base_url, model, r, out, texts.get(r.index) if texts else None)
        except BaseException as exc:
            errors.append(exc)
        out.done = time.perf_counter() - origin
        finished[r.index].set()

    def worker(client: httpx.Client, todo: queue.Queue[Request]) -> None:
        with contextlib.suppress(queue.Empty):
            while not errors:
                one(client, todo.get_nowait())

    limits = httpx.Limits(max_connections=max(concurrency, 8) * 2)
    with httpx.Client(timeout=900, limits=limits) as client:
        if rate is None:
            todo: queue.Queue[Request] = queue.Queue()
            for r in requests:
                todo.put(r)
            threads = [
                threading.Thread(target=worker, args=(client, todo)) for _ in range(concurrency)
            ]
        else:
            times = poisson_arrivals(seed, len(requests), rate)
            threads = [
                threading.Thread(target=one, args=(client, r, t))
                for r, t in zip(requests, times, strict=True)
            ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    return outcomes, max(o.done for o in outcomes) - min(o.sent for o in outcomes)


def counters(url: str, names: Mapping[str, tuple[str, str]]) -> dict[str, float]:
    """Each named counter at ``url``: the sum of its samples whose labels hold the filter."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        head, value = line.rsplit(" ", 1)
        for key, (name, labels) in names.items():
            if head.split("{")[0] == name and labels in head:
                values[key] += float(value)
    return values
