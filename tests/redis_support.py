"""A real redis-server on a free loopback port, stopped by PID; restartable on the same port.

With ``tls`` (files from :func:`make_tls_files`) it listens for TLS only (``rediss://``).
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import pytest

from kvplane.engine.backends.redis_server import redis_server_args, redis_server_binary
from tests.support import free_port, stop_process, wait_until

REDIS_BIN = redis_server_binary()


def redis_available() -> bool:
    return Path(REDIS_BIN).exists()


needs_redis = pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")


class TlsFiles(NamedTuple):
    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """A throwaway CA and a server certificate it signed for 127.0.0.1 (subjectAltName, so
    hostname checking passes), made with the openssl CLI; skips the test without one."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl CLI is not installed: cannot make test certificates")
    ca_key, ca_cert = directory / "ca.key", directory / "ca.crt"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.crt"
    ext = directory / "san.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for cmd in (
        ["req", "-x509", *ec, "-keyout", ca_key, "-out", ca_cert, "-days", "1",
         "-subj", "/CN=kvplane test CA"],
        ["req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "1", "-extfile", ext],
    ):  # fmt: skip
        subprocess.run([openssl, *map(str, cmd)], check=True, capture_output=True, timeout=30)
    return TlsFiles(ca_cert, cert, key)


class RedisServer:
    def __init__(
        self,
        workdir: Path,
        password: str | None = None,
        tls: TlsFiles | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        """``extra_args``: more redis-server options (later ones override earlier ones,
        e.g. ``--appendonly yes`` for a server that keeps what it acknowledged)."""
        self.port = free_port()
        self.workdir = workdir
        self.password = password
        self.tls = tls
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{auth}127.0.0.1:{self.port}"

    def start(self) -> None:
        args = redis_server_args(self.port, self.workdir)
        if self.password:
            args += ["--requirepass", self.password]
        if self.tls:
            args[1:3] = ["--port", "0", "--tls-port", str(self.port)]
            args += [
                "--tls-cert-file", str(self.tls.server_cert),
                "--tls-key-file", str(self.tls.server_key),
                "--tls-ca-cert-file", str(self.tls.ca_cert),
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        args += self.extra_args
        log = self.workdir / f"redis-{self.port}.log"
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        wait_until(self._accepts, timeout=10, what="redis-server to accept connections")

    def _accepts(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            text = (self.workdir / f"redis-{self.port}.log").read_text(errors="replace")
            if self.tls and "tls" in text.lower():
                pytest.skip(f"{REDIS_BIN} has no TLS support: {text.strip()[-300:]}")
            raise RuntimeError(f"redis-server exited: {text[-500:]}")
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw:
            if not self.tls:
                raw.sendall(b"PING\r\n")
                return bool(raw.recv(64))
            ctx = ssl.create_default_context(cafile=str(self.tls.ca_cert))
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall(b"PING\r\n")
                return bool(s.recv(64))

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def kill(self) -> None:
        """SIGKILL (it may be stopped with SIGSTOP): no shutdown, no final save."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None
