"""The controller: registry, chunk index and executor (pure) | ZMQ service, HTTP API, CLI.

Imports no torch: it installs and starts on a box without the engine's stack.
"""

__all__: list[str] = []
