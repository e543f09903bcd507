"""The seeds' lookup and query_worker_info flows, as written, against real processes.

controller_lookup.rst / controller_query_worker_info.rst: the seeds' ``example.yaml`` (ports
replaced by free ones), ``kvplane controller --host localhost --port C --monitor-port PULL``
(the seeds' command line), ``LMCACHE_CONFIG_FILE=example.yaml kvplane serve --port S``, then
the seeds' curl bodies over real HTTP.
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.support import free_ports, kvplane_env, kvplane_process, wait_until

pytestmark = pytest.mark.slow

SEED_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
SEED_PROMPT = "Explain the significance of KV cache in language models."
INSTANCE = "lmcache_default_instance"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seed-flows")
    c_port, pull, serve_port, worker_port, p2p_port = free_ports(5)
    cfg = tmp / "example.yaml"
    cfg.write_text(
        "chunk_size: 256\n"
        "local_cpu: True\n"
        "max_local_cpu_size: 5\n"
        "\n"
        "# cache controller configurations\n"
        "enable_controller: True\n"
        f'lmcache_instance_id: "{INSTANCE}"\n'
        f'controller_pull_url: "localhost:{pull}"\n'
        f"lmcache_worker_ports: {worker_port}\n"
        "\n"
        "# Peer identifiers\n"
        'p2p_host: "localhost"\n'
        f"p2p_init_ports: {p2p_port}\n"
    )
    controller_args = ["controller", "--host", "localhost", "--port", str(c_port)]
    with (
        kvplane_process(
            [*controller_args, "--monitor-port", str(pull)], log_path=tmp / "controller.log"
        ),
        kvplane_process(
            ["serve", "--port", str(serve_port)],
            env=kvplane_env(LMCACHE_CONFIG_FILE=str(cfg), OMP_NUM_THREADS="1"),
            log_path=tmp / "serve.log",
        ),
    ):
        serve = httpx.Client(base_url=f"http://localhost:{serve_port}", timeout=30)
        controller = httpx.Client(base_url=f"http://localhost:{c_port}", timeout=30)
        wait_until(lambda: serve.get("/health").status_code == 200, timeout=90, what="serve")
        yield serve, controller, worker_port, p2p_port
        serve.close()
        controller.close()


def test_lookup_after_a_completion_names_the_instance_tier_and_prompt_length(cluster):
    serve, controller, _, _ = cluster
    completion = serve.post(
        "/v1/completions", json={"model": SEED_MODEL, "prompt": SEED_PROMPT, "max_tokens": 10}
    )
    assert completion.status_code == 200
    tokenized = serve.post("/tokenize", json={"model": SEED_MODEL, "prompt": SEED_PROMPT}).json()
    tokens = tokenized["tokens"]
    assert tokenized["count"] == len(tokens)

    def looked_up():
        reply = controller.post("/lookup", json={"tokens": tokens})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        return body if body["layout_info"].get(INSTANCE) else None

    body = wait_until(looked_up, timeout=15, what="the controller to index the prompt")
    assert isinstance(body["event_id"], str) and body["event_id"]
    assert body["layout_info"] == {INSTANCE: ["LocalCPUBackend", len(tokens)]}


def test_query_worker_info_returns_the_registered_worker(cluster):
    _, controller, worker_port, p2p_port = cluster

    def infos():
        reply = controller.post(
            "/query_worker_info", json={"instance_id": INSTANCE, "worker_ids": [0]}
        )
        return reply.json() if reply.status_code == 200 and reply.json()["worker_infos"] else None

    body = wait_until(infos, timeout=30, what="the worker to register")
    assert isinstance(body["event_id"], str) and body["event_id"]
    (info,) = body["worker_infos"]
    assert info["instance_id"] == INSTANCE
    assert info["worker_id"] == 0
    assert info["ip"] in ("127.0.0.1", "localhost", "::1")
    assert info["port"] == worker_port
    assert info["peer_init_url"].endswith(f":{p2p_port}")
    now = time.time()
    assert now - 120 < info["registration_time"] <= info["last_heartbeat_time"] <= now + 1
