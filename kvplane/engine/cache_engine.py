"""The cache engine: store a prompt's KV in chunks, retrieve the cached prefix back.

``store`` gathers each chunk's slots from the paged caches straight into a page of the CPU
tier (pinned memory; one device->host copy per chunk) and hands it to the storage manager.
``retrieve`` walks the prompt's chunks in order and scatters each into the paged caches; the
first chunk that no tier holds ends it, so what comes back is always a prefix from token 0.
Thread-safe: the engine itself holds no mutable state besides its observers. Admit/evict
events are not its business: consumers subscribe to them at the storage manager
(:meth:`StorageManager.subscribe`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence

import torch

from kvplane.config import ConfigStore, EngineConfig
from kvplane.engine.chunk import ChunkMeta, KVChunk, dtype_name
from kvplane.engine.compression import CompressResult
from kvplane.engine.facts import EngineFacts
from kvplane.engine.kv.copies import gather
from kvplane.engine.kv.layout import KVLayout
from kvplane.engine.kv.slots import SlotIndex, slot_indices, without_head
from kvplane.engine.kv.transfers import Transfers
from kvplane.engine.kv_api import (
    KVCaches,
    RetrieveResult,
    SlotMapping,
    StorePolicy,
    StoreResult,
    TokenIds,
)
from kvplane.engine.memory_pool import MemoryPage
from kvplane.engine.metrics import EngineMetrics
from kvplane.engine.p2p.move import MoveRequest, MoveResult
from kvplane.engine.storage_manager import Cleared, StorageManager
from kvplane.errors import BadRequest, Unsupported
from kvplane.keys import CacheKey, chunk_hashes, chunk_spans, to_token_array

__all__ = ["CacheEngine", "MoveRequest"]

log = logging.getLogger(__name__)

Decoder = Callable[[KVChunk], KVChunk]
Mover = Callable[[MoveRequest, Sequence[CacheKey] | None], MoveResult]

_Staged = list[tuple[CacheKey, KVChunk, MemoryPage]]  # gathered pages, not yet published
_InFlight = list[tuple["torch.cuda.Event | None", _Staged]]  # batches and their copies' event

# Chunks planned before their copies are issued: large enough to batch kernels on CUDA,
# small enough that the device works while the host plans the next ones.
_FLUSH_CHUNKS = 8


def _identity_decoder(chunk: KVChunk) -> KVChunk:
    if chunk.meta.compression != "none":
        raise BadRequest(f"chunk compressed with {chunk.meta.compression!r} and no decoder set")
    return chunk


class CacheEngine:
    def __init__(
        self,
        config_store: ConfigStore,
        facts: EngineFacts,
        layout: KVLayout,
        storage: StorageManager,
        *,
        decode: Decoder | None = None,
        mover: Mover | None = None,
    ) -> None:
        """``facts`` name the storage keys (model, world size, rank); ``decode`` turns a
        stored (possibly compressed) chunk into raw KV; ``mover`` pushes a tier's chunks to
        a peer (:meth:`P2PNode.move`), None without p2p."""
        self.config_store = config_store
        self.facts = facts
        self.layout = layout
        self.storage = storage
        self.metrics: EngineMetrics = storage.metrics
        self.decode = decode or _identity_decoder
        self._mover = mover
        self._dtype_name = dtype_name(layout.dtype)
        # every key of this rank: model, world size, rank (the facts), dtype (the layout)
        self._key_prefix = (facts.model_name, facts.world_size, facts.worker_id, self._dtype_name)
        self._transfers = Transfers(layout, self.metrics)
        self._lookup_observers: list[Callable[[Sequence[int]], None]] = []
        self._transfer_observers: list[Callable[[str, torch.Tensor], None]] = []

    # ------------------------------------------------------------------ keys and observers
    def keys_for(self, tokens: TokenIds) -> list[CacheKey]:
        c = self.config
        return [CacheKey(*self._key_prefix, h) for h in chunk_hashes(tokens, c.chunk_size)]

    def set_mover(self, mover: Mover | None) -> None:
        """Use ``mover`` for :meth:`move` (this process's :meth:`P2PNode.move`, wired by the
        composition root once the node exists); None: move is Unsupported."""
        self._mover = mover

    def add_lookup_observer(self, observer: Callable[[Sequence[int]], None]) -> None:
        """Receive the chunk hashes of every lookup/retrieve (e.g. chunk statistics)."""
        self._lookup_observers.append(observer)

    def add_transfer_observer(self, observer: Callable[[str, torch.Tensor], None]) -> None:
        """Receive ``("store" | "retrieve", slot_mapping)`` of every call that moved KV
        (the internal API's ``record_slot`` logging). Called on the caller's thread."""
        self._transfer_observers.append(observer)

    def _observe_transfer(self, op: str, slots: torch.Tensor) -> None:
        for observer in list(self._transfer_observers):
            observer(op, slots)

    def _observe(self, keys: Sequence[CacheKey]) -> None:
        if self._lookup_observers:
            hashes = [k.chunk_hash for k in keys]
            for observer in list(self._lookup_observers):
                observer(hashes)

    @property
    def config(self) -> EngineConfig:
        """The config now: runtime-mutable keys (``min_retrieve_tokens``,
        ``save_unfull_chunk``, ``save_decode_cache``) are read from it at each call."""
        return self.config_store.current

    @property
    def frozen(self) -> bool:
        return self.storage.frozen

    @frozen.setter
    def frozen(self, value: bool) -> None:
        self.storage.frozen = value

    # ------------------------------------------------------------------ data path
    @property
    def store_policy(self) -> StorePolicy:
        """What a host stores of a request (:func:`~kvplane.engine.kv_api.store_boundary`),
        from the config now."""
        return StorePolicy.of(self.config)

    def store(
        self, tokens: TokenIds, kv_caches: KVCaches, slot_mapping: SlotMapping
    ) -> StoreResult:
        """Store every chunk of ``tokens`` not held yet (the last one, if partial, only with
        ``save_unfull_chunk``). Skipped entirely while frozen. See :class:`KVApi`."""
        token_arr = to_token_array(tokens)
        slots = self._slots(slot_mapping, len(token_arr))
        self._check_caches(kv_caches)
        if self.storage.frozen or len(token_arr) == 0:
            return StoreResult(0, 0, 0)
        start_time = time.perf_counter()
        spans = chunk_spans(len(token_arr), self.config.chunk_size)
        keys = self.keys_for(token_arr)
        held_tokens = new_chunks = nbytes = 0
        staged: _Staged = []
        in_flight: _InFlight = []
        copies: list[tuple[SlotIndex, torch.Tensor]] = []
        indices = self._indices(kv_caches, slots, spans)

        def flush() -> None:
            """Start the queued copies; publish every batch whose copies have finished."""
            nonlocal copies, staged
            self._transfers.gather(kv_caches, copies, copy_stream)
            done = None
            if copy_stream is not None:
                done = torch.cuda.Event()
                done.record(copy_stream)
            in_flight.append((done, staged))
            copies, staged = [], []
            self._publish(in_flight, wait=False)

        try:
            with self._transfers.on_device(kv_caches) as copy_stream:
                for chunk_no, (key, (start, end)) in enumerate(zip(keys, spans, strict=True)):
                    n = end - start
                    if n < self.config.chunk_size and not self.config.save_unfull_chunk:
                        break
                    if self.storage.locate(key) is None:
                        if not self._stage(key, indices[chunk_no], n, kv_caches, staged, copies):
                            self.metrics.refused_stores.inc()
                            break
                        if len(copies) == _FLUSH_CHUNKS:  # start the copies while planning on
                            flush()
                        new_chunks += 1
                        nbytes += self.layout.chunk_nbytes(n)
                    held_tokens = end
                flush()
                self._publish(in_flight, wait=True)
        except BaseException:  # pages never published go back to the pool
            for _, _, page in staged + [item for _, batch in in_flight for item in batch]:
                page.release()
            raise
        if new_chunks:
            self._observe_transfer("store", slots[:held_tokens])
        self.metrics.stored_tokens.inc(held_tokens)
        self.metrics.stored_bytes.inc(nbytes)
        self.metrics.store_seconds.observe(time.perf_counter() - start_time)
        return StoreResult(held_tokens, new_chunks, nbytes)

    def _stage(
        self,
        key: CacheKey,
        index: SlotIndex,
        n: int,
        kv_caches: Sequence[torch.Tensor],
        staged: _Staged,
        copies: list[tuple[SlotIndex, torch.Tensor]],
    ) -> bool:
        """Queue one chunk's copy into a fresh CPU page (or, with no writable CPU tier, store
        it to the lower tiers now). False when no tier would take it."""
        meta = ChunkMeta(self.layout.chunk_shape(n), self._dtype_name, n)
        cpu = self.storage.cpu_writable
        if cpu is None:
            return self._store_uncached(key, meta, kv_caches, index)
        page = cpu.allocate()
        if page is None:
            return False
        chunk = KVChunk(meta, page.data[: self.layout.chunk_nbytes(n)])
        staged.append((key, chunk, page))
        copies.append((index, chunk.kv()))
        return True

    def _publish(
        self,
        in_flight: _InFlight,
        *,
        wait: bool,
    ) -> None:
        """Hand gathered pages to the storage manager, oldest batch first, once their
        device->host copies are done (at once on CPU). Without ``wait``, stop at the first
        batch still copying, so publishing overlaps the copies of later batches."""
        while in_flight:
            done, batch = in_flight[0]
            if done is not None and not done.query():
                if not wait:
                    return
                done.synchronize()
            in_flight.pop(0)
            for key, chunk, page in batch:
                self.storage.put(key, chunk, page)

    def _check_caches(self, kv_caches: Sequence[torch.Tensor]) -> None:
        """BadRequest unless ``kv_caches`` are this engine's layout: other shapes would be
        stored as garbage (or read back into the wrong places)."""
        layout, shape = self.layout, self.layout.cache_shape()
        if len(kv_caches) != layout.num_layers or any(
            tuple(c.shape) != shape or c.dtype != layout.dtype for c in kv_caches
        ):
            got = [(tuple(c.shape), str(c.dtype)) for c in kv_caches[:1]]
            raise BadRequest(
                f"kv_caches must be {layout.num_layers} layers of {list(shape)} "
                f"{layout.dtype}; got {len(kv_caches)} layers, first {got}"
            )

    def _store_uncached(
        self, key: CacheKey, meta: ChunkMeta, kv_caches: Sequence[torch.Tensor], index: SlotIndex
    ) -> bool:
        """Without a writable CPU tier: gather into plain memory for the lower tiers."""
        kv = gather(self.layout, kv_caches, index).cpu()
        return self.storage.put(key, KVChunk.from_kv(kv, meta.num_tokens))

    def _indices(
        self,
        kv_caches: Sequence[torch.Tensor],
        slots: torch.Tensor,
        spans: Sequence[tuple[int, int]],
    ) -> list[SlotIndex]:
        return slot_indices(self.layout, slots, spans, kv_caches[0].device)

    def retrieve(
        self,
        tokens: TokenIds,
        kv_caches: KVCaches,
        slot_mapping: SlotMapping,
        *,
        skip_tokens: int = 0,
    ) -> RetrieveResult:
        """Load the cached prefix of ``tokens`` into the caches at ``slot_mapping``.

        Returns how many leading tokens are now valid in the caches (0 when the cached
        prefix is shorter than ``min_retrieve_tokens``). A chunk no tier holds ends the
        prefix. The first ``skip_tokens`` (a multiple of the block size) are the caller's
        already: their slots are never written (a serving engine may share those blocks
        with running requests) and their chunks need not be held.
        """
        if skip_tokens % self.layout.block_size:
            raise BadRequest(
                f"skip_tokens {skip_tokens} is not a multiple of the block size "
                f"{self.layout.block_size}"
            )
        token_arr = to_token_array(tokens)
        slots = self._slots(slot_mapping, len(token_arr))
        self._check_caches(kv_caches)
        keys = self.keys_for(token_arr)
        self._observe(keys)
        spans = chunk_spans(len(token_arr), self.config.chunk_size)
        min_tokens = self.config.min_retrieve_tokens
        if min_tokens and self._prefix_tokens(keys, spans) < min_tokens:
            return RetrieveResult(0, 0, 0)
        start_time = time.perf_counter()
        if self.storage.fetches_from_peers:
            self.storage.prefetch(keys)  # one batch per peer instead of one fetch per chunk
        loaded_tokens = chunks = nbytes = 0
        copies: list[tuple[SlotIndex, torch.Tensor]] = []
        indices = self._indices(kv_caches, slots, spans)
        transfers = self._transfers
        with contextlib.ExitStack() as reads, transfers.on_device(kv_caches) as copy_stream:
            for chunk_no, (key, (start, end)) in enumerate(zip(keys, spans, strict=True)):
                if end <= skip_tokens:
                    loaded_tokens = end
                    continue
                chunk = reads.enter_context(self.storage.read(key))
                if chunk is None:
                    self.metrics.lookup_misses.inc()
                    break
                kv = self.decode(chunk).kv()
                if kv.shape != self.layout.chunk_shape(end - start):
                    break  # a chunk of another layout under this key: treat as a miss
                index = indices[chunk_no]
                if start < skip_tokens:
                    index, kv = without_head(self.layout, index, kv, skip_tokens - start)
                copies.append((index, kv))
                if len(copies) == _FLUSH_CHUNKS:
                    transfers.scatter(kv_caches, copies, copy_stream)
                    copies = []
                self.metrics.lookup_hits.inc()
                loaded_tokens, chunks, nbytes = end, chunks + 1, nbytes + chunk.nbytes
            transfers.scatter(kv_caches, copies, copy_stream)
            transfers.wait(kv_caches)  # pages must not be reused before the copies finished
        if loaded_tokens:
            self._observe_transfer("retrieve", slots[:loaded_tokens])
        self.metrics.retrieved_tokens.inc(max(0, loaded_tokens - skip_tokens))
        self.metrics.retrieved_bytes.inc(nbytes)
        self.metrics.retrieve_seconds.observe(time.perf_counter() - start_time)
        return RetrieveResult(loaded_tokens, chunks, nbytes)

    def lookup(self, tokens: TokenIds) -> int:
        """Leading tokens whose chunks are all held by an active tier. With a peer tier, the
        chunks after the local prefix are fetched from the peer that holds them first."""
        token_arr = to_token_array(tokens)
        keys = self.keys_for(token_arr)
        self._observe(keys)
        spans = chunk_spans(len(token_arr), self.config.chunk_size)
        if self.storage.fetches_from_peers:
            held = self.storage.prefetch(keys)
            return spans[held - 1][1] if held else 0
        return self._prefix_tokens(keys, spans)

    def promote(self, tokens: TokenIds) -> int:
        """Read the chunks of the prompt's locally held prefix that only a lower tier (disk,
        FS, remote) holds into the CPU tier, so that a load that follows copies from
        memory. Returns how many chunks were promoted."""
        return self.storage.promote(self.keys_for(to_token_array(tokens)))

    def _prefix_tokens(self, keys: Sequence[CacheKey], spans: Sequence[tuple[int, int]]) -> int:
        held = 0
        for key, (_, end) in zip(keys, spans, strict=True):
            if self.storage.locate(key) is None:
                break
            held = end
        return held

    # ------------------------------------------------------------------ management
    def clear(self, locations: Sequence[str] | None = None) -> Cleared:
        """Remove every chunk of the named tiers (all when None): chunks and tokens removed."""
        return self.storage.clear(locations)

    def pin(self, tokens: TokenIds, location: str | None = None) -> int:
        """Exempt the prompt's chunks held in tier ``location`` (None: the CPU tier) from
        eviction; returns the tokens pinned. Tiers that never evict accept and count them.
        Raises NotFound naming the tiers for one this engine does not have."""
        return self._for_chunks_in(tokens, "pin", location)

    def unpin(self, tokens: TokenIds, location: str | None = None) -> int:
        return self._for_chunks_in(tokens, "unpin", location)

    def _for_chunks_in(self, tokens: TokenIds, op: str, location: str | None) -> int:
        tier = self.storage.cpu if location is None else self.storage.backend(location)
        if tier is None:
            return 0
        token_arr = to_token_array(tokens)
        spans = chunk_spans(len(token_arr), self.config.chunk_size)
        done = 0
        for key, (start, end) in zip(self.keys_for(token_arr), spans, strict=True):
            if getattr(tier, op)(key):
                done += end - start
        return done

    def compress_chunks(
        self,
        tokens: TokenIds | None,
        method: str,
        location: str,
        *,
        only_from: str | None = None,
    ) -> CompressResult:
        """Re-encode the chunks of ``tokens`` (None: every chunk) held in tier ``location``
        with ``method`` (see :mod:`kvplane.engine.compression`; ``none`` decompresses),
        with ``only_from`` only those now stored with that method; retrieve decodes them.
        What changed, with the bytes saved, comes back.
        Raises NotFound for an unknown tier, BadRequest for an unknown method, Conflict
        while frozen."""
        keys = None if tokens is None else self.keys_for(tokens)
        result = self.storage.compress(method, location, keys, only_from=only_from)
        log.info(
            "%s: %d chunks (%d tokens) of %s now %s, %d bytes saved",
            "compress" if method != "none" else "decompress",
            result.num_chunks,
            result.num_tokens,
            location,
            method,
            result.bytes_saved,
        )
        return result

    def compress(self, *, method: str, location: str, tokens: TokenIds | None = None) -> int:
        """The controller's compress: tokens whose chunks in ``location`` are now stored
        with ``method``. Raises as :meth:`compress_chunks`."""
        return self.compress_chunks(tokens, method, location).num_tokens

    def decompress(self, *, method: str, location: str, tokens: TokenIds | None = None) -> int:
        """The controller's decompress: the chunks in ``location`` compressed with
        ``method`` are stored uncompressed again; returns their tokens (chunks stored
        otherwise are left alone). Raises as :meth:`compress_chunks`, BadRequest naming
        the valid methods for an unknown ``method``."""
        return self.compress_chunks(tokens, "none", location, only_from=method).num_tokens

    def move(self, request: MoveRequest) -> int:
        """The controller's move: push the chunks of ``request.tokens`` (None: all) held in
        local tier ``request.source_location`` to the peer's tier; without ``request.copy``
        they leave here once the peer accepted them. Returns the tokens moved. Raises
        Unsupported without a peer-to-peer transport (``enable_p2p``), NotFound for an
        unknown tier, Unavailable for a dead peer."""
        if self._mover is None:
            raise Unsupported("move needs the peer-to-peer transport (enable_p2p: true)")
        keys = None if request.tokens is None else self.keys_for(request.tokens)
        return self._mover(request, keys).num_tokens

    # ------------------------------------------------------------------ helpers
    def _slots(self, slot_mapping: SlotMapping, num_tokens: int) -> torch.Tensor:
        slots = torch.as_tensor(slot_mapping).reshape(-1)
        if slots.numel() < num_tokens:
            raise BadRequest(f"slot_mapping has {slots.numel()} entries for {num_tokens} tokens")
        slots = slots[:num_tokens].to("cpu", torch.long)  # one sync; chunks index on the host
        if num_tokens and (int(slots.min()) < 0 or int(slots.max()) >= self.layout.num_slots):
            raise BadRequest(f"slot_mapping out of range [0, {self.layout.num_slots})")
        return slots
