"""The internal API server of an engine process (see docs/internal_api.md).

``server`` runs one uvicorn per process role in its own thread (:class:`InternalApiService`
is the runtime's service); ``app`` builds each role's FastAPI app from the routers that
``discovery`` finds in the ``common/`` and ``engine/`` category packages; ``deps`` holds the
routes' ``Annotated`` dependencies and the token guard; ``error_handlers`` maps
``kvplane.errors`` to JSON error bodies.
"""
