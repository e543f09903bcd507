"""The package's promises about itself: the controller side installs and runs without torch."""

import os

import httpx

from tests.controller_client import controller_args
from tests.support import free_ports, kvplane_env, kvplane_process, wait_until


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
