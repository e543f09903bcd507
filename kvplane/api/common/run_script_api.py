"""POST /run_script: run an uploaded Python script inside the engine process.

Refused (403) unless ``internal_api_server_allow_run_script`` is true, and it needs the
bearer token when one is configured; both are checked before the body is read (the route
parses its multipart form itself), so a disabled endpoint answers 403 whatever is sent. The script sees ``app`` (the FastAPI app: the engine
handle is ``app.state.ctx.engine``); the value it leaves in ``result`` is the JSON answer.
"""

from __future__ import annotations

import traceback
from typing import Any

from fastapi import APIRouter, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from kvplane.api.deps import Config
from kvplane.errors import BadRequest, Forbidden
from kvplane.web.openapi import error_responses

__all__ = ["router", "run_script_source"]

router = APIRouter()


def run_script_source(source: str, filename: str, scope: dict[str, Any]) -> Any:
    """Execute ``source`` with ``scope`` as its globals; return its ``result`` variable."""
    namespace: dict[str, Any] = {"__name__": "__kvplane_script__", "result": None, **scope}
    try:
        code = compile(source, filename, "exec")
        exec(code, namespace)
    except Exception as exc:
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        raise BadRequest(last, title="Script failed") from None
    return namespace.get("result")


_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"script": {"type": "string", "format": "binary"}},
                "required": ["script"],
            }
        }
    },
}


async def _script_part(request: Request) -> tuple[str, bytes]:
    """The uploaded ``script`` part's file name and bytes; 400 "Invalid parameters" naming it
    when there is none. The form is closed on the way out: FastAPI closes only the forms it
    parses itself, and an unclosed upload's temporary file lingers until collected."""
    try:
        async with request.form() as form:
            script = form.get("script")
            if not isinstance(script, UploadFile):
                raise BadRequest(
                    "body.script: a file part named 'script' is required",
                    title="Invalid parameters",
                )
            return script.filename or "<script>", await script.read()
    except HTTPException as exc:  # starlette's answer to a malformed multipart body
        raise BadRequest(f"body: {exc.detail}", title="Invalid parameters") from None


@router.post(
    "/run_script", openapi_extra={"requestBody": _BODY}, responses=error_responses(400, 403)
)
async def run_script(request: Request, config: Config) -> JSONResponse:
    if not config.internal_api_server_allow_run_script:
        raise Forbidden(
            "/run_script is disabled; set internal_api_server_allow_run_script: true to allow it",
            title="Run script disabled",
        )
    filename, raw = await _script_part(request)
    try:
        source = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("The script is not UTF-8 text", title="Script failed") from None
    result = await run_in_threadpool(run_script_source, source, filename, {"app": request.app})
    try:
        body = jsonable_encoder(result)
    except (TypeError, ValueError):
        body = repr(result)
    return JSONResponse(body)
