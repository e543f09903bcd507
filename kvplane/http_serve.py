"""Run a FastAPI app under uvicorn in the foreground until SIGTERM/SIGINT, then return.

uvicorn handles SIGTERM/SIGINT while it runs and afterwards re-raises the signal to the
handler installed before it; with the default handler that kills the process (exit -15)
before the caller's cleanup runs. The handler installed here only logs, so the caller's
``finally`` stops its services and the process exits 0.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

__all__ = ["run_http"]

log = logging.getLogger(__name__)


def run_http(app: Any, host: str, port: int, *, log_level: str = "warning") -> None:
    import uvicorn

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: log.info("signal %d: stopping", signum))
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False)
    uvicorn.Server(config).run()
