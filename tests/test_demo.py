"""``kvplane demo`` as a person runs it: exit code, the story it prints, nothing left behind."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import psutil
import pytest

from kvplane.cli import build_parser
from tests.support import REPO_ROOT, kvplane_env

pytestmark = pytest.mark.slow


def controller_available() -> bool:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return "controller" in sub.choices  # type: ignore[operator]


def run_demo(tmp_path, *extra: str) -> tuple[int, str, float]:
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "kvplane", "demo", "--workdir", str(tmp_path), *extra],
        cwd=REPO_ROOT,
        env=kvplane_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def leftover_processes(tmp_path) -> list[psutil.Process]:
    """Any process still running with a config or log of this demo's workdir."""
    left = []
    for p in psutil.process_iter(["cmdline", "environ"]):
        try:
            env = p.info["environ"] or {}
            if str(tmp_path) in " ".join(p.info["cmdline"] or []) or str(tmp_path) in str(
                env.get("LMCACHE_CONFIG_FILE", "")
            ):
                left.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return left


def _ttft_ms(output: str, label: str) -> float:
    match = re.search(rf"^\s+{label}\s+\d+\s+\d+\s+([\d.]+) ms", output, re.M)
    assert match, output
    return float(match.group(1))


def test_demo_without_controller_shows_ttft_gain_and_leaves_nothing(tmp_path):
    code, out, elapsed = run_demo(tmp_path, "--no-controller", "--prefix-tokens", "2000")
    assert code == 0, out
    assert "instance-a ready" in out and "instance-b ready" in out
    assert _ttft_ms(out, "second") < _ttft_ms(out, "first")
    assert re.search(r"second\s+\d+\s+1792\s", out), out  # 7 whole chunks of 256 cached
    assert "no process left" in out
    assert leftover_processes(tmp_path) == []
    assert elapsed < 120


@pytest.mark.skipif(not controller_available(), reason="kvplane controller not merged yet")
def test_full_demo_runs_every_seed_flow_in_under_two_minutes(tmp_path):
    code, out, elapsed = run_demo(tmp_path)
    assert code == 0, out
    assert "both workers registered with the controller" in out
    assert re.search(r"instance-a\s+LocalCPUBackend\s+(\d+) of \1", out), out
    assert "/query_worker_info instance-a" in out
    assert re.search(r"/clear instance-a LocalCPUBackend: \d+ tokens cleared", out), out
    assert "no process left" in out
    assert leftover_processes(tmp_path) == []
    assert elapsed < 120
