"""The seeds' response shapes, built in one place."""

from __future__ import annotations

from typing import Any

from kvplane.errors import KvplaneError

__all__ = ["error_body", "success"]


def success(**fields: Any) -> dict[str, Any]:
    """``{"status": "success", **fields}``, the shape of every engine endpoint's answer."""
    return {"status": "success", **fields}


def error_body(exc: KvplaneError) -> dict[str, Any]:
    """``{"error": title, "message": text, **details}``, the seeds' error shape."""
    return {"error": exc.title, "message": str(exc), **exc.details}
