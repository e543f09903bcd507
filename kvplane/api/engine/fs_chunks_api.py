"""POST /cache/load-fs-chunks: warm the CPU tier from a shared FSConnector directory.

The directory is the ``fs://`` ``remote_url`` of the engine config file the caller names
(the FSConnector tier's own loader reads it); chunks go into this engine's LocalCPUBackend.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from pydantic import BaseModel, Field

from kvplane.api.deps import CpuTier
from kvplane.api.responses import Success
from kvplane.engine.backends.fs import load_fs_chunks_from_config
from kvplane.errors import BadRequest
from kvplane.web.openapi import JSON_INTEGER, error_responses

__all__ = ["LoadFsChunksRequest", "LoadFsChunksResponse", "router"]

router = APIRouter()


class LoadFsChunksRequest(BaseModel):
    config_path: str = Field(min_length=1, description="an engine config with an fs:// remote_url")
    max_chunks: Annotated[int, Field(ge=0), JSON_INTEGER] | None = None
    max_failed_keys: Annotated[int, Field(ge=0), JSON_INTEGER] = 10


class LoadFsChunksResponse(Success):
    loaded_chunks: int
    total_files: int
    failed_keys: list[str]
    config_path: str


@router.post("/cache/load-fs-chunks", tags=["cache-management"], responses=error_responses(400))
def load_fs_chunks(body: LoadFsChunksRequest, cpu: CpuTier) -> LoadFsChunksResponse:
    try:
        result = load_fs_chunks_from_config(
            body.config_path,
            cpu,
            max_chunks=body.max_chunks,
            max_failed_keys=body.max_failed_keys,
        )
    except BadRequest as exc:
        raise BadRequest(
            str(exc),
            title="Failed to load chunks from FSConnector",
            details={"config_path": body.config_path},
        ) from None
    return LoadFsChunksResponse(
        loaded_chunks=result.loaded_chunks,
        total_files=result.total_files,
        failed_keys=result.failed_keys,
        config_path=body.config_path,
    )
