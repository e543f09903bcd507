"""GET /threads: every thread of the process with its current stack (for hang diagnosis);
the route every kvplane server shares (:mod:`kvplane.web.diagnostics`)."""

from __future__ import annotations

from kvplane.web.diagnostics import threads_router

__all__ = ["router"]

router = threads_router()
