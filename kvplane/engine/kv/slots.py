"""A chunk's slots prepared for copying, and the check that they address exactly its rows.

Prepared on the host from host slots, so preparing never waits for the GPU. Slots that are
whole blocks in order copy a row per block (the usual paged case) instead of a row per token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from kvplane.engine.kv.layout import KVLayout
from kvplane.errors import BadRequest

__all__ = [
    "Copies",
    "SlotIndex",
    "check_chunk",
    "prepare",
    "slot_index",
    "slot_indices",
    "without_head",
]


class SlotIndex(NamedTuple):
    """A chunk's slots prepared for copying: per block when they are whole blocks in order,
    else per slot."""

    ids: torch.Tensor  # block or slot indices, on the caches' device
    by_block: bool
    host_ids: list[int]  # the same indices on the host (CPU per-block copies)

    def num_slots(self, block_size: int) -> int:
        """Slots addressed: a block id stands for all ``block_size`` slots of its block."""
        return len(self.host_ids) * (block_size if self.by_block else 1)


#: ``(index, chunk)`` pairs, one per chunk to copy
Copies = Sequence[tuple[SlotIndex, torch.Tensor]]


def slot_index(layout: KVLayout, slots: torch.Tensor, device: torch.device) -> SlotIndex:
    """One chunk's slots, prepared."""
    return slot_indices(layout, slots, [(0, int(slots.numel()))], device)[0]


def prepare(layout: KVLayout, slots: torch.Tensor | SlotIndex, device: torch.device) -> SlotIndex:
    """``slots`` prepared, unless they are already."""
    return slots if isinstance(slots, SlotIndex) else slot_index(layout, slots, device)


def slot_indices(
    layout: KVLayout,
    slots: torch.Tensor,
    spans: Sequence[tuple[int, int]],
    device: torch.device,
) -> list[SlotIndex]:
    """Prepare every chunk ``slots[start:end]`` of a request at once: the checks run
    vectorized on the host and the indices cross to the device in one copy each (preparing
    chunk by chunk costs more host time than the copies it feeds on a fast GPU).

    With packed caches every chunk becomes the blocks its slots lie in, a partial last block
    included; BadRequest when a chunk's slots are not whole blocks in order (a packed block
    cannot be cut into tokens)."""
    block_size = layout.block_size
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
        in_order = start % block_size == 0 and end > start and bad_before[end] == bad_before[start]
        if in_order and (end - start) % block_size == 0:
            lo, hi = start // block_size, end // block_size
            prepared.append(SlotIndex(device_blocks[lo:hi], True, block_ids[lo:hi].tolist()))
        elif layout.packed:
            if not in_order:
                raise BadRequest(
                    f"slots {start}..{end} of a packed-block cache must be whole blocks of "
                    f"{block_size} slots in order (block * {block_size} + offset)"
                )
            lo, hi = start // block_size, -(-end // block_size)
            prepared.append(SlotIndex(device_blocks[lo:hi], True, block_ids[lo:hi].tolist()))
        else:
            prepared.append(SlotIndex(device_slots[start:end], False, host[start:end].tolist()))
    return prepared


def check_chunk(layout: KVLayout, index: SlotIndex, chunk: torch.Tensor) -> None:
    """ValueError unless ``index`` addresses exactly the rows of ``chunk``: a shorter index
    would leave rows of a stored chunk unset (or of the caches, loading), a longer one would
    reach past the chunk."""
    expected = layout.chunk_shape(index.num_slots(layout.block_size))
    if tuple(chunk.shape) == expected:
        return
    what = "block ids" if index.by_block else "slots"
    if len(chunk.shape) != len(expected):
        raise ValueError(
            f"a chunk of this layout is {len(expected)}-dimensional; got {list(chunk.shape)}"
        )
    held = chunk.shape[layout.token_axis]
    unit = "blocks" if layout.packed else "tokens"
    if index.by_block and not layout.packed:
        held, unit = held // layout.block_size, f"blocks ({held} tokens)"
    raise ValueError(
        f"{len(index.host_ids)} {what} for a chunk of {held} {unit}, shape "
        f"{list(chunk.shape)}; {list(expected)} expected"
    )


def without_head(
    layout: KVLayout, index: SlotIndex, kv: torch.Tensor, head: int
) -> tuple[SlotIndex, torch.Tensor]:
    """A chunk's copy minus its first ``head`` tokens (a multiple of the block size)."""
    bs = layout.block_size
    rows = head // bs if index.by_block else head
    index = SlotIndex(index.ids[rows:], index.by_block, index.host_ids[rows:])
    kv_rows = head // bs if layout.packed else head
    axis = layout.token_axis
    return index, kv.narrow(axis, kv_rows, kv.shape[axis] - kv_rows).contiguous()
