import hashlib
import re
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvplane.engine.kv.checksums import kv_checksums
from kvplane.engine.kv.copies import (
    gather,
    gather_chunks,
    gather_many,
    scatter,
    scatter_chunks,
    scatter_many,
)
from kvplane.engine.kv.layout import KVLayout, allocate_kv_caches
from kvplane.engine.kv.slots import SlotIndex, slot_index, slot_indices

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
if hasattr(torch, "float8_e4m3fn"):
    DTYPES.append(torch.float8_e4m3fn)


def _layout(dtype, mla=False, layers=3, heads=2, head=8, block=4, blocks=16):
    return KVLayout(layers, heads, head, block, blocks, dtype, mla)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mla", [False, True], ids=["paged", "mla"])
def test_gather_scatter_round_trip_is_byte_exact(device, dtype, mla):
    layout = _layout(dtype, mla)
    src = allocate_kv_caches(layout, device, seed=7)
    gen = torch.Generator().manual_seed(3)
    slots = torch.randperm(layout.num_slots, generator=gen)[:37]
    chunk = gather(layout, src, slots)
    assert tuple(chunk.shape) == layout.chunk_shape(37)
    dst = allocate_kv_caches(layout, device)
    other = torch.randperm(layout.num_slots, generator=gen)[:37]
    scatter(layout, dst, other, chunk)
    for a, b in zip(src, dst, strict=True):
        flat_a = a.view(torch.uint8).reshape(*a.shape[:-1], -1)
        flat_b = b.view(torch.uint8).reshape(*b.shape[:-1], -1)
        if mla:
            ra, rb = (
                flat_a.reshape(-1, flat_a.shape[-1])[slots.to(device)],
                flat_b.reshape(-1, flat_b.shape[-1])[other.to(device)],
            )
        else:
            ra = flat_a.reshape(2, -1, *flat_a.shape[-2:])[:, slots.to(device)]
            rb = flat_b.reshape(2, -1, *flat_b.shape[-2:])[:, other.to(device)]
        assert torch.equal(ra, rb)


def test_gather_into_host_buffer_from_device(device):
    layout = _layout(torch.bfloat16)
    src = allocate_kv_caches(layout, device, seed=1)
    slots = torch.arange(10, 30)
    out = torch.empty(layout.chunk_shape(20), dtype=torch.bfloat16, pin_memory=device == "cuda")
    gather(layout, src, slots, out=out)
    assert torch.equal(out.view(torch.int16), gather(layout, src, slots).cpu().view(torch.int16))


def test_nan_payloads_survive():
    layout = _layout(torch.float16, layers=1)
    caches = allocate_kv_caches(layout)
    caches[0].view(torch.int16).fill_(0x7E01)  # a NaN with a payload
    chunk = gather(layout, caches, torch.arange(4))
    dst = allocate_kv_caches(layout)
    scatter(layout, dst, torch.arange(4), chunk)
    assert torch.all(dst[0].view(torch.int16)[:, 0, :4] == 0x7E01)


def test_checksums_per_chunk_and_layerwise(device):
    layout = _layout(torch.bfloat16)
    caches = allocate_kv_caches(layout, device, seed=5)
    slots = torch.tensor([1, 2, 3, 9, 10, 11, 12, 17])
    combined = kv_checksums(layout, caches, slots, chunk_size=3)
    assert len(combined) == 3
    expected0 = hashlib.md5(
        gather(layout, caches, slots[:3]).cpu().view(torch.int16).numpy().tobytes()
    ).hexdigest()
    assert combined[0] == expected0
    layered = kv_checksums(layout, caches, slots, chunk_size=3, layerwise=True)
    assert sorted(layered) == ["layer_0", "layer_1", "layer_2"]
    assert all(len(v) == 3 for v in layered.values())
    # moving the KV elsewhere and back keeps the checksum
    dst = allocate_kv_caches(layout, device)
    scatter(layout, dst, slots, gather(layout, caches, slots))
    assert kv_checksums(layout, dst, slots, chunk_size=3) == combined
    with pytest.raises(ValueError):
        kv_checksums(layout, caches, slots, chunk_size=0)


@pytest.mark.parametrize("mla", [False, True], ids=["paged", "mla"])
def test_whole_block_path_matches_per_slot_path(device, mla):
    layout = _layout(torch.bfloat16, mla)
    src = allocate_kv_caches(layout, device, seed=11)
    table = torch.tensor([5, 2, 9, 0])
    slots = (table[:, None] * layout.block_size + torch.arange(layout.block_size)).reshape(-1)
    prepared = slot_index(layout, slots, src[0].device)
    assert prepared.by_block and prepared.host_ids == [5, 2, 9, 0]
    per_slot = gather(layout, src, slot_index(layout, slots[:-1], src[0].device))
    by_block = gather(layout, src, prepared)
    assert torch.equal(by_block[..., :-1, :, :] if not mla else by_block[:, :-1], per_slot)
    dst = allocate_kv_caches(layout, device)
    scatter(layout, dst, prepared, by_block.cpu().pin_memory() if device == "cuda" else by_block)
    torch.cuda.synchronize() if device == "cuda" else None
    assert torch.equal(
        gather(layout, dst, slots).cpu().view(torch.int16), by_block.cpu().view(torch.int16)
    )


@pytest.mark.parametrize("mla", [False, True], ids=["paged", "mla"])
@pytest.mark.parametrize("blocks", [True, False], ids=["blocks", "slots"])
def test_batched_chunks_match_single_chunks(device, mla, blocks):
    layout = _layout(torch.bfloat16, mla, blocks=32)
    src = allocate_kv_caches(layout, device, seed=13)
    bs = layout.block_size
    if blocks:
        table = torch.randperm(32, generator=torch.Generator().manual_seed(1))[:6]
        slots = (table[:, None] * bs + torch.arange(bs)).reshape(-1)
    else:
        slots = torch.randperm(layout.num_slots, generator=torch.Generator().manual_seed(2))[:24]
    parts = [slot_index(layout, p, src[0].device) for p in slots.split(8)]
    outs = [torch.empty(layout.chunk_shape(8), dtype=layout.dtype) for _ in parts]
    gather_chunks(layout, src, parts, outs)
    if device == "cuda":
        torch.cuda.synchronize()
    for part, out in zip(parts, outs, strict=True):
        assert torch.equal(out.view(torch.int16), gather(layout, src, part).cpu().view(torch.int16))
    dst = allocate_kv_caches(layout, device)
    scatter_chunks(layout, dst, parts, [o.to(device) for o in outs])
    assert torch.equal(
        gather(layout, dst, slots).cpu().view(torch.int16),
        gather(layout, src, slots).cpu().view(torch.int16),
    )


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_request_wide_slot_preparation_matches_per_chunk_rules(data):
    block, chunk = data.draw(st.sampled_from([(4, 8), (4, 6), (2, 2)]))
    blocks = data.draw(st.permutations(list(range(12))))
    n_blocks = data.draw(st.integers(1, 12))
    slots = torch.tensor([b * block + o for b in blocks[:n_blocks] for o in range(block)])
    if data.draw(st.booleans()):  # break one slot so its chunk must copy per slot
        slots[data.draw(st.integers(0, len(slots) - 1))] = 47
    n = data.draw(st.integers(1, len(slots)))
    spans = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    prepared = slot_indices(
        _layout(torch.float32, block=block), slots[:n], spans, torch.device("cpu")
    )
    for (start, end), got in zip(spans, prepared, strict=True):
        part = slots[start:end]
        rows_ok = len(part) % block == 0 and start % block == 0
        if rows_ok:
            rows = part.view(-1, block)
            rows_ok = bool((rows[:, 0] % block == 0).all()) and torch.equal(
                rows - rows[:, :1], torch.arange(block).expand_as(rows)
            )
        assert got.by_block == rows_ok
        expected = part[::block] // block if rows_ok else part
        assert got.ids.tolist() == expected.tolist() == got.host_ids


@pytest.mark.parametrize("mla", [False, True], ids=["paged", "mla"])
def test_an_index_that_does_not_cover_its_chunk_is_refused_and_nothing_moves(device, mla):
    """A shorter index would leave rows of the chunk (a stored page, or the caches' blocks on
    a load) unset; a longer one would reach past it. Every copy path refuses both, naming
    the counts, before it moves anything, also for the good chunks beside a bad one."""
    layout = _layout(torch.bfloat16, mla)
    caches = allocate_kv_caches(layout, device, seed=3)
    before = [c.clone() for c in caches]
    where = caches[0].device
    blocks = slot_index(layout, torch.arange(8, 16), where)  # blocks 2 and 3
    assert blocks.by_block
    per_slot = slot_index(layout, torch.tensor([9, 3, 5]), where)

    def chunk(tokens):
        return torch.ones(layout.chunk_shape(tokens), dtype=layout.dtype, device=device)

    cases = [
        (SlotIndex(blocks.ids[:1], True, blocks.host_ids[:1]), 8, "1 block ids for a chunk of 2"),
        (blocks, 12, "2 block ids for a chunk of 3"),
        (per_slot, 4, "3 slots for a chunk of 4 tokens"),
    ]
    good = (blocks, chunk(8))
    for index, tokens, message in cases:
        kv = chunk(tokens)
        calls: list[tuple[Callable[..., object], tuple[object, ...]]] = [
            (scatter, (index, kv)),
            (gather, (index, kv)),
            (scatter_many, ([good, (index, kv)],)),
            (gather_many, ([good, (index, kv)],)),
            (scatter_chunks, ([index, index], [kv, kv])),
            (gather_chunks, ([index, index], [kv, kv])),
        ]
        for copy, args in calls:
            with pytest.raises(ValueError, match=re.escape(message)):
                copy(layout, caches, *args)
    assert all(torch.equal(c, b) for c, b in zip(caches, before, strict=True))
