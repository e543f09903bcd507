"""Block copies for packed CPU caches: whole blocks as ``memcpy`` through raw addresses.

Every chunk's blocks are copied as byte slices of memoryviews, a run of consecutive blocks
in one slice assignment, which CPython does with libc's ``memcpy``. That moves cold memory
with ``rep movsb``, writing whole lines without reading them first, where numpy's and
torch's vector loops read each destination line before writing it. A slice assignment also
costs less than a ctypes call, and with small chunks the Python per piece costs as much as
the copy, so the copy loop does as little else as it can (docs/vllm.md, performance notes).
Memoryview slices never reach outside their buffer: a bad index raises.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvplane.engine.kv.layout import KVLayout
from kvplane.engine.kv.slots import Copies, SlotIndex, check_chunk
from kvplane.errors import BadRequest

__all__ = ["block_copies"]


def block_copies(
    layout: KVLayout,
    kv_caches: Sequence[torch.Tensor],
    items: Copies,
    *,
    to_caches: bool,
) -> None:
    """Copy each ``(blocks, chunk)`` pair's blocks between the caches and the chunk (into
    the caches when ``to_caches``). Every pair is checked before any byte moves, since a
    raw copy checks nothing itself: the chunk has the layout's shape for exactly its blocks
    (:func:`~kvplane.engine.kv.slots.check_chunk`), the layout's dtype, dense memory, and
    the block ids lie inside the caches (ValueError; BadRequest for per-slot indices)."""
    if not kv_caches:
        return
    rows = _cpu_rows(layout, kv_caches)
    for index, chunk in items:
        _check(layout, rows, index, chunk)
    views, row_bytes = rows.views, rows.row_bytes
    for index, chunk in items:
        ids = index.host_ids
        layer_bytes = len(ids) * row_bytes
        data = _raw_bytes(chunk.data_ptr(), len(views) * layer_bytes)
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


@dataclass(frozen=True)
class _PackedRows:
    """Byte views of packed CPU caches, which are all alike: each layer's bytes from its
    first block to the end of its last."""

    views: list[memoryview]
    dtype: torch.dtype
    row_bytes: int
    stride: int  # bytes from one block to the next
    num_rows: int

    @property
    def dense(self) -> bool:
        return self.stride == self.row_bytes


def _check(layout: KVLayout, rows: _PackedRows, index: SlotIndex, chunk: torch.Tensor) -> None:
    if not index.by_block:
        raise BadRequest("a packed-block cache moves whole blocks only")
    check_chunk(layout, index, chunk)
    if chunk.dtype != rows.dtype or not chunk.is_contiguous():
        raise ValueError(
            f"a packed chunk is dense memory of {rows.dtype}; got {chunk.dtype}"
            f"{'' if chunk.is_contiguous() else ', not contiguous'}"
        )
    ids = index.host_ids
    if ids and (min(ids) < 0 or max(ids) >= rows.num_rows):
        raise ValueError(f"block ids {ids} in a cache of {rows.num_rows} blocks")


def _raw_bytes(address: int, nbytes: int) -> memoryview:
    """The ``nbytes`` at ``address`` as a writable byte view (no copy; the owner must outlive
    it)."""
    return memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")


_last_rows: dict[tuple[object, ...], _PackedRows] = {}


def _cpu_rows(layout: KVLayout, kv_caches: Sequence[torch.Tensor]) -> _PackedRows:
    """The byte views of packed CPU caches, built once for the caches an engine serves.

    Kept for the last caches seen, by each cache's address, shape, strides and dtype: views
    of the same memory span for as long as those match (what must keep the memory alive
    is the caller's tensors, as for every view made here)."""
    key = tuple((c.data_ptr(), c.shape, c.stride(), c.dtype) for c in kv_caches)
    rows = _last_rows.get(key)
    if rows is not None:
        return rows
    shape, dtype = layout.cache_shape(), layout.dtype
    strides = kv_caches[0].stride()
    for cache in kv_caches:
        if tuple(cache.shape) != shape or cache.stride() != strides or cache.dtype != dtype:
            raise ValueError(
                f"packed caches are alike {list(shape)} of {dtype} with rows of dense "
                f"memory; got {list(cache.shape)} of {cache.dtype}, strides {cache.stride()}"
            )
    if strides[1] != 1:
        raise ValueError(f"packed cache rows must be dense memory; got strides {strides}")
    row_bytes, stride_bytes = shape[1] * dtype.itemsize, strides[0] * dtype.itemsize
    span = (shape[0] - 1) * stride_bytes + row_bytes if shape[0] else 0
    rows = _PackedRows(
        [_raw_bytes(c.data_ptr(), span) for c in kv_caches],
        dtype,
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
