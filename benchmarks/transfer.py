"""Store/retrieve throughput of the cache engine beside the physical baseline, in one run.

A Llama-3.1-8B-shaped paged cache (32 layers, 8 KV heads, head 128, bf16, block 16), 16,384
tokens in chunks of 256 with a shuffled block table. Baseline: on CPU a plain contiguous copy
of the same number of bytes; on CUDA a pinned host<->device copy of the same bytes (device to
host for store, host to device for retrieve). Also: prefix-hash throughput for a 128K-token
prompt. The last line is one JSON object with the figures.

    python benchmarks/transfer.py [--device cpu|cuda] [--tokens 16384] [--repeat 3]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import time
from collections.abc import Callable

import torch

from kvplane.config import EngineConfig
from kvplane.keys import chunk_hashes
from kvplane.process import EngineProcess


def best_seconds(
    fn: Callable[[], object],
    repeat: int,
    sync: Callable[[], None],
    setup: Callable[[], object] = lambda: None,
) -> float:
    setup()
    fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        setup()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    device = args.device
    block = 16
    num_blocks = args.tokens // block + 8
    cfg = EngineConfig(
        chunk_size=256,
        kv_num_layers=32,
        kv_num_heads=8,
        kv_head_size=128,
        kv_block_size=block,
        kv_num_blocks=num_blocks,
        kv_dtype="bfloat16",
        max_local_cpu_size=args.tokens * 131072 / 2**30 * 1.05,
    )
    rt = EngineProcess(cfg, device=device, kv_caches=None)
    engine = rt.cache_engine
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    block_table = torch.randperm(num_blocks, generator=gen)[: args.tokens // block]
    slots = (block_table[:, None] * block + torch.arange(block)).reshape(-1).to(device)
    nbytes = rt.layout.chunk_nbytes(args.tokens)
    prompts = iter(range(10**6))

    def store() -> None:
        tokens = torch.arange(args.tokens) + next(prompts) * args.tokens
        assert engine.store(tokens, rt.kv_caches, slots).num_chunks == args.tokens // 256

    store_s = best_seconds(store, args.repeat, sync, setup=rt.storage.clear)
    tokens = torch.arange(args.tokens)
    engine.store(tokens, rt.kv_caches, slots)
    retrieve_s = best_seconds(
        lambda: engine.retrieve(tokens, rt.kv_caches, slots), args.repeat, sync
    )
    loaded = engine.retrieve(tokens, rt.kv_caches, slots).num_tokens
    assert loaded == args.tokens, loaded

    # The physical baseline on the same bytes.
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device == "cuda")
    if device == "cuda":
        dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
        d2h_s = best_seconds(lambda: host.copy_(dev), args.repeat, sync)
        h2d_s = best_seconds(lambda: dev.copy_(host), args.repeat, sync)
        baseline = f"pinned host<->device copy (cudaMemcpy) on {torch.cuda.get_device_name()}"
    else:
        other = torch.ones(nbytes, dtype=torch.uint8)
        d2h_s = h2d_s = best_seconds(
            lambda: ctypes.memmove(host.data_ptr(), other.data_ptr(), nbytes), args.repeat, sync
        )
        baseline = "plain memcpy (libc, one thread) of the same bytes"

    prompt = list(range(128 * 1024))
    start = time.perf_counter()
    for _ in range(5):
        chunk_hashes(prompt, 256)
    hash_rate = 5 * len(prompt) / (time.perf_counter() - start)

    gb = nbytes / 1e9
    result = {
        "store_GBps": round(gb / store_s, 3),
        "retrieve_GBps": round(gb / retrieve_s, 3),
        "baseline_GBps": round(gb / d2h_s, 3),
        "baseline_h2d_GBps": round(gb / h2d_s, 3),
        "store_ratio": round(d2h_s / store_s, 3),
        "retrieve_ratio": round(h2d_s / retrieve_s, 3),
        "hash_tokens_per_s": round(hash_rate),
        "bytes": nbytes,
        "tokens": args.tokens,
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
    }
    print(f"KV bytes moved per direction: {gb:.2f} GB ({args.tokens} tokens)")
    print(f"baseline: {baseline}")
    print(
        f"store    {result['store_GBps']:7.2f} GB/s  ratio vs baseline {result['store_ratio']:.2f}"
    )
    print(
        f"retrieve {result['retrieve_GBps']:7.2f} GB/s  ratio vs baseline {result['retrieve_ratio']:.2f}"
    )
    print(f"hashing  {hash_rate / 1e6:7.1f} M tokens/s (128K-token prompt)")
    rt.stop()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
