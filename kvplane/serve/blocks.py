"""Paged-KV block allocation for the reference server. Pure: no I/O, no threads.

A request owns whole blocks; its token ``i`` lives in slot ``blocks[i // block_size] *
block_size + i % block_size`` of every layer's cache (vLLM's slot mapping).
"""

from __future__ import annotations

from collections import deque

import torch

from kvplane.errors import Unavailable

__all__ = ["BlockAllocator", "slot_mapping"]


class BlockAllocator:
    """A free list of block ids ``0..num_blocks-1``; blocks come back in the order freed."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("num_blocks must be positive")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    def allocate(self, count: int) -> list[int]:
        """Take ``count`` blocks; raises Unavailable (nothing taken) when too few are free."""
        if count > len(self._free):
            raise Unavailable(
                f"KV cache full: {count} blocks needed, {len(self._free)} of {self.num_blocks} free"
            )
        return [self._free.popleft() for _ in range(count)]

    @property
    def num_free(self) -> int:
        return len(self._free)

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)


def slot_mapping(blocks: list[int], num_tokens: int, block_size: int) -> torch.Tensor:
    """Flat slot index (int64, on the host) of tokens ``0..num_tokens-1`` of a request
    owning ``blocks``; vectorized, as a 16K-token prompt's mapping is built per request."""
    if num_tokens > len(blocks) * block_size:
        raise ValueError(f"{num_tokens} tokens do not fit in {len(blocks)} blocks")
    starts = torch.tensor(blocks, dtype=torch.long) * block_size
    slots = (starts[:, None] + torch.arange(block_size, dtype=torch.long)[None, :]).reshape(-1)
    return slots[:num_tokens]
