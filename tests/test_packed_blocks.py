"""Packed-block caches: vLLM 0.32's per-layer ``[B, H, N, C]`` views with opaque block
interiors (LBHNC on CPU, LBNHC on CUDA), all layers views into one buffer. Chunks move as
whole blocks of bytes, so what comes back is exactly what was stored, whatever the layout."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvplane.config import ConfigStore, EngineConfig
from kvplane.engine.cache_engine import CacheEngine
from kvplane.engine.facts import EngineFacts
from kvplane.engine.kv.checksums import kv_checksums
from kvplane.engine.kv.copies import gather_chunks, gather_many, scatter_chunks, scatter_many
from kvplane.engine.kv.layout import KVLayout, packed_view
from kvplane.engine.kv.slots import SlotIndex
from kvplane.engine.memory_pool import HostMemoryPool
from kvplane.engine.storage_manager import StorageManager
from kvplane.engine.tiers import build_backends
from kvplane.errors import BadRequest

L, B, H, N, D = 3, 12, 2, 4, 8  # layers, blocks, kv heads, tokens per block, head size
VIEWS = KVLayout(L, H, D, N, B, torch.bfloat16, packed=True)  # the layout of vllm_views()


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
    pool = HostMemoryPool.for_capacity(int(0.01 * (1 << 30)), VIEWS.chunk_nbytes(2 * N))
    storage = StorageManager(build_backends(config, pool))
    facts = EngineFacts("m", 1, 0, VIEWS.kv_shape())
    return CacheEngine(ConfigStore(config), facts, VIEWS, storage), [packed_view(v) for v in views]


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
    sums = kv_checksums(engine.layout, caches, slots, 2 * N)
    assert isinstance(sums, list) and len(sums) == 1
    packed_view(views[0])[8, 0] += 1
    assert kv_checksums(engine.layout, caches, slots, 2 * N) != sums
    with pytest.raises(BadRequest):
        kv_checksums(engine.layout, caches, slots[1:], 2 * N)


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


def spaced_caches(layers: int, blocks: int, elems: int, pad: int) -> list[torch.Tensor]:
    """Packed int16 caches whose rows lie ``pad`` elements apart (``pad`` 0: dense rows)."""
    raw = torch.randint(-(2**15), 2**15, (layers, blocks, elems + pad), dtype=torch.int16)
    return [packed_view(layer[:, :elems]) for layer in raw]


def rows_of(elems: int) -> KVLayout:
    """The layout of ``spaced_caches(L, B, elems, pad)``: blocks of one token's K and V."""
    return KVLayout(L, 1, elems // 2, 1, B, torch.int16, packed=True)


@settings(max_examples=60, deadline=None)
@given(
    ids=st.lists(st.integers(0, B - 1), min_size=1, max_size=B, unique=True),
    pad=st.sampled_from([0, 3]),
    data=st.data(),
)
def test_block_copies_match_indexing(ids: list[int], pad: int, data: st.DataObject) -> None:
    """Each chunk's blocks land in exactly the cache rows its index names, and a gather reads
    them back: consecutive ids copy as one run, rows apart in the cache one by one."""
    caches = spaced_caches(L, B, 10, pad)
    cut = data.draw(st.integers(1, len(ids)))
    chunks = [ids[:cut], ids[cut:]] if cut < len(ids) else [ids]
    items = [
        (SlotIndex(torch.tensor(c), True, c), torch.randint(0, 99, (L, len(c), 10)).short())
        for c in chunks
    ]
    before = [c.clone() for c in caches]
    scatter_many(rows_of(10), caches, items)
    for layer, cache in enumerate(caches):
        expected = before[layer].clone()
        for index, kv in items:
            expected[index.host_ids] = kv[layer]
        assert torch.equal(cache, expected)
    outs = [(index, torch.empty_like(kv)) for index, kv in items]
    gather_many(rows_of(10), caches, outs)
    assert all(torch.equal(out, kv) for (_, out), (_, kv) in zip(outs, items, strict=True))


def test_block_copies_refuse_a_block_outside_the_cache_and_write_nothing() -> None:
    caches = spaced_caches(L, B, 10, 0)
    before = [c.clone() for c in caches]
    for bad in ([B], [-1]):
        item = (SlotIndex(torch.tensor(bad), True, bad), torch.ones(L, 1, 10, dtype=torch.int16))
        with pytest.raises(ValueError, match="block ids"):
            scatter_many(rows_of(10), caches, [item])
    wrong_width = (SlotIndex(torch.tensor([0]), True, [0]), torch.ones(L, 1, 9, dtype=torch.int16))
    wrong_dtype = (SlotIndex(torch.tensor([0]), True, [0]), torch.ones(L, 1, 10).half())
    for item, match in ((wrong_width, r"\[3, 1, 10\] expected"), (wrong_dtype, "of torch.int16")):
        with pytest.raises(ValueError, match=match):
            scatter_many(rows_of(10), caches, [item])
    blocks = SlotIndex(torch.tensor([4, 5]), True, [4, 5])
    good = (blocks, torch.ones(L, 2, 10, dtype=torch.int16))
    short = (SlotIndex(torch.tensor([6]), True, [6]), torch.ones(L, 2, 10, dtype=torch.int16))
    for items in ([short], [good, short]):  # a good chunk beside a bad one is not moved either
        with pytest.raises(ValueError, match="1 block ids for a chunk of 2 blocks"):
            scatter_many(rows_of(10), caches, items)
    assert all(torch.equal(c, b) for c, b in zip(caches, before, strict=True))


def shorten_every_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection: the engine's chunk indices each name one block fewer than the chunk."""
    from kvplane.engine import cache_engine

    prepare = cache_engine.slot_indices

    def short(layout: KVLayout, *args: Any) -> list[SlotIndex]:
        return [SlotIndex(i.ids[:-1], True, i.host_ids[:-1]) for i in prepare(layout, *args)]

    monkeypatch.setattr(cache_engine, "slot_indices", short)


def test_a_short_block_id_list_is_refused_storing_and_loading(
    device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Storing, it would leave bytes of the stored page unset; loading, a block of the
    caches unwritten though reported loaded. Either is refused: nothing is stored, no page
    leaks, no block is written."""
    views = vllm_views("LBNHC" if device == "cuda" else "LBHNC", device)
    engine, caches = engine_over(views)
    cpu = engine.storage.cpu
    assert cpu is not None
    pool = cpu.pool
    tokens = list(range(2 * N))
    slots = slots_of([3, 8], len(tokens))
    with monkeypatch.context() as patch:
        shorten_every_index(patch)
        with pytest.raises(ValueError, match="1 block ids for a chunk of 2 blocks"):
            engine.store(tokens, caches, slots)
    assert engine.storage.locate(engine.keys_for(tokens)[0]) is None
    assert cpu.keys() == [] and pool.free_pages == pool.num_pages
    assert engine.store(tokens, caches, slots).num_chunks == 1
    for v in views:
        v.zero_()
    with monkeypatch.context() as patch:
        shorten_every_index(patch)
        with pytest.raises(ValueError, match="1 block ids for a chunk of 2 blocks"):
            engine.retrieve(tokens, caches, slots)
    assert all(set(packed_view(v).view(-1).tolist()) == {0.0} for v in views)
    assert pool.free_pages == pool.num_pages - 1  # the stored chunk's page; the read's is back


def test_block_copies_follow_the_caches_they_are_given() -> None:
    """The byte views of the last caches are kept between calls; other caches, of the same
    shape or not, get their own (and the first ones theirs again)."""
    first, second = spaced_caches(L, B, 10, 0), spaced_caches(L, B, 10, 0)
    narrow = spaced_caches(L, B, 6, 2)
    for caches, fill in ((first, 1), (second, 2), (narrow, 3), (first, 4)):
        width = caches[0].shape[1]
        chunk = torch.full((L, 1, width), fill, dtype=torch.int16)
        index = SlotIndex(torch.tensor([fill]), True, [fill])
        scatter_many(rows_of(width), caches, [(index, chunk)])
        assert all(torch.equal(c[fill], chunk[0, 0]) for c in caches)
    assert all(torch.equal(c[1], torch.ones(10, dtype=torch.int16)) for c in first)
    assert not any(torch.equal(c[2], torch.full((10,), 2, dtype=torch.int16)) for c in first)


@pytest.mark.parametrize("order", ["LBHNC", "LBNHC"])
def test_batched_kernel_copies_move_the_blocks_bytes(order: str, device: str) -> None:
    """The batched index-kernel copies that CUDA caches take (two kernels per layer for a
    run of chunks) move exactly each named block, in either layout, on any device; on CPU
    they agree with the memcpy path."""
    views = vllm_views(order, device)
    caches = [packed_view(v) for v in views]
    chunks = [[7, 2], [9, 4], [0, 11]]
    indices = [SlotIndex(torch.tensor(c, device=device), True, c) for c in chunks]
    width = caches[0].shape[1]
    pinned = device == "cuda"
    outs = [torch.empty(L, 2, width, dtype=torch.bfloat16, pin_memory=pinned) for _ in chunks]
    gather_chunks(VIEWS, caches, indices, outs)
    if device == "cuda":
        torch.cuda.synchronize()
    for ids, out in zip(chunks, outs, strict=True):
        for layer in range(L):
            got = [out[layer, j].view(torch.int16).numpy().tobytes() for j in range(2)]
            assert got == [block_bytes(views, b)[layer] for b in ids]
    if device == "cpu":
        by_memcpy = [
            (index, torch.empty_like(out)) for index, out in zip(indices, outs, strict=True)
        ]
        gather_many(VIEWS, caches, by_memcpy)
        assert all(
            torch.equal(a.view(torch.int16), b.view(torch.int16))
            for (_, a), b in zip(by_memcpy, outs, strict=True)
        )
    targets = vllm_views(order, device, seed=1)
    for v in targets:
        v.zero_()
    scatter_chunks(VIEWS, [packed_view(v) for v in targets], indices, [o.to(device) for o in outs])
    if device == "cuda":
        torch.cuda.synchronize()
    named = [b for ids in chunks for b in ids]
    assert all(block_bytes(targets, b) == block_bytes(views, b) for b in named)
    others = [b for b in range(B) if b not in named]
    assert all(set(packed_view(v)[others].view(-1).tolist()) == {0.0} for v in targets)
