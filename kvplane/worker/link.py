"""The worker's wire to the controller's reply port, and the address helpers.

:class:`ControllerLink` sends one request and waits for its reply under a deadline, on a
fresh REQ socket each time (a lost reply never wedges the next request), so any thread may
use it: the control thread for registrations and heartbeats, engine threads for peer
lookups. Without a reply URL (the seeds' pull-only mode) nothing can be asked. With
:class:`ClientCurve` keys every socket towards the controller is a CURVE client.
"""

from __future__ import annotations

import logging
import socket
from typing import Any, NamedTuple

import msgspec
import zmq

from kvplane.curve import KeyPair, load_key_pair, load_public_key, make_client
from kvplane.protocol import decode, encode

__all__ = ["ClientCurve", "ControllerLink", "local_ip_towards", "zmq_url"]

log = logging.getLogger(__name__)


class ClientCurve(NamedTuple):
    """A worker's CURVE keys and the controller's public key (z85)."""

    keys: KeyPair
    controller: bytes

    @classmethod
    def from_files(cls, secret_key_file: str, controller_key_file: str) -> ClientCurve:
        """Raises ConfigError naming the config key of a file that cannot be used."""
        return cls(
            load_key_pair(secret_key_file, "controller_curve_secret_key_file"),
            load_public_key(controller_key_file, "controller_curve_public_key_file"),
        )


def zmq_url(address: str) -> str:
    """``host:port`` (the seeds' form) or a full ``tcp://`` URL."""
    return address if "://" in address else f"tcp://{address}"


def local_ip_towards(url: str) -> str:
    """The local address that routes to ``url``'s host (a UDP connect sends nothing)."""
    host = url.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    try:
        family = socket.getaddrinfo(host, None)[0][0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"


class ControllerLink:
    """Request/reply with the controller's REP socket at ``reply_url`` (None: none)."""

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        reply_url: str | None,
        *,
        who: str = "worker",
        curve: ClientCurve | None = None,
    ) -> None:
        """``who`` names the worker in log lines (``worker inst/0``); ``curve``: this
        worker's keys and the controller's public key, to talk CURVE (None: plain)."""
        self._ctx = ctx
        self.reply_url = reply_url
        self._who = who
        self.curve = curve
        self._unanswered: set[str] = set()  # request kinds the controller left unanswered

    def socket(self, kind: int) -> zmq.Socket[bytes]:
        """A socket towards the controller (LINGER 0; a CURVE client when configured)."""
        sock: zmq.Socket[bytes] = self._ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            make_client(sock, self.curve.keys, self.curve.controller)
        return sock

    @property
    def answers(self) -> bool:
        """Whether the controller has a reply port (else requests go over PUSH, unanswered)."""
        return self.reply_url is not None

    def request(self, msg: msgspec.Struct, timeout_s: float) -> Any:
        """Send ``msg`` and return the decoded reply; None when there is no reply port,
        the controller did not answer within ``timeout_s``, or the exchange failed."""
        if self.reply_url is None:
            return None
        sock = self.socket(zmq.REQ)
        try:
            sock.connect(self.reply_url)
            sock.send(encode(msg))
            kind = type(msg).__name__
            if not sock.poll(int(timeout_s * 1000)):
                # Once per outage at WARNING (a worker retries every second while the
                # controller is down), the repeats at DEBUG.
                level = logging.DEBUG if kind in self._unanswered else logging.WARNING
                self._unanswered.add(kind)
                log.log(
                    level,
                    "%s: controller %s did not answer %s within %.1fs (retrying)",
                    self._who,
                    self.reply_url,
                    kind,
                    timeout_s,
                )
                return None
            if kind in self._unanswered:
                self._unanswered.discard(kind)
                log.info("%s: controller %s answers %s again", self._who, self.reply_url, kind)
            return decode(sock.recv())
        except Exception as exc:
            log.warning("%s: request %s failed: %s", self._who, type(msg).__name__, exc)
            return None
        finally:
            sock.close(linger=0)
