"""Packed-block caches: vLLM 0.32's per-layer ``[B, H, N, C]`` views with opaque block
interiors (LBHNC on CPU, LBNHC on CUDA), all layers views into one buffer. Chunks move as
whole blocks of bytes, so what comes back is exactly what was stored, whatever the layout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvplane.config import ConfigStore, EngineConfig
from kvplane.engine.cache_engine import CacheEngine
from kvplane.engine.facts import EngineFacts
from kvplane.engine.kv_layout import KVLayout, kv_checksums, packed_view
from kvplane.engine.memory_pool import HostMemoryPool
from kvplane.engine.storage_manager import StorageManager
from kvplane.engine.tiers import build_backends
from kvplane.errors import BadRequest

L, B, H, N, D = 3, 12, 2, 4, 8  # layers, blocks, kv heads, tokens per block, head size


def vllm_views(order: str, device: str = "cpu", seed: int = 0) -> list[torch.Tensor]:
    """One int8 buffer, a ``[B, H, N, 2D]`` bf16 view per layer, physically in ``order``
    (``LBHNC`` or ``LBNHC``), filled with random bytes (NaN payloads included)."""
    per_layer = B * H * N * 2 * D
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(-128, 128, (L * per_layer * 2,), generator=gen, dtype=torch.int8)
    buffer = raw.to(device)
    views = []
    for layer in range(L):
        flat = buffer[layer * per_layer * 2 : (layer + 1) * per_layer * 2].view(torch.bfloat16)
        if order == "LBHNC":
            views.append(flat.view(B, H, N, 2 * D))
        else:
            views.append(flat.view(B, N, H, 2 * D).transpose(1, 2))
    return views


def block_bytes(views: list[torch.Tensor], block: int) -> list[bytes]:
    return [packed_view(v)[block].view(torch.int16).cpu().numpy().tobytes() for v in views]


def engine_over(views: list[torch.Tensor], **overrides: object) -> tuple[CacheEngine, list]:
    config = EngineConfig(chunk_size=2 * N, max_local_cpu_size=0.01, **overrides)  # type: ignore[arg-type]
    layout = KVLayout(L, H, D, N, B, torch.bfloat16, packed=True)
    pool = HostMemoryPool.for_capacity(int(0.01 * (1 << 30)), layout.chunk_nbytes(2 * N))
    storage = StorageManager(build_backends(config, pool))
    facts = EngineFacts("m", 1, 0, layout.kv_shape())
    return CacheEngine(ConfigStore(config), facts, layout, storage), [packed_view(v) for v in views]


def slots_of(blocks: list[int], num_tokens: int) -> torch.Tensor:
    return torch.tensor([blocks[t // N] * N + t % N for t in range(num_tokens)])


@pytest.mark.parametrize("order", ["LBHNC", "LBNHC"])
def test_blocks_round_trip_byte_exact(order: str, device: str) -> None:
    """On CUDA this is vLLM's own case: ``LBNHC`` views of one device buffer."""
    views = vllm_views(order, device)
    engine, caches = engine_over(views)
    blocks = [7, 2, 9, 4, 0]  # 5 blocks: two whole chunks and a partial one of 1 block
    tokens = list(range(100, 100 + 5 * N - 1))  # the last block is one token short
    before = {b: block_bytes(views, b) for b in blocks}
    stored = engine.store(tokens, caches, slots_of(blocks, len(tokens)))
    assert stored.num_tokens == len(tokens) and stored.num_chunks == 3
    for v in views:
        v.zero_()
    loaded = engine.retrieve(tokens, caches, slots_of(blocks, len(tokens)))
    assert loaded.num_tokens == len(tokens)
    assert {b: block_bytes(views, b) for b in blocks} == before
    untouched = [b for b in range(B) if b not in blocks]
    assert all(set(packed_view(v)[untouched].view(-1).tolist()) == {0.0} for v in views)


def test_skip_tokens_never_writes_the_callers_blocks(device: str) -> None:
    views = vllm_views("LBNHC" if device == "cuda" else "LBHNC", device)
    engine, caches = engine_over(views)
    blocks = [1, 3, 5, 6]
    tokens = list(range(4 * N))
    engine.store(tokens, caches, slots_of(blocks, len(tokens)))
    expected = {b: block_bytes(views, b) for b in blocks}
    for v in views:
        v.fill_(1.0)
    ones = block_bytes(views, 1)
    loaded = engine.retrieve(tokens, caches, slots_of(blocks, len(tokens)), skip_tokens=N)
    assert loaded.num_tokens == len(tokens)
    assert block_bytes(views, 1) == ones  # the caller's block, mid-chunk: left alone
    assert [block_bytes(views, b) for b in blocks[1:]] == [expected[b] for b in blocks[1:]]
    with pytest.raises(BadRequest, match="multiple of the block size"):
        engine.retrieve(tokens, caches, slots_of(blocks, len(tokens)), skip_tokens=1)


def test_per_token_slots_are_refused() -> None:
    views = vllm_views("LBHNC")
    engine, caches = engine_over(views)
    shuffled = torch.tensor([5, 4, 6, 7, 8, 9, 10, 11])  # one block, tokens out of order
    with pytest.raises(BadRequest, match="whole blocks"):
        engine.store(list(range(8)), caches, shuffled)


def test_checksums_digest_whole_blocks() -> None:
    views = vllm_views("LBNHC")
    engine, caches = engine_over(views)
    slots = slots_of([4, 8], 2 * N)
    sums = kv_checksums(caches, slots, 2 * N, layout=engine.layout)
    assert isinstance(sums, list) and len(sums) == 1
    packed_view(views[0])[8, 0] += 1
    assert kv_checksums(caches, slots, 2 * N, layout=engine.layout) != sums
    with pytest.raises(BadRequest):
        kv_checksums(caches, slots[1:], 2 * N, layout=engine.layout)


@settings(max_examples=40, deadline=None)
@given(order=st.permutations([1, 2, 3]), block=st.integers(0, 5))
def test_packed_view_is_each_blocks_memory(order: list[int], block: int) -> None:
    """Whatever the axis order inside a block, row ``b`` of the view is block ``b``'s run."""
    sizes = {1: 2, 2: 3, 3: 4}
    physical = torch.arange(6 * 24, dtype=torch.float32).view(6, *(sizes[a] for a in order))
    logical = physical.permute(0, *(1 + order.index(a) for a in (1, 2, 3)))
    assert list(logical.shape) == [6, 2, 3, 4]
    row = packed_view(logical)[block]
    assert row.tolist() == list(range(block * 24, (block + 1) * 24))


def test_packed_view_refuses_a_block_that_is_not_dense() -> None:
    t = torch.zeros(4, 2, 8)[:, :, ::2]
    with pytest.raises(ValueError, match="not dense"):
        packed_view(t)
