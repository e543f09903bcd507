"""The controller worker that runs inside each engine process (one per rank)."""

__all__: list[str] = []
