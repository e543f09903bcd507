"""What the scheduler knows its workers hold: a pure index fed by the workers' own tier
events, so a scheduling step answers from memory instead of asking anyone.

A chunk is loadable when every rank holds its own part of it in some tier. Each
(chunk, tier) keeps a bit per rank; ``admit``/``evict`` return the tier-level transitions
(the chunk became held by all ranks in that tier, or stopped being), which is what vLLM's
KV-event publisher announces.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

__all__ = ["HeldChunks", "Prefix", "TierChange"]


class TierChange(NamedTuple):
    chunk_hash: int
    location: str
    held: bool  # True: now held by every rank in ``location``; False: no longer


class Prefix(NamedTuple):
    num_chunks: int  # leading chunks every rank holds
    locations: tuple[str, ...]  # per chunk, the highest tier holding it on every rank


class HeldChunks:
    """Chunk hash -> tier -> bitmask of the ranks holding it there.

    ``tier_order`` ranks tiers for :meth:`prefix` (highest first); unknown tiers sort last.
    Not thread-safe: the owner serializes calls.
    """

    def __init__(self, world_size: int, tier_order: Sequence[str] = ()) -> None:
        if world_size < 1:
            raise ValueError("world_size must be at least 1")
        self.world_size = world_size
        self._full = (1 << world_size) - 1
        self._order = {name: i for i, name in enumerate(tier_order)}
        self._chunks: dict[int, dict[str, int]] = {}

    def __len__(self) -> int:
        return len(self._chunks)

    def admit(self, rank: int, location: str, hashes: Iterable[int]) -> list[TierChange]:
        bit = self._bit(rank)
        changes = []
        for h in hashes:
            tiers = self._chunks.setdefault(h, {})
            before = tiers.get(location, 0)
            after = before | bit
            tiers[location] = after
            if after == self._full and before != self._full:
                changes.append(TierChange(h, location, True))
        return changes

    def evict(self, rank: int, location: str, hashes: Iterable[int]) -> list[TierChange]:
        bit = self._bit(rank)
        changes = []
        for h in hashes:
            tiers = self._chunks.get(h)
            if tiers is None or location not in tiers:
                continue
            before = tiers[location]
            after = before & ~bit
            if after:
                tiers[location] = after
            else:
                del tiers[location]
                if not tiers:
                    del self._chunks[h]
            if before == self._full:
                changes.append(TierChange(h, location, False))
        return changes

    def drop_rank(self, rank: int) -> list[TierChange]:
        """Forget everything ``rank`` reported (it restarted and will send a new snapshot)."""
        changes: list[TierChange] = []
        for h in list(self._chunks):
            for location in list(self._chunks.get(h, {})):
                changes += self.evict(rank, location, [h])
        return changes

    def holds(self, chunk_hash: int) -> str | None:
        """The highest tier where every rank holds the chunk, or None."""
        tiers = self._chunks.get(chunk_hash)
        if not tiers:
            return None
        full = [loc for loc, mask in tiers.items() if mask == self._full]
        if full:
            return min(full, key=self._rank_of)
        union = 0
        for mask in tiers.values():
            union |= mask
        if union == self._full:  # ranks hold their parts in different tiers
            return max(tiers, key=self._rank_of)
        return None

    def prefix(self, hashes: Sequence[int]) -> Prefix:
        locations: list[str] = []
        for h in hashes:
            location = self.holds(h)
            if location is None:
                break
            locations.append(location)
        return Prefix(len(locations), tuple(locations))

    def _rank_of(self, location: str) -> int:
        return self._order.get(location, len(self._order))

    def _bit(self, rank: int) -> int:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world size {self.world_size}")
        return 1 << rank
