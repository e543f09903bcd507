"""The OpenAPI documents of kvplane's HTTP APIs: the error responses they declare and the
document each app serves.

Every 4xx/5xx answer carries the one error body of :mod:`kvplane.web.errors`, declared here
once as ``ErrorBody``. FastAPI documents a 422 for every route with parameters, but the error
handlers answer a request that does not validate with 400 "Invalid parameters", so the
served document says 400 instead (:func:`install_openapi`). Routes declare the other codes
they answer with :func:`error_responses`; clients generate code from these documents and the
test suite fuzzes the running servers against them (``tests/test_openapi_fuzz.py``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Annotated, Any

from fastapi import FastAPI
from fastapi.encoders import jsonable_encoder
from fastapi.openapi.models import Operation, Schema
from fastapi.openapi.utils import get_openapi
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    WithJsonSchema,
)
from pydantic.json_schema import JsonSchemaMode
from pydantic_core import core_schema

__all__ = [
    "CHOICES",
    "JSON_INTEGER",
    "NAMES",
    "NONEMPTY_STRING",
    "ErrorBody",
    "JsonInt",
    "OneOf",
    "Refine",
    "case_insensitive_pattern",
    "error_answer",
    "error_responses",
    "install_openapi",
    "link",
    "linked",
    "operations",
    "pair",
    "unrouted_operation",
]

OpenApi = dict[str, Any]

# Markers in a parameter's schema for values only the serving process knows; the app's
# refinement (kvplane.api.openapi) replaces them: CHOICES by an enum, NAMES by the pattern
# of a comma-separated list of names. The value names which set.
CHOICES = "x-kvplane-choices"
NAMES = "x-kvplane-names"
Refine = Callable[[OpenApi], None]

_METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")
_COMPONENT = "#/components/schemas/{model}"

#: A string that names something: never empty.
NONEMPTY_STRING = {"type": "string", "minLength": 1}


class ErrorBody(BaseModel):
    """``{"error": title, "message": text, **details}``: every kvplane error answer."""

    model_config = ConfigDict(extra="allow")

    error: str = Field(description="a short title, e.g. 'Invalid parameters', 'Unknown backend'")
    message: str = Field(description="what is wrong, naming the field or value")


_DESCRIPTIONS = {
    400: "Invalid parameters, or a value this server cannot use (the message names it)",
    401: "A bearer token is configured and the call lacks it",
    403: "Refused by this server's policy",
    404: "Something the request names does not exist",
    409: "The request contradicts the current state, or this instance cannot serve it as set "
    "up (the message says why)",
    503: "A worker, peer or store did not answer, or failed",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries declaring that a route answers ``codes`` with the error body."""
    return {code: {"model": ErrorBody, "description": _DESCRIPTIONS[code]} for code in codes}


def error_answer(description: str) -> dict[str, Any]:
    """A document's answer that carries the error body (what :func:`error_responses` has
    FastAPI write), for the steps that edit a built document."""
    schema = {"$ref": _COMPONENT.format(model=ErrorBody.__name__)}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def link(operation_id: str, description: str, **body: Any) -> dict[str, Any]:
    """An OpenAPI link to ``operation_id`` whose request body takes ``body``: the target's
    fields, each a runtime expression (``"$response.body#/event_id"``, or a list of them for
    an array) naming where in this call's answer, or its request, the value comes from.
    Schemathesis follows these in its stateful phase, so a link is also what lets the fuzzing
    reach an operation with an id that exists."""
    return {"operationId": operation_id, "requestBody": body, "description": description}


def query_link(operation_id: str, description: str, **parameters: str) -> dict[str, Any]:
    """An OpenAPI link to ``operation_id`` whose query ``parameters`` take runtime
    expressions (``"$response.body#/backend_name"``, ``"$request.query.tokens_input"``)."""
    return {"operationId": operation_id, "parameters": parameters, "description": description}


def linked(**links: dict[str, Any]) -> dict[int | str, dict[str, Any]]:
    """A ``responses=`` entry: the 200 answer, with ``links`` (each made by :func:`link` or
    :func:`query_link`)."""
    return {200: {"description": "Successful Response", "links": links}}


def _json_integer(value: Any) -> Any:
    """Let through what JSON Schema calls an integer (``1`` and ``1.0``) and nothing else:
    pydantic's lax mode would also turn ``"1"`` and ``true`` into 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be an integer")
    return value


JSON_INTEGER = BeforeValidator(_json_integer)
"""Metadata for an ``int`` field of a request body so that it takes exactly what its schema
(``integer``) says; after any constraints (``Annotated[int, Field(ge=0), JSON_INTEGER]``),
or pydantic writes them into the schema as ``ge``/``le`` instead of minimum/maximum."""
JsonInt = Annotated[int, JSON_INTEGER]


def pair(first: dict[str, Any], second: dict[str, Any], description: str) -> WithJsonSchema:
    """The schema of a two-element array (a tuple field) for ``Annotated[tuple[...], pair()]``.

    Written without ``prefixItems``: schemathesis (4.32) turns a response schema's
    ``prefixItems`` into the draft-4 ``items: [...]``, which it then rejects as invalid 3.1.
    So each element is described as either type (one schema when both are alike), and the
    description says which comes first."""
    items = first if first == second else {"anyOf": [first, second]}
    return WithJsonSchema(
        {
            "type": "array",
            "items": items,
            "minItems": 2,
            "maxItems": 2,
            "description": description,
        }
    )


class OneOf:
    """``Annotated[str, OneOf(values)]``: a string among ``values``, documented as their
    ``enum`` and checked on input (an error naming the valid ones)."""

    def __init__(self, values: Sequence[str]) -> None:
        self.values = tuple(values)

    def _check(self, value: str) -> str:
        if value not in self.values:
            raise ValueError(f"{value!r} is not one of {list(self.values)}")
        return value

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> dict[str, Any]:
        return {**handler(schema), "enum": list(self.values)}


def case_insensitive_pattern(words: Iterable[str]) -> str:
    """A regex (ECMA and Python alike) matching exactly one of ``words`` in any letter case:
    ``["info"]`` -> ``^(?:[Ii][Nn][Ff][Oo])$``."""

    def letters(word: str) -> str:
        return "".join(
            f"[{c.upper()}{c.lower()}]" if c.lower() != c.upper() else re.escape(c) for c in word
        )

    return "^(?:" + "|".join(letters(w) for w in words) + ")$"


def operations(document: OpenApi) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """``(path, method, operation)`` for every operation of ``document``."""
    for path, item in document.get("paths", {}).items():
        for method in _METHODS:
            if method in item:
                yield path, method, item[method]


def _validation_answers_400(document: OpenApi) -> None:
    """Replace FastAPI's documented 422 by the 400 the error handlers answer, and declare
    the error body once among the components."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas["ErrorBody"] = ErrorBody.model_json_schema()
    for _, _, operation in operations(document):
        responses = operation.setdefault("responses", {})
        if responses.pop("422", None) is not None and "400" not in responses:
            responses["400"] = error_answer(_DESCRIPTIONS[400])
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)


# How get_openapi() writes its document out: through FastAPI's OpenAPI models, which put
# each object's keys in their order and write numbers of schemas as floats (``minimum: 0.0``).
_AS_FASTAPI: dict[str, Any] = {"by_alias": True, "exclude_none": True}


def _schema(
    model: type[BaseModel], mode: JsonSchemaMode, schemas: dict[str, Any]
) -> dict[str, Any]:
    """``model``'s JSON schema as FastAPI writes it, the models it nests put among the
    document's ``schemas``."""
    schema = model.model_json_schema(mode=mode, ref_template=_COMPONENT)
    for name, nested in schema.pop("$defs", {}).items():
        schemas[name] = jsonable_encoder(Schema.model_validate(nested), **_AS_FASTAPI)
    return schema


def unrouted_operation(
    path: str,
    method: str,
    *,
    operation_id: str,
    tag: str,
    request: type[BaseModel],
    response: type[BaseModel],
    errors: Sequence[int],
    links: dict[str, Any],
) -> Refine:
    """A step for :func:`install_openapi` documenting an operation that no FastAPI route
    serves (an ASGI middleware answers it before routing) from its models: ``request``'s
    schema as the required JSON body, ``response``'s among the components (kept in name
    order) as the 200 answer with ``links``, the error body for each of ``errors``. The path
    goes first in ``paths``; the entry is what FastAPI writes for a route so declared."""

    def step(document: OpenApi) -> None:
        components = document.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        body = _schema(request, "validation", schemas)
        answer = _schema(response, "serialization", schemas)
        schemas[response.__name__] = jsonable_encoder(Schema.model_validate(answer), **_AS_FASTAPI)
        components["schemas"] = dict(sorted(schemas.items()))
        media = "application/json"
        ref = {"$ref": _COMPONENT.format(model=response.__name__)}
        operation = {
            "tags": [tag],
            "summary": operation_id.replace("_", " ").title(),
            "operationId": operation_id,
            "requestBody": {"content": {media: {"schema": body}}, "required": True},
            "responses": {
                "200": {
                    "description": "Successful Response",
                    "content": {media: {"schema": ref}},
                    "links": links,
                },
                **{str(code): error_answer(_DESCRIPTIONS[code]) for code in errors},
            },
        }
        item = {method: jsonable_encoder(Operation.model_validate(operation), **_AS_FASTAPI)}
        document["paths"] = {path: item, **document.get("paths", {})}

    return step


def install_openapi(app: FastAPI, *refine: Refine) -> None:
    """Serve ``app``'s document with validation errors as 400, then each ``refine`` applied
    in order (an app's own facts: this process's tier names, its token). Built once, on the
    first request for it."""

    def openapi() -> OpenApi:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                openapi_version=app.openapi_version,
                description=app.description,
                routes=app.routes,
            )
            _validation_answers_400(document)
            for step in refine:
                step(document)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
