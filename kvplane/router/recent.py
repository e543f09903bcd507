"""The prompts the router itself sent to each backend in the last few seconds. Pure: no I/O;
the time comes in.

The controller's index shows a prefix only once its prefill is done and its chunks are
stored: a second request with a new prefix, sent while the first is still computing it,
finds no hit anywhere, and a router going by the index alone sends it to the less loaded
backend, which computes the same prefix again. What the router sent where is known at once;
:meth:`RecentPrompts.held` answers it, block by block (a chained hash of every token up to
each block's end, so equal keys mean equal prefixes). The router counts it only for a
backend the index shows none of the prompt: once the index answers, its chunks are what a
peer can fetch by P2P, and the score weighs holder against fetcher on them alone.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

__all__ = ["RecentPrompts", "prefix_keys"]


def prefix_keys(tokens: Sequence[int], block: int) -> list[int]:
    """One key per whole block of ``tokens``, standing for every token up to its end."""
    keys, previous = [], 0
    for end in range(block, len(tokens) + 1, block):
        previous = hash((previous, tuple(tokens[end - block : end])))
        keys.append(previous)
    return keys


class RecentPrompts:
    """Block keys -> the backends each was sent to, and when. At most ``capacity`` keys
    (least recently sent dropped first); an entry older than ``ttl_s`` no longer counts."""

    def __init__(self, block: int, ttl_s: float, capacity: int = 262144) -> None:
        if block < 1 or ttl_s < 0 or capacity < 1:
            raise ValueError(f"block {block}, ttl {ttl_s} and capacity {capacity} out of range")
        self.block, self.ttl_s, self.capacity = block, ttl_s, capacity
        self._sent: OrderedDict[int, dict[str, float]] = OrderedDict()

    def add(self, backend: str, keys: Sequence[int], now: float) -> None:
        """``backend`` was sent a prompt with these block keys at ``now``."""
        for key in keys:
            self._sent.setdefault(key, {})[backend] = now
            self._sent.move_to_end(key)
        while len(self._sent) > self.capacity:
            self._sent.popitem(last=False)

    def held(self, keys: Sequence[int], now: float) -> dict[str, int]:
        """Per backend, the tokens of the longest prefix of ``keys`` sent to it within the
        last ``ttl_s`` seconds (backends with none are left out)."""
        out: dict[str, int] = {}
        alive: set[str] | None = None
        for n, key in enumerate(keys, start=1):
            sent = self._sent.get(key)
            fresh = {b for b, t in (sent or {}).items() if now - t <= self.ttl_s}
            alive = fresh if alive is None else alive & fresh
            if not alive:
                break
            for b in alive:
                out[b] = n * self.block
        return out
