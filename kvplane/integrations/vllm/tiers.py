"""What vLLM calls each kvplane tier, keyed by the tier's own name (its backend's ``name``).

One row per tier that can answer a load, highest first: the order the scheduler's index
prefers a tier in, the KV-event medium vLLM publishes (upper case, as Dynamo and llm-d read
them) and the ``CacheHitSource`` a load from it counts as.
"""

from __future__ import annotations

from typing import NamedTuple

from kvplane.engine.backends.cpu import LocalCPUBackend
from kvplane.engine.backends.disk import LocalDiskBackend
from kvplane.engine.backends.fs import FSConnectorBackend
from kvplane.engine.backends.remote import RemoteBackend

__all__ = ["TIERS", "TIER_ORDER", "VllmTier", "hit_source", "medium"]


class VllmTier(NamedTuple):
    name: str
    medium: str
    hit_source: str


TIERS = (
    VllmTier(LocalCPUBackend.name, "CPU", "host"),
    VllmTier(LocalDiskBackend.name, "DISK", "disk"),
    VllmTier(FSConnectorBackend.name, "SHARED", "disk"),
    VllmTier(RemoteBackend.name, "EXTERNAL", "external_unspecified"),
)
TIER_ORDER = tuple(t.name for t in TIERS)
_BY_NAME = {t.name: t for t in TIERS}


def medium(location: str) -> str:
    """The KV-event medium of tier ``location``; an unknown tier's name in upper case."""
    tier = _BY_NAME.get(location)
    return tier.medium if tier is not None else location.upper()


def hit_source(location: str) -> str:
    """The ``CacheHitSource`` of a load from tier ``location``."""
    tier = _BY_NAME.get(location)
    return tier.hit_source if tier is not None else "external_unspecified"
