"""Which worker holds which chunk, in which tier. Pure: no I/O, no threads, no torch.

Layout, and why: the index is keyed by worker first (``worker -> location -> set of chunk
hashes``) and answers "who holds chunk h" by probing each instance's sets. That makes the
hot paths whole-batch C operations instead of per-chunk Python work:

* admit / evict a batch of N hashes: one ``set.update`` / ``set.difference_update``;
* drop a worker (deregistered, reaped, re-registered): unlink its sets in O(1), whatever
  it holds. The caller gets the unlinked sets back (:class:`DroppedChunks`) to free them
  off the hot path, so a worker with 1M chunks leaves lookups in microseconds;
* lookup: per instance, walk the request's chunk hashes from token 0 and stop at the first
  chunk a rank lacks: at most ``ranks x tiers`` set probes per matched chunk, one per
  instance for instances that lack the first chunk.

A global ``hash -> holders`` map would instead cost a Python-level update per chunk on
every admit, evict and worker drop (about 100 ms to drop 1M chunks on a small VM).

An instance holds a chunk only when every one of its registered ranks holds it (tensor
parallel ranks each store their own slice of the KV).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

from kvplane.controller.registry import WorkerKey

__all__ = ["ChunkIndex", "DroppedChunks", "Match"]


class Match(NamedTuple):
    """An instance's contiguous cached prefix of a request."""

    location: str
    num_chunks: int
    num_tokens: int


class DroppedChunks(NamedTuple):
    """What a dropped worker held; freeing ``sets`` is the caller's (possibly deferred) job."""

    key: WorkerKey
    num_chunks: int
    sets: list[set[int]]


class _Worker:
    __slots__ = ("chunk_size", "locations")

    def __init__(self, chunk_size: int) -> None:
        self.chunk_size = chunk_size
        # Insertion order = the order tiers were first reported (CPU first in practice),
        # which is also the preference order when reporting a match's location.
        self.locations: dict[str, set[int]] = {}

    def count(self) -> int:
        return sum(len(s) for s in self.locations.values())

    def prefix(self, hashes: Sequence[int], limit: int) -> int:
        """How many leading ``hashes`` (up to ``limit``) this worker holds in any tier."""
        sets = list(self.locations.values())
        if not sets:
            return 0
        if len(sets) == 1:
            only = sets[0]
            for i in range(limit):
                if hashes[i] not in only:
                    return i
            return limit
        for i in range(limit):
            h = hashes[i]
            if not any(h in s for s in sets):
                return i
        return limit

    def location_of(self, hashes: Sequence[int], n: int) -> str:
        """The first tier holding all of ``hashes[:n]``, else the first holding chunk 0."""
        for loc, s in self.locations.items():
            if all(h in s for h in hashes[:n]):
                return loc
        return next(loc for loc, s in self.locations.items() if hashes[0] in s)


class ChunkIndex:
    """Chunks by instance, rank and tier. Not thread-safe: the owner serializes access."""

    def __init__(self) -> None:
        self._instances: dict[str, dict[int, _Worker]] = {}

    # --- membership --------------------------------------------------------------------------

    def add_worker(self, key: WorkerKey, chunk_size: int) -> DroppedChunks | None:
        """Start an empty chunk set for ``key``; replaces (and returns) any previous one."""
        old = self.drop_worker(key)
        self._instances.setdefault(key.instance_id, {})[key.worker_id] = _Worker(chunk_size)
        return old

    def drop_worker(self, key: WorkerKey) -> DroppedChunks | None:
        """Forget a worker and its chunks at once; None if it was not there."""
        ranks = self._instances.get(key.instance_id)
        if ranks is None or key.worker_id not in ranks:
            return None
        worker = ranks.pop(key.worker_id)
        if not ranks:
            del self._instances[key.instance_id]
        return DroppedChunks(key, worker.count(), list(worker.locations.values()))

    def has_worker(self, key: WorkerKey) -> bool:
        return key.worker_id in self._instances.get(key.instance_id, {})

    # --- reports -----------------------------------------------------------------------------

    def admit(self, key: WorkerKey, location: str, hashes: Iterable[int]) -> None:
        worker = self._instances[key.instance_id][key.worker_id]
        chunks = worker.locations.get(location)
        if chunks is None:
            chunks = worker.locations[location] = set()
        chunks.update(hashes)

    def evict(self, key: WorkerKey, location: str, hashes: Iterable[int]) -> None:
        worker = self._instances[key.instance_id][key.worker_id]
        chunks = worker.locations.get(location)
        if chunks is not None:
            chunks.difference_update(hashes)

    # --- queries -----------------------------------------------------------------------------

    def chunk_sizes(self) -> set[int]:
        return {w.chunk_size for ranks in self._instances.values() for w in ranks.values()}

    def num_chunks(self, key: WorkerKey | None = None) -> int:
        """Chunks held (one per worker and tier); of one worker, or of all."""
        if key is not None:
            worker = self._instances.get(key.instance_id, {}).get(key.worker_id)
            return worker.count() if worker else 0
        return sum(w.count() for ranks in self._instances.values() for w in ranks.values())

    def worker_chunks(self, key: WorkerKey) -> dict[str, set[int]]:
        """A copy of one worker's chunks by tier (for tests and debugging)."""
        worker = self._instances.get(key.instance_id, {}).get(key.worker_id)
        return {loc: set(s) for loc, s in worker.locations.items()} if worker else {}

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
            n = len(hashes)
            for worker in ranks.values():
                n = worker.prefix(hashes, n)
                if n == 0:
                    break
            if n:
                tokens = min(n * first.chunk_size, num_tokens)
                found[instance_id] = Match(first.location_of(hashes, n), n, tokens)
        return found
