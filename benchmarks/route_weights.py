"""The weights of a router's score, measured on the benchmark's own two instances: what
loading a prompt token from kvplane's CPU tier, its disk tier or a peer (P2P) costs, as a
share of computing it.

For each of a few prompts of :data:`TOKENS` fresh token ids (caches emptied first), the
time to first token on instance A computing it all, again from vLLM's own cache (the
floor: the prompt's KV is in place), from A's CPU tier after vLLM's cache is reset, on B
by P2P from A, and from A's disk tier after its CPU tier is cleared. A tier's weight is
``(TTFT_tier - TTFT_vllm_hit) / (TTFT_compute - TTFT_vllm_hit)``: 0 costs what a prompt
already in vLLM's cache costs, 1 what computing it costs. Medians over the prompts.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from benchmarks.cluster import Instance, empty_caches
from benchmarks.vllm_ttft import ttft

__all__ = ["TOKENS", "calibrate", "disk_tier", "tiers_bypassed", "weights_of"]

TOKENS = 1600
SETTLE_S = 0.5
TIERS = ("cpu", "p2p", "disk")


def disk_tier(path: Path, gb: float = 2.0) -> dict[str, Any]:
    """The config keys of a disk tier at ``path``."""
    return {"local_disk": str(path), "max_local_disk_size": gb}


@contextlib.contextmanager
def tiers_bypassed(instances: Sequence[Instance], names: Sequence[str]) -> Iterator[None]:
    """kvplane's tiers ``names`` skipped on every instance (``/bypass/add``) for the body."""
    for inst in instances:
        for name in names:
            httpx.put(f"{inst.worker}/bypass/add", params={"backend_name": name}, timeout=10)
    try:
        yield
    finally:
        for inst in instances:
            for name in names:
                with contextlib.suppress(httpx.HTTPError):
                    httpx.put(
                        f"{inst.worker}/bypass/remove", params={"backend_name": name}, timeout=10
                    )


def weights_of(medians: dict[str, float]) -> dict[str, float]:
    """Each tier's weight from median TTFTs ``compute``, ``vllm_hit`` and one per tier."""
    span = medians["compute"] - medians["vllm_hit"]
    if span <= 0:
        raise ValueError(f"computing was not slower than vLLM's own hit: {medians}")
    return {t: max(0.0, (medians[t] - medians["vllm_hit"]) / span) for t in TIERS}


def _timed(url: str, model: str, prompt: list[int]) -> float:
    time.sleep(SETTLE_S)
    return ttft(url, model, prompt)


def calibrate(
    instances: Sequence[Instance],
    controller: str,
    model: str,
    alphabet: Sequence[int],
    prompts: int,
) -> dict[str, Any]:
    """Median TTFTs per path and the weights (:func:`weights_of`); leaves caches full."""
    a, b = instances[0], instances[1]
    rng = random.Random(20)
    samples: dict[str, list[float]] = {k: [] for k in ("compute", "vllm_hit", *TIERS)}
    for inst in instances:  # a server's first requests pay one-off costs
        for _ in range(2):
            ttft(inst.server.base_url, model, [rng.choice(alphabet) for _ in range(300)])
    for _ in range(prompts):
        empty_caches(instances, controller)
        prompt = [rng.choice(alphabet) for _ in range(TOKENS)]
        samples["compute"].append(_timed(a.server.base_url, model, prompt))
        samples["vllm_hit"].append(_timed(a.server.base_url, model, prompt))
        httpx.post(f"{a.server.base_url}/reset_prefix_cache", timeout=30).raise_for_status()
        samples["cpu"].append(_timed(a.server.base_url, model, prompt))
        samples["p2p"].append(_timed(b.server.base_url, model, prompt))
        httpx.post(f"{a.server.base_url}/reset_prefix_cache", timeout=30).raise_for_status()
        time.sleep(1.0)  # the disk tier's writes of the first request are done
        clear = httpx.delete(
            f"{a.worker}/cache/clear", params={"locations": "LocalCPUBackend"}, timeout=30
        )
        clear.raise_for_status()
        samples["disk"].append(_timed(a.server.base_url, model, prompt))
    medians = {k: statistics.median(v) for k, v in samples.items()}
    per_token_ms = (medians["compute"] - medians["vllm_hit"]) / TOKENS * 1e3
    return {
        "prompt_tokens": TOKENS,
        "prompts": prompts,
        "ttft_s": medians,
        "compute_ms_per_token": per_token_ms,
        "weights": weights_of(medians),
    }
