"""Peer-to-peer chunk transfer between engine processes over TCP.

``server.ChunkServer`` serves chunks by key and accepts pushed chunks; ``client.P2PClient``
fetches and pushes; ``wire`` is the framing both sides share. The tier that fetches on a
local miss is :class:`kvplane.engine.backends.p2p.P2PBackend`.
"""

from kvplane.engine.p2p.client import P2PClient, parse_peer_url
from kvplane.engine.p2p.server import ChunkServer

__all__ = ["ChunkServer", "P2PClient", "parse_peer_url"]
