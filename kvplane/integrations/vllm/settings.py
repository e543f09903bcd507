"""kvplane's config inside vLLM: the seeds' YAML (``$KVPLANE_CONFIG_FILE`` or
``$LMCACHE_CONFIG_FILE``), then ``kv_connector_extra_config`` on top (keys as in the YAML,
optionally prefixed ``kvplane.`` or ``lmcache.``). The facts vLLM decides (model name, world
size, rank, block size, and on a worker rank the KV shape of its tensors) are not config:
:meth:`VllmFacts.engine_facts` makes them the engine's facts record. No torch here: the
scheduler process uses it too."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvplane.config import EngineConfig, load_config, serving_url_of
from kvplane.engine.facts import EngineFacts, KVShape
from kvplane.errors import ConfigError

__all__ = ["VllmFacts", "connector_config", "extra_overrides", "serving_url_from_argv"]

_PREFIXES = ("kvplane.", "lmcache.")


@dataclass(frozen=True)
class VllmFacts:
    """What vLLM decides and kvplane must agree with."""

    model_name: str
    world_size: int
    rank: int
    block_size: int
    engine_id: str
    dp_rank: int
    use_mla: bool
    vllm_version: str

    @classmethod
    def of(cls, vllm_config: Any) -> VllmFacts:
        import vllm

        model = vllm_config.model_config
        served = model.served_model_name
        name = served[0] if isinstance(served, (list, tuple)) and served else served
        parallel = vllm_config.parallel_config
        return cls(
            model_name=str(name or model.model),
            world_size=int(parallel.world_size),
            rank=int(parallel.rank),
            block_size=int(vllm_config.cache_config.block_size),
            engine_id=str(vllm_config.kv_transfer_config.engine_id),
            dp_rank=int(parallel.data_parallel_rank),
            use_mla=bool(getattr(model, "use_mla", False)),
            vllm_version=str(getattr(vllm, "__version__", "unknown")),
        )

    def engine_facts(self, config: EngineConfig, kv: KVShape | None = None) -> EngineFacts:
        """The engine facts of this vLLM process: vLLM's model name, world size and rank,
        and ``kv``, the shape of the KV tensors vLLM handed a worker rank. The scheduler
        holds no KV (``kv`` None): its shape is the config's ``kv_*`` keys with vLLM's block
        size, what its ``/meta`` shows."""
        if kv is None:
            kv = dataclasses.replace(KVShape.from_config(config), block_size=self.block_size)
        return EngineFacts(self.model_name, self.world_size, self.rank, kv)


def extra_overrides(extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """``kv_connector_extra_config`` as config keys (prefixes dropped)."""
    out: dict[str, Any] = {}
    for key, value in (extra or {}).items():
        name = next((key[len(p) :] for p in _PREFIXES if key.startswith(p)), key)
        out[name] = value
    return out


def connector_config(facts: VllmFacts, extra: Mapping[str, Any] | None) -> EngineConfig:
    """The validated config of one connector object. Raises ConfigError naming the
    problem, e.g. a chunk size that is not a multiple of vLLM's block size."""
    config = load_config(overrides=extra_overrides(extra))
    if config.chunk_size % facts.block_size:
        raise ConfigError(
            f"chunk_size {config.chunk_size} is not a multiple of vLLM's block size "
            f"{facts.block_size}: kvplane moves whole vLLM blocks, so set chunk_size to a "
            f"multiple of {facts.block_size} (e.g. {max(1, config.chunk_size // facts.block_size) * facts.block_size})"
        )
    if config.serving_url is None:
        url = serving_url_from_argv(sys.argv, config.p2p_host)
        if url is not None:
            config = dataclasses.replace(config, serving_url=url)
    return config


def _flag(argv: Sequence[str], name: str) -> str | None:
    """The value of ``--name V`` or ``--name=V`` in ``argv`` (the last one wins)."""
    found = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            found = argv[i + 1]
        elif arg.startswith(name + "="):
            found = arg[len(name) + 1 :]
    return found


def serving_url_from_argv(argv: Sequence[str], reach_host: str) -> str | None:
    """The OpenAI URL of ``vllm serve ... [--host H] [--port P]`` (vLLM's default port
    8000) from its command line, which vLLM's engine-core and worker processes inherit
    (multiprocessing hands a spawned child its parent's ``sys.argv``); None for any other
    command line (vLLM as a library), where only the config key can tell."""
    if len(argv) < 2 or argv[1] != "serve":
        return None
    port = _flag(argv, "--port") or "8000"
    if not port.isdigit():
        return None
    return serving_url_of(_flag(argv, "--host"), int(port), reach_host)
