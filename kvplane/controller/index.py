"""Which worker holds which chunk, in which tier. Pure: no I/O, no threads, no torch.

Layout, and why: the index is keyed by worker first (``worker -> tier -> chunk hashes``)
and answers "who holds chunk h" by probing each instance's maps. That keeps the hot paths
whole-batch C operations instead of per-chunk Python work:

* admit / evict a batch of N hashes: C-level dict merges / pop loops;
* drop a worker (deregistered, reaped, re-registered): unlink its maps in O(1), whatever
  it holds. The caller gets the unlinked maps back (:class:`DroppedChunks`) to free them
  off the hot path, so a worker with 1M chunks leaves lookups in microseconds;
* lookup: per instance, walk the request's chunk hashes from token 0 and stop at the first
  chunk a rank lacks: at most ``ranks x tiers`` probes per matched chunk, one per
  instance for instances that lack the first chunk.

A global ``hash -> holders`` map would instead cost a Python-level update per chunk on
every admit, evict and worker drop (about 100 ms to drop 1M chunks on a small VM).

Two details bound the pauses a lookup can meet behind an ingest batch:

* each tier's hashes are the keys of ``dict[int, None]`` maps, not sets: CPython does not
  track a dict of atomic keys and values in the cyclic garbage collector, while every full
  collection walks every element of every set (about 100 ms at 1M chunks on a small VM);
* the maps are sharded by the hash's low bits (:data:`SHARDS`): growing one map rehashes
  all of it (200 ms at 3M entries on a small VM), a shard only a 1/64th of that.

An instance holds a chunk only when every one of its registered ranks holds it (tensor
parallel ranks each store their own slice of the KV).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from itertools import chain, repeat
from typing import NamedTuple

import numpy as np

from kvplane.controller.registry import WorkerKey

__all__ = ["SHARDS", "ChunkIndex", "DroppedChunks", "Match", "ShardedHashes", "shard_hashes"]

SHARDS = 64
_MASK = SHARDS - 1

_Shards = list[dict[int, None]]


class Match(NamedTuple):
    """An instance's contiguous cached prefix of a request."""

    location: str
    num_chunks: int
    num_tokens: int


class DroppedChunks(NamedTuple):
    """What a dropped worker held; freeing ``maps`` is the caller's (possibly deferred) job."""

    key: WorkerKey
    num_chunks: int
    maps: list[dict[int, None]]


class ShardedHashes(NamedTuple):
    """A batch of hashes grouped by shard: ``(shard, hashes)`` pairs. Built without locks."""

    parts: list[tuple[int, list[int]]]
    size: int


def shard_hashes(hashes: np.ndarray | Iterable[int]) -> ShardedHashes:
    """Group hashes by shard (a stable sort: order within a shard is kept)."""
    arr = hashes if isinstance(hashes, np.ndarray) else np.fromiter(hashes, dtype=np.uint64)
    if arr.size == 0:
        return ShardedHashes([], 0)
    shard = (arr & np.uint64(_MASK)).astype(np.uint8)  # 8-bit keys: a linear radix sort
    order = np.argsort(shard, kind="stable")
    values = arr[order].tolist()
    parts: list[tuple[int, list[int]]] = []
    start = 0
    for i, n in enumerate(np.bincount(shard, minlength=SHARDS).tolist()):
        if n:
            parts.append((i, values[start : start + n]))
            start += n
    return ShardedHashes(parts, len(values))


class _Worker:
    __slots__ = ("chunk_size", "locations", "tiers")

    def __init__(self, chunk_size: int) -> None:
        self.chunk_size = chunk_size
        # Insertion order = the order tiers were first reported (CPU first in practice),
        # which is also the preference order when reporting a match's location.
        self.locations: dict[str, _Shards] = {}
        self.tiers: list[_Shards] = []  # locations' values, for the lookup's probe loop

    def add_location(self, location: str) -> _Shards:
        shards: _Shards = [{} for _ in range(SHARDS)]
        self.locations[location] = shards
        self.tiers.append(shards)
        return shards

    def count(self) -> int:
        return sum(len(m) for shards in self.locations.values() for m in shards)

    def prefix(self, hashes: Sequence[int], limit: int) -> int:
        """How many leading ``hashes`` (up to ``limit``) this worker holds in any tier."""
        tiers = self.tiers
        if not tiers:
            return 0
        if len(tiers) == 1:
            only = tiers[0]
            for i in range(limit):
                h = hashes[i]
                if h not in only[h & _MASK]:
                    return i
            return limit
        for i in range(limit):
            h = hashes[i]
            if not any(h in shards[h & _MASK] for shards in tiers):
                return i
        return limit

    def location_of(self, hashes: Sequence[int], n: int) -> str:
        """The first tier holding all of ``hashes[:n]``, else the first holding chunk 0.
        ``n`` is at most :meth:`prefix`, so a worker with one tier holds them there."""
        if len(self.locations) == 1:
            return next(iter(self.locations))
        for loc, shards in self.locations.items():
            if all(h in shards[h & _MASK] for h in hashes[:n]):
                return loc
        first = hashes[0]
        return next(loc for loc, s in self.locations.items() if first in s[first & _MASK])


class ChunkIndex:
    """Chunks by instance, rank and tier. Not thread-safe: the owner serializes access,
    except for :meth:`chunk_sizes`."""

    def __init__(self) -> None:
        self._instances: dict[str, dict[int, _Worker]] = {}
        self._chunk_sizes: frozenset[int] = frozenset()

    # --- membership --------------------------------------------------------------------------

    def add_worker(self, key: WorkerKey, chunk_size: int) -> DroppedChunks | None:
        """Start an empty chunk set for ``key``; replaces (and returns) any previous one."""
        old = self.drop_worker(key)
        self._instances.setdefault(key.instance_id, {})[key.worker_id] = _Worker(chunk_size)
        self._update_chunk_sizes()
        return old

    def drop_worker(self, key: WorkerKey) -> DroppedChunks | None:
        """Forget a worker and its chunks at once; None if it was not there."""
        ranks = self._instances.get(key.instance_id)
        if ranks is None or key.worker_id not in ranks:
            return None
        worker = ranks.pop(key.worker_id)
        if not ranks:
            del self._instances[key.instance_id]
        self._update_chunk_sizes()
        maps = [m for shards in worker.locations.values() for m in shards]
        return DroppedChunks(key, worker.count(), maps)

    def has_worker(self, key: WorkerKey) -> bool:
        return key.worker_id in self._instances.get(key.instance_id, {})

    # --- reports -----------------------------------------------------------------------------

    def admit(self, key: WorkerKey, location: str, hashes: ShardedHashes | Iterable[int]) -> None:
        sharded = hashes if isinstance(hashes, ShardedHashes) else shard_hashes(hashes)
        worker = self._instances[key.instance_id][key.worker_id]
        shards = worker.locations.get(location)
        if shards is None:
            shards = worker.add_location(location)
        for i, part in sharded.parts:
            shards[i].update(dict.fromkeys(part))

    def evict(self, key: WorkerKey, location: str, hashes: ShardedHashes | Iterable[int]) -> None:
        sharded = hashes if isinstance(hashes, ShardedHashes) else shard_hashes(hashes)
        worker = self._instances[key.instance_id][key.worker_id]
        shards = worker.locations.get(location)
        if shards is not None:
            for i, part in sharded.parts:
                deque(map(shards[i].pop, part, repeat(None)), maxlen=0)  # a C-level loop

    # --- queries -----------------------------------------------------------------------------

    def chunk_sizes(self) -> frozenset[int]:
        """Chunk sizes in use. Safe without the owner's lock: membership changes replace
        the attribute whole."""
        return self._chunk_sizes

    def _update_chunk_sizes(self) -> None:
        self._chunk_sizes = frozenset(
            w.chunk_size for ranks in self._instances.values() for w in ranks.values()
        )

    def num_chunks(self, key: WorkerKey | None = None) -> int:
        """Chunks held (one per worker and tier); of one worker, or of all."""
        if key is not None:
            worker = self._instances.get(key.instance_id, {}).get(key.worker_id)
            return worker.count() if worker else 0
        return sum(w.count() for ranks in self._instances.values() for w in ranks.values())

    def chunks(self, key: WorkerKey) -> dict[str, list[int]]:
        """The chunk hashes ``key`` holds, per tier in report order (hashes in no particular
        order); empty for a worker not in the index. A copy made by C-level loops (about
        20 ms per million chunks), for audits rather than hot paths."""
        worker = self._instances.get(key.instance_id, {}).get(key.worker_id)
        if worker is None:
            return {}
        return {loc: list(chain.from_iterable(shards)) for loc, shards in worker.locations.items()}

    def tier_arrays(self, key: WorkerKey) -> dict[str, np.ndarray]:
        """The chunk hashes ``key`` holds per tier, in report order of the tiers, as uint64
        arrays (what a snapshot stores: one C-level copy, no Python list per tier)."""
        worker = self._instances.get(key.instance_id, {}).get(key.worker_id)
        if worker is None:
            return {}
        return {
            loc: np.fromiter(
                chain.from_iterable(shards), dtype=np.uint64, count=sum(map(len, shards))
            )
            for loc, shards in worker.locations.items()
        }

    def tier_counts(self, key: WorkerKey) -> dict[str, int]:
        """Chunks one worker holds per tier, in the order its tiers were first reported
        (a tier emptied by evictions stays, at 0); empty for an unknown worker."""
        worker = self._instances.get(key.instance_id, {}).get(key.worker_id)
        if worker is None:
            return {}
        return {loc: sum(map(len, shards)) for loc, shards in worker.locations.items()}

    def match(
        self,
        hashes_by_chunk_size: Mapping[int, Sequence[int]],
        num_tokens: int,
        exclude: str | None = None,
    ) -> dict[str, Match]:
        """Every instance (but ``exclude``) holding a non-empty prefix from token 0.

        ``hashes_by_chunk_size`` gives the request's chunk hashes for each chunk size in
        use (:meth:`chunk_sizes`); an instance whose size is missing there is skipped.
        ``num_tokens`` is the request's length, so a matched last partial chunk counts only
        up to it.
        """
        found: dict[str, Match] = {}
        for instance_id, ranks in self._instances.items():
            if instance_id == exclude or not ranks:
                continue
            first = ranks[min(ranks)]
            hashes = hashes_by_chunk_size.get(first.chunk_size)
            if not hashes:
                continue
            # Most instances lack the request's first chunk: turn them away with a probe
            # per tier of the lead rank, before a call per rank.
            head = hashes[0]
            for tier in first.tiers:
                if head in tier[head & _MASK]:
                    break
            else:
                continue
            n = len(hashes)
            for worker in ranks.values():
                n = worker.prefix(hashes, n)
                if n == 0:
                    break
            if n:
                tokens = min(n * first.chunk_size, num_tokens)
                found[instance_id] = Match(first.location_of(hashes, n), n, tokens)
        return found
