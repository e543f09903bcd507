"""Paged KV caches: gather a token set's slots into one chunk buffer, scatter it back.

Per-layer caches use one of three layouts:

* paged: ``[2, num_blocks, block_size, num_kv_heads, head_size]`` (K and V);
* MLA: ``[num_blocks, block_size, head_size]``;
* packed blocks: ``[num_blocks, block_elems]``, one row per block whose interior is opaque
  (vLLM 0.32 hands each layer as a ``[B, H, N, C]`` view whose block interior depends on the
  backend: on CPU, K is stored transposed and re-packed per ISA). Such caches move only as
  whole blocks, which is exact on every backend.

``slots`` are flat slot indices (``block * block_size + offset``), one per token. A gathered
chunk is ``[num_layers, 2, n, H, D]`` (MLA: ``[num_layers, n, D]``; packed:
``[num_layers, ceil(n / block_size), block_elems]``), contiguous.

The same code runs on CPU and CUDA tensors. Data moves through an integer view of the same
item size, so every dtype (fp8 included) round-trips byte-exactly and NaN payloads survive.
"""

from __future__ import annotations

import ctypes
import hashlib
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from kvplane.engine.chunk import dtype_from_name, dtype_name
from kvplane.engine.facts import KVShape
from kvplane.errors import BadRequest

__all__ = [
    "KVLayout",
    "SlotIndex",
    "allocate_kv_caches",
    "gather",
    "gather_chunks",
    "gather_many",
    "kv_checksums",
    "packed_view",
    "scatter",
    "scatter_chunks",
    "scatter_many",
    "slot_index",
    "slot_indices",
]

_BITS_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class KVLayout(NamedTuple):
    num_layers: int
    num_kv_heads: int
    head_size: int
    block_size: int
    num_blocks: int
    dtype: torch.dtype
    use_mla: bool = False
    #: per-layer caches are ``[num_blocks, block_elems]`` rows of opaque whole blocks
    packed: bool = False

    @classmethod
    def from_shape(cls, shape: KVShape, *, packed: bool = False) -> KVLayout:
        """The layout of caches of ``shape`` (paged or MLA; ``packed``: opaque blocks)."""
        return cls(
            shape.num_layers,
            shape.num_kv_heads,
            shape.head_size,
            shape.block_size,
            shape.num_blocks,
            dtype_from_name(shape.dtype),
            shape.use_mla,
            packed,
        )

    def kv_shape(self) -> KVShape:
        """The shape these caches have, whatever their memory layout."""
        return KVShape(
            self.num_layers,
            self.num_kv_heads,
            self.head_size,
            self.block_size,
            self.num_blocks,
            dtype_name(self.dtype),
            self.use_mla,
        )

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def block_elems(self) -> int:
        """Elements of one layer's block (K and V, or the MLA latent)."""
        kv = 1 if self.use_mla else 2
        return kv * self.num_kv_heads * self.block_size * self.head_size

    def cache_shape(self) -> tuple[int, ...]:
        if self.packed:
            return (self.num_blocks, self.block_elems)
        if self.use_mla:
            return (self.num_blocks, self.block_size, self.head_size)
        return (2, self.num_blocks, self.block_size, self.num_kv_heads, self.head_size)

    def chunk_shape(self, num_tokens: int) -> tuple[int, ...]:
        if self.packed:
            return (self.num_layers, -(-num_tokens // self.block_size), self.block_elems)
        if self.use_mla:
            return (self.num_layers, num_tokens, self.head_size)
        return (self.num_layers, 2, num_tokens, self.num_kv_heads, self.head_size)

    def chunk_nbytes(self, num_tokens: int) -> int:
        n = self.dtype.itemsize
        for d in self.chunk_shape(num_tokens):
            n *= d
        return n


def allocate_kv_caches(
    layout: KVLayout, device: str | torch.device = "cpu", *, seed: int | None = None
) -> list[torch.Tensor]:
    """Per-layer paged caches; zeros, or seeded random values when ``seed`` is given."""
    caches = []
    gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
    for _ in range(layout.num_layers):
        if gen is None:
            caches.append(torch.zeros(layout.cache_shape(), dtype=layout.dtype, device=device))
            continue
        values = torch.randn(layout.cache_shape(), generator=gen, dtype=torch.float32)
        caches.append(values.to(layout.dtype).to(device))
    return caches


def packed_view(cache: torch.Tensor) -> torch.Tensor:
    """``[num_blocks, block_elems]`` over a per-layer cache whose first axis is blocks and
    whose every block is one dense run of memory in any axis order (vLLM 0.32's views:
    ``[B, H, N, C]`` laid out LBHNC on CPU, LBNHC on CUDA). No copy: writes through the
    result land in the cache. ValueError when a block is not dense."""
    if cache.dim() < 2:
        raise ValueError(
            f"a paged cache has a block axis and a block interior; got {list(cache.shape)}"
        )
    inner = sorted(
        ((cache.stride(d), cache.shape[d]) for d in range(1, cache.dim()) if cache.shape[d] > 1),
        reverse=True,
    )
    expected = 1
    for stride, size in reversed(inner):
        if stride != expected:
            raise ValueError(
                f"cache of shape {list(cache.shape)} strides {list(cache.stride())}: its blocks "
                "are not dense runs of memory, so they cannot move as whole blocks"
            )
        expected *= size
    elems = expected
    if cache.shape[0] > 1 and cache.stride(0) < elems:
        raise ValueError(f"cache blocks overlap: block stride {cache.stride(0)} < {elems} elements")
    return cache.as_strided((cache.shape[0], elems), (cache.stride(0), 1), cache.storage_offset())


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_BITS_VIEW[t.element_size()])


class SlotIndex(NamedTuple):
    """A chunk's slots prepared for copying: per block when they are whole blocks in order
    (the usual paged case: a row per block instead of a row per token), else per slot.

    Built on the host from host slots, so preparing it never waits for the GPU.
    """

    ids: torch.Tensor  # block or slot indices, on the caches' device
    by_block: bool
    host_ids: list[int]  # the same indices on the host (CPU per-block copies)


def slot_index(slots: torch.Tensor, block_size: int, device: torch.device) -> SlotIndex:
    """One chunk's slots, prepared."""
    return slot_indices(slots, [(0, int(slots.numel()))], block_size, device)[0]


def slot_indices(
    slots: torch.Tensor,
    spans: Sequence[tuple[int, int]],
    block_size: int,
    device: torch.device,
    *,
    whole_blocks: bool = False,
) -> list[SlotIndex]:
    """Prepare every chunk ``slots[start:end]`` of a request at once: the checks run
    vectorized on the host and the indices cross to the device in one copy each (per-chunk
    preparation costs more host time than the copies it feeds on a fast GPU).

    ``whole_blocks`` (packed caches): every chunk becomes the blocks its slots lie in, a
    partial last block included; BadRequest when a chunk's slots are not whole blocks in
    order (a packed block cannot be cut into tokens)."""
    host = slots.detach().to("cpu", torch.long).reshape(-1).numpy()
    n = len(host)
    pos = np.arange(n)
    # token i sits where a whole-block copy would put it: its block's first slot + offset
    first_in_block = host[pos - pos % block_size]
    aligned = (host == first_in_block + pos % block_size) & (first_in_block % block_size == 0)
    bad_before = np.concatenate(([0], np.cumsum(~aligned)))
    block_ids = host[::block_size] // block_size
    device_slots = torch.from_numpy(host).to(device, non_blocking=True)
    device_blocks = torch.from_numpy(block_ids).to(device, non_blocking=True)
    prepared = []
    for start, end in spans:
        by_block = (
            start % block_size == 0
            and (end - start) % block_size == 0
            and end > start
            and bad_before[end] == bad_before[start]
        )
        if by_block:
            lo, hi = start // block_size, end // block_size
            prepared.append(SlotIndex(device_blocks[lo:hi], True, block_ids[lo:hi].tolist()))
        elif whole_blocks:
            if not (
                start % block_size == 0 and end > start and bad_before[end] == bad_before[start]
            ):
                raise BadRequest(
                    f"slots {start}..{end} of a packed-block cache must be whole blocks of "
                    f"{block_size} slots in order (block * {block_size} + offset)"
                )
            lo, hi = start // block_size, -(-end // block_size)
            prepared.append(SlotIndex(device_blocks[lo:hi], True, block_ids[lo:hi].tolist()))
        else:
            prepared.append(SlotIndex(device_slots[start:end], False, host[start:end].tolist()))
    return prepared


def _prepare(kv_caches: Sequence[torch.Tensor], slots: torch.Tensor | SlotIndex) -> SlotIndex:
    if isinstance(slots, SlotIndex):
        return slots
    first = kv_caches[0]
    if first.dim() == 2:
        raise ValueError(
            "packed-block caches need a SlotIndex (their block size is not in the shape)"
        )
    block_size = int(first.shape[1] if first.dim() == 3 else first.shape[2])
    return slot_index(slots, block_size, first.device)


def _rows(
    cache: torch.Tensor, out: torch.Tensor, by_block: bool
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(cache rows, chunk rows, dim): the cache and a layer of the chunk, with one row per
    slot, or per block when copying whole blocks, along ``dim``."""
    bits, out_bits = _bits(cache), _bits(out)
    if cache.dim() == 2:  # packed: a row per block, never per token
        if not by_block:
            raise BadRequest("a packed-block cache moves whole blocks only")
        return bits, out_bits.view(-1, cache.shape[1]), 0
    mla = cache.dim() == 3
    if mla:
        width = cache.shape[1] * cache.shape[2] if by_block else cache.shape[2]
        return bits.view(-1, width), out_bits.view(-1, width), 0
    if not by_block:
        return bits.view(2, -1, cache.shape[3], cache.shape[4]), out_bits, 1
    width = cache.shape[2] * cache.shape[3] * cache.shape[4]
    return bits.view(2, -1, width), out_bits.view(2, -1, width), 1


def gather(
    kv_caches: Sequence[torch.Tensor],
    slots: torch.Tensor | SlotIndex,
    out: torch.Tensor | None = None,
    *,
    non_blocking: bool = False,
) -> torch.Tensor:
    """Copy the KV at ``slots`` of every layer into one chunk tensor.

    ``out`` (shape ``chunk_shape(len(slots))``, the caches' dtype) may live on another
    device, e.g. a pinned host page for CUDA caches. With ``non_blocking`` the copy into a
    pinned ``out`` is only queued on the current stream: synchronize before reading it.
    """
    first = kv_caches[0]
    device = first.device
    prepared = _prepare(kv_caches, slots)
    n = int(prepared.ids.numel()) * (_block_len(first) if prepared.by_block else 1)
    shape: tuple[int, ...]
    if first.dim() == 2:
        shape = (len(kv_caches), n, first.shape[1])
    elif first.dim() == 3:
        shape = (len(kv_caches), n, first.shape[-1])
    else:
        shape = (len(kv_caches), 2, n, first.shape[-2], first.shape[-1])
    direct = out is not None and out.device == device
    staging = (
        out if direct and out is not None else torch.empty(shape, dtype=first.dtype, device=device)
    )
    for layer, cache in enumerate(kv_caches):
        rows, out_rows, dim = _rows(cache, staging[layer], prepared.by_block)
        torch.index_select(rows, dim, prepared.ids, out=out_rows)
    if out is None or direct:
        return staging
    out.copy_(staging, non_blocking=non_blocking)
    return out


def _block_len(cache: torch.Tensor) -> int:
    """Rows a whole-block index stands for: tokens per block (1 for packed caches, whose
    rows are blocks)."""
    if cache.dim() == 2:
        return 1
    return int(cache.shape[1] if cache.dim() == 3 else cache.shape[2])


def scatter(
    kv_caches: Sequence[torch.Tensor], slots: torch.Tensor | SlotIndex, kv: torch.Tensor
) -> None:
    """Write a chunk tensor (any device) into the caches at ``slots``.

    A pinned ``kv`` is copied to the device asynchronously on the current stream: keep it
    unchanged until that stream is synchronized.
    """
    first = kv_caches[0]
    device = first.device
    prepared = _prepare(kv_caches, slots)
    src = kv.to(device, non_blocking=kv.is_pinned())
    # On CPU, torch's index_copy_ runs serially at a fraction of memcpy speed; numpy's
    # fancy-index assignment copies whole rows with memcpy. On CUDA one kernel per layer.
    host_ids = np.asarray(prepared.host_ids) if device.type == "cpu" else None
    for layer, cache in enumerate(kv_caches):
        rows, src_rows, dim = _rows(cache, src[layer], prepared.by_block)
        if host_ids is None:
            rows.index_copy_(dim, prepared.ids, src_rows)
        else:
            rows.numpy()[(slice(None),) * dim + (host_ids,)] = src_rows.numpy()


def gather_chunks(
    kv_caches: Sequence[torch.Tensor],
    indices: Sequence[SlotIndex],
    outs: Sequence[torch.Tensor],
    copy_stream: torch.cuda.Stream | None = None,
) -> None:
    """Gather several same-size chunks into host buffers ``outs`` with two kernels per layer
    instead of one per layer per chunk (CUDA; kernel launches dominate small chunks).

    The device->host copies are queued on ``copy_stream`` (else the current stream), so
    they overlap the next batch's kernels: synchronize both before reading ``outs``.
    """
    first = kv_caches[0]
    mla = first.dim() != 5  # MLA and packed chunks are one row-major run per layer
    count = len(indices)
    by_block = indices[0].by_block
    ids = torch.cat([i.ids for i in indices])
    staging = torch.empty((count, *outs[0].shape), dtype=first.dtype, device=first.device)
    staging_bits = _bits(staging)
    for layer, cache in enumerate(kv_caches):
        rows, _, dim = _rows(cache, staging[0, layer], by_block)
        picked = torch.index_select(rows, dim, ids)
        if mla:
            staging_bits[:, layer].view(count, -1).copy_(picked.view(count, -1))
        else:
            staging_bits[:, layer].view(count, 2, -1).copy_(
                picked.view(2, count, -1).transpose(0, 1)
            )
    if copy_stream is None:
        for c, out in enumerate(outs):
            out.copy_(staging[c], non_blocking=True)
        return
    copy_stream.wait_stream(torch.cuda.current_stream(first.device))
    with torch.cuda.stream(copy_stream):
        for c, out in enumerate(outs):
            out.copy_(staging[c], non_blocking=True)
    staging.record_stream(copy_stream)  # not reused before the copies read it


def scatter_chunks(
    kv_caches: Sequence[torch.Tensor],
    indices: Sequence[SlotIndex],
    kvs: Sequence[torch.Tensor],
    copy_stream: torch.cuda.Stream | None = None,
) -> None:
    """Scatter several same-size chunks (pinned host tensors) with one copy per chunk and
    two kernels per layer. The host->device copies run on ``copy_stream`` (else the current
    stream) ahead of the kernels. Keep ``kvs`` unchanged until both are synchronized."""
    first = kv_caches[0]
    mla = first.dim() != 5  # MLA and packed chunks are one row-major run per layer
    count = len(indices)
    by_block = indices[0].by_block
    ids = torch.cat([i.ids for i in indices])
    on_copy_stream = torch.cuda.stream(copy_stream) if copy_stream is not None else nullcontext()
    with on_copy_stream:
        staging = torch.empty((count, *kvs[0].shape), dtype=first.dtype, device=first.device)
        for c, kv in enumerate(kvs):
            staging[c].copy_(kv, non_blocking=True)
    if copy_stream is not None:
        compute = torch.cuda.current_stream(first.device)
        compute.wait_stream(copy_stream)
        staging.record_stream(compute)
    staging_bits = _bits(staging)
    for layer, cache in enumerate(kv_caches):
        rows, _, dim = _rows(cache, staging[0, layer], by_block)
        per_chunk = staging_bits[:, layer]
        if mla:
            src = per_chunk.reshape(-1, *rows.shape[1:])
        else:
            src = per_chunk.view(count, 2, -1).transpose(0, 1).reshape(2, -1, *rows.shape[2:])
        rows.index_copy_(dim, ids, src)


_BATCH_CHUNKS = 16  # chunks per batched copy: bounds the device staging buffer


def _runs(
    items: Sequence[tuple[SlotIndex, torch.Tensor]],
) -> list[list[tuple[SlotIndex, torch.Tensor]]]:
    """Consecutive items of one shape and index kind, at most ``_BATCH_CHUNKS`` each."""
    runs: list[list[tuple[SlotIndex, torch.Tensor]]] = []
    for item in items:
        last = runs[-1] if runs else None
        if (
            last
            and len(last) < _BATCH_CHUNKS
            and last[0][1].shape == item[1].shape
            and last[0][0].by_block == item[0].by_block
        ):
            last.append(item)
        else:
            runs.append([item])
    return runs


def gather_many(
    kv_caches: Sequence[torch.Tensor],
    items: Sequence[tuple[SlotIndex, torch.Tensor]],
    copy_stream: torch.cuda.Stream | None = None,
) -> None:
    """Gather each ``(slots, out)`` pair. On CUDA, runs of same-size chunks share kernels and
    the copies into pinned ``out`` are queued on ``copy_stream``.

    Without ``copy_stream`` the current stream waits for the copies at the end, so syncing
    it suffices. A caller that gathers in several calls passes one copy stream to all and
    joins it once: a join per call would stall the copy engine at every call.
    """
    if kv_caches and kv_caches[0].device.type == "cpu" and kv_caches[0].dim() == 2:
        _cpu_block_copies(kv_caches, items, to_caches=False)
        return
    if not kv_caches or kv_caches[0].device.type != "cuda":
        for index, out in items:
            gather(kv_caches, index, out=out)
        return
    compute = torch.cuda.current_stream(kv_caches[0].device)
    stream = copy_stream or torch.cuda.Stream(kv_caches[0].device)
    for run in _runs(items):
        if len(run) == 1:
            gather(kv_caches, run[0][0], out=run[0][1], non_blocking=True)
        else:
            gather_chunks(kv_caches, [i for i, _ in run], [o for _, o in run], stream)
    if copy_stream is None:
        compute.wait_stream(stream)


def _cpu_block_copies(
    kv_caches: Sequence[torch.Tensor],
    items: Sequence[tuple[SlotIndex, torch.Tensor]],
    *,
    to_caches: bool,
) -> None:
    """Packed CPU caches: every chunk's blocks copied as byte slices of memoryviews, a run
    of consecutive blocks in one slice assignment, which CPython does with libc's
    ``memcpy``. That moves cold memory with ``rep movsb``, writing whole lines without
    reading them first, where numpy's and torch's vector loops read each destination line
    before writing it (measured here: 0.80-0.87 of one plain memcpy of the same bytes with
    numpy slices, 0.9-0.95 with memcpy). A slice assignment also costs a third of a ctypes
    call, and with 2-block chunks the Python per piece costs as much as the copy, so the
    loop does as little else as it can (inside vLLM the copies of a 4-layer load take
    0.75-0.9 ms and everything around them took another 0.15-0.3 ms).
    Memoryview slices never reach outside their buffer: a bad index raises."""
    if not kv_caches:
        return
    rows = _cpu_rows(kv_caches)
    views, row_bytes, layers = rows.views, rows.row_bytes, len(rows.views)
    for index, chunk in items:
        if not index.by_block:
            raise BadRequest("a packed-block cache moves whole blocks only")
        shape = chunk.shape
        if (
            len(shape) != 3
            or shape[0] != layers
            or chunk.dtype != rows.dtype
            or shape[2] != rows.row_elems
            or not chunk.is_contiguous()
        ):
            raise ValueError(
                f"a packed chunk is a dense [{layers}, blocks, {rows.row_elems}] of "
                f"{rows.dtype}; got {list(shape)} of {chunk.dtype}"
            )
        blocks = shape[1]
        ids = index.host_ids
        if len(ids) > blocks or (ids and (min(ids) < 0 or max(ids) >= rows.num_rows)):
            raise ValueError(
                f"block ids {ids} for a chunk of {blocks} in a cache of {rows.num_rows}"
            )
        layer_bytes = blocks * row_bytes
        data = _raw_bytes(chunk.data_ptr(), layers * layer_bytes)
        # consecutive blocks are one run where the cache's rows are dense, else one each
        runs = _block_runs(ids) if rows.dense else [(p, b, 1) for p, b in enumerate(ids)]
        for start, first, count in runs:
            at, c, nbytes = start * row_bytes, first * rows.stride, count * row_bytes
            for view in views:
                if to_caches:
                    view[c : c + nbytes] = data[at : at + nbytes]
                else:
                    data[at : at + nbytes] = view[c : c + nbytes]
                at += layer_bytes


def _raw_bytes(address: int, nbytes: int) -> memoryview:
    """The ``nbytes`` at ``address`` as a writable byte view (no copy; the owner must outlive
    it)."""
    return memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")


@dataclass(frozen=True)
class _PackedRows:
    """Byte views of packed CPU caches, which are all alike: each layer's bytes from its
    first block to the end of its last."""

    views: list[memoryview]
    dtype: torch.dtype
    row_elems: int  # elements per block
    row_bytes: int
    stride: int  # bytes from one block to the next
    num_rows: int

    @property
    def dense(self) -> bool:
        return self.stride == self.row_bytes


_last_rows: dict[tuple[object, ...], _PackedRows] = {}


def _cpu_rows(kv_caches: Sequence[torch.Tensor]) -> _PackedRows:
    """The byte views of packed CPU caches, built once for the caches an engine serves.

    Kept for the last caches seen, by each cache's address, shape, strides and dtype: views
    of the same memory span for as long as those match (what must keep the memory alive
    is the caller's tensors, as for every view made here)."""
    key = tuple((c.data_ptr(), c.shape, c.stride(), c.dtype) for c in kv_caches)
    rows = _last_rows.get(key)
    if rows is not None:
        return rows
    first = kv_caches[0]
    shape, strides, dtype = first.shape, first.stride(), first.dtype
    if len(shape) != 2 or strides[1] != 1:
        raise ValueError(f"a packed cache is [blocks, block_elems] dense rows; got {shape}")
    for cache in kv_caches:
        if cache.shape != shape or cache.stride() != strides or cache.dtype != dtype:
            raise ValueError(f"packed caches are alike; got {list(cache.shape)} and {shape}")
    row_bytes, stride_bytes = shape[1] * dtype.itemsize, strides[0] * dtype.itemsize
    span = (shape[0] - 1) * stride_bytes + row_bytes if shape[0] else 0
    rows = _PackedRows(
        [_raw_bytes(c.data_ptr(), span) for c in kv_caches],
        dtype,
        shape[1],
        row_bytes,
        stride_bytes,
        shape[0],
    )
    _last_rows.clear()
    _last_rows[key] = rows
    return rows


def _block_runs(ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(position, first block, count)`` of each run of consecutive block ids."""
    runs: list[tuple[int, int, int]] = []
    for pos, block in enumerate(ids):
        if runs and runs[-1][1] + runs[-1][2] == block:
            start, first, count = runs[-1]
            runs[-1] = (start, first, count + 1)
        else:
            runs.append((pos, block, 1))
    return runs


def scatter_many(
    kv_caches: Sequence[torch.Tensor],
    items: Sequence[tuple[SlotIndex, torch.Tensor]],
    copy_stream: torch.cuda.Stream | None = None,
) -> None:
    """Scatter each ``(slots, kv)`` pair; batched like :func:`gather_many` (host->device
    copies on ``copy_stream``, the kernels on the current stream, which waits for them).
    Keep the ``kv`` tensors unchanged until the current stream is synchronized."""
    if kv_caches and kv_caches[0].device.type == "cpu" and kv_caches[0].dim() == 2:
        _cpu_block_copies(kv_caches, items, to_caches=True)
        return
    if not kv_caches or kv_caches[0].device.type != "cuda":
        for index, kv in items:
            scatter(kv_caches, index, kv)
        return
    copy_stream = copy_stream or torch.cuda.Stream(kv_caches[0].device)
    for run in _runs(items):
        if len(run) == 1:
            scatter(kv_caches, run[0][0], run[0][1])
        else:
            scatter_chunks(kv_caches, [i for i, _ in run], [kv for _, kv in run], copy_stream)


def kv_checksums(
    kv_caches: Sequence[torch.Tensor],
    slots: torch.Tensor,
    chunk_size: int,
    layerwise: bool = False,
    *,
    layout: KVLayout | None = None,
) -> list[str] | dict[str, list[str]]:
    """MD5 of the KV at ``slots``, per chunk of ``chunk_size`` slots.

    All layers combined (a list, one digest per chunk) or per layer (``{"layer_i": [...]}``).
    Packed-block caches (``layout.packed``) digest the whole blocks the slots lie in; their
    slots must be whole blocks in order (BadRequest otherwise).
    """
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    per_layer: dict[str, list[str]] = {f"layer_{i}": [] for i in range(len(kv_caches))}
    combined: list[str] = []
    packed = layout is not None and layout.packed
    spans = [
        (start, min(start + chunk_size, int(slots.numel())))
        for start in range(0, int(slots.numel()), chunk_size)
    ]
    indices: list[SlotIndex] | None = None
    if packed and layout is not None:
        indices = slot_indices(
            slots, spans, layout.block_size, kv_caches[0].device, whole_blocks=True
        )
    for no, (start, end) in enumerate(spans):
        where = indices[no] if indices is not None else slots[start:end]
        kv = gather(kv_caches, where).cpu()
        data = _bits(kv).contiguous()
        if layerwise:
            for i in range(len(kv_caches)):
                per_layer[f"layer_{i}"].append(hashlib.md5(data[i].numpy().tobytes()).hexdigest())
        else:
            combined.append(hashlib.md5(data.numpy().tobytes()).hexdigest())
    return per_layer if layerwise else combined
