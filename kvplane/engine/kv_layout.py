"""Paged KV caches: gather a token set's slots into one chunk buffer, scatter it back.

Per-layer caches use vLLM's layout ``[2, num_blocks, block_size, num_kv_heads, head_size]``
(K and V), or the MLA layout ``[num_blocks, block_size, head_size]``. ``slots`` are flat slot
indices (``block * block_size + offset``), one per token. A gathered chunk is
``[num_layers, 2, n, H, D]`` (MLA: ``[num_layers, n, D]``), contiguous.

The same code runs on CPU and CUDA tensors. Data moves through an integer view of the same
item size, so every dtype (fp8 included) round-trips byte-exactly and NaN payloads survive.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import NamedTuple

import torch

from kvplane.config import EngineConfig
from kvplane.engine.chunk import dtype_from_name

__all__ = [
    "KVLayout",
    "allocate_kv_caches",
    "gather",
    "kv_checksums",
    "scatter",
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

    @classmethod
    def from_config(cls, cfg: EngineConfig) -> KVLayout:
        return cls(
            cfg.kv_num_layers,
            cfg.kv_num_heads,
            cfg.kv_head_size,
            cfg.kv_block_size,
            cfg.kv_num_blocks,
            dtype_from_name(cfg.kv_dtype),
            cfg.use_mla,
        )

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    def cache_shape(self) -> tuple[int, ...]:
        if self.use_mla:
            return (self.num_blocks, self.block_size, self.head_size)
        return (2, self.num_blocks, self.block_size, self.num_kv_heads, self.head_size)

    def chunk_shape(self, num_tokens: int) -> tuple[int, ...]:
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


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_BITS_VIEW[t.element_size()])


def _token_major(cache: torch.Tensor, use_mla: bool) -> tuple[torch.Tensor, int]:
    """The cache viewed with one row per slot along the returned dimension."""
    if use_mla:
        return _bits(cache).view(-1, cache.shape[-1]), 0
    return _bits(cache).view(2, -1, cache.shape[-2], cache.shape[-1]), 1


def gather(
    kv_caches: Sequence[torch.Tensor],
    slots: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Copy the KV at ``slots`` of every layer into one chunk tensor.

    ``out`` (shape ``chunk_shape(len(slots))``, the caches' dtype) may live on another
    device, e.g. a pinned host page for CUDA caches; the copy to it is synchronous.
    """
    first = kv_caches[0]
    use_mla = first.dim() == 3
    device = first.device
    slots = slots.to(device=device, dtype=torch.long)
    n = int(slots.numel())
    shape = (
        (len(kv_caches), n, first.shape[-1])
        if use_mla
        else (len(kv_caches), 2, n, first.shape[-2], first.shape[-1])
    )
    direct = out is not None and out.device == device
    staging = (
        out if direct and out is not None else torch.empty(shape, dtype=first.dtype, device=device)
    )
    staging_bits = _bits(staging)
    for layer, cache in enumerate(kv_caches):
        rows, dim = _token_major(cache, use_mla)
        torch.index_select(rows, dim, slots, out=staging_bits[layer])
    if out is None or direct:
        return staging
    out.copy_(staging)
    return out


def scatter(kv_caches: Sequence[torch.Tensor], slots: torch.Tensor, kv: torch.Tensor) -> None:
    """Write a chunk tensor (any device) into the caches at ``slots``."""
    first = kv_caches[0]
    use_mla = first.dim() == 3
    device = first.device
    slots = slots.to(device=device, dtype=torch.long)
    src = _bits(kv.to(device, non_blocking=kv.is_pinned()))
    for layer, cache in enumerate(kv_caches):
        rows, dim = _token_major(cache, use_mla)
        rows.index_copy_(dim, slots, src[layer])


def kv_checksums(
    kv_caches: Sequence[torch.Tensor],
    slots: torch.Tensor,
    chunk_size: int,
    layerwise: bool = False,
) -> list[str] | dict[str, list[str]]:
    """MD5 of the KV at ``slots``, per chunk of ``chunk_size`` slots.

    All layers combined (a list, one digest per chunk) or per layer (``{"layer_i": [...]}``).
    """
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    per_layer: dict[str, list[str]] = {f"layer_{i}": [] for i in range(len(kv_caches))}
    combined: list[str] = []
    for start in range(0, int(slots.numel()), chunk_size):
        kv = gather(kv_caches, slots[start : start + chunk_size]).cpu()
        data = _bits(kv).contiguous()
        if layerwise:
            for i in range(len(kv_caches)):
                per_layer[f"layer_{i}"].append(hashlib.md5(data[i].numpy().tobytes()).hexdigest())
        else:
            combined.append(hashlib.md5(data.numpy().tobytes()).hexdigest())
    return per_layer if layerwise else combined
