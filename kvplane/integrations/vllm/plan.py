"""The scheduler side's decisions, as pure logic: how much of a request kvplane can load,
and which tokens each step must load and store. No vLLM, torch or sockets here; the
connector turns vLLM's objects into these calls and the resulting :class:`StepPlan` into
the metadata every worker rank receives.

Rules:

* A hit is the leading run of chunks every rank holds (see :mod:`.held`), beyond vLLM's
  own block-aligned local hit. It ends on a chunk boundary (so on a block boundary, as the
  chunk size is a multiple of the block size), except that a hit covering the whole request
  gives back its last token, which vLLM must compute to get a logit; that last chunk is
  still loaded whole and the token's slot is overwritten by vLLM.
* A load writes only blocks past vLLM's local hit: those blocks may be shared with running
  requests and are never rewritten.
* Stores happen after the forward pass of a step, up to the last chunk boundary the
  request's computed tokens reached; the prompt's final partial chunk only with
  ``save_unfull_chunk``, tokens produced while decoding only with ``save_decode_cache``
  (:func:`kvplane.engine.kv_api.store_boundary`, the policy every host applies).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgspec

from kvplane.engine.kv_api import StorePolicy, store_boundary
from kvplane.integrations.vllm.held import HeldChunks
from kvplane.keys import chunk_hashes, chunk_spans

__all__ = [
    "LoadSpec",
    "Match",
    "Planner",
    "PlannerPolicy",
    "SaveSpec",
    "StepPlan",
]


class LoadSpec(msgspec.Struct, frozen=True):
    req_id: str
    token_ids: list[int]  # the chunk-aligned tokens whose chunks are loaded
    block_ids: list[int]  # the request's blocks covering ``token_ids``
    skip_tokens: int  # vLLM's local hit: blocks before it are not written


class SaveSpec(msgspec.Struct, frozen=True):
    req_id: str
    token_ids: list[int]  # tokens whose chunks are stored (held chunks are skipped)
    block_ids: list[int]


class StepPlan(msgspec.Struct, frozen=True):
    loads: list[LoadSpec] = []  # before this step's forward pass (vLLM's sync loads)
    saves: list[SaveSpec] = []
    preempted: list[str] = []
    #: started this step, finished while other steps run; each request waits for its own
    async_loads: list[LoadSpec] = []
    idle: bool = False  # no request computes in this step


class Match(msgspec.Struct, frozen=True):
    """What :meth:`Planner.match` answered for one request at one local hit."""

    num_computed: int  # vLLM's local hit the answer was for
    chunk_tokens: int  # tokens of the held chunk-aligned prefix (from token 0)
    external: int  # tokens to load beyond ``num_computed`` (what vLLM is told)
    locations: tuple[str, ...]  # tier of each chunk of the prefix


@dataclass(frozen=True)
class PlannerPolicy:
    chunk_size: int
    block_size: int
    save_unfull_chunk: bool = True
    save_decode_cache: bool = False
    min_retrieve_tokens: int = 0
    skip_save: bool = False  # kv_consumer: load only
    async_loads: bool = False  # vLLM's asynchronous load path

    def __post_init__(self) -> None:
        # connector_config refuses such a config with advice; here it is an invariant
        if self.chunk_size % self.block_size:
            raise ValueError(
                f"chunk_size {self.chunk_size} is not whole blocks of {self.block_size}"
            )

    @property
    def store(self) -> StorePolicy:
        """The keys :func:`store_boundary` decides by."""
        return StorePolicy(self.chunk_size, self.save_unfull_chunk, self.save_decode_cache)


@dataclass
class _Request:
    tokens: Callable[[], Sequence[int]]  # all token ids so far (prompt, then outputs)
    num_prompt: int
    block_ids: list[int] = field(default_factory=list)
    saved: int = 0  # tokens whose chunks were handed to a store
    computed: int = 0  # tokens with KV after the last planned step
    load: LoadSpec | None = None  # due in the next plan


class Planner:
    """Per-request state of the scheduler side. Not thread-safe: vLLM's scheduler calls
    it from one thread."""

    def __init__(self, policy: PlannerPolicy, held: HeldChunks) -> None:
        self.policy = policy
        self.held = held
        self._requests: dict[str, _Request] = {}
        self._matches: dict[str, Match] = {}
        self._loaded: dict[str, Match] = {}
        self._hashes: dict[str, tuple[int, list[int]]] = {}
        #: Whether a step has computed two or more tokens of one request. vLLM 0.32's CPU
        #: attention dies (SIGILL) when the first attention call of a worker process has a
        #: single query token over a long context, which a full hit right after start-up
        #: would be; until then a hit leaves at least two tokens to compute.
        self.warm = False

    def __len__(self) -> int:
        return len(self._requests)

    # --------------------------------------------------------------- lookups
    def hashes(self, req_id: str, tokens: Sequence[int]) -> list[int]:
        """Chunk hashes of ``tokens``, cached per request while its length is unchanged."""
        cached = self._hashes.get(req_id)
        if cached is None or cached[0] != len(tokens):
            cached = (len(tokens), chunk_hashes(tokens, self.policy.chunk_size))
            self._hashes[req_id] = cached
        return cached[1]

    def hashes_of(self, tokens: Sequence[int]) -> list[int]:
        return chunk_hashes(tokens, self.policy.chunk_size)

    def match(
        self, req_id: str, tokens: Sequence[int], num_computed: int, *, probed: int = 0
    ) -> Match:
        """How many tokens beyond vLLM's ``num_computed`` can be loaded now. ``probed``:
        the chunk prefix every rank reported holding when asked (tiers the index does not
        see). Idempotent: the same inputs and index give the same answer."""
        num_tokens = len(tokens)
        hashes = self.hashes(req_id, tokens)
        spans = chunk_spans(num_tokens, self.policy.chunk_size)
        prefix = self.held.prefix(hashes)
        chunk_tokens = spans[prefix.num_chunks - 1][1] if prefix.num_chunks else 0
        chunk_tokens = max(chunk_tokens, min(probed, num_tokens))
        usable = min(chunk_tokens, num_tokens - 1)  # vLLM computes at least one token
        if not self.warm and num_tokens - usable < 2:
            usable = max(0, (num_tokens - 2) // self.policy.block_size * self.policy.block_size)
        if usable < self.policy.min_retrieve_tokens:
            usable = 0
        external = max(0, usable - num_computed)
        locations: tuple[str, ...] = prefix.locations
        if external == 0:
            chunk_tokens, locations = 0, ()
        found = Match(num_computed, chunk_tokens, external, locations)
        self._matches[req_id] = found
        return found

    def last_loaded(self, req_id: str) -> Match | None:
        """The match behind the request's planned load, if it has one."""
        return self._loaded.get(req_id)

    # --------------------------------------------------------------- allocation
    def allocated(
        self,
        req_id: str,
        tokens: Callable[[], Sequence[int]],
        num_prompt: int,
        block_ids: Sequence[int],
        num_external: int,
    ) -> None:
        """vLLM allocated blocks for the request, ``num_external`` of its tokens to load."""
        request = self._requests.get(req_id)
        if request is None:
            request = self._requests[req_id] = _Request(tokens, num_prompt)
        request.block_ids = list(block_ids)
        found = self._matches.pop(req_id, None)
        if found is not None:  # None: admitted again after an async load (or no lookup)
            request.computed = found.num_computed + num_external
        if num_external == 0 or found is None:
            request.load = None
            self._loaded.pop(req_id, None)
            return
        if found.external != num_external:
            # vLLM may cut the hit (a partial local block it drops): load what it asked for,
            # rounded to whole chunks from token 0 as they are stored.
            wanted = found.num_computed + num_external
            chunks = -(-wanted // self.policy.chunk_size) * self.policy.chunk_size
            found = msgspec.structs.replace(
                found, chunk_tokens=min(chunks, found.chunk_tokens), external=num_external
            )
        self._loaded[req_id] = found
        all_tokens = tokens()
        request.load = LoadSpec(
            req_id,
            list(all_tokens[: found.chunk_tokens]),
            self._blocks(request.block_ids, found.chunk_tokens),
            found.num_computed,
        )
        request.saved = max(request.saved, found.chunk_tokens)

    # --------------------------------------------------------------- steps
    def plan(
        self,
        scheduled: Sequence[tuple[str, int]],
        *,
        new_blocks: dict[str, tuple[list[int], bool]] | None = None,
        preempted: Sequence[str] = (),
        finished: Sequence[str] = (),
    ) -> StepPlan:
        """The plan of one step. ``scheduled`` is ``(req_id, computed_after_step)`` for every
        request this step computes; ``new_blocks[req_id] = (block_ids, replace)`` are the
        blocks vLLM added to running requests (``replace`` for a resumed request)."""
        for req_id in finished:
            self.forget(req_id)
        for req_id, (blocks, replace) in (new_blocks or {}).items():
            request = self._requests.get(req_id)
            if request is not None:
                request.block_ids = list(blocks) if replace else request.block_ids + list(blocks)
        loads: list[LoadSpec] = []
        saves: list[SaveSpec] = []
        for req_id, computed in scheduled:
            request = self._requests.get(req_id)
            if request is None:
                continue
            if computed - request.computed >= 2:
                self.warm = True
            request.computed = computed
            if request.load is not None:
                loads.append(request.load)
                request.load = None
            if self.policy.skip_save:
                continue
            end = store_boundary(computed, request.num_prompt, request.saved, self.policy.store)
            if end is None:
                continue
            tokens = request.tokens()
            if len(tokens) < end or len(request.block_ids) * self.policy.block_size < end:
                continue  # vLLM has not shown us these tokens' blocks yet
            saves.append(SaveSpec(req_id, list(tokens[:end]), self._blocks(request.block_ids, end)))
            request.saved = end
        for req_id in preempted:
            request = self._requests.get(req_id)
            if request is not None:
                request.block_ids = []
                request.load = None
        waiting: list[LoadSpec] = []
        if self.policy.async_loads:  # allocated, waiting for their KV: not scheduled
            for request in self._requests.values():
                if request.load is not None:
                    waiting.append(request.load)
                    request.load = None
        return StepPlan(loads, saves, list(preempted), waiting, idle=not scheduled)

    def load_failed(self, block_ids: set[int]) -> None:
        """vLLM's ``invalid_block_ids``: loads left these blocks unwritten, and vLLM
        recomputes each request from its first one. Those chunks are stored again once
        computed (the planner had counted them as stored when their load was planned)."""
        per_chunk = self.policy.chunk_size // self.policy.block_size
        for request in self._requests.values():
            bad = [i for i, block in enumerate(request.block_ids) if block in block_ids]
            if bad:
                boundary = bad[0] // per_chunk * self.policy.chunk_size
                request.saved = min(request.saved, boundary)

    def forget(self, req_id: str) -> None:
        self._requests.pop(req_id, None)
        self._matches.pop(req_id, None)
        self._loaded.pop(req_id, None)
        self._hashes.pop(req_id, None)

    def _blocks(self, block_ids: Sequence[int], num_tokens: int) -> list[int]:
        return list(block_ids[: -(-num_tokens // self.policy.block_size)])
