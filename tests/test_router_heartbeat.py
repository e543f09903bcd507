"""The router's side of its heartbeat and its controller token, without a fleet: the body it
sends is what the controller's model accepts, the token goes on the lean client's requests
(to a real socket), and the settings and the command line refuse what cannot work before
the router announces itself. With real processes: tests/test_router_dashboard.py."""

from __future__ import annotations

import asyncio
import socket

import pytest

from kvplane.controller.routers_api import RouterHeartbeat, report_of
from kvplane.errors import ConfigError
from kvplane.router.heartbeat import heartbeat_body, identity
from kvplane.router.lean_http import LeanClient
from kvplane.router.pool import BackendSpec, Pool
from kvplane.router.settings import RouterConfig
from tests.support import run_kvplane


def test_the_heartbeat_body_is_what_the_controller_accepts() -> None:
    pool = Pool(eject_after=3)
    pool.add(BackendSpec("http://127.0.0.1:8100", None), from_flag=True)
    pool.add(BackendSpec("http://127.0.0.1:8000", "inst-a"), from_flag=True)
    pool.check_answered("http://127.0.0.1:8000", None, ["m"])
    body = heartbeat_body("edge-1", "http://h:8080", 2.0, 12.3456, pool, {"prefix": 3, "load": 0})
    report = report_of(RouterHeartbeat.model_validate(body))
    assert report.router_id == "edge-1" and report.uptime_s == 12.346
    assert [(b.url, b.instance_id, b.admitted) for b in report.backends] == [
        ("http://127.0.0.1:8000", "inst-a", True),
        ("http://127.0.0.1:8100", None, False),
    ]
    assert report.requests == {"prefix": 3, "load": 0}


def test_router_id_and_url_default_to_host_port() -> None:
    assert identity(RouterConfig(host="127.0.0.1", port=8081)) == (
        "127.0.0.1:8081",
        "http://127.0.0.1:8081",
    )
    name = socket.gethostname()
    assert identity(RouterConfig(port=8080)) == (f"{name}:8080", f"http://{name}:8080")
    assert identity(RouterConfig(port=8080, router_id="edge-1"))[0] == "edge-1"


def test_the_lean_client_sends_the_token_on_each_request() -> None:
    async def main() -> tuple[int, bytes, list[bytes]]:
        heads: list[bytes] = []

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            heads.append(await reader.readuntil(b"\r\n\r\n"))
            await reader.readexactly(2)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = LeanClient(f"http://127.0.0.1:{port}", headers={"authorization": "Bearer t0k"})
        try:
            status, body = await client.post("/lookup", b"{}", timeout=10)
        finally:
            client.close()
            server.close()
            await server.wait_closed()
        return status, body, heads

    status, body, heads = asyncio.run(main())
    assert (status, body) == (200, b"ok")
    (head,) = heads
    assert b"\r\nauthorization: Bearer t0k\r\n" in head
    assert head.startswith(b"POST /lookup HTTP/1.1\r\nhost: 127.0.0.1:")


@pytest.mark.parametrize(
    ("keys", "named"),
    [
        ({"controller_token": "two words"}, "controller_token"),
        ({"controller_token": "line\r\nx-injected: 1"}, "controller_token"),
        ({"backends": ("localhost:8000",)}, "localhost:8000"),
        ({"discovery_interval_s": 7200.0}, "discovery_interval_s"),
    ],
)
def test_settings_that_cannot_work_are_config_errors(keys, named) -> None:
    with pytest.raises(ConfigError, match=named) as caught:
        RouterConfig(**keys)
    assert "two words" not in str(caught.value)  # a token is never echoed


def test_the_token_is_masked_in_the_config_repr() -> None:
    shown = repr(RouterConfig(controller_token="s3cret"))
    assert "s3cret" not in shown and "controller_token='***'" not in shown
    assert "controller_token=***" in shown


def test_a_backend_without_a_scheme_fails_before_the_router_announces_itself() -> None:
    done = run_kvplane(["router", "--backend", "localhost:8000"], timeout=120)
    assert done.returncode == 2, done.stdout
    assert (
        "kvplane router: error: --backend 'localhost:8000': expected [INSTANCE_ID=]http://"
        in done.stdout
    )
    assert "kvplane router on" not in done.stdout and "Traceback" not in done.stdout
