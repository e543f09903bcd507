"""The layout of the paged KV caches and their chunks, decided once, by :class:`KVLayout`.

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

Data moves through an integer view of the same item size (:func:`as_bits`), so every dtype
(fp8 included) round-trips byte-exactly and NaN payloads survive.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kvplane.engine.chunk import dtype_from_name, dtype_name
from kvplane.engine.facts import KVShape
from kvplane.errors import BadRequest

__all__ = ["KVLayout", "allocate_kv_caches", "as_bits", "packed_view"]

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

    @property
    def has_kv_axis(self) -> bool:
        """Caches and chunks hold K and V apart, on a leading axis of 2 (paged only: an MLA
        or packed chunk is one row-major run per layer)."""
        return not (self.packed or self.use_mla)

    @property
    def token_axis(self) -> int:
        """The chunk axis along its tokens (along its blocks, for packed chunks)."""
        return 2 if self.has_kv_axis else 1

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

    def rows(
        self, cache: torch.Tensor, chunk_layer: torch.Tensor, by_block: bool
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(cache rows, chunk rows, dim): one layer's cache and that layer of a chunk as
        integer views with one row per slot, or per block when ``by_block``, along ``dim``.
        BadRequest for per-slot rows of packed caches, whose blocks cannot be cut."""
        bits, chunk_bits = as_bits(cache), as_bits(chunk_layer)
        if self.packed:
            if not by_block:
                raise BadRequest("a packed-block cache moves whole blocks only")
            return bits, chunk_bits.view(-1, self.block_elems), 0
        if self.use_mla:
            width = self.block_size * self.head_size if by_block else self.head_size
            return bits.view(-1, width), chunk_bits.view(-1, width), 0
        if not by_block:
            return bits.view(2, -1, self.num_kv_heads, self.head_size), chunk_bits, 1
        width = self.block_size * self.num_kv_heads * self.head_size
        return bits.view(2, -1, width), chunk_bits.view(2, -1, width), 1


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` viewed as integers of its item size (no copy)."""
    return t.view(_BITS_VIEW[t.element_size()])


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
