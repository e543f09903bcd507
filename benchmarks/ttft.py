"""Time to first token with and without a cached prefix, through the real serving path.

The instance is built exactly like ``kvplane serve`` (model -> config with the model's KV
shape -> EngineProcess around the model's paged caches -> generator). For each prompt
length: clear kvplane, run the prompt (full prefill; its chunks are stored afterwards), then
run it again (every chunk retrieved from kvplane's CPU tier, only the last token
recomputed). TTFT is the generator's own clock: from the start of the request (lookup and
retrieve included) to the first token sampled, with a CUDA synchronize before it is read.

* CPU: the ``tiny`` random-weight Llama in float32 (4 layers, GQA 8/4 heads of 32).
* CUDA: a Llama-3.1-8B-shaped model with random bfloat16 weights on the GPU; the paged KV
  caches on the GPU, kvplane's CPU tier in pinned host memory.

    PYTHONPATH=. python benchmarks/ttft.py [--lengths 1024 4096 16384] [--repeat N]

The last line is one JSON object: ``device``, ``model``, and ``ttft_full_s``,
``ttft_cached_s``, ``speedup`` keyed by prompt length (medians over ``--repeat`` runs).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from kvplane.serve.cli import build_instance
from kvplane.serve.generator import SamplingParams
from kvplane.serve.launch import ServeOptions

GB = 1 << 30
ONE_TOKEN = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)


def device_name(device: str) -> str:
    if device == "cuda":
        return f"cuda ({torch.cuda.get_device_name()})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"cpu ({cpu}, {torch.get_num_threads()} threads)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--repeat", type=int, default=None, help="default: 3 on CUDA, 1 on CPU")
    parser.add_argument("--chunk-size", type=int, default=256)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    repeat = args.repeat or (3 if cuda else 1)
    longest = max(args.lengths)
    options = ServeOptions(
        architecture="llama-3.1-8b" if cuda else "tiny",
        max_model_len=longest + 16,
        device=args.device,
    )
    started = time.perf_counter()
    # Room in the CPU tier for every length's chunks at once (the runs clear it anyway).
    per_token = 32 * 2 * 8 * 128 * 2 if cuda else 4 * 2 * 4 * 32 * 4
    cpu_gb = max(0.5, 1.25 * per_token * longest / GB)
    overrides = {"chunk_size": args.chunk_size, "max_local_cpu_size": cpu_gb}
    runtime, served = build_instance(options, None, overrides)
    print(f"model {served.name} on {device_name(args.device)}: {runtime.layout}")
    print(f"built in {time.perf_counter() - started:.1f}s; CPU tier {cpu_gb:.2f} GB")
    gen, engine = served.generator, runtime.cache_engine
    vocab = 256  # byte-tokenizer ids: valid for every architecture's embedding
    gen.generate(list(range(3, 3 + 64)), ONE_TOKEN)  # warm-up: kernels, allocator

    full: dict[str, float] = {}
    cached: dict[str, float] = {}
    same_token: dict[str, bool] = {}
    for length in args.lengths:
        rng = torch.Generator().manual_seed(length)
        prompt = [1, *(torch.randint(3, 3 + vocab, (length - 1,), generator=rng).tolist())]
        full_runs, cached_runs = [], []
        for _ in range(repeat):
            engine.clear()
            cold = gen.generate(prompt, ONE_TOKEN)
            warm = gen.generate(prompt, ONE_TOKEN)
            if cold.cached_tokens != 0 or warm.cached_tokens != length - 1:
                raise SystemExit(f"unexpected hits: {cold.cached_tokens}, {warm.cached_tokens}")
            # bf16 on a GPU: the last token's logits differ by rounding between the two
            # paths, so a near-tie could flip the argmax; reported, not fatal.
            same_token[str(length)] = cold.output_tokens == warm.output_tokens
            full_runs.append(cold.ttft_s)
            cached_runs.append(warm.ttft_s)
        key = str(length)
        full[key] = statistics.median(full_runs)
        cached[key] = statistics.median(cached_runs)
        print(
            f"{length:>6} tokens: full prefill {full[key]:8.3f} s   cached prefix "
            f"{cached[key]:8.4f} s   speedup {full[key] / cached[key]:7.1f}x",
            flush=True,
        )
    runtime.stop()
    result = {
        "device": device_name(args.device),
        "model": f"{served.name} ({runtime.layout.dtype})",
        "chunk_size": args.chunk_size,
        "repeat": repeat,
        "ttft_full_s": {k: round(v, 5) for k, v in full.items()},
        "ttft_cached_s": {k: round(v, 5) for k, v in cached.items()},
        "speedup": {k: round(full[k] / cached[k], 2) for k in full},
        "same_first_token": same_token,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
