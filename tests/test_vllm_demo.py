"""``make demo-vllm`` as a person runs it (the same module, a real vLLM): it passes, shows
the seeds' flow, and leaves no process behind. A failed request prints vLLM's own error."""

from __future__ import annotations

import http.server
import re
import subprocess
import sys
import threading

import pytest

from kvplane.integrations.vllm import demo
from tests.support import REPO_ROOT, kvplane_env
from tests.test_demo import leftover_processes
from tests.vllm_support import vllm_python

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900)]


def test_demo_vllm_runs_end_to_end_and_leaves_nothing(tmp_path):
    vllm_python()
    proc = subprocess.run(
        [sys.executable, "-m", "kvplane.integrations.vllm.demo", "--workdir", str(tmp_path)],
        cwd=REPO_ROOT,
        env=kvplane_env(),
        capture_output=True,
        text=True,
        timeout=840,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    # the prompt was cut to the served model's limit (2,048 tokens, 4 for the answer)
    assert re.search(r"cut to the model's limit: 2044 tokens", out), out
    assert "controller /lookup: {'lmcache_default_instance': ['LocalCPUBackend', 2044]}" in out
    assert re.search(r"kvplane CPU-tier hit\s+\d+ ms\s+bit-identical: True", out), out
    assert "2044 tokens removed" in out
    assert leftover_processes(tmp_path) == []


def test_a_refused_request_shows_the_servers_own_error_body() -> None:
    """The demo's requests raise with the status, the URL and the server's JSON body."""
    body = b'{"error": {"message": "This model\'s maximum context length is 2048 tokens"}}'

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1/completions"
        with pytest.raises(demo.ServerError) as refused:
            demo._post(url, {"prompt": [1, 2, 3]})
        assert "400 from " + url in str(refused.value)
        assert "maximum context length is 2048 tokens" in str(refused.value)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
