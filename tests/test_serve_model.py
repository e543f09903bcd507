"""The paged forward against transformers' own forward, and cached vs full prefill.

Tolerance: the model runs in float32; a prefix computed in one pass and read back from the
paged cache differs from a full prefill only by summation order, so last-position logits
agree to 1e-4 absolute (observed ~5e-7 on logits of magnitude ~1).
"""

from __future__ import annotations

import pytest
import torch

from kvplane.errors import BadRequest, Unavailable
from kvplane.serve import model as model_mod
from kvplane.serve.blocks import BlockAllocator, slot_mapping
from kvplane.serve.generator import Generator, SamplingParams
from kvplane.serve.model import PagedLlama, build_model, default_config
from kvplane.serve.tokenizer import BYTE_VOCAB_SIZE, ByteTokenizer

ATOL = 1e-4
BLOCK = 16
BLOCKS = 64


@pytest.fixture(scope="module")
def llama():
    return build_model(default_config(BYTE_VOCAB_SIZE, max_model_len=1024))


def _paged(llama) -> PagedLlama:
    shape = PagedLlama.shape_of(llama)
    caches = [
        torch.zeros(2, BLOCKS, BLOCK, shape.num_kv_heads, shape.head_size)
        for _ in range(shape.num_layers)
    ]
    return PagedLlama(llama, caches)


def _prompt(n: int) -> list[int]:
    text = "Explain the significance of KV cache in language models. " * 20
    return ByteTokenizer().encode(text)[:n]


def test_paged_prefill_matches_transformers_forward(llama):
    paged = _paged(llama)
    ids = _prompt(300)
    slots = torch.randperm(BLOCKS * BLOCK)[: len(ids)]
    got = paged.forward(torch.tensor(ids), 0, slots)
    with torch.no_grad():
        want = llama(torch.tensor([ids])).logits[0, -1].float()
    assert torch.allclose(got, want, atol=ATOL), (got - want).abs().max()


@pytest.mark.parametrize("cached", [1, 100, 256, 299])
def test_prefix_read_from_other_slots_gives_same_logits(llama, cached, monkeypatch):
    paged = _paged(llama)
    ids = torch.tensor(_prompt(300))
    perm = torch.randperm(BLOCKS * BLOCK)
    first, second = perm[:300], perm[300:600]
    full = paged.forward(ids, 0, first)
    # The prefix's KV moves to other slots, as a retrieve into a new request's blocks does.
    for cache in paged.kv_caches:
        for kv in cache:
            flat = kv.view(-1, paged.num_kv_heads, paged.head_size)
            flat[second[:cached]] = flat[first[:cached]].clone()
    monkeypatch.setattr(model_mod, "PREFILL_STEP", 37)  # steps cross block edges too
    part = paged.forward(ids[cached:], cached, second)
    assert torch.allclose(part, full, atol=ATOL), (part - full).abs().max()


def test_greedy_generation_matches_transformers_generate(llama):
    gen = Generator(
        _paged(llama), block_size=BLOCK, num_blocks=BLOCKS, max_model_len=1024, eos_token_id=None
    )
    ids = _prompt(40)
    done = gen.generate(ids, SamplingParams(max_tokens=12))
    with torch.no_grad():
        want = llama.generate(
            torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None
        )[0, len(ids) :].tolist()
    assert done.output_tokens == want
    assert done.finish_reason == "length"
    assert done.cached_tokens == 0


def test_generator_rejects_bad_requests(llama):
    gen = Generator(
        _paged(llama), block_size=BLOCK, num_blocks=4, max_model_len=1024, eos_token_id=2
    )
    with pytest.raises(BadRequest):
        gen.generate([], SamplingParams())
    with pytest.raises(BadRequest):
        gen.generate(_prompt(10), SamplingParams(max_tokens=2000))
    with pytest.raises(Unavailable):
        gen.generate(_prompt(100), SamplingParams(max_tokens=1))
    # The failed request gave its blocks back: a fitting one still runs.
    assert len(gen.generate(_prompt(10), SamplingParams(max_tokens=3)).output_tokens) >= 1


def test_block_allocator_and_slot_mapping():
    alloc = BlockAllocator(3)
    a = alloc.allocate(2)
    assert a == [0, 1]
    assert slot_mapping([2, 0], 5, 4).tolist() == [8, 9, 10, 11, 0]
    assert slot_mapping([], 0, 4).tolist() == []
    with pytest.raises(Unavailable):
        alloc.allocate(2)
    alloc.free(a)
    assert alloc.allocate(3) == [2, 0, 1]
    with pytest.raises(ValueError):
        slot_mapping([0], 5, 4)


def test_byte_tokenizer_round_trips_utf8():
    tok = ByteTokenizer()
    ids = tok.encode("KV ćache ✓")
    assert ids[0] == tok.bos_token_id
    assert len(ids) == 1 + len("KV ćache ✓".encode())
    assert tok.decode(ids) == "KV ćache ✓"
