"""Bearer tokens, the same on every kvplane HTTP server (the controller's ``api_token``, the
internal API's ``internal_api_server_token``).

A guarded call without ``Authorization: Bearer <token>`` is refused with 401 (and
``WWW-Authenticate: Bearer``), one with another token with 403; tokens are compared in
constant time. :func:`declare_bearer` writes the same rule into an app's OpenAPI document
(the ``bearer`` scheme, 401 and 403 on each guarded operation), so clients generated from
it know which routes need the header.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi.responses import JSONResponse

from kvplane.errors import Forbidden, KvplaneError, Unauthorized
from kvplane.web.errors import error_body
from kvplane.web.openapi import error_answer, operations

__all__ = [
    "SAFE_METHODS",
    "SECURITY_SCHEME",
    "BearerGuard",
    "bearer_refinement",
    "check_bearer",
    "declare_bearer",
    "is_loopback",
]

#: Methods that read: a server that guards "mutating calls" guards every other one.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

#: The scheme's name in the OpenAPI documents.
SECURITY_SCHEME = "bearer"
_ANSWERS = {
    "401": "No bearer token (Authorization: Bearer <token>)",
    "403": "A bearer token that is not this server's",
}

_Scope = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
_Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
_App = Callable[[_Scope, _Receive, _Send], Awaitable[None]]


def check_bearer(authorization: str | None, token: str) -> None:
    """Pass if ``authorization`` (the header's value) is ``Bearer <token>``; raise
    Unauthorized when no bearer token was sent, Forbidden when another one was."""
    scheme, _, given = (authorization or "").partition(" ")
    given = given.strip()
    if scheme.lower() != "bearer" or not given:
        raise Unauthorized("This endpoint requires 'Authorization: Bearer <token>'")
    if not secrets.compare_digest(given.encode("utf-8", "replace"), token.encode("utf-8")):
        raise Forbidden("The bearer token is not this server's token")


class BearerGuard:
    """ASGI middleware: each HTTP request goes through ``check(method, path,
    authorization)`` before anything reads its body; a KvplaneError it raises is answered
    with the error body (401 with ``WWW-Authenticate: Bearer``)."""

    def __init__(self, app: _App, check: Callable[[str, str, str | None], None]) -> None:
        self.app = app
        self.check = check

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] == "http":
            given = next((v for k, v in scope["headers"] if k == b"authorization"), None)
            try:
                self.check(
                    scope["method"],
                    scope["path"],
                    None if given is None else given.decode("latin-1"),
                )
            except KvplaneError as exc:
                headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
                answer = JSONResponse(error_body(exc), status_code=exc.status_code, headers=headers)
                await answer(scope, receive, send)
                return
        await self.app(scope, receive, send)


def declare_bearer(document: dict[str, Any], guarded: Callable[[str, str], bool]) -> None:
    """Declare the bearer scheme in an OpenAPI ``document``, and its 401/403 answers on each
    operation that ``guarded(method, path)`` says needs the token (a refinement for
    :func:`kvplane.web.openapi.install_openapi`)."""
    schemes = document.setdefault("components", {}).setdefault("securitySchemes", {})
    schemes[SECURITY_SCHEME] = {"type": "http", "scheme": "bearer"}
    for path, method, operation in operations(document):
        if guarded(method.upper(), path):
            operation["security"] = [{SECURITY_SCHEME: []}]
            responses = operation.setdefault("responses", {})
            for code, description in _ANSWERS.items():
                responses.setdefault(code, error_answer(description))


def bearer_refinement(guarded: Callable[[str, str], bool]) -> Callable[[dict[str, Any]], None]:
    """:func:`declare_bearer` with ``guarded``, as a step for ``install_openapi``."""
    return lambda document: declare_bearer(document, guarded)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps a server on this machine (``localhost`` included)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"
