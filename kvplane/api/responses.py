"""The seeds' response shapes, built in one place."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from kvplane.errors import KvplaneError

__all__ = ["Success", "error_body", "success"]


class Success(BaseModel):
    """Base of the engine endpoints' answers: ``{"status": "success", ...}``."""

    status: Literal["success"] = "success"


def success(**fields: Any) -> dict[str, Any]:
    """``{"status": "success", **fields}`` for shapes whose field names vary."""
    return {"status": "success", **fields}


def error_body(exc: KvplaneError) -> dict[str, Any]:
    """``{"error": title, "message": text, **details}``, the seeds' error shape."""
    return {"error": exc.title, "message": str(exc), **exc.details}
