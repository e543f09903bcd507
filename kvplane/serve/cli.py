"""``kvplane serve``: the reference OpenAI-compatible server with kvplane's engine inside.

Like the seeds' ``LMCACHE_CONFIG_FILE=example.yaml vllm serve MODEL --port 8000``: kvplane's
YAML comes from ``--config``, ``$KVPLANE_CONFIG_FILE`` or ``$LMCACHE_CONFIG_FILE``. The
process is one engine rank: the :class:`~kvplane.process.EngineProcess` is built around the
model's own paged KV caches and runs its services (internal API server, controller worker,
p2p node) next to the HTTP front.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvplane.config import help_lines
from kvplane.serve.progress import StartupSteps

if TYPE_CHECKING:
    from kvplane.process import EngineProcess
    from kvplane.serve.launch import ServedModel, ServeOptions

__all__ = ["add_parser", "build_instance", "options_from_args"]

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible server over a small Llama with kvplane's KV cache",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (YAML via --config, $KVPLANE_CONFIG_FILE or $LMCACHE_CONFIG_FILE):\n  "
        + "\n  ".join(help_lines()),
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="local Llama checkpoint directory (default: a small model with seeded random weights)",
    )
    p.add_argument(
        "--architecture",
        default="tiny",
        help="shape of the random-weight model without --model: tiny (default) or "
        "llama-3.1-8b (bfloat16 on a GPU)",
    )
    p.add_argument("--served-model-name", default=None, help="name in responses and cache keys")
    p.add_argument("--max-model-len", type=int, default=4096, help="prompt + output tokens limit")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (default)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the random weights")
    p.add_argument("--config", default=None, help="kvplane YAML (overrides the env variables)")
    p.set_defaults(func=run)


def options_from_args(args: argparse.Namespace) -> ServeOptions:
    from kvplane.serve.launch import ServeOptions

    return ServeOptions(
        host=args.host,
        port=args.port,
        model_dir=args.model,
        architecture=args.architecture,
        served_model_name=args.served_model_name,
        max_model_len=args.max_model_len,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
    )


def build_instance(
    options: ServeOptions,
    config_path: str | None,
    overrides: Mapping[str, Any] | None = None,
    steps: StartupSteps | None = None,
) -> tuple[EngineProcess, ServedModel]:
    """Config, model -> the model's engine facts -> engine process around the model's
    caches -> served model. ``overrides`` are config keys on top of the YAML and the
    environment; ``steps`` reports progress (3 steps). Returns ``(process, served)``;
    nothing started yet."""
    if steps is None:
        steps = StartupSteps(3, log)
    from kvplane.config import load_config, serving_url_of
    from kvplane.engine.kv.layout import KVLayout, allocate_kv_caches
    from kvplane.process import EngineProcess
    from kvplane.serve.launch import load_model, make_served, served_facts
    from kvplane.serve.progress import mib

    config = load_config(config_path, overrides=overrides)
    if config.serving_url is None:
        url = serving_url_of(options.host, options.port, config.p2p_host)
        config = dataclasses.replace(config, serving_url=url)
    source = f"checkpoint {options.model_dir}" if options.model_dir else "random weights"
    with steps.step(f"loading model {options.model_name} ({source}, device {options.device})"):
        loaded = load_model(options)
        params = sum(p.numel() for p in loaded.model.parameters())
        param_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
        steps.note(
            f"{loaded.shape.num_layers} layers, {params:,} parameters ({mib(param_bytes)}, "
            f"{str(loaded.shape.dtype).removeprefix('torch.')}) on {loaded.device}"
        )
    facts = served_facts(loaded.shape, config, options.model_name, options.max_model_len)
    layout = KVLayout.from_shape(facts.kv)
    kv_bytes = layout.num_layers * layout.num_blocks * layout.block_elems * layout.dtype.itemsize
    with steps.step(
        f"allocating KV caches: {facts.kv.num_layers} layers of {list(layout.cache_shape())} "
        f"{facts.kv.dtype} ({mib(kv_bytes)}) on {loaded.device}"
    ):
        kv_caches = allocate_kv_caches(layout, loaded.device)
    tiers = f"CPU tier {config.max_local_cpu_size:g} GB" if config.local_cpu else "no CPU tier"
    with steps.step(f"building the engine ({tiers}; chunk size {config.chunk_size})"):
        process = EngineProcess(config, facts, kv_caches=kv_caches)
    served = make_served(
        loaded,
        kv_caches,
        facts,
        model_name=options.model_name,
        max_model_len=options.max_model_len,
        cache=process.cache_engine,
    )
    return process, served


def run(args: argparse.Namespace) -> int:

    from kvplane.http_serve import run_http
    from kvplane.serve.app import create_app

    options = options_from_args(args)
    steps = StartupSteps(4, log)
    process, served = build_instance(options, args.config, steps=steps)
    with steps.step("starting the engine's services (internal API, controller worker, p2p)"):
        process.start()
    try:
        log.info(
            "serving %s (KV %s) on http://%s:%d",
            served.name,
            process.layout,
            options.host,
            options.port,
        )
        run_http(create_app(served), options.host, options.port)
    finally:
        log.info("HTTP server closed; stopping the engine process")
        process.stop()
        log.info("stopped")
    return 0
