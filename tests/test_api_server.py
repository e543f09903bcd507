"""The internal API server itself: addresses, roles, sockets, discovery, errors, the token."""

import dataclasses
import logging
import os
import socket
import stat
import sys
import textwrap
import threading

import httpx
import pytest

from kvplane.api.discovery import discover_routers
from kvplane.api.server import (
    exposure_warning,
    process_indices,
    served_indices,
    server_address,
)
from kvplane.engine.facts import EngineFacts
from kvplane.errors import ConfigError, Conflict, KvplaneError
from tests.api_client import (
    TRANSPORTS,
    api_config,
    api_service,
    client_for,
    serving,
    short_tmpdir,
)
from tests.support import free_port


def test_addresses_follow_port_start_and_socket_prefix():
    cfg = api_config(internal_api_server_port_start=6999)
    assert server_address(cfg, 0) == ("127.0.0.1", 6999, None)
    assert server_address(cfg, 1).port == 7000
    cfg = api_config(internal_api_server_socket_path_prefix="/tmp/x/socket")
    assert server_address(cfg, 1).uds == "/tmp/x/socket_7000"


def test_roles_of_a_process_and_the_include_list():
    rank0 = EngineFacts.from_config(api_config(worker_id=0, world_size=2))
    assert process_indices(rank0) == [0, 1]
    assert process_indices(dataclasses.replace(rank0, worker_id=1)) == [2]
    cfg = api_config(internal_api_server_include_index_list=[1])
    assert served_indices(cfg, [0, 1]) == [1]
    assert served_indices(api_config(), [0, 1]) == [0, 1]


def test_tcp_binds_loopback_by_default_and_stops_cleanly():
    with serving("tcp") as (service, client):
        server = service.servers[0]
        assert server._sock is not None
        assert server._sock.getsockname()[0] == "127.0.0.1"
        assert client.get("/meta").json()["role"] == "scheduler"
        port = server.port
        threads_while_serving = {t.name for t in threading.enumerate()}
        assert any(name.startswith("kvplane-api-") for name in threads_while_serving)
    assert not any(t.name.startswith("kvplane-api-") for t in threading.enumerate())
    with socket.socket() as s:  # the port is free again
        s.bind(("127.0.0.1", port))
    with pytest.raises(httpx.ConnectError), httpx.Client() as c:
        c.get(f"http://127.0.0.1:{port}/meta", timeout=2)


def test_port_in_use_is_reported_at_start():
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        cfg = api_config(internal_api_server_port_start=port)
        service = api_service(cfg, indices=[0])
        with pytest.raises(Conflict, match="cannot bind"):
            service.start()
        assert service.servers == {}


def test_unix_sockets_for_both_roles_owner_only_and_removed_on_stop():
    with short_tmpdir() as tmp:
        prefix = f"{tmp}/nested/dir/socket"
        cfg = api_config(
            internal_api_server_socket_path_prefix=prefix,
            internal_api_server_port_start=6999,
        )
        service = api_service(cfg, indices=[0, 1])
        service.start()
        try:
            for index, role in ((0, "scheduler"), (1, "worker_0")):
                path = f"{prefix}_{6999 + index}"
                assert stat.S_ISSOCK(os.stat(path).st_mode)
                assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
                with client_for(service, index) as client:
                    assert client.get("/meta").json()["role"] == role
        finally:
            service.stop()
        assert not os.path.exists(f"{prefix}_6999")
        assert not os.path.exists(f"{prefix}_7000")


def test_include_index_list_limits_what_starts():
    with short_tmpdir() as tmp:
        cfg = api_config(
            internal_api_server_socket_path_prefix=f"{tmp}/s",
            internal_api_server_include_index_list=[1],
        )
        service = api_service(cfg, indices=[0, 1])
        service.start()
        try:
            assert list(service.servers) == [1]
        finally:
            service.stop()


def test_stale_socket_is_replaced_but_live_socket_or_file_is_refused():
    with short_tmpdir() as tmp:
        prefix = f"{tmp}/s"
        path = f"{prefix}_6999"
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(path)
        stale.close()  # the file stays, nobody listens: stale
        cfg = api_config(internal_api_server_socket_path_prefix=prefix)
        with serving("uds", cfg) as (_, client):
            assert client.get("/meta").status_code == 200
            other = api_service(cfg, indices=[0])
            with pytest.raises(Conflict, match="in use"):
                other.start()
            assert client.get("/meta").status_code == 200
        with open(path, "w") as f:
            f.write("not a socket")
        with pytest.raises(Conflict, match="not a socket"):
            api_service(cfg, indices=[0]).start()


@pytest.fixture
def plugin_package(tmp_path, monkeypatch):
    """A category package on sys.path; tests add *_api.py modules to it."""
    name = f"kvp_plugins_{os.getpid()}_{len(sys.modules)}"
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, pkg
    for mod in [m for m in sys.modules if m.startswith(name)]:
        del sys.modules[mod]


def _write_api(pkg, filename, path, answer):
    (pkg / filename).write_text(
        textwrap.dedent(f"""
        from fastapi import APIRouter
        router = APIRouter()

        @router.get("{path}")
        def endpoint():
            return {{"from": "{answer}"}}
        """)
    )


def test_discovery_is_sorted_and_a_new_file_adds_endpoints(plugin_package):
    name, pkg = plugin_package
    _write_api(pkg, "zeta_api.py", "/clash", "zeta")
    _write_api(pkg, "alpha_api.py", "/clash", "alpha")
    (pkg / "helpers.py").write_text("VALUE = 1\n")  # not *_api: not a router module
    found = discover_routers((name,))
    assert [f.module for f in found] == [f"{name}.alpha_api", f"{name}.zeta_api"]
    with serving("tcp", categories=(name,)) as (_, client):
        assert client.get("/clash").json() == {"from": "alpha"}  # sorted: alpha wins
        assert client.get("/meta").status_code == 404  # only the given categories


def test_module_without_router_stops_start_up(plugin_package):
    name, pkg = plugin_package
    (pkg / "broken_api.py").write_text("ROUTER = None\n")
    with pytest.raises(KvplaneError, match="broken_api must define"):
        discover_routers((name,))
    service = api_service(api_config(), indices=[0], categories=(name,))
    with pytest.raises(KvplaneError):
        service.start()
    assert service.servers == {}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_unknown_path_and_bad_parameters_have_json_error_bodies(transport):
    with serving(transport) as (_, client):
        r = client.get("/no/such/path")
        assert r.status_code == 404
        assert set(r.json()) == {"error", "message"}
        r = client.post("/loglevel", json={"level": "DEBUG"})  # logger_name is missing
        assert r.status_code == 400
        assert r.json()["error"] == "Invalid parameters"
        assert "logger_name" in r.json()["message"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_token_guards_every_mutating_call(transport):
    cfg = api_config(internal_api_server_token="s3cret")
    logging.getLogger("kvplane.t").setLevel(logging.WARNING)
    with serving(transport, cfg) as (service, client):
        assert client.get("/conf").status_code == 200  # reads stay open
        r = client.post("/conf", json={"min_retrieve_tokens": 5})
        assert r.status_code == 401
        assert r.json()["error"] == "Unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
        assert service.config.min_retrieve_tokens == 0
        # No bearer token: 401; a bearer token that is not this server's: 403.
        for given, status in (
            ("Basic s3cret", 401),
            ("s3cret", 401),
            ("Bearer", 401),
            ("Bearer nope", 403),
            ("Bearer s3cret2", 403),
            ("Bearer s3cr\u00e9t", 403),
        ):
            headers = {"Authorization": given.encode("utf-8")}
            r = client.post("/conf", json={}, headers=headers)
            assert (r.status_code, set(r.json())) == (status, {"error", "message"}), given
        r = client.get("/loglevel", params={"logger_name": "kvplane.t", "level": "DEBUG"})
        assert r.status_code == 401
        r = client.post("/loglevel", json={"logger_name": "kvplane.t", "level": "DEBUG"})
        assert r.status_code == 401
        assert logging.getLogger("kvplane.t").level == logging.WARNING
        good = {"Authorization": "Bearer s3cret"}
        r = client.post("/conf", json={"min_retrieve_tokens": 5}, headers=good)
        assert r.status_code == 200
        assert service.config.min_retrieve_tokens == 5
        r = client.get(
            "/loglevel", params={"logger_name": "kvplane.t", "level": "DEBUG"}, headers=good
        )
        assert r.status_code == 200
        # Every non-GET route of the app is guarded, including ones discovered later.
        app = service.servers[0].app
        for route in app.routes:
            methods = getattr(route, "methods", set()) - {"GET", "HEAD"}
            for method in methods:
                assert client.request(method, route.path).status_code == 401, route.path


def test_public_bind_without_token_warns():
    assert exposure_warning(api_config()) is None
    assert exposure_warning(api_config(internal_api_server_host="::1")) is None
    assert exposure_warning(api_config(internal_api_server_host="localhost")) is None
    public = api_config(internal_api_server_host="0.0.0.0")
    assert "without internal_api_server_token" in (exposure_warning(public) or "")
    assert exposure_warning(dataclasses.replace(public, internal_api_server_token="t")) is None


def test_ipv6_loopback_host():
    port = free_port("::1")
    cfg = api_config(internal_api_server_host="::1", internal_api_server_port_start=port)
    service = api_service(cfg, indices=[0])
    service.start()
    try:
        with httpx.Client(timeout=5) as client:
            assert client.get(f"http://[::1]:{port}/meta").json()["index"] == 0
    finally:
        service.stop()


def test_unusable_socket_prefix_is_a_config_error_naming_the_key(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    too_long = f"{tmp_path}/{'x' * 120}/socket"
    for prefix, words in (
        (f"{not_a_dir}/sub/socket", "cannot create directory"),
        (too_long, "at most 107"),
    ):
        cfg = api_config(internal_api_server_socket_path_prefix=prefix)
        service = api_service(cfg, indices=[0])
        with pytest.raises(ConfigError, match=words) as info:
            service.start()
        assert "internal_api_server_socket_path_prefix" in str(info.value)
        assert service.servers == {}
    assert not os.path.exists(os.path.dirname(too_long))  # refused before creating anything


def test_a_role_port_beyond_65535_is_a_config_error():
    cfg = api_config(internal_api_server_port_start=65535)
    service = api_service(cfg, indices=[1])
    with pytest.raises(ConfigError, match="65536 of this role is beyond 65535"):
        service.start()
    assert service.servers == {}
