"""The controller's locks: the bearer token on its HTTP API, CURVE on its worker ports.

Real controller processes on loopback. Workers are protocol-level clients
(tests/controller_client.py) where a test needs exact frames or a bad key, and the real
engine-backed worker (an :class:`~kvplane.process.EngineProcess` in this process) where
it needs the real thing: registering, reporting, answering commands over CURVE.
"""

from __future__ import annotations

import contextlib
import json
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import zmq

from kvplane.curve import KeyPair, load_key_pair, load_public_key, make_client, write_key_pair
from kvplane.keys import chunk_hashes
from kvplane.protocol import ClearCommand, CommandReply, decode, encode
from kvplane.worker.link import ClientCurve
from tests.controller_client import ControllerProc, ProtoWorker, controller_args
from tests.support import (
    free_ports,
    kvplane_env,
    kvplane_process,
    run_kvplane,
    stop_process,
    wait_until,
)

TOKEN = "s3cret-token"
GOOD = {"Authorization": f"Bearer {TOKEN}"}
TOKENS = list(range(10))  # chunk_size 4: three chunks


@contextlib.contextmanager
def controller(
    tmp_path: Path, *extra: str, env: dict[str, str] | None = None, name: str = "controller"
) -> Iterator[ControllerProc]:
    http, pull, reply = free_ports(3)
    args = [*controller_args(http, pull, reply, command_timeout=2), *extra]
    log = tmp_path / f"{name}.log"
    with kvplane_process(args, env=kvplane_env(**(env or {})), log_path=log):
        url = f"http://127.0.0.1:{http}"
        wait_until(
            lambda: httpx.get(url + "/healthz", timeout=1).status_code == 200,
            timeout=30,
            what="controller /healthz",
        )
        yield ControllerProc(url, pull, reply, log)


def call(
    c: ControllerProc, method: str, path: str, headers: Any = None, **kw: Any
) -> httpx.Response:
    return httpx.request(method, c.url + path, headers=headers, timeout=15, **kw)


# Every call that changes state, with a valid body.
MUTATING = [
    ("POST", "/clear", {"instance_id": "A", "location": "LocalCPUBackend"}),
    ("POST", "/pin", {"instance_id": "A", "location": "LocalCPUBackend", "tokens": TOKENS}),
    ("POST", "/compress", {"instance_id": "A", "method": "cachegen", "location": "LocalCPUBackend"}),
    ("POST", "/decompress", {"instance_id": "A", "method": "cachegen", "location": "LocalCPUBackend"}),
    ("POST", "/move", {"old_position": ["A", "LocalCPUBackend"], "new_position": ["A", "LocalDiskBackend"]}),
    ("POST", "/loglevel", {"logger_name": "kvplane.auth_test", "level": "DEBUG"}),
]  # fmt: skip
READS = [
    ("POST", "/lookup", {"tokens": TOKENS}),
    ("POST", "/health", {"instance_id": "A"}),
    ("POST", "/query_worker_info", {"instance_id": "A"}),
    ("POST", "/query_instance", {"ip": "127.0.0.1"}),
    ("POST", "/check_finish", {"event_id": "nope"}),
    ("GET", "/metrics", None),
    ("GET", "/conf", None),
    ("GET", "/threads", None),
    ("GET", "/loglevel", None),
]


def test_token_guards_every_mutating_call_and_reads_stay_open(tmp_path: Path) -> None:
    with controller(tmp_path, env={"KVPLANE_CONTROLLER_TOKEN": TOKEN}) as c:
        worker = ProtoWorker(c.pull, c.reply, "A", port=free_ports(1)[0])
        seen: list[Any] = []
        worker.serve_commands(lambda cmd: seen.append(cmd) or CommandReply(num_tokens=12))
        try:
            assert worker.register().ok
            worker.report(chunk_hashes(TOKENS, 4))
            wait_until(lambda: c.lookup(TOKENS) == {"A": ["LocalCPUBackend", 10]}, timeout=10)
            for method, path, body in READS:
                r = call(c, method, path, json=body)
                assert r.status_code in (200, 404), (path, r.text)  # no such event: 404
            assert call(c, "GET", "/conf").json()["api_token"] == "***"
            seen.clear()  # /health asked the worker
            for method, path, body in MUTATING:
                r = call(c, method, path, json=body)
                assert (r.status_code, r.json()["error"]) == (401, "Unauthorized"), path
                assert r.headers["www-authenticate"] == "Bearer"
                r = call(c, method, path, {"Authorization": "Bearer wrong"}, json=body)
                assert (r.status_code, set(r.json())) == (403, {"error", "message"}), path
                # The token is checked before the body is read: a broken body is refused too.
                r = call(c, method, path, content=b"{not json")
                assert r.status_code == 401, path
            assert seen == []  # nothing refused reached the worker
            assert c.lookup(TOKENS) == {"A": ["LocalCPUBackend", 10]}
            level = call(
                c, "GET", "/loglevel", params={"logger_name": "kvplane.controller"}
            ).json()["level"]
            # A GET never sets a level on the controller, token or not.
            for headers in (None, GOOD):
                r = call(c, "GET", "/loglevel", headers, params={"logger_name": "kvplane.controller", "level": "CRITICAL"})  # fmt: skip
                assert (r.status_code, r.json()["error"]) == (400, "Use POST")
                assert "POST /loglevel" in r.json()["message"]
            assert (
                call(c, "GET", "/loglevel", params={"logger_name": "kvplane.controller"}).json()[
                    "level"
                ]
                == level
            )
            r = call(
                c,
                "POST",
                "/loglevel",
                GOOD,
                json={"logger_name": "kvplane.controller", "level": "warning"},
            )
            assert r.status_code == 200 and r.json()["level"] == "WARNING"
            r = call(c, "POST", "/clear", GOOD, json=MUTATING[0][2])
            assert r.status_code == 200 and r.json()["num_tokens"] == 12
            assert [type(cmd).__name__ for cmd in seen] == ["ClearCommand"]
            schema = call(c, "GET", "/openapi.json").json()
        finally:
            worker.close()
    assert schema["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
    }
    for method, path, _ in MUTATING:
        op = schema["paths"][path][method.lower()]
        assert op["security"] == [{"bearer": []}] and {"401", "403"} <= set(op["responses"])
    for method, path, _ in READS:
        op = schema["paths"][path][method.lower()]
        assert "security" not in op and "401" not in op["responses"], path


def test_protect_reads_guards_reads_but_healthz(tmp_path: Path) -> None:
    with controller(tmp_path, "--api-token", TOKEN, "--protect-reads") as c:
        for method, path, body in READS:
            r = call(c, method, path, json=body)
            assert (r.status_code, r.json()["error"]) == (401, "Unauthorized"), path
            r = call(c, method, path, {"Authorization": "Bearer wrong"}, json=body)
            assert r.status_code == 403, path
            assert call(c, method, path, GOOD, json=body).status_code in (200, 404), path
        r = call(c, "POST", "/lookup", GOOD, json={"tokens": TOKENS})
        assert r.json()["layout_info"] == {}
        # A call that no route serves runs nothing, so it is answered as such, token or not:
        # a method the path lacks is a 405 naming the ones it has, a path none has a 404.
        for headers in (None, GOOD):
            for method, path, allow in (("TRACE", "/status", "GET"), ("PUT", "/conf", "GET")):
                r = call(c, method, path, headers)
                assert (r.status_code, r.headers["allow"]) == (405, allow), (method, path)
            assert call(c, "POST", "/no-such-path", headers, json={}).status_code == 404
        assert call(c, "GET", "/healthz").status_code == 200  # liveness probes stay open
        assert call(c, "GET", "/conf", GOOD).json()["protect_reads"] is True
        lookup = call(c, "GET", "/openapi.json").json()["paths"]["/lookup"]["post"]
        assert lookup["security"] == [{"bearer": []}]
        # kvplane status reads /status: it says what is missing, and passes the token.
        out = run_kvplane(["status", "--controller", c.url], timeout=30)
        assert out.returncode == 2 and "answered 401" in out.stdout and "--api-token" in out.stdout
        assert "Traceback" not in out.stdout
        out = run_kvplane(["status", "--controller", c.url, "--api-token", TOKEN], timeout=30)
        assert out.returncode == 0 and "0 instance(s)" in out.stdout, out.stdout


def test_public_bind_without_token_or_curve_warns_at_start(tmp_path: Path) -> None:
    """Bound to 0.0.0.0 the controller warns; the pull port is held here, so it exits at
    once (code 1) without ever listening beyond loopback."""
    http, pull, reply = free_ports(3)
    holder = socket.socket()
    holder.bind(("127.0.0.1", pull))
    holder.listen()
    try:
        args = ["controller", "--host", "0.0.0.0", "--port", str(http)]
        args += ["--monitor-ports", json.dumps({"pull": pull, "reply": reply})]
        out = run_kvplane(args, timeout=30)
        assert out.returncode == 1, out.stdout
        assert "without an API token" in out.stdout and "--api-token" in out.stdout
        assert "without CURVE on its worker ports" in out.stdout
        assert "cannot bind its worker ports" in out.stdout and "Traceback" not in out.stdout
        keys = tmp_path / "keys"
        assert (
            run_kvplane(["keygen", str(keys), "--name", "controller"], timeout=30).returncode == 0
        )
        (keys / "workers").mkdir()
        run_kvplane(["keygen", str(keys / "workers"), "--name", "w"], timeout=30)
        curve = ["--curve-secret-key-file", str(keys / "controller.key_secret")]
        curve += ["--curve-allowed-keys-dir", str(keys / "workers")]
        out = run_kvplane([*args, "--api-token", TOKEN, *curve], timeout=30)
        assert out.returncode == 1 and "cannot bind" in out.stdout
        assert "without an API token" not in out.stdout and "without CURVE" not in out.stdout
    finally:
        holder.close()


# --- CURVE on the worker ports ---------------------------------------------------------------


def keygen(directory: Path, name: str) -> KeyPair:
    """What ``kvplane keygen DIR --name NAME`` does (tested as a command below)."""
    _, secret = write_key_pair(directory, name)
    return load_key_pair(secret, "test")


def test_keygen_writes_a_pair_and_never_overwrites(tmp_path: Path) -> None:
    out = run_kvplane(["keygen", str(tmp_path / "k"), "--name", "ctl"], timeout=30)
    assert out.returncode == 0 and "ctl.key_secret" in out.stdout, out.stdout
    keys = load_key_pair(tmp_path / "k" / "ctl.key_secret", "test")
    assert load_public_key(tmp_path / "k" / "ctl.key", "test") == keys.public
    assert stat.S_IMODE((tmp_path / "k" / "ctl.key_secret").stat().st_mode) == 0o600
    before = (tmp_path / "k" / "ctl.key_secret").read_bytes()
    out = run_kvplane(["keygen", str(tmp_path / "k"), "--name", "ctl"], timeout=30)
    assert out.returncode == 2 and "not overwriting" in out.stdout
    assert "Traceback" not in out.stdout
    assert (tmp_path / "k" / "ctl.key_secret").read_bytes() == before


def test_curve_settings_that_cannot_work_are_errors_naming_the_key(tmp_path: Path) -> None:
    from kvplane.controller.service import ControllerService
    from kvplane.controller.settings import ControllerConfig
    from kvplane.errors import ConfigError

    keygen(tmp_path, "ctl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="go together"):
        ControllerConfig(curve_secret_key_file=str(tmp_path / "ctl.key_secret"))
    for secret, allowed, expected in (
        ("ctl.key", ".", "curve_secret_key_file: .* holds no secret key"),
        ("ctl.key_secret", "empty", "curve_allowed_keys_dir: .* holds no public key files"),
        ("ctl.key_secret", "ctl.key", "curve_allowed_keys_dir: .* is not a directory"),
        ("nope", ".", "curve_secret_key_file: cannot read CURVE key file"),
    ):
        pull, reply = free_ports(2)
        service = ControllerService(
            ControllerConfig(
                host="127.0.0.1", pull_port=pull, reply_port=reply,
                curve_secret_key_file=str(tmp_path / secret),
                curve_allowed_keys_dir=str(tmp_path / allowed),
            )
        )  # fmt: skip
        with pytest.raises(ConfigError, match=expected):
            service.start()
        service.stop()
    # The command says so and exits 2, with no traceback.
    http, pull, reply = free_ports(3)
    bad = ["--curve-secret-key-file", str(tmp_path / "ctl.key")]
    out = run_kvplane([*controller_args(http, pull, reply), *bad, "--curve-allowed-keys-dir", str(tmp_path)], timeout=30)  # fmt: skip
    assert out.returncode == 2, out.stdout
    assert "holds no secret key" in out.stdout and "Traceback" not in out.stdout


def _engine_config(c: ControllerProc, **extra: Any) -> Any:
    from kvplane.config import EngineConfig

    return EngineConfig(
        chunk_size=4, kv_num_layers=2, kv_num_heads=2, kv_head_size=16, kv_num_blocks=64,
        max_local_cpu_size=0.01, enable_controller=True, lmcache_instance_id="good",
        controller_pull_url=f"127.0.0.1:{c.pull}", controller_reply_url=f"127.0.0.1:{c.reply}",
        lmcache_worker_heartbeat_time=0.2, controller_timeout_s=1.0, **extra,
    )  # fmt: skip


def test_curve_lets_the_right_worker_in_and_no_other(tmp_path: Path) -> None:
    import torch

    from kvplane.process import EngineProcess

    keys = tmp_path / "keys"
    ctl = keygen(keys, "controller")
    allowed = keys / "workers"
    keygen(allowed, "good")
    stranger = keygen(keys, "stranger")  # a valid pair the controller never heard of
    curve = ["--curve-secret-key-file", str(keys / "controller.key_secret")]
    curve += ["--curve-allowed-keys-dir", str(allowed)]
    with contextlib.ExitStack() as stack:
        c = stack.enter_context(controller(tmp_path, *curve))
        rt = EngineProcess(
            _engine_config(
                c,
                controller_curve_secret_key_file=str(allowed / "good.key_secret"),
                controller_curve_public_key_file=str(keys / "controller.key"),
            )
        )
        rt.start()
        stack.callback(rt.stop)
        wait_until(lambda: c.post("/query_worker_info", {"instance_id": "good"}).status_code == 200, timeout=10)  # fmt: skip
        rt.cache_engine.store(TOKENS, rt.kv_caches, torch.arange(len(TOKENS)))
        wait_until(lambda: c.lookup(TOKENS) == {"good": ["LocalCPUBackend", 10]}, timeout=10)

        # Three workers that must not get in: no CURVE, a key not allowed, the right key
        # but a wrong controller key. None registers, none of their reports is applied.
        failures_before = c.metric("auth_failures")
        bad = [
            ProtoWorker(c.pull, c.reply, "plain"),
            ProtoWorker(c.pull, c.reply, "stranger", curve=ClientCurve(stranger, ctl.public)),
            ProtoWorker(
                c.pull, c.reply, "impostor",
                curve=ClientCurve(load_key_pair(allowed / "good.key_secret", "t"), stranger.public),
            ),
        ]  # fmt: skip
        for w in bad:
            stack.callback(w.close)
            with pytest.raises(TimeoutError):
                w.register(timeout=1.0, epoch=1)
            with contextlib.suppress(zmq.Again):  # queued, or refused at once: never delivered
                w.report(chunk_hashes(list(range(100, 110)), 4), flags=zmq.NOBLOCK)
        wait_until(
            lambda: c.metric("auth_failures") >= failures_before + 3,
            timeout=10,
            what="failed handshakes counted",
        )
        for w in bad:
            assert c.post("/query_worker_info", {"instance_id": w.instance_id}).status_code == 404
        assert c.lookup(list(range(100, 110))) == {}
        assert c.metric("workers") == 1 and c.metric("registrations") == 1
        metrics = httpx.get(c.url + "/metrics", timeout=10).text
        assert "\nkvplane_controller_auth_failures_total " in metrics
        log = c.log.read_text()
        assert "CURVE handshake failed" in log and "Traceback" not in log

        # The good worker goes on: heartbeats advance, reports land, commands reach it.
        beat = c.post("/query_worker_info", {"instance_id": "good"}).json()["worker_infos"][0]
        more = list(range(40, 48))
        rt.cache_engine.store(more, rt.kv_caches, torch.arange(16, 24))
        wait_until(lambda: c.lookup(more) == {"good": ["LocalCPUBackend", 8]}, timeout=10)
        wait_until(
            lambda: c.post("/query_worker_info", {"instance_id": "good"}).json()["worker_infos"][0]["last_heartbeat_time"]
            > beat["last_heartbeat_time"],
            timeout=10,
        )  # fmt: skip
        # Nobody but the controller may command the worker: its command port is CURVE too.
        port = rt_worker_port(rt)
        for client in (None, KeyPair(stranger.public, stranger.secret)):
            assert not _command_answered(port, client, load_public_key(allowed / "good.key", "t"))
        assert c.lookup(TOKENS) == {"good": ["LocalCPUBackend", 10]}
        r = c.post("/clear", {"instance_id": "good", "location": "LocalCPUBackend"})
        assert r.status_code == 200 and r.json()["num_tokens"] > 0, r.text
        wait_until(lambda: c.lookup(TOKENS) == {}, timeout=10, what="clear over CURVE")


def rt_worker_port(rt: Any) -> int:
    from kvplane.worker.service import ControllerWorker

    worker = next(s for s in rt.services if isinstance(s, ControllerWorker))
    assert worker.port is not None
    return worker.port


def _command_answered(port: int, keys: KeyPair | None, server: bytes) -> bool:
    """Whether a ClearCommand from this client gets any answer from the worker in 1 s."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        make_client(sock, keys, server)
    try:
        sock.connect(f"tcp://127.0.0.1:{port}")
        sock.send(encode(ClearCommand(event_id="x", locations=None)))
        if not sock.poll(1000):
            return False
        return isinstance(decode(sock.recv()), CommandReply)
    finally:
        sock.close()
        ctx.term()


def test_worker_with_one_curve_key_file_is_a_config_error(tmp_path: Path) -> None:
    from kvplane.errors import ConfigError
    from kvplane.process import EngineProcess

    c = ControllerProc("http://127.0.0.1:1", 1, 2, tmp_path / "none.log")
    with pytest.raises(ConfigError, match="go together"):
        EngineProcess(_engine_config(c, controller_curve_secret_key_file=str(tmp_path / "k")))
    keygen(tmp_path, "w")
    with pytest.raises(ConfigError, match="controller_curve_public_key_file"):
        EngineProcess(
            _engine_config(
                c,
                controller_curve_secret_key_file=str(tmp_path / "w.key_secret"),
                controller_curve_public_key_file=str(tmp_path / "missing.key"),
            )
        )


def test_curve_in_pull_only_mode_a_restarted_controller_reaches_the_worker(
    tmp_path: Path,
) -> None:
    """The seeds' pull-only mode (no reply port) with CURVE: the worker registers over the
    PULL socket; a restarted controller tells it to resync with a ResyncCommand over CURVE,
    to the command-port key its heartbeats carry."""
    import torch

    from kvplane.config import EngineConfig
    from kvplane.process import EngineProcess

    keys = tmp_path / "keys"
    keygen(keys, "controller")
    keygen(keys / "workers", "w")
    http, pull = free_ports(2)
    args = ["controller", "--host", "127.0.0.1", "--port", str(http), "--monitor-port", str(pull)]
    args += ["--curve-secret-key-file", str(keys / "controller.key_secret")]
    args += ["--curve-allowed-keys-dir", str(keys / "workers")]
    c = ControllerProc(f"http://127.0.0.1:{http}", pull, 0, tmp_path / "c.log")

    def up() -> bool:
        return httpx.get(c.url + "/healthz", timeout=1).status_code == 200

    cfg = EngineConfig(
        chunk_size=4, kv_num_layers=2, kv_num_heads=2, kv_head_size=16, kv_num_blocks=64,
        max_local_cpu_size=0.01, enable_controller=True, lmcache_instance_id="pull-only",
        controller_pull_url=f"127.0.0.1:{pull}", lmcache_worker_heartbeat_time=0.2,
        controller_curve_secret_key_file=str(keys / "workers" / "w.key_secret"),
        controller_curve_public_key_file=str(keys / "controller.key"),
    )  # fmt: skip
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(kvplane_process(args, log_path=tmp_path / "c1.log"))
        wait_until(up, timeout=30, what="controller up")
        rt = EngineProcess(cfg)
        rt.start()
        stack.callback(rt.stop)
        rt.cache_engine.store(TOKENS, rt.kv_caches, torch.arange(len(TOKENS)))
        wait_until(lambda: c.lookup(TOKENS) == {"pull-only": ["LocalCPUBackend", 10]}, timeout=15)
        stop_process(first)
        with kvplane_process(args, log_path=tmp_path / "c2.log"):
            wait_until(up, timeout=30, what="controller restarted")
            wait_until(
                lambda: c.lookup(TOKENS) == {"pull-only": ["LocalCPUBackend", 10]},
                timeout=15,
                what="resync over CURVE after the restart",
            )
            assert c.metric("auth_failures") == 0


def test_dashboard_with_protect_reads_takes_the_token_from_its_fragment(tmp_path: Path) -> None:
    """The page and its files hold no cluster data and stay open; /dashboard/data needs the
    token, which the page (in a real browser) sends from ``#token=...``."""
    import shutil

    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.skip("chromium and chromedriver are not installed (`make system-deps`)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    with controller(tmp_path, "--api-token", TOKEN, "--protect-reads") as c:
        assert call(c, "GET", "/dashboard").status_code == 200
        assert call(c, "GET", "/dashboard/data").status_code == 401
        assert call(c, "GET", "/dashboard/data", GOOD).json()["instances"] == []
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=Service(chromedriver), options=options)
        try:
            driver.set_page_load_timeout(30)

            def status(d: Any) -> tuple[str, str]:
                return tuple(
                    d.execute_script(
                        "const s = document.getElementById('status');"
                        "return [s.dataset.state || '', s.textContent];"
                    )
                )

            driver.get(c.url + "/dashboard")
            WebDriverWait(driver, 20, poll_frequency=0.1).until(
                lambda d: "HTTP 401" in status(d)[1], message="no 401 shown without the token"
            )
            driver.get(c.url + f"/dashboard#token={TOKEN}")
            driver.refresh()  # a fragment change alone does not reload the page
            WebDriverWait(driver, 20, poll_frequency=0.1).until(
                lambda d: status(d)[0] == "live", message="the page never went live"
            )
        finally:
            driver.quit()
