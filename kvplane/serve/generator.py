"""One request at a time: retrieve the cached prefix, prefill the rest, store, decode.

The flow per request (under one lock: the paged caches and the allocator are shared):

1. allocate blocks for prompt + max_tokens and compute the slot mapping;
2. ``retrieve`` the cached prefix of the prompt into its slots. The engine returns a
   contiguous prefix from token 0; at most ``n - 1`` tokens count as cached, so the last
   prompt token is always recomputed and produces the first token's logits;
3. prefill the remaining tokens (attention reads the retrieved KV through the slots);
4. sample the first token (time to first token ends here), then ``store`` the prompt's
   chunks (the engine skips chunks it already holds);
5. decode until ``max_tokens`` or EOS, then ``store`` the decoded tokens' whole chunks if
   the engine's policy says so; free the blocks.

What is stored after steps 4 and 5 is the engine's decision, not this module's:
:func:`kvplane.engine.kv_api.store_boundary` under the engine's ``store_policy``
(``save_unfull_chunk``, ``save_decode_cache``), the same function vLLM's planner uses.
"""

from __future__ import annotations

import threading
import time
from typing import NamedTuple

import torch

from kvplane.engine.kv_api import KVApi, store_boundary
from kvplane.errors import BadRequest
from kvplane.serve.blocks import BlockAllocator, slot_mapping
from kvplane.serve.model import PagedLlama

__all__ = ["Completion", "Generator", "SamplingParams"]


class SamplingParams(NamedTuple):
    max_tokens: int = 16
    temperature: float = 0.0
    seed: int | None = None
    ignore_eos: bool = False


class Completion(NamedTuple):
    prompt_tokens: list[int]
    output_tokens: list[int]
    finish_reason: str  # "length" or "stop"
    cached_tokens: int  # prompt tokens loaded from kvplane instead of computed
    ttft_s: float  # request start (lock held) to the first token sampled
    prompt_logits: torch.Tensor  # the prompt's last-position logits, float32 on the CPU


class Generator:
    def __init__(
        self,
        model: PagedLlama,
        *,
        block_size: int,
        num_blocks: int,
        max_model_len: int,
        eos_token_id: int | None,
        cache: KVApi | None = None,
    ) -> None:
        """``cache``: kvplane's engine (its :class:`KVApi`); None runs without one."""
        self.model = model
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.eos_token_id = eos_token_id
        self.cache = cache
        self._allocator = BlockAllocator(num_blocks)
        self._lock = threading.Lock()

    def generate(self, prompt: list[int], params: SamplingParams) -> Completion:
        """Raises BadRequest for an empty or too long request, Unavailable when the paged
        cache cannot hold it."""
        if not prompt:
            raise BadRequest("the prompt has no tokens")
        vocab = self.model.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise BadRequest(f"prompt token ids must lie in [0, {vocab})")
        if params.max_tokens < 1:
            raise BadRequest("max_tokens must be at least 1")
        total = len(prompt) + params.max_tokens
        if total > self.max_model_len:
            raise BadRequest(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"max_model_len {self.max_model_len}"
            )
        with self._lock:
            blocks = self._allocator.allocate(-(-total // self.block_size))
            try:
                return self._run(prompt, params, blocks)
            finally:
                self._allocator.free(blocks)

    def _run(self, prompt: list[int], params: SamplingParams, blocks: list[int]) -> Completion:
        device = self.model.device
        start_time = time.perf_counter()
        n = len(prompt)
        slots = slot_mapping(blocks, n + params.max_tokens, self.block_size)
        prompt_t = torch.tensor(prompt, dtype=torch.long)
        # Host tensors: the engine plans its copies on the host, without waiting on a GPU.
        prompt_slots = slots[:n]
        cached = 0
        if self.cache is not None:
            got = self.cache.retrieve(prompt, self.model.kv_caches, prompt_slots)
            cached = min(got.num_tokens, n - 1)
        prompt_logits = self.model.forward(prompt_t[cached:], cached, slots[:n])
        rng = None
        if params.seed is not None:
            rng = torch.Generator(device="cpu").manual_seed(params.seed)
        token = _sample(prompt_logits, params.temperature, rng)
        _synchronize(device)
        ttft = time.perf_counter() - start_time
        saved = self._store(prompt, slots, computed=n, num_prompt=n, saved=0)
        out = [token]
        finish = "length"
        while True:
            if not params.ignore_eos and token == self.eos_token_id:
                finish = "stop"
                break
            if len(out) >= params.max_tokens:
                break
            pos = n + len(out) - 1
            logits = self.model.forward(torch.tensor([token]), pos, slots[: pos + 1])
            token = _sample(logits, params.temperature, rng)
            out.append(token)
        # the last sampled token has no KV yet: it was never fed back
        self._store(prompt + out[:-1], slots, computed=n + len(out) - 1, num_prompt=n, saved=saved)
        return Completion(prompt, out, finish, cached, ttft, prompt_logits.cpu())

    def _store(
        self, tokens: list[int], slots: torch.Tensor, *, computed: int, num_prompt: int, saved: int
    ) -> int:
        """Store what the engine's policy says is due once ``computed`` tokens hold KV;
        returns the tokens stored so far."""
        if self.cache is None:
            return saved
        end = store_boundary(computed, num_prompt, saved, self.cache.store_policy)
        if end is None:
            return saved
        self.cache.store(tokens[:end], self.model.kv_caches, slots[:end])
        return end


def _sample(logits: torch.Tensor, temperature: float, rng: torch.Generator | None) -> int:
    if temperature <= 0.0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=rng).item())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
