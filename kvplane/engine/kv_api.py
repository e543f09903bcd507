"""The engine-facing contract: what a host that drives the KV calls, and which tokens it stores.

Every host goes through the same three calls over paged KV caches, :class:`KVApi`, which
:class:`~kvplane.engine.cache_engine.CacheEngine` implements: the reference server
(:mod:`kvplane.serve.generator`), the vLLM connector's worker ranks
(:mod:`kvplane.integrations.vllm.worker`) and the internal API's ``/cache/store`` and
``/cache/retrieve`` (``tokens_mock`` / ``tokens_input``).

* ``store(tokens, kv_caches, slot_mapping)``: keep the KV of every chunk of ``tokens`` not
  held yet, gathered from ``slot_mapping``'s slots. A partial last chunk is stored only with
  ``save_unfull_chunk`` (read at each call, so ``POST /conf`` reaches every host).
* ``retrieve(tokens, kv_caches, slot_mapping, skip_tokens=0)``: write the held prefix of
  ``tokens`` (a prefix from token 0; the first chunk no tier holds ends it) into the slots.
* ``lookup(tokens)``: how many leading tokens ``retrieve`` could load now.

Which prefix of a request to store, and when, is :func:`store_boundary`, the decode-store
policy (``save_unfull_chunk``, ``save_decode_cache``) in one pure function: the reference
server asks it after the prefill and after decoding, vLLM's scheduler-side planner after
every step. A host then stores ``tokens[:boundary]``.

Pure: no torch at run time (only for type checking), so the vLLM scheduler's planner, which
has no KV of its own, imports the policy without the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol, TypeAlias

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import torch

    from kvplane.config import EngineConfig

__all__ = [
    "KVApi",
    "KVCaches",
    "RetrieveResult",
    "SlotMapping",
    "StorePolicy",
    "StoreResult",
    "TokenIds",
    "store_boundary",
]

#: Token ids of one request, in order: a list (or any sequence) of ints, or a 1-D numpy array.
#: Each must lie in :data:`kvplane.keys.TOKEN_ID_RANGE` (ValueError / BadRequest otherwise).
TokenIds: TypeAlias = Sequence[int] | npt.NDArray[np.int32] | npt.NDArray[np.int64]
#: The flat slot (``block * block_size + offset``) of each token, an integer tensor on any
#: device, at least as long as the tokens; with a packed (vLLM) layout, whole blocks only.
SlotMapping: TypeAlias = "torch.Tensor"
#: The per-layer paged KV caches the engine was built around (its layout; BadRequest else).
KVCaches: TypeAlias = "Sequence[torch.Tensor]"


class StoreResult(NamedTuple):
    num_tokens: int  # tokens whose chunks are now held (newly stored or already present)
    num_chunks: int  # chunks newly stored
    nbytes: int  # bytes newly stored


class RetrieveResult(NamedTuple):
    num_tokens: int  # leading tokens now valid in the caches (``skip_tokens`` included)
    num_chunks: int  # chunks written into the caches
    nbytes: int  # bytes read from the tiers


class StorePolicy(NamedTuple):
    """The config keys that decide what a request stores (see :func:`store_boundary`)."""

    chunk_size: int
    save_unfull_chunk: bool = True
    save_decode_cache: bool = False

    @classmethod
    def of(cls, config: EngineConfig) -> StorePolicy:
        """The policy of ``config`` now (its two keys are mutable at run time)."""
        return cls(config.chunk_size, config.save_unfull_chunk, config.save_decode_cache)


def store_boundary(computed: int, num_prompt: int, saved: int, policy: StorePolicy) -> int | None:
    """How many leading tokens of a request to store once ``computed`` of them hold KV, or
    None when nothing new is due (the first ``saved`` tokens were stored already).

    Prompt tokens are stored up to the last chunk boundary they reached; the prompt's last
    partial chunk once the whole prompt is computed, with ``save_unfull_chunk``. Tokens
    produced while decoding (``computed > num_prompt``) only with ``save_decode_cache``, and
    only in whole chunks: a partial chunk past the prompt would match only the same
    request again, token for token."""
    size = policy.chunk_size
    if computed > num_prompt and policy.save_decode_cache:
        end = computed // size * size
    else:  # prefill, or decode without decode saving: only what the prompt reached
        upto = min(computed, num_prompt)
        end = upto if upto == num_prompt and policy.save_unfull_chunk else upto // size * size
    return end if end > saved else None


class KVApi(Protocol):
    """Store / retrieve / lookup over paged KV: the calls every host makes (module docstring).

    Thread-safe; each call runs on the caller's thread and returns once its copies are done
    (the caches may be read or reused at once). Raises BadRequest for caches of another
    layout, a slot mapping that is too short or out of range, and ValueError for token ids
    outside :data:`~kvplane.keys.TOKEN_ID_RANGE`. While the engine is frozen, ``store``
    stores nothing and reads come from the CPU tier only.
    """

    @property
    def store_policy(self) -> StorePolicy:
        """The engine's :class:`StorePolicy` now (its config's keys)."""
        ...

    def store(
        self, tokens: TokenIds, kv_caches: KVCaches, slot_mapping: SlotMapping
    ) -> StoreResult: ...

    def retrieve(
        self,
        tokens: TokenIds,
        kv_caches: KVCaches,
        slot_mapping: SlotMapping,
        *,
        skip_tokens: int = 0,
    ) -> RetrieveResult: ...

    def lookup(self, tokens: TokenIds) -> int: ...
