"""CURVE on the controller-worker sockets: key files, socket options, the ZAP check.

ZMQ's CURVE encrypts a connection and authenticates both ends by their key pairs. The
server end of a socket has a key pair; a client must know the server's public key and have
a key pair of its own, whose public key the server's ZAP handler (:class:`CurveAuth`, on
pyzmq's :class:`~zmq.auth.thread.ThreadAuthenticator`) must find in its allowed set. A
client without CURVE, with another key or with a wrong server key fails the handshake:
nothing it sends reaches the application.

Who is the server where: the controller's pull and reply ports (workers connect), and each
worker's command port (the controller connects; a worker tells the controller its public
key when it registers, and allows only the controller's key).

Key files are pyzmq's (``zmq.auth.create_certificates``): ``NAME.key`` holds the public key,
``NAME.key_secret`` both keys; ``kvplane keygen`` writes them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from kvplane.errors import ConfigError

__all__ = [
    "HANDSHAKE_FAILURES",
    "CurveAuth",
    "KeyPair",
    "load_key_pair",
    "load_public_key",
    "load_public_keys",
    "make_client",
    "make_server",
    "write_key_pair",
]

log = logging.getLogger(__name__)

#: Monitor events of a handshake that failed: no CURVE, a wrong key, a refused key.
HANDSHAKE_FAILURES = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)

_ZAP_DOMAIN = "kvplane"  # the ZAP domain of every CURVE server socket here


class KeyPair(NamedTuple):
    """A CURVE key pair, each key z85-encoded (40 bytes)."""

    public: bytes
    secret: bytes


def load_key_pair(path: str | os.PathLike[str], what: str) -> KeyPair:
    """The key pair in a ``.key_secret`` file; ConfigError naming ``what`` (the config key)
    when the file is missing, unreadable, or holds only a public key."""
    public, secret = _load(path, what)
    if not secret:
        raise ConfigError(
            f"{what}: {os.fspath(path)!r} holds no secret key (use the .key_secret file)"
        )
    return KeyPair(public, secret)


def load_public_key(path: str | os.PathLike[str], what: str) -> bytes:
    """The public key in a ``.key`` (or ``.key_secret``) file; ConfigError naming ``what``."""
    return _load(path, what)[0]


def load_public_keys(directory: str | os.PathLike[str], what: str) -> frozenset[bytes]:
    """Every public key in ``directory``'s ``*.key`` files; ConfigError naming ``what`` when
    it is not a directory or holds none (a server nobody may reach is a mistake)."""
    folder = Path(directory)
    if not folder.is_dir():
        raise ConfigError(f"{what}: {str(folder)!r} is not a directory")
    keys = frozenset(load_public_key(p, what) for p in sorted(folder.glob("*.key")))
    if not keys:
        raise ConfigError(f"{what}: {str(folder)!r} holds no public key files (*.key)")
    return keys


def _load(path: str | os.PathLike[str], what: str) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{what}: cannot read CURVE key file {os.fspath(path)!r}: {exc}"
        ) from None
    if not public:
        raise ConfigError(f"{what}: {os.fspath(path)!r} holds no CURVE public key")
    return public, secret


def write_key_pair(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` and ``NAME.key_secret`` (mode 0600) in ``directory`` (made if
    missing); ConfigError if either exists (a key is never overwritten)."""
    folder = Path(directory)
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise ConfigError(f"{str(path)!r} exists; not overwriting a key")
    folder.mkdir(parents=True, exist_ok=True)
    old_mask = os.umask(0o077)
    try:
        zmq.auth.create_certificates(folder, name)
    finally:
        os.umask(old_mask)
    public.chmod(0o644)
    return public, secret


def make_server(sock: zmq.Socket[bytes], keys: KeyPair) -> None:
    """Make ``sock`` (before it binds) a CURVE server checked by its context's ZAP."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.zap_domain = _ZAP_DOMAIN.encode()
    sock.curve_server = True


def make_client(sock: zmq.Socket[bytes], keys: KeyPair, server_public: bytes) -> None:
    """Make ``sock`` (before it connects) a CURVE client of the server ``server_public``."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = server_public


class CurveAuth:
    """The ZAP handler of one ZMQ context: a CURVE client passes if its public key is one of
    ``allowed``. Only CURVE server sockets (:func:`make_server`) consult it."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], allowed: Iterable[bytes]) -> None:
        self.allowed = frozenset(allowed)
        self._auth = ThreadAuthenticator(ctx, log=log)

    def start(self) -> None:
        self._auth.start()
        self._auth.configure_curve_callback(domain=_ZAP_DOMAIN, credentials_provider=self)

    def stop(self) -> None:
        self._auth.stop()

    def callback(self, domain: str, client_key: bytes) -> bool:
        """pyzmq's credentials-provider hook: ``client_key`` is z85-encoded."""
        return client_key in self.allowed
