"""A cache hit gives the same completion as a full prefill.

The instance is built exactly as ``kvplane serve`` builds it (model -> config with the
model's KV shape -> EngineProcess around the model's paged caches). Each case stores a
prompt, wipes the paged caches (so the prefix can only come back through kvplane's
retrieve), then runs a related prompt and compares it with a reference generator that has no
cache at all.

Tolerance: float32 model; the hit path recomputes the suffix in a different number of
attention steps than the full prefill, so the prompt's last-position logits may differ by
summation order only: ``atol=1e-4`` (observed < 1e-6). Greedy tokens must be identical.
"""

from __future__ import annotations

import pytest
import torch

from kvplane.engine.kv.layout import allocate_kv_caches
from kvplane.serve.cli import build_instance
from kvplane.serve.generator import Generator, SamplingParams
from kvplane.serve.launch import ServeOptions
from kvplane.serve.model import PagedLlama
from kvplane.serve.tokenizer import ByteTokenizer

ATOL = 1e-4
CHUNK = 64
PARAMS = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

TEXT = "The KV cache keeps attention keys and values of earlier tokens. " * 8
BASE = ByteTokenizer().encode(TEXT)[:200]  # 3 full chunks of 64 + a partial chunk of 8
OTHER = [t + 1 if t < 250 else t - 1 for t in BASE]  # same length, different tokens

# (stored prompt, queried prompt, expected cached tokens)
CASES = {
    "full-hit": (BASE, BASE, 199),  # all 200 retrieved; the last is recomputed
    "full-hit-chunk-aligned": (BASE[:192], BASE[:192], 191),
    "diverges-inside-chunk": (BASE, BASE[:150] + OTHER[150:], 128),
    "diverges-at-chunk-edge": (BASE, BASE[:128] + OTHER[128:], 128),
    "shorter-prompt-ends-mid-chunk": (BASE, BASE[:150], 128),
    "longer-prompt-crosses-stored-partial-chunk": (BASE, BASE + OTHER[:100], 192),
    "miss": (BASE, OTHER, 0),
}


@pytest.fixture(scope="module")
def instance(tmp_path_factory):
    cfg = tmp_path_factory.mktemp("serve") / "kvplane.yaml"
    cfg.write_text(f"chunk_size: {CHUNK}\nmax_local_cpu_size: 0.05\nkv_block_size: 16\n")
    runtime, served = build_instance(ServeOptions(max_model_len=1024, device="cpu"), str(cfg))
    reference = Generator(
        PagedLlama(served.generator.model.model, allocate_kv_caches(runtime.layout)),
        block_size=runtime.layout.block_size,
        num_blocks=runtime.layout.num_blocks,
        max_model_len=served.max_model_len,
        eos_token_id=None,
    )
    yield runtime, served, reference
    runtime.stop()


@pytest.mark.parametrize("case", sorted(CASES))
def test_cache_hit_gives_same_completion_and_logits(instance, case):
    runtime, served, reference = instance
    stored, query, expected_cached = CASES[case]
    runtime.cache_engine.clear()
    first = served.generator.generate(stored, PARAMS)
    assert first.cached_tokens == 0
    assert runtime.cache_engine.lookup(stored) == len(stored)
    for cache in runtime.kv_caches:
        cache.zero_()

    hit = served.generator.generate(query, PARAMS)
    want = reference.generate(query, PARAMS)

    assert hit.cached_tokens == expected_cached
    assert hit.output_tokens == want.output_tokens
    diff = (hit.prompt_logits - want.prompt_logits).abs().max().item()
    assert diff <= ATOL, f"last-position logits differ by {diff}"


def test_layout_and_keys_come_from_the_model(instance):
    runtime, served, _ = instance
    shape = PagedLlama.shape_of(served.generator.model.model)
    layout = runtime.layout
    assert (layout.num_layers, layout.num_kv_heads, layout.head_size, layout.dtype) == (
        shape.num_layers,
        shape.num_kv_heads,
        shape.head_size,
        shape.dtype,
    )
    assert runtime.kv_caches[0].shape == (2, layout.num_blocks, 16, shape.num_kv_heads, 32)
    assert layout.num_blocks * layout.block_size >= served.max_model_len
    key = runtime.cache_engine.keys_for(BASE)[0]
    assert (key.model_name, key.kv_dtype) == (served.name, "float32")
    assert torch.float32 == shape.dtype


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_bf16_cache_hit_matches_full_prefill(tmp_path):
    """The same flow on a GPU in bfloat16 (KV in the GPU's paged caches, kvplane's CPU tier
    in pinned memory). The recomputed last token runs through matmuls of other shapes than
    in the full prefill, so logits agree to bfloat16 rounding: atol 0.05 on logits of
    magnitude ~1; the greedy token must match unless the top two are closer than that."""
    cfg = tmp_path / "kvplane.yaml"
    cfg.write_text(f"chunk_size: {CHUNK}\nmax_local_cpu_size: 0.05\n")
    options = ServeOptions(max_model_len=1024, device="cuda", dtype="bfloat16")
    runtime, served = build_instance(options, str(cfg))
    try:
        assert runtime.kv_caches[0].is_cuda and runtime.layout.dtype == torch.bfloat16
        cold = served.generator.generate(BASE, PARAMS)
        for cache in runtime.kv_caches:
            cache.zero_()
        warm = served.generator.generate(BASE, PARAMS)
        assert (cold.cached_tokens, warm.cached_tokens) == (0, len(BASE) - 1)
        diff = (cold.prompt_logits - warm.prompt_logits).abs().max().item()
        assert diff <= 0.05, f"last-position logits differ by {diff}"
        top2 = cold.prompt_logits.topk(2).values
        if (top2[0] - top2[1]).item() > 0.1:
            assert cold.output_tokens[0] == warm.output_tokens[0]
    finally:
        runtime.stop()
