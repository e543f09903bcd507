"""What every kvplane HTTP app shares (the controller's, the internal API's, the reference
server's): one error body and its handlers, and the diagnostic routes. FastAPI only, no
torch: the controller imports it too."""

__all__: list[str] = []
