"""``kvplane serve`` as a real process: the seeds' request bodies over real HTTP."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import httpx
import pytest

from tests.support import free_port, kvplane_env, kvplane_process, wait_until

SEED_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
SEED_PROMPT = "Explain the significance of KV cache in language models."


def adjacent_free_ports() -> int:
    """A port p with p and p + 1 both free (the internal API's scheduler and worker 0)."""
    for _ in range(100):
        p = free_port()
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", p + 1)) != 0:
                return p
    raise RuntimeError("no two adjacent free ports")


@pytest.fixture(scope="module")
def instance(tmp_path_factory):
    """(an HTTP client of the server, the internal API's port_start, the server's log)"""
    tmp = tmp_path_factory.mktemp("serve-http")
    cfg = tmp / "example.yaml"
    port, api_port = free_port(), adjacent_free_ports()
    cfg.write_text(
        "chunk_size: 16\nlocal_cpu: True\nmax_local_cpu_size: 0.05\n"
        f"internal_api_server_enabled: true\ninternal_api_server_port_start: {api_port}\n"
    )
    log = tmp / "serve.log"
    env = kvplane_env(LMCACHE_CONFIG_FILE=str(cfg), OMP_NUM_THREADS="1")
    args = ["serve", "--port", str(port), "--max-model-len", "512"]
    with kvplane_process(args, env=env, log_path=log) as proc:
        base = f"http://127.0.0.1:{port}"
        wait_until(
            lambda: proc.poll() is None and httpx.get(f"{base}/health").status_code == 200,
            timeout=300,  # an outer bound: a model load on a busy 2-core machine
            what=f"kvplane serve on {port} (log {log})",
        )
        with httpx.Client(base_url=base, timeout=30) as client:
            yield client, api_port, log


@pytest.fixture
def server(instance):
    return instance[0]


def test_start_up_shows_each_step_with_its_size_and_time(instance):
    lines = [line for line in instance[2].read_text().splitlines() if "start-up " in line]
    steps = [line.split("start-up ", 1)[1] for line in lines]
    for i, what in enumerate(("loading model kvplane/tiny-llama-random (random weights",
                              "allocating KV caches: 4 layers of [2, ", "building the engine (",
                              "starting the engine's services"), start=1):  # fmt: skip
        begin = next(n for n, s in enumerate(steps) if s.startswith(f"{i}/4: {what}"))
        done = next(n for n, s in enumerate(steps) if s.startswith(f"{i}/4: done in "))
        assert begin < done, steps
    assert any(s.startswith("1/4: 4 layers, ") and " parameters (" in s for s in steps), steps
    assert steps[-1].startswith("4/4: done in "), steps


def test_completion_follows_openai_schema_and_second_request_hits(server):
    body = {"model": SEED_MODEL, "prompt": SEED_PROMPT, "max_tokens": 10, "temperature": 0}
    first = server.post("/v1/completions", json=body)
    assert first.status_code == 200
    reply = first.json()
    assert reply["object"] == "text_completion"
    assert reply["id"].startswith("cmpl-")
    assert isinstance(reply["created"], int)
    assert reply["model"] == "kvplane/tiny-llama-random"
    (choice,) = reply["choices"]
    assert set(choice) == {"text", "index", "logprobs", "finish_reason"}
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["finish_reason"] in ("length", "stop")
    n_prompt = len(SEED_PROMPT.encode()) + 1
    usage = reply["usage"]
    assert usage["prompt_tokens"] == n_prompt
    assert usage["total_tokens"] == n_prompt + usage["completion_tokens"]
    assert float(first.headers["x-kvplane-ttft-s"]) > 0

    again = server.post("/v1/completions", json=body).json()
    assert again["choices"][0]["text"] == choice["text"]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == n_prompt - 1


def test_seed_body_without_temperature_samples(server):
    """The seeds' body has no temperature: the default samples (temperature 1.0, the OpenAI
    default), it is not greedy."""

    def text(**extra):
        body = {"model": SEED_MODEL, "prompt": SEED_PROMPT, "max_tokens": 10, **extra}
        reply = server.post("/v1/completions", json=body)
        assert reply.status_code == 200, reply.text
        assert 1 <= reply.json()["usage"]["completion_tokens"] <= 10
        return reply.json()["choices"][0]["text"]

    assert text()  # the seeds' body as written
    greedy = text(temperature=0, ignore_eos=True)
    by_seed = {seed: text(seed=seed, ignore_eos=True) for seed in range(4)}
    assert by_seed == {s: text(seed=s, temperature=1.0, ignore_eos=True) for s in range(4)}
    assert by_seed[0] == text(seed=0, ignore_eos=True)  # a seed makes it repeatable
    assert len(set(by_seed.values())) > 1  # different seeds, different samples
    assert set(by_seed.values()) != {greedy}


def test_tokenize_has_the_seed_shape(server):
    reply = server.post("/tokenize", json={"model": SEED_MODEL, "prompt": SEED_PROMPT}).json()
    assert set(reply) == {"count", "max_model_len", "tokens", "token_strs"}
    assert reply["count"] == len(reply["tokens"]) == len(SEED_PROMPT.encode()) + 1
    assert reply["max_model_len"] == 512
    assert reply["token_strs"] is None
    assert reply["tokens"][0] == 1  # BOS


def test_prompt_lists_and_token_prompts(server):
    tokens = server.post("/tokenize", json={"prompt": "abc"}).json()["tokens"]
    by_tokens = server.post(
        "/v1/completions", json={"prompt": tokens, "max_tokens": 3, "temperature": 0}
    ).json()
    by_text = server.post(
        "/v1/completions", json={"prompt": ["abc", "xyz"], "max_tokens": 3, "temperature": 0}
    ).json()
    assert [c["index"] for c in by_text["choices"]] == [0, 1]
    assert by_text["choices"][0]["text"] == by_tokens["choices"][0]["text"]
    assert by_text["usage"]["prompt_tokens"] == 8


def test_models_and_health(server):
    models = server.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["kvplane/tiny-llama-random"]
    assert models["data"][0]["max_model_len"] == 512
    assert server.get("/health").status_code == 200


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"prompt": "x", "max_tokens": 600}, "max_model_len"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 3}, "prompt"),
        ({"prompt": "x", "max_tokens": 600, "stream": True}, "max_model_len"),
        ({"prompt": []}, "empty"),
        ({"prompt": [1, 5, 100000]}, "token ids"),
    ],
)
def test_bad_requests_are_400_with_a_reason(server, body, fragment):
    reply = server.post("/v1/completions", json=body)
    assert reply.status_code == 400
    assert fragment in reply.json()["error"]["message"]


def test_the_internal_api_server_sees_the_models_paged_caches(instance):
    _, api_port, _ = instance
    worker = httpx.get(f"http://127.0.0.1:{api_port + 1}/cache/kvcache/info", timeout=10)
    assert worker.status_code == 200, worker.text
    info = worker.json()
    assert info["num_layers"] == 4  # the tiny model's layers
    assert info["layers"]["layer_0"]["shape"] == [2, info["num_slots"] // 16, 16, 4, 32]
    assert info["layers"]["layer_0"]["dtype"] == "torch.float32"
    meta = httpx.get(f"http://127.0.0.1:{api_port}/meta", timeout=10).json()
    assert "kvplane/tiny-llama-random" in str(meta)


def _metric(server, name: str) -> float:
    for line in server.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not on /metrics")


def _events(lines: Iterator[str]) -> Iterator[str]:
    """The data of each server-sent event, as it arrives."""
    return (line.removeprefix("data: ") for line in lines if line.startswith("data: "))


def test_streaming_sends_each_token_as_it_is_sampled(server):
    body = {"prompt": "stream me", "max_tokens": 400, "temperature": 0, "ignore_eos": True}
    whole = server.post("/v1/completions", json=body).json()["choices"][0]["text"]
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with server.stream("POST", "/v1/completions", json=stream) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        lines = reply.iter_lines()
        events_in = _events(lines)
        first = json.loads(next(events_in))
        # the first event is here while the server is still generating the rest
        assert _metric(server, "kvplane_serve_num_requests_running") == 1
        events = [first, *(json.loads(e) if e != "[DONE]" else e for e in events_in)]
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 400
    chunks = events[:-2]
    assert all(c["object"] == "text_completion" and c["id"] == first["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_a_client_that_goes_away_stops_its_stream(server):
    before = _metric(server, "kvplane_serve_request_aborts_total")
    body = {"prompt": "abandon", "max_tokens": 500, "ignore_eos": True, "stream": True}
    with server.stream("POST", "/v1/completions", json=body) as reply:
        next(_events(reply.iter_lines()))
    wait_until(
        lambda: _metric(server, "kvplane_serve_request_aborts_total") == before + 1,
        timeout=30,
        what="the abandoned stream counted as an abort",
    )
    assert _metric(server, "kvplane_serve_num_requests_running") == 0
    assert _metric(server, "kvplane_serve_kv_cache_usage_perc") == 0.0
