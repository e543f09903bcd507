"""Digests of the KV at given slots, per chunk: what the internal API's check compares."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from kvplane.engine.kv.copies import gather
from kvplane.engine.kv.layout import KVLayout, as_bits
from kvplane.engine.kv.slots import slot_indices

__all__ = ["kv_checksums"]


def kv_checksums(
    layout: KVLayout,
    kv_caches: Sequence[torch.Tensor],
    slots: torch.Tensor,
    chunk_size: int,
    layerwise: bool = False,
) -> list[str] | dict[str, list[str]]:
    """MD5 of the KV at ``slots``, per chunk of ``chunk_size`` slots.

    All layers combined (a list, one digest per chunk) or per layer (``{"layer_i": [...]}``).
    Packed-block caches digest the whole blocks the slots lie in; their slots must be whole
    blocks in order (BadRequest otherwise).
    """
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    per_layer: dict[str, list[str]] = {f"layer_{i}": [] for i in range(len(kv_caches))}
    combined: list[str] = []
    n = int(slots.numel())
    spans = [(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)]
    for index in slot_indices(layout, slots, spans, kv_caches[0].device):
        data = as_bits(gather(layout, kv_caches, index).cpu()).contiguous()
        if layerwise:
            for i in range(len(kv_caches)):
                per_layer[f"layer_{i}"].append(hashlib.md5(data[i].numpy().tobytes()).hexdigest())
        else:
            combined.append(hashlib.md5(data.numpy().tobytes()).hexdigest())
    return per_layer if layerwise else combined
