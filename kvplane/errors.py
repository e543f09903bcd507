"""kvplane's error tree.

    KvplaneError
    ├── ConfigError      bad config key, type or value (names the key)
    ├── BadRequest       a caller's input is malformed (HTTP 400)
    ├── NotFound         unknown instance, worker, event, backend (HTTP 404)
    ├── Conflict         the request contradicts current state (HTTP 409)
    ├── Forbidden        refused by policy, e.g. /run_script disabled (HTTP 403)
    ├── Unavailable      a peer, worker or store did not answer in time (HTTP 503)
    └── CorruptChunk     stored or received chunk bytes fail their header or checksum check

Third-party exceptions are translated at the boundary that meets them.
"""

from __future__ import annotations

__all__ = [
    "BadRequest",
    "ConfigError",
    "Conflict",
    "CorruptChunk",
    "Forbidden",
    "KvplaneError",
    "NotFound",
    "Unavailable",
]


class KvplaneError(Exception):
    """Base of every error kvplane raises on purpose."""

    status_code = 500


class ConfigError(KvplaneError):
    status_code = 400


class BadRequest(KvplaneError):
    status_code = 400


class NotFound(KvplaneError):
    status_code = 404


class Conflict(KvplaneError):
    status_code = 409


class Forbidden(KvplaneError):
    status_code = 403


class Unavailable(KvplaneError):
    status_code = 503


class CorruptChunk(KvplaneError):
    """Framed chunk bytes are truncated, malformed or fail their checksum; never served as KV."""

    status_code = 500
