"""kvplane's error tree.

    KvplaneError
    ├── ConfigError      bad config key, type or value (names the key)
    ├── BadRequest       a caller's input is malformed (HTTP 400)
    ├── NotFound         unknown instance, worker, event, backend (HTTP 404)
    ├── Conflict         the request contradicts current state (HTTP 409)
    ├── Unauthorized     a mutating call without the configured bearer token (HTTP 401)
    ├── Forbidden        refused by policy, e.g. /run_script disabled (HTTP 403)
    ├── Unavailable      a peer, worker or store did not answer in time (HTTP 503)
    ├── Unsupported      a known operation this instance cannot do, e.g. move without
    │                    P2P (HTTP 409: understood, but not servable in this setup)
    └── CorruptChunk     stored or received chunk bytes fail their header or checksum check

Third-party exceptions are translated at the boundary that meets them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "BadRequest",
    "ConfigError",
    "Conflict",
    "CorruptChunk",
    "Forbidden",
    "KvplaneError",
    "NotFound",
    "Unauthorized",
    "Unavailable",
    "Unsupported",
]


def _in_words(class_name: str) -> str:
    """``BadRequest`` -> ``Bad request``."""
    words = re.findall(r"[A-Z][a-z]*|[a-z]+|\d+", class_name)
    return " ".join(words).capitalize() if words else class_name


class KvplaneError(Exception):
    """Base of every error kvplane raises on purpose.

    ``title`` is the short ``error`` field of an HTTP error body (the seeds' error shapes use
    titles such as "Unknown backend"; by default the class name in words, "Bad request");
    ``details`` are extra fields for that body.
    """

    status_code = 500

    def __init__(
        self,
        message: str = "",
        *,
        title: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.title = title or (
            "Internal error" if type(self) is KvplaneError else _in_words(type(self).__name__)
        )
        self.details: dict[str, Any] = dict(details or {})


class ConfigError(KvplaneError):
    status_code = 400


class BadRequest(KvplaneError):
    status_code = 400


class NotFound(KvplaneError):
    status_code = 404


class Conflict(KvplaneError):
    status_code = 409


class Unauthorized(KvplaneError):
    status_code = 401


class Forbidden(KvplaneError):
    status_code = 403


class Unavailable(KvplaneError):
    status_code = 503


class Unsupported(KvplaneError):
    """The operation exists in the API but this worker cannot do it as set up (HTTP 409, not
    501: the server implements it; what refuses is this instance's state, named in the
    message)."""

    status_code = 409


class CorruptChunk(KvplaneError):
    """Framed chunk bytes are truncated, malformed or fail their checksum; never served as KV."""

    status_code = 500
