"""The demo's child processes are :mod:`kvplane.children`'s; this name stays only for
``kvplane.integrations.vllm.demo``, whose rewrite imports :mod:`kvplane.children` itself."""

from kvplane.children import free_ports

__all__ = ["free_ports"]
