"""kvplane inside vLLM: the v1 KV connector.

``kv_connector_module_path: kvplane.integrations.vllm`` with ``kv_connector``
``KvplaneConnector`` (or ``LMCacheConnectorV1``, the original's name). The classes are
imported on first access, so importing this package costs nothing and needs no vLLM.
"""

from __future__ import annotations

from typing import Any

__all__ = ["KvplaneConnector", "LMCacheConnectorV1"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from kvplane.integrations.vllm import connector

        return getattr(connector, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
