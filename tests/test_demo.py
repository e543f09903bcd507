"""``kvplane demo`` as a person runs it: exit code, the story it prints, nothing left behind."""

from __future__ import annotations

import re
import subprocess
import sys

import psutil
import pytest

from tests.support import REPO_ROOT, kvplane_env

pytestmark = pytest.mark.slow


def run_demo(tmp_path, *extra: str) -> tuple[int, str]:
    """Run the demo; the subprocess timeout bounds it (its speed is benchmarked, not tested)."""
    proc = subprocess.run(
        [sys.executable, "-m", "kvplane", "demo", "--workdir", str(tmp_path), *extra],
        cwd=REPO_ROOT,
        env=kvplane_env(),
        capture_output=True,
        text=True,
        timeout=900,  # an outer bound: the demo gives up on its own after 300 s of start-up
    )
    return proc.returncode, proc.stdout + proc.stderr


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


def summary(output: str) -> dict[str, str]:
    """The closing summary table: step -> result."""
    lines = output.split("\nsummary\n", 1)[1].splitlines()
    assert lines[0].split() == ["step", "result"], lines
    width = lines[1].strip().index(" ")  # the first column's dashes
    rows = {}
    for line in lines[2:]:
        if not line.startswith("    "):
            break
        rows[line[4 : 4 + width].strip()] = line[4 + width :].strip()
    return rows


def test_demo_without_controller_serves_the_second_prompt_from_cache_and_leaves_nothing(
    tmp_path,
):
    code, out = run_demo(tmp_path, "--no-controller", "--prefix-tokens", "2000")
    assert code == 0, out
    assert "instance-a ready" in out and "instance-b ready" in out
    assert _ttft_ms(out, "first") > 0 and _ttft_ms(out, "second") > 0  # both reported
    assert re.search(r"second\s+\d+\s+1792\s", out), out  # 7 whole chunks of 256 cached
    assert "no process left" in out
    rows = summary(out)
    assert list(rows) == ["start-up", "first completion", "second completion", "shutdown"]
    assert rows["start-up"].startswith("2 servers ready after ")
    assert re.fullmatch(r"1792 of \d+ tokens cached, TTFT [\d.]+ ms \([\d.]+x sooner\)",
                        rows["second completion"]), rows  # fmt: skip
    assert rows["shutdown"] == "2 processes stopped, none left"
    assert leftover_processes(tmp_path) == []


def test_full_demo_runs_every_seed_flow(tmp_path):
    code, out = run_demo(tmp_path)
    assert code == 0, out
    assert "both workers registered with the controller" in out
    assert re.search(r"instance-a\s+LocalCPUBackend\s+(\d+) of \1", out), out
    assert "/query_worker_info instance-a" in out
    assert re.search(r"/clear instance-a LocalCPUBackend: \d+ tokens cleared", out), out
    assert "no process left" in out
    # the cluster as `kvplane status` shows it, before the clear
    assert re.search(r"kvplane cluster at http://127\.0\.0\.1:\d+ \(.*\): 2 instance\(s\), "
                     r"2 worker\(s\), \d+ chunk\(s\)", out), out  # fmt: skip
    assert re.search(r"^\s+instance-a\s+0\s+tcp://127\.0\.0\.1:\d+\s", out, re.M), out
    rows = summary(out)
    assert list(rows) == [
        "start-up", "first completion", "second completion", "/lookup first prompt",
        "/lookup unseen prompt", "/query_worker_info", "kvplane status", "/clear", "shutdown",
    ]  # fmt: skip
    assert rows["start-up"].startswith("controller + 2 servers ready after ")
    assert re.fullmatch(r"instance-a LocalCPUBackend (\d+) of \1", rows["/lookup first prompt"])
    assert rows["/query_worker_info"] == "instance-a: 1 worker(s) registered"
    assert rows["shutdown"] == "3 processes stopped, none left"
    assert leftover_processes(tmp_path) == []
