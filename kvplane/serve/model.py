"""A Llama-architecture causal LM whose attention reads and writes paged KV caches.

The weights and the per-layer modules (embedding, RMSNorms, q/k/v/o projections, MLP,
rotary embedding, LM head) are transformers' own ``LlamaForCausalLM``; only the forward is
ours, because transformers' cache classes keep KV contiguous per sequence while kvplane
needs vLLM's paged layout: one tensor per layer ``[2, num_blocks, block_size, num_kv_heads,
head_size]`` and a slot mapping (flat slot index ``block * block_size + offset`` per token).

Every forward first writes the new tokens' K and V into their slots, then attends over the
K and V *read back from the cache* for all context slots. A full prefill and a prefill that
finds its first M tokens already in the cache (put there by kvplane's retrieve) therefore
compute over the same stored values and differ only by floating-point summation order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from kvplane.errors import ConfigError

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_SEED",
    "ModelShape",
    "PagedLlama",
    "architecture_config",
    "build_model",
    "default_config",
    "llama_8b_config",
]

DEFAULT_SEED = 1234
#: Query tokens per attention step of a prefill: bounds the score matrix on long prompts.
PREFILL_STEP = 2048


class ModelShape(NamedTuple):
    """What the paged KV cache of a model looks like."""

    num_layers: int
    num_kv_heads: int
    head_size: int
    dtype: torch.dtype
    vocab_size: int
    max_model_len: int


def default_config(vocab_size: int, max_model_len: int = 4096) -> LlamaConfig:
    """A small Llama (4 layers, GQA 8/4 heads of 32) that prefills thousands of tokens on a CPU."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=32,
        max_position_embeddings=max_model_len,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def llama_8b_config(max_model_len: int = 32768) -> LlamaConfig:
    """Llama-3.1-8B's shape (32 layers, 32/8 heads of 128, 14336 MLP, 128256 vocab)."""
    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=max_model_len,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        bos_token_id=128000,
        eos_token_id=128001,
        tie_word_embeddings=False,
    )


#: Random-weight model shapes by name: ``(vocab_size, max_model_len) -> LlamaConfig``.
ARCHITECTURES: dict[str, Callable[[int, int], LlamaConfig]] = {
    "tiny": default_config,
    "llama-3.1-8b": lambda _vocab, max_len: llama_8b_config(max_len),
}


def architecture_config(name: str, vocab_size: int, max_model_len: int) -> LlamaConfig:
    try:
        make = ARCHITECTURES[name]
    except KeyError:
        raise ConfigError(
            f"unknown architecture {name!r}; choose from {sorted(ARCHITECTURES)}"
        ) from None
    return make(vocab_size, max_model_len)


def build_model(
    config: LlamaConfig | None = None,
    *,
    model_dir: Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = DEFAULT_SEED,
) -> LlamaForCausalLM:
    """Random weights from ``config`` (seeded: every process builds the same model), or a
    local checkpoint from ``model_dir``. Never downloads anything."""
    if model_dir is not None:
        loaded = LlamaForCausalLM.from_pretrained(
            str(model_dir), local_files_only=True, dtype=dtype
        )
        # transformers' decorated ``to`` confuses mypy; the call is the plain nn.Module one.
        model = cast(Any, loaded).to(device)
    else:
        if config is None:
            raise ValueError("build_model needs a config or a model_dir")
        torch.manual_seed(seed)
        # Built directly in ``dtype`` on ``device``: an 8B model in float32 first would
        # need twice the memory. The default dtype is restored before returning.
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = cast(Any, LlamaForCausalLM(config)).to(dtype)
        finally:
            torch.set_default_dtype(previous)
    model.eval()
    return model


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class PagedLlama:
    """The forward pass of a ``LlamaForCausalLM`` over paged KV caches.

    Not thread-safe: callers serialize forwards (the caches are shared state).
    """

    def __init__(self, model: LlamaForCausalLM, kv_caches: list[torch.Tensor]) -> None:
        cfg = model.config
        if len(kv_caches) != cfg.num_hidden_layers:
            raise ValueError(
                f"{len(kv_caches)} KV caches for a model of {cfg.num_hidden_layers} layers"
            )
        self.model = model
        self.kv_caches = kv_caches
        shape = self.shape_of(model)
        self.num_heads = int(cast(int, cfg.num_attention_heads))
        self.num_kv_heads = shape.num_kv_heads
        self.head_size = shape.head_size
        self.scale = 1.0 / math.sqrt(self.head_size)
        self.device = next(model.parameters()).device
        self.vocab_size = shape.vocab_size

    @staticmethod
    def shape_of(model: LlamaForCausalLM) -> ModelShape:
        cfg: Any = model.config
        heads = int(cfg.num_attention_heads)
        return ModelShape(
            num_layers=int(cfg.num_hidden_layers),
            num_kv_heads=int(cfg.num_key_value_heads),
            head_size=int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads),
            dtype=next(model.parameters()).dtype,
            vocab_size=int(cfg.vocab_size),
            max_model_len=int(cfg.max_position_embeddings),
        )

    @torch.inference_mode()
    def forward(
        self, token_ids: torch.Tensor, start: int, context_slots: torch.Tensor
    ) -> torch.Tensor:
        """Run ``token_ids`` (positions ``start..start+n-1``) and return the last position's
        logits (float32, ``[vocab]``).

        ``context_slots`` holds the slots of positions ``0..start+n-1``: the first ``start``
        must already hold valid KV (computed earlier or retrieved); the new tokens' K and V
        are written to the last ``n``. Long inputs run in steps of ``PREFILL_STEP`` tokens.
        """
        n = int(token_ids.numel())
        if n == 0 or int(context_slots.numel()) != start + n:
            raise ValueError(f"need >= 1 token and {start + n} context slots")
        token_ids = token_ids.to(self.device)
        context_slots = context_slots.to(self.device, torch.long)
        hidden = None
        for lo in range(0, n, PREFILL_STEP):
            hi = min(n, lo + PREFILL_STEP)
            hidden = self._step(token_ids[lo:hi], start + lo, context_slots[: start + hi])
        assert hidden is not None  # n >= 1 guarantees one step
        last = self.model.model.norm(hidden[-1:])
        return self.model.lm_head(last)[0].float()

    def _step(self, ids: torch.Tensor, start: int, slots: torch.Tensor) -> torch.Tensor:
        llama = self.model.model
        n = int(ids.numel())
        total = start + n
        positions = torch.arange(start, total, device=self.device)
        hidden = llama.embed_tokens(ids)
        cos, sin = llama.rotary_emb(hidden[None], positions[None])
        cos, sin = cos[0][:, None, :], sin[0][:, None, :]
        # Query i sits at position start + i and may see keys 0..start + i; a single query
        # (decode, or the one recomputed token of a full hit) sees every key.
        mask = None
        if n > 1:
            mask = torch.arange(total, device=self.device)[None, :] <= positions[:, None]
            mask = mask.repeat(self.num_heads // self.num_kv_heads, 1)
        new_slots = slots[start:]
        for layer, cache in zip(llama.layers, self.kv_caches, strict=True):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(n, self.num_heads, self.head_size)
            k = attn.k_proj(x).view(n, self.num_kv_heads, self.head_size)
            v = attn.v_proj(x).view(n, self.num_kv_heads, self.head_size)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            k_flat = cache[0].view(-1, self.num_kv_heads, self.head_size)
            v_flat = cache[1].view(-1, self.num_kv_heads, self.head_size)
            k_flat.index_copy_(0, new_slots, k.to(cache.dtype))
            v_flat.index_copy_(0, new_slots, v.to(cache.dtype))
            keys = k_flat.index_select(0, slots).to(q.dtype).transpose(0, 1)
            values = v_flat.index_select(0, slots).to(q.dtype).transpose(0, 1)
            out = self._attend(q, keys, values, mask)
            hidden = hidden + attn.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return hidden

    def _attend(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Grouped-query attention without copying K/V per query head.

        ``q`` is ``[n, heads, D]``, ``keys``/``values`` ``[kv_heads, T, D]``. Query head
        ``h`` uses KV head ``h // group`` (transformers' ``repeat_kv`` order), so the group's
        queries are folded into the row dimension: ``[kv_heads, group * n, D]`` against
        ``[kv_heads, T, D]`` is plain multi-head attention, which every SDPA kernel runs
        (the ``enable_gqa`` path was several times slower on CPU); ``mask`` is already
        repeated per group row.
        """
        n = q.shape[0]
        group = self.num_heads // self.num_kv_heads
        folded = q.transpose(0, 1).reshape(self.num_kv_heads, group * n, self.head_size)
        out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=mask, scale=self.scale)
        out = out.reshape(self.num_heads, n, self.head_size).transpose(0, 1)
        return out.reshape(n, self.num_heads * self.head_size)
