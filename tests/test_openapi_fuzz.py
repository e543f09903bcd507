"""Both HTTP APIs against their own OpenAPI documents: the documents validate, and
schemathesis, with all its checks and phases, finds nothing on running processes.

Processes dedicated to this module: a controller with a bearer token (``--api-token``: its
mutating calls need it) and one ``kvplane engine`` that registers with it (so the cluster
operations reach a real worker and engine) and serves both internal API roles (scheduler,
worker 0) over TCP, guarded by a bearer token, with every kind of tier it can have at once
(CPU, disk, FSConnector, P2P); and a second controller, with ``--protect-reads`` too, that
no engine registers with. Schemathesis runs as its CLI would for a user (``python -m
schemathesis.cli run``) with the settings in ``tests/fuzz/*.toml``, on each controller with
the token and without it; what those settings relax, and why, is written there and in
docs/verification.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import httpx
import pytest
from openapi_spec_validator import validate

from kvplane.controller.http import ALWAYS_OPEN, READ_POSTS
from kvplane.web.openapi import operations
from tests.controller_client import controller_args, wait_controller_up
from tests.support import (
    consecutive_free_ports,
    free_ports,
    kvplane_env,
    kvplane_process,
    wait_until,
)

pytestmark = pytest.mark.slow

TOKEN = "fuzz-token"
AUTH = f"Authorization: Bearer {TOKEN}"
# Fixed, so that a run is repeatable; schemathesis prints the seed of a failing run too.
SEED = "20261201"
MAX_EXAMPLES = 20  # per operation in the fuzzing phase (coverage and examples: all theirs)
FUZZ_TIMEOUT = 240  # seconds for one schemathesis run; the six take ~100 s on 2 cores
FUZZ_DIR = Path(__file__).resolve().parent / "fuzz"


class Apis(NamedTuple):
    controller: str  # --api-token; the engine's instance "inst-a" is registered
    reads_guarded: str  # --api-token --protect-reads; no instance
    scheduler: str
    worker: str


@pytest.fixture(scope="module")
def apis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Apis]:
    tmp = tmp_path_factory.mktemp("fuzz")
    http, pull, reply, worker_port, p2p_port, *guarded = free_ports(8)
    api_port = consecutive_free_ports(2)
    (tmp / "fs").mkdir()
    cfg = {
        "chunk_size": 16, "kv_num_layers": 2, "kv_num_heads": 2, "kv_head_size": 16,
        "kv_block_size": 16, "kv_num_blocks": 64, "max_local_cpu_size": 0.01,
        "local_disk": str(tmp / "disk"), "max_local_disk_size": 0.01,
        "remote_url": f"fs://{tmp / 'fs'}",
        "enable_controller": True, "lmcache_instance_id": "inst-a",
        "controller_pull_url": f"127.0.0.1:{pull}", "controller_reply_url": f"127.0.0.1:{reply}",
        "lmcache_worker_ports": [worker_port], "lmcache_worker_heartbeat_time": 0.5,
        "enable_p2p": True, "p2p_host": "127.0.0.1", "p2p_init_ports": [p2p_port],
        "internal_api_server_enabled": True, "internal_api_server_port_start": api_port,
        "internal_api_server_include_index_list": [0, 1],
        "internal_api_server_token": TOKEN,
    }  # fmt: skip
    config_path = tmp / "engine.yaml"
    config_path.write_text(json.dumps(cfg))  # JSON is YAML
    apis = Apis(
        f"http://127.0.0.1:{http}",
        f"http://127.0.0.1:{guarded[0]}",
        f"http://127.0.0.1:{api_port}",
        f"http://127.0.0.1:{api_port + 1}",
    )
    token = ["--api-token", TOKEN]
    with (
        kvplane_process([*controller_args(http, pull, reply), *token], log_path=tmp / "c.log"),
        kvplane_process(
            [*controller_args(*guarded), *token, "--protect-reads"], log_path=tmp / "rg.log"
        ),
    ):
        wait_controller_up(apis.controller)
        wait_controller_up(apis.reads_guarded)
        engine = ["engine", "--config", str(config_path)]
        with kvplane_process(engine, log_path=tmp / "engine.log"):
            for url in (apis.scheduler, apis.worker):
                wait_until(lambda u=url: httpx.get(u + "/meta", timeout=2).status_code == 200,
                           timeout=180, what=f"internal API {url}")  # fmt: skip
            wait_until(
                lambda: httpx.post(
                    apis.controller + "/query_worker_info", json={"instance_id": "inst-a"}
                ).status_code == 200,
                timeout=60, what="the engine registered",
            )  # fmt: skip
            yield apis


def _document(url: str) -> dict[str, object]:
    resp = httpx.get(url + "/openapi.json", timeout=10)
    assert resp.status_code == 200, resp.text
    document: dict[str, object] = resp.json()
    return document


def test_every_document_is_valid_openapi(apis: Apis) -> None:
    for url in apis:
        document = _document(url)
        validate(document)  # raises naming the first invalid part
        assert str(document["openapi"]).startswith("3.1")
        text = json.dumps(document)
        assert '"422"' not in text, "validation errors answer 400, not FastAPI's 422"


def test_the_worker_document_names_this_engines_tiers_and_its_token(apis: Apis) -> None:
    document = _document(apis.worker)
    bypass = document["paths"]["/bypass/add"]["put"]  # type: ignore[index]
    (name,) = [p for p in bypass["parameters"] if p["name"] == "backend_name"]
    tiers = httpx.get(apis.worker + "/bypass/list", timeout=5).json()["all_backends"]
    assert sorted(tiers) == ["FSConnector", "LocalCPUBackend", "LocalDiskBackend", "P2PBackend"]
    assert name["schema"]["enum"] == tiers
    assert bypass["security"] == [{"bearer": []}] and "401" in bypass["responses"]
    assert "security" not in document["paths"]["/meta"]["get"]  # type: ignore[index]


def _body_fields(document: dict[str, Any], operation: dict[str, Any]) -> set[str]:
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    if "$ref" in schema:
        schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return set(schema["properties"])


def test_the_controller_documents_declare_links_and_who_needs_the_token(apis: Apis) -> None:
    """Each link names an operation of the document and only fields of its body; the token
    is declared (security, 401, 403) on exactly the operations that need it."""
    for url, reads_guarded in ((apis.controller, False), (apis.reads_guarded, True)):
        document = _document(url)
        by_id = {op["operationId"]: op for _, _, op in operations(document)}
        links = 0
        for path, method, op in operations(document):
            for answer in op["responses"].values():
                for name, link in answer.get("links", {}).items():
                    target = by_id[link["operationId"]]
                    assert set(link["requestBody"]) <= _body_fields(document, target), name
                    links += 1
            guarded = path not in ALWAYS_OPEN and (
                reads_guarded or (method == "post" and path not in READ_POSTS)
            )
            declared = "security" in op and {"401", "403"} <= set(op["responses"])
            assert declared == guarded, (url, method, path)
            assert guarded or not {"401", "403"} & set(op["responses"]), (method, path)
        assert links >= 20, links
        status = document["paths"]["/status"]["get"]["responses"]["200"]["links"]
        assert {"QueryWorkerInfo", "Health", "Clear", "Pin", "Move"} <= set(status)


ALL_PHASES = "examples,coverage,fuzzing,stateful"


def _schemathesis(
    url: str, config: str, *headers: str, tmp: Path, phases: str = ALL_PHASES
) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "schemathesis.cli", "--no-color"]
    args += ["--config-file", str(FUZZ_DIR / config), "run", url + "/openapi.json"]
    args += ["--checks", "all", "--phases", phases]
    args += ["--max-examples", str(MAX_EXAMPLES), "--seed", SEED, "--workers", "1"]
    args += ["--request-timeout", "30", "--report", "ndjson", "--report-dir", str(tmp)]
    for header in headers:
        args += ["-H", header]
    return subprocess.run(
        args,
        cwd=tmp,
        env=kvplane_env(NO_COLOR="1", SCHEMATHESIS_TELEMETRY="false"),
        capture_output=True,
        text=True,
        timeout=FUZZ_TIMEOUT,
        check=False,
    )


def _scenarios(report_dir: Path) -> Iterator[dict[str, Any]]:
    """Each finished scenario of schemathesis's NDJSON report: its ``phase`` and ``recorder``
    (every request it sent and the answer, by case id)."""
    (report,) = report_dir.glob("*.ndjson")
    for line in report.read_text().splitlines():
        scenario = json.loads(line).get("ScenarioFinished")
        if scenario is not None:
            yield scenario


def _assert_clean(
    run: subprocess.CompletedProcess[str], report_dir: Path, phases: str = ALL_PHASES
) -> None:
    """Schemathesis found nothing, every phase asked for sent requests, and none of them,
    in any phase, was answered 5xx (a server error is never what a request deserves)."""
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-12000:]
    assert "No issues found" in out or " passed" in out, out[-4000:]
    sent: Counter[str] = Counter()
    server_errors = []
    for scenario in _scenarios(report_dir):
        for interaction in scenario["recorder"].get("interactions", {}).values():
            sent[scenario["phase"]] += 1
            request, response = interaction["request"], interaction["response"]
            if response is not None and response["status_code"] >= 500:
                server_errors.append(
                    f"{scenario['phase']}: {request['method']} {request['uri']} -> "
                    f"{response['status_code']}"
                )
    assert server_errors == [], server_errors[:20]
    assert set(phases.split(",")) <= set(sent), sent


def _answers_to(report_dir: Path, method: str, path: str) -> dict[str, Counter[int]]:
    """From schemathesis's NDJSON report: per phase, how often ``method path`` was
    answered by each status code."""
    answers: dict[str, Counter[int]] = defaultdict(Counter)
    for scenario in _scenarios(report_dir):
        for interaction in scenario["recorder"].get("interactions", {}).values():
            request, response = interaction["request"], interaction["response"]
            if (request["method"], urlsplit(request["uri"]).path) == (method, path):
                answers[scenario["phase"]][0 if response is None else response["status_code"]] += 1
    return answers


def _link_answers(report_dir: Path) -> dict[str, Counter[int]]:
    """From schemathesis's NDJSON report: for each link (``GET /status -> [200] Health ->
    POST /health``), how often the stateful phase followed it, putting the values it carries
    into the request, answered by each status code."""
    answers: dict[str, Counter[int]] = defaultdict(Counter)
    for scenario in _scenarios(report_dir):
        if scenario.get("phase") != "stateful":
            continue
        recorder = scenario["recorder"]
        for case_id, node in recorder.get("cases", {}).items():
            if "transition" in node and node.get("is_transition_applied"):
                response = recorder["interactions"][case_id]["response"]
                answers[node["transition"]["id"]][response["status_code"]] += 1
    return answers


# The fuzzing phase runs once per document, where its requests get furthest: on the
# controller with an instance, with the token. The other runs (no instance, or no token, so
# that most calls end at the guard) run every check in the other phases.
CONTROLLER_RUNS = [
    pytest.param("controller", AUTH, ALL_PHASES, id="controller-token"),
    pytest.param("controller", None, "examples,coverage,stateful", id="controller-no-token"),
    pytest.param("reads_guarded", AUTH, "examples,coverage,stateful", id="reads_guarded-token"),
    pytest.param("reads_guarded", None, "examples,coverage,stateful", id="reads_guarded-no-token"),
]


@pytest.mark.parametrize(("which", "auth", "phases"), CONTROLLER_RUNS)
def test_schemathesis_finds_nothing_on_the_controller(
    apis: Apis, which: str, auth: str | None, phases: str, tmp_path: Path
) -> None:
    """Every check holds with the token and without it: the document declares the 401/403
    of each operation that needs it. On the controller with an instance the stateful phase
    carries real ids along the document's links (from ``/status`` and ``/query_worker_info``
    to the calls that name an instance, from each answer's ``event_id`` to
    ``/check_finish``), and some call that names an instance is answered 2xx that way.
    ``/lookup``, which a middleware serves and its models document, is fuzzed like the
    rest: every phase calls it, and where it is open it is answered both 200 and 400."""
    headers = [auth] if auth else []
    _assert_clean(
        _schemathesis(
            getattr(apis, which), "controller.toml", *headers, tmp=tmp_path, phases=phases
        ),
        tmp_path,
        phases,
    )
    lookup = _answers_to(tmp_path, "POST", "/lookup")
    assert set(phases.split(",")) <= set(lookup), dict(lookup)
    if which == "controller" or auth:
        assert {200, 400} <= set(sum(lookup.values(), Counter())), dict(lookup)
    if which == "controller":
        answers = _link_answers(tmp_path)
        succeeded = {
            link
            for link, codes in answers.items()
            if any(200 <= code < 300 for code in codes)
            and not link.endswith("-> POST /check_finish")  # 200 for any event id
        }
        assert succeeded, f"no link to an instance answered 2xx: {dict(answers)}"


@pytest.mark.parametrize("role", ["scheduler", "worker"])
def test_schemathesis_finds_nothing_on_the_internal_api(
    apis: Apis, role: str, tmp_path: Path
) -> None:
    """The stateful phase follows the document's links (from the tiers listed to bypassing
    one and back, from a store to retrieving it) with this engine's real values."""
    url = getattr(apis, role)
    _assert_clean(_schemathesis(url, "internal_api.toml", AUTH, tmp=tmp_path), tmp_path)
    answers = _link_answers(tmp_path)
    assert any(200 <= code < 300 for codes in answers.values() for code in codes), answers


def test_the_fuzzed_processes_still_serve(apis: Apis) -> None:
    """After the fuzzing, and an operator putting back the switches and the config it
    changed, the engine still stores and the controller still routes to it."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    restore = {"max_local_cpu_size": 0.01, "save_unfull_chunk": True, "min_retrieve_tokens": 0}
    resp = httpx.post(apis.worker + "/conf", json=restore, headers=auth, timeout=30)
    assert resp.status_code == 200, resp.text
    tiers = httpx.get(apis.worker + "/bypass/list", timeout=5).json()["all_backends"]
    for tier in tiers:
        httpx.put(apis.worker + "/bypass/remove", params={"backend_name": tier}, headers=auth)
    for switch in ("/freeze/disable", "/hot_cache/enable"):
        assert httpx.put(apis.worker + switch, headers=auth, timeout=10).status_code == 200
    tokens = list(range(900_000, 900_000 + 48))
    resp = httpx.post(
        apis.worker + "/cache/store",
        params={"tokens_input": ",".join(map(str, tokens))},
        headers=auth,
        timeout=30,
    )
    assert resp.status_code == 200 and resp.json()["num_stored_tokens"] == 48, resp.text

    def routed() -> bool:
        body = httpx.post(apis.controller + "/lookup", json={"tokens": tokens}, timeout=10)
        return body.json()["layout_info"].get("inst-a", [None, 0])[1] == 48

    wait_until(routed, timeout=30, what="the controller routes the new prefix to inst-a")
