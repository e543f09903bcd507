"""What the host decides about an engine: one typed record, separate from the user's config.

The model's name, the tensor-parallel world size and this process's rank, and the shape of
the paged KV caches are facts of the host framework, not settings: kvplane takes them from
whoever knows them, once, and never writes them back into the config.

* ``kvplane engine`` (synthetic caches): :meth:`EngineFacts.from_config`, the config's model
  keys, its only source;
* ``kvplane serve``: the reference model's shape (:func:`kvplane.serve.launch.served_facts`);
* vLLM: vLLM's config and the KV tensors it hands each worker rank
  (:meth:`kvplane.integrations.vllm.settings.VllmFacts.engine_facts`).

Storage keys (:meth:`CacheEngine.keys_for`), the KV layout, ``/meta`` and the controller
worker's registration read the record. No torch here: the dtype is its name.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from kvplane.errors import ConfigError

if TYPE_CHECKING:
    from kvplane.config import EngineConfig

__all__ = ["EngineFacts", "KVShape"]


@dataclass(frozen=True)
class KVShape:
    """The per-layer paged KV caches' shape (see :class:`~kvplane.engine.kv.layout.KVLayout`,
    which adds how the caches are laid out in memory)."""

    num_layers: int
    num_kv_heads: int
    head_size: int
    block_size: int  # tokens per paged block
    num_blocks: int  # blocks per layer
    dtype: str  # torch's name without "torch.": "bfloat16", "float8_e4m3fn", ...
    use_mla: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "dtype":
                if not isinstance(value, str) or not value:
                    raise ConfigError(f"KV shape: dtype must be a dtype name, got {value!r}")
            elif f.name == "use_mla":
                if not isinstance(value, bool):
                    raise ConfigError(f"KV shape: use_mla must be a bool, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"KV shape: {f.name} must be a positive integer, got {value!r}")

    @classmethod
    def from_config(cls, config: EngineConfig) -> KVShape:
        """The config's ``kv_*`` keys and ``use_mla``."""
        return cls(
            config.kv_num_layers,
            config.kv_num_heads,
            config.kv_head_size,
            config.kv_block_size,
            config.kv_num_blocks,
            config.kv_dtype,
            config.use_mla,
        )


@dataclass(frozen=True)
class EngineFacts:
    """The facts of one engine rank (or of a scheduler process: its instance's facts)."""

    model_name: str  # part of every storage key
    world_size: int  # tensor-parallel ranks of the instance
    worker_id: int  # this process's rank
    kv: KVShape

    def __post_init__(self) -> None:
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ConfigError(f"engine facts: model_name must be a name, got {self.model_name!r}")
        for name in ("world_size", "worker_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"engine facts: {name} must be an integer >= 0, got {value!r}")
        if self.world_size < 1:
            raise ConfigError("engine facts: world_size must be at least 1")

    @classmethod
    def from_config(cls, config: EngineConfig) -> EngineFacts:
        """The facts ``config``'s model keys state: those of ``kvplane engine``, whose
        synthetic caches have no other source."""
        return cls(
            config.model_name, config.world_size, config.worker_id, KVShape.from_config(config)
        )
