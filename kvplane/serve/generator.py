"""One request at a time: retrieve the cached prefix, prefill the rest, store, decode.

The flow per request (under one lock: the paged caches and the allocator are shared):

1. allocate blocks for prompt + max_tokens and compute the slot mapping;
2. ``retrieve`` the cached prefix of the prompt into its slots. The engine returns a
   contiguous prefix from token 0; at most ``n - 1`` tokens count as cached, so the last
   prompt token is always recomputed and produces the first token's logits;
3. prefill the remaining tokens (attention reads the retrieved KV through the slots);
4. sample the first token (time to first token ends here), then ``store`` the prompt's
   chunks (the engine skips chunks it already holds);
5. decode until ``max_tokens`` or EOS; free the blocks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import torch

from kvplane.errors import BadRequest
from kvplane.serve.blocks import BlockAllocator, slot_mapping
from kvplane.serve.model import PagedLlama

__all__ = ["Completion", "Generator", "PrefixCache", "SamplingParams"]


class PrefixCache(Protocol):
    """What the generator needs from kvplane's CacheEngine."""

    def retrieve(
        self, tokens: torch.Tensor, kv_caches: list[torch.Tensor], slot_mapping: torch.Tensor
    ) -> Any: ...

    def store(
        self, tokens: torch.Tensor, kv_caches: list[torch.Tensor], slot_mapping: torch.Tensor
    ) -> Any: ...


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
        cache: PrefixCache | None = None,
        store_decode: Callable[[], bool] = lambda: False,
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.eos_token_id = eos_token_id
        self.cache = cache
        self.store_decode = store_decode
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
            got = self.cache.retrieve(prompt_t, self.model.kv_caches, prompt_slots)
            cached = min(int(got.num_tokens), n - 1)
        prompt_logits = self.model.forward(prompt_t[cached:], cached, slots[:n])
        rng = None
        if params.seed is not None:
            rng = torch.Generator(device="cpu").manual_seed(params.seed)
        token = _sample(prompt_logits, params.temperature, rng)
        _synchronize(device)
        ttft = time.perf_counter() - start_time
        if self.cache is not None:
            self.cache.store(prompt_t, self.model.kv_caches, prompt_slots)
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
        if self.cache is not None and self.store_decode():
            seq = prompt + out[:-1]
            self.cache.store(
                torch.tensor(seq, dtype=torch.long), self.model.kv_caches, slots[: len(seq)]
            )
        return Completion(prompt, out, finish, cached, ttft, prompt_logits.cpu())


def _sample(logits: torch.Tensor, temperature: float, rng: torch.Generator | None) -> int:
    if temperature <= 0.0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=rng).item())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
