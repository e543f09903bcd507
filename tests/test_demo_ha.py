"""``make demo-ha`` as a person runs it (kvplane/demo/ha.py): exit code, its tables,
nothing left behind."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.nats_support import nats_binary
from tests.support import REPO_ROOT, kvplane_env

pytestmark = pytest.mark.slow


def table(output: str, first_header: str) -> list[list[str]]:
    """The rows of the table whose header starts with ``first_header``, split on runs of
    two or more spaces; it ends at an unindented line or the next table's header (a line
    above dashes)."""
    lines = [*output.splitlines(), ""]
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(first_header))
    rows = []
    for line, below in zip(lines[start + 2 :], lines[start + 3 :], strict=False):
        if not line.startswith("    ") or below.strip().startswith("--"):
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    return rows


def left_by(workdir: Path) -> list[psutil.Process]:
    """Processes the demo started (its workdir in their command line or environment)."""
    found = []
    for p in psutil.process_iter(["cmdline", "environ"]):
        try:
            env = p.info["environ"] or {}
            if str(workdir) in " ".join(p.info["cmdline"] or []) or env.get(
                "KVPLANE_DEMO_WORKDIR"
            ) == str(workdir):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_demo_ha_keeps_answering_through_the_kills_and_the_replicas_agree(
    tmp_path: Path,
) -> None:
    nats_binary()  # skips without nats-server
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvplane.demo.ha", "--workdir", str(tmp_path)],
        cwd=REPO_ROOT,
        env=kvplane_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=600)  # an outer bound; about 30 s on 2 cores
    except subprocess.TimeoutExpired:
        proc.terminate()  # the demo stops its children on SIGTERM
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    steps = {row[0]: row[1] for row in table(out, "step")}
    killed = next(s for s in steps if s.startswith("killed replica"))
    holder = killed.split()[2]
    other = ({"r1", "r2"} - {holder}).pop()
    assert f"router -> {holder}, {other}" in steps["started"]
    assert steps["lease moved"] == f"{other} holds the lease; the router asks {other}"
    assert f"restarted {holder}" in steps
    assert "replicas agree" in steps
    assert re.fullmatch(r"\d+ processes, none left", steps["stopped"]), steps

    completions = table(out, "completions (router)")
    assert [r[0] for r in completions] == [
        "steady", "replica killed", "NATS node down", "replica back",
    ]  # fmt: skip
    for _, sent, failed, to_a, to_b, _, fallback in completions:
        assert int(sent) > 0 and failed == "0", completions
        assert int(to_a) + int(to_b) == int(sent)
        assert fallback == "0", completions  # every decision had the index's answer
    assert any("prefix" in row[5] for row in completions), completions
    lookups = {r[0]: r[1:] for r in table(out, "lookups")}
    assert set(lookups) == {"r1", "r2"}
    for answered, found, failed in lookups.values():
        assert int(answered) > 0 and int(found) > 0 and failed == "0", lookups
    assert left_by(tmp_path) == []
