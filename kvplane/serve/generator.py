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
from collections.abc import Callable
from typing import NamedTuple

import torch

from kvplane.engine.kv_api import KVApi, store_boundary
from kvplane.errors import BadRequest
from kvplane.serve.blocks import BlockAllocator, slot_mapping
from kvplane.serve.model import PagedLlama

__all__ = ["Completion", "Generator", "Load", "OnToken", "SamplingParams"]

OnToken = Callable[[int], bool]
"""Called with each sampled token on the generating thread; False stops the request
(its client went away): it finishes as ``"abort"`` after that token."""


class SamplingParams(NamedTuple):
    max_tokens: int = 16
    temperature: float = 0.0
    seed: int | None = None
    ignore_eos: bool = False


class Completion(NamedTuple):
    prompt_tokens: list[int]
    output_tokens: list[int]
    finish_reason: str  # "length", "stop" or "abort"
    cached_tokens: int  # prompt tokens loaded from kvplane instead of computed
    ttft_s: float  # request start (lock held) to the first token sampled
    prompt_logits: torch.Tensor  # the prompt's last-position logits, float32 on the CPU


class Load(NamedTuple):
    """What the server's /metrics shows of its queue (vLLM's equivalents in brackets)."""

    running: int  # requests generating (num_requests_running): 0 or 1
    waiting: int  # requests queued behind it (num_requests_waiting)
    kv_usage: float  # share of the paged cache's blocks in use (kv_cache_usage_perc), 0..1
    aborts: int  # requests stopped because their client went away


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
        self._count_lock = threading.Lock()
        self._waiting = 0
        self._running = 0
        self._aborts = 0

    def load(self) -> Load:
        with self._count_lock:
            used = 1.0 - self._allocator.num_free / self._allocator.num_blocks
            return Load(self._running, self._waiting, used, self._aborts)

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """Raises BadRequest for an empty or too long request (what :meth:`generate`
        refuses before it queues), so a streaming server can refuse it before its first
        byte."""
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

    def generate(
        self, prompt: list[int], params: SamplingParams, on_token: OnToken | None = None
    ) -> Completion:
        """Raises BadRequest for an empty or too long request (:meth:`check`), Unavailable
        when the paged cache cannot hold it. ``on_token`` sees each token as it is sampled."""
        self.check(prompt, params)
        total = len(prompt) + params.max_tokens
        with self._count_lock:
            self._waiting += 1
        with self._lock:
            with self._count_lock:
                self._waiting -= 1
                blocks = self._allocator.allocate(-(-total // self.block_size))
                self._running += 1
            try:
                done = self._run(prompt, params, blocks, on_token)
            finally:
                with self._count_lock:
                    self._allocator.free(blocks)
                    self._running -= 1
        if done.finish_reason == "abort":
            with self._count_lock:
                self._aborts += 1
        return done

    def _run(
        self,
        prompt: list[int],
        params: SamplingParams,
        blocks: list[int],
        on_token: OnToken | None,
    ) -> Completion:
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
            if on_token is not None and not on_token(token):
                finish = "abort"
                break
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
