"""Builds one reference-server instance: model, tokenizer, paged KV caches, generator.

The paged caches' shape comes from the model (layers, KV heads, head size, dtype) and from
kvplane's config (block size, number of blocks, at least ``max_model_len`` tokens):
:func:`served_facts` puts both in the engine's facts record, from which the layout, the
storage keys and ``/meta`` describe the KV this process really has. The config itself stays
what the user wrote.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from kvplane.config import EngineConfig
from kvplane.engine.chunk import dtype_name
from kvplane.engine.facts import EngineFacts, KVShape
from kvplane.engine.kv_api import KVApi
from kvplane.errors import ConfigError
from kvplane.serve.generator import Generator
from kvplane.serve.model import (
    DEFAULT_SEED,
    ModelShape,
    PagedLlama,
    architecture_config,
    build_model,
)
from kvplane.serve.tokenizer import BYTE_VOCAB_SIZE, ByteTokenizer, CheckpointTokenizer, Tokenizer

__all__ = [
    "DTYPES",
    "LoadedModel",
    "ServeOptions",
    "ServedModel",
    "load_model",
    "make_served",
    "resolve_device",
    "served_facts",
]


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    model_dir: Path | None = None
    architecture: str = "tiny"  # of the random-weight model (see model.ARCHITECTURES)
    served_model_name: str | None = None
    max_model_len: int = 4096
    device: str = "auto"
    dtype: str = "auto"
    seed: int = DEFAULT_SEED

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        if self.model_dir:
            return str(self.model_dir)
        return f"kvplane/{self.architecture}-llama-random"


class ServedModel(NamedTuple):
    """What the HTTP front serves: one model, its tokenizer and its generator."""

    name: str
    tokenizer: Tokenizer
    generator: Generator
    max_model_len: int
    created: int


@dataclass(frozen=True)
class LoadedModel:
    model: Any  # transformers' LlamaForCausalLM
    tokenizer: Tokenizer
    shape: ModelShape
    device: torch.device


#: ``--dtype`` values besides ``auto``.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DEVICE_CHOICES = "cpu, cuda, cuda:N or auto"


def resolve_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """``auto``: CUDA with bfloat16 when there is a GPU, else the CPU with float32.

    Raises ConfigError naming the flag for an unknown dtype, a device torch cannot parse or
    the model cannot run on, and a CUDA device this machine lacks (torch would fail later,
    deep inside model construction)."""
    if dtype != "auto" and dtype not in DTYPES:
        raise ConfigError(f"--dtype: unsupported {dtype!r}; choose from {sorted(DTYPES)} or auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device: {device!r} is not a device; use {_DEVICE_CHOICES}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device: {device!r} is not supported; use {_DEVICE_CHOICES}")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index is not None and dev.index >= count):
            raise ConfigError(f"--device: {device!r}: torch sees {count} CUDA device(s) here")
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, DTYPES[dtype]


def _load_checkpoint(model_dir: Path, device: torch.device, dtype: torch.dtype) -> Any:
    """Model and tokenizer of a local checkpoint; a missing or unreadable one is a
    ConfigError naming ``--model`` (transformers would first try it as a hub repo id)."""
    if not model_dir.is_dir():
        raise ConfigError(f"--model: {str(model_dir)!r} is not a directory (a local checkpoint)")
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"--model: {str(model_dir)!r} has no config.json: not a checkpoint")
    try:
        model = build_model(model_dir=model_dir, device=device, dtype=dtype)
        return model, CheckpointTokenizer(model_dir)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--model: cannot load {str(model_dir)!r}: {exc}") from None


def load_model(options: ServeOptions) -> LoadedModel:
    """Raises ConfigError for a bad device, dtype, architecture or checkpoint."""
    device, dtype = resolve_device(options.device, options.dtype)
    tokenizer: Tokenizer
    if options.model_dir is not None:
        model, tokenizer = _load_checkpoint(options.model_dir, device, dtype)
    else:
        config = architecture_config(options.architecture, BYTE_VOCAB_SIZE, options.max_model_len)
        model = build_model(config, device=device, dtype=dtype, seed=options.seed)
        tokenizer = ByteTokenizer()
    shape = PagedLlama.shape_of(model)
    return LoadedModel(model, tokenizer, shape, device)


def served_facts(
    shape: ModelShape, config: EngineConfig, model_name: str, max_model_len: int
) -> EngineFacts:
    """The engine facts of the served model (see the module docstring); ranks from the
    config (one process: world size 1, rank 0 unless configured otherwise)."""
    needed_blocks = -(-max_model_len // config.kv_block_size)
    kv = KVShape(
        num_layers=shape.num_layers,
        num_kv_heads=shape.num_kv_heads,
        head_size=shape.head_size,
        block_size=config.kv_block_size,
        num_blocks=max(config.kv_num_blocks, needed_blocks),
        dtype=dtype_name(shape.dtype),
    )
    return EngineFacts(model_name, config.world_size, config.worker_id, kv)


def make_served(
    loaded: LoadedModel,
    kv_caches: list[torch.Tensor],
    facts: EngineFacts,
    *,
    model_name: str,
    max_model_len: int,
    cache: KVApi | None,
) -> ServedModel:
    max_len = min(max_model_len, loaded.shape.max_model_len)
    generator = Generator(
        PagedLlama(loaded.model, kv_caches),
        block_size=facts.kv.block_size,
        num_blocks=facts.kv.num_blocks,
        max_model_len=max_len,
        eos_token_id=loaded.tokenizer.eos_token_id,
        cache=cache,
    )
    return ServedModel(model_name, loaded.tokenizer, generator, max_len, int(time.time()))
