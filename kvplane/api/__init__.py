"""The internal API server of an engine process (see docs/internal_api.md).

``server`` runs one uvicorn per process role in its own thread (:class:`InternalApiService`
is a service of :mod:`kvplane.process`); ``app`` builds each role's FastAPI app from the
routers that ``discovery`` finds in the ``common/`` and ``engine/`` category packages;
``deps`` holds the routes' ``Annotated`` dependencies and the token guard;
``error_handlers`` maps ``kvplane.errors`` to JSON error bodies. Routes reach the engine
only through the :class:`kvplane.engine.engine.Engine` handle in ``app.state.ctx``.
"""
