"""The package's promises about itself: the controller side installs and runs without torch,
and the package metadata builds without deprecation warnings."""

import os
import warnings
from pathlib import Path

import httpx

from tests.controller_client import controller_args
from tests.support import free_ports, kvplane_env, kvplane_process, wait_until

ROOT = Path(__file__).resolve().parent.parent


def test_controller_starts_and_answers_without_torch(tmp_path):
    # A 'torch' that cannot be imported shadows the real one: any import of it fails loudly.
    shim = tmp_path / "shim" / "torch"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('torch is not installed here')\n")
    env = kvplane_env()
    env["PYTHONPATH"] = str(shim.parent) + os.pathsep + env["PYTHONPATH"]
    http, pull, reply = free_ports(3)
    args = controller_args(http, pull, reply)
    log = tmp_path / "controller.log"
    with kvplane_process(args, env=env, log_path=log) as proc, httpx.Client(timeout=5) as client:
        r = wait_until(
            lambda: client.post(f"http://127.0.0.1:{http}/lookup", json={"tokens": [1, 2, 3]}),
            timeout=60,
            what="controller /lookup",
        )
        assert r.status_code == 200
        assert r.json()["layout_info"] == {}
        assert proc.poll() is None
    assert "torch is not installed here" not in log.read_text()


def test_pyproject_metadata_applies_without_setuptools_warnings():
    # A fresh `make demo` installs with `pip install -e .`; setuptools warns there about
    # anything deprecated in our pyproject (e.g. a `license` table instead of an SPDX string).
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), str(ROOT / "pyproject.toml"))
    # Only setuptools' own: the window also records what other threads warn about meanwhile.
    ours = [w for w in caught if "setuptools" in w.filename or "Setuptools" in w.category.__name__]
    assert [str(w.message) for w in ours] == []
    assert dist.metadata.license_expression == "Apache-2.0"
