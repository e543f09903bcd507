"""Gather chunks from the paged caches and scatter them back.

:func:`gather` and :func:`scatter` move one chunk with torch's index kernels, on CPU or
CUDA. :func:`gather_many` and :func:`scatter_many` move a request's chunks: packed CPU
caches by ``memcpy`` (:mod:`kvplane.engine.kv.cpu_blocks`), CUDA caches in runs of
same-size chunks that share kernels (:func:`gather_chunks`, :func:`scatter_chunks`), with
the host copies on a copy stream. Every copy checks that its index addresses exactly the
chunk's rows, before anything moves.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch

from kvplane.engine.kv.cpu_blocks import block_copies
from kvplane.engine.kv.layout import KVLayout, as_bits
from kvplane.engine.kv.slots import Copies, SlotIndex, check_chunk, prepare

__all__ = [
    "gather",
    "gather_chunks",
    "gather_many",
    "scatter",
    "scatter_chunks",
    "scatter_many",
]

_BATCH_CHUNKS = 16  # chunks per batched copy: bounds the device staging buffer


def gather(
    layout: KVLayout,
    kv_caches: Sequence[torch.Tensor],
    slots: torch.Tensor | SlotIndex,
    out: torch.Tensor | None = None,
    *,
    non_blocking: bool = False,
) -> torch.Tensor:
    """Copy the KV at ``slots`` of every layer into one chunk tensor.

    ``out`` (shape ``chunk_shape`` of the slots, the caches' dtype) may live on another
    device, e.g. a pinned host page for CUDA caches. With ``non_blocking`` the copy into a
    pinned ``out`` is only queued on the current stream: synchronize before reading it.
    """
    device = kv_caches[0].device
    index = prepare(layout, slots, device)
    if out is not None:
        check_chunk(layout, index, out)
    if out is not None and out.device == device:
        staging = out
    else:
        shape = layout.chunk_shape(index.num_slots(layout.block_size))
        staging = torch.empty(shape, dtype=layout.dtype, device=device)
    for layer, cache in enumerate(kv_caches):
        rows, out_rows, dim = layout.rows(cache, staging[layer], index.by_block)
        torch.index_select(rows, dim, index.ids, out=out_rows)
    if out is None or staging is out:
        return staging
    out.copy_(staging, non_blocking=non_blocking)
    return out


def scatter(
    layout: KVLayout,
    kv_caches: Sequence[torch.Tensor],
    slots: torch.Tensor | SlotIndex,
    kv: torch.Tensor,
) -> None:
    """Write a chunk tensor (any device) into the caches at ``slots``.

    A pinned ``kv`` is copied to the device asynchronously on the current stream: keep it
    unchanged until that stream is synchronized.
    """
    device = kv_caches[0].device
    index = prepare(layout, slots, device)
    check_chunk(layout, index, kv)
    src = kv.to(device, non_blocking=kv.is_pinned())
    # On CPU, torch's index_copy_ runs serially, far below memcpy speed; numpy's
    # fancy-index assignment copies whole rows with memcpy. On CUDA one kernel per layer.
    host_ids = np.asarray(index.host_ids) if device.type == "cpu" else None
    for layer, cache in enumerate(kv_caches):
        rows, src_rows, dim = layout.rows(cache, src[layer], index.by_block)
        if host_ids is None:
            rows.index_copy_(dim, index.ids, src_rows)
        else:
            rows.numpy()[(slice(None),) * dim + (host_ids,)] = src_rows.numpy()


def gather_chunks(
    layout: KVLayout,
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
    ids = _run_ids(layout, indices, outs)
    device, count, by_block = kv_caches[0].device, len(indices), indices[0].by_block
    staging = torch.empty((count, *outs[0].shape), dtype=layout.dtype, device=device)
    staging_bits = as_bits(staging)
    for layer, cache in enumerate(kv_caches):
        rows, _, dim = layout.rows(cache, staging[0, layer], by_block)
        picked = torch.index_select(rows, dim, ids)
        if layout.has_kv_axis:
            staging_bits[:, layer].view(count, 2, -1).copy_(
                picked.view(2, count, -1).transpose(0, 1)
            )
        else:
            staging_bits[:, layer].view(count, -1).copy_(picked.view(count, -1))
    if copy_stream is None:
        for c, out in enumerate(outs):
            out.copy_(staging[c], non_blocking=True)
        return
    copy_stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(copy_stream):
        for c, out in enumerate(outs):
            out.copy_(staging[c], non_blocking=True)
    staging.record_stream(copy_stream)  # not reused before the copies read it


def scatter_chunks(
    layout: KVLayout,
    kv_caches: Sequence[torch.Tensor],
    indices: Sequence[SlotIndex],
    kvs: Sequence[torch.Tensor],
    copy_stream: torch.cuda.Stream | None = None,
) -> None:
    """Scatter several same-size chunks (pinned host tensors) with one copy per chunk and
    two kernels per layer. The host->device copies run on ``copy_stream`` (else the current
    stream) ahead of the kernels. Keep ``kvs`` unchanged until both are synchronized."""
    ids = _run_ids(layout, indices, kvs)
    device, count, by_block = kv_caches[0].device, len(indices), indices[0].by_block
    on_copy_stream = torch.cuda.stream(copy_stream) if copy_stream is not None else nullcontext()
    with on_copy_stream:
        staging = torch.empty((count, *kvs[0].shape), dtype=layout.dtype, device=device)
        for c, kv in enumerate(kvs):
            staging[c].copy_(kv, non_blocking=True)
    if copy_stream is not None:
        compute = torch.cuda.current_stream(device)
        compute.wait_stream(copy_stream)
        staging.record_stream(compute)
    staging_bits = as_bits(staging)
    for layer, cache in enumerate(kv_caches):
        rows, _, dim = layout.rows(cache, staging[0, layer], by_block)
        per_chunk = staging_bits[:, layer]
        if layout.has_kv_axis:
            src = per_chunk.view(count, 2, -1).transpose(0, 1).reshape(2, -1, *rows.shape[2:])
        else:
            src = per_chunk.reshape(-1, *rows.shape[1:])
        rows.index_copy_(dim, ids, src)


def gather_many(
    layout: KVLayout,
    kv_caches: Sequence[torch.Tensor],
    items: Copies,
    copy_stream: torch.cuda.Stream | None = None,
) -> None:
    """Gather each ``(slots, out)`` pair. On CUDA, runs of same-size chunks share kernels and
    the copies into pinned ``out`` are queued on ``copy_stream``.

    Without ``copy_stream`` the current stream waits for the copies at the end, so syncing
    it suffices. A caller that gathers in several calls passes one copy stream to all and
    joins it once: a join per call would stall the copy engine at every call.
    """
    if _by_memcpy(layout, kv_caches):
        block_copies(layout, kv_caches, items, to_caches=False)
        return
    for index, out in items:
        check_chunk(layout, index, out)
    if not kv_caches or kv_caches[0].device.type != "cuda":
        for index, out in items:
            gather(layout, kv_caches, index, out=out)
        return
    compute = torch.cuda.current_stream(kv_caches[0].device)
    stream = copy_stream or torch.cuda.Stream(kv_caches[0].device)
    for run in _runs(items):
        if len(run) == 1:
            gather(layout, kv_caches, run[0][0], out=run[0][1], non_blocking=True)
        else:
            gather_chunks(layout, kv_caches, [i for i, _ in run], [o for _, o in run], stream)
    if copy_stream is None:
        compute.wait_stream(stream)


def scatter_many(
    layout: KVLayout,
    kv_caches: Sequence[torch.Tensor],
    items: Copies,
    copy_stream: torch.cuda.Stream | None = None,
) -> None:
    """Scatter each ``(slots, kv)`` pair; batched like :func:`gather_many` (host->device
    copies on ``copy_stream``, the kernels on the current stream, which waits for them).
    Keep the ``kv`` tensors unchanged until the current stream is synchronized."""
    if _by_memcpy(layout, kv_caches):
        block_copies(layout, kv_caches, items, to_caches=True)
        return
    for index, kv in items:
        check_chunk(layout, index, kv)
    if not kv_caches or kv_caches[0].device.type != "cuda":
        for index, kv in items:
            scatter(layout, kv_caches, index, kv)
        return
    copy_stream = copy_stream or torch.cuda.Stream(kv_caches[0].device)
    for run in _runs(items):
        if len(run) == 1:
            scatter(layout, kv_caches, run[0][0], run[0][1])
        else:
            scatter_chunks(
                layout, kv_caches, [i for i, _ in run], [kv for _, kv in run], copy_stream
            )


def _run_ids(
    layout: KVLayout, indices: Sequence[SlotIndex], chunks: Sequence[torch.Tensor]
) -> torch.Tensor:
    """The indices of a run of chunks as one tensor, once each is checked against its chunk."""
    for index, chunk in zip(indices, chunks, strict=True):
        check_chunk(layout, index, chunk)
    return torch.cat([i.ids for i in indices])


def _by_memcpy(layout: KVLayout, kv_caches: Sequence[torch.Tensor]) -> bool:
    """Packed CPU caches move by ``memcpy``, faster than any index kernel on the host."""
    return layout.packed and bool(kv_caches) and kv_caches[0].device.type == "cpu"


def _runs(items: Copies) -> list[list[tuple[SlotIndex, torch.Tensor]]]:
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
