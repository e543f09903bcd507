"""The seeds' success shapes, built in one place (errors: :mod:`kvplane.web.errors`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

__all__ = ["Success", "success"]


class Success(BaseModel):
    """Base of the engine endpoints' answers: ``{"status": "success", ...}``."""

    status: Literal["success"] = "success"


def success(**fields: Any) -> dict[str, Any]:
    """``{"status": "success", **fields}`` for shapes whose field names vary."""
    return {"status": "success", **fields}
