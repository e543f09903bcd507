"""Paged KV caches and the chunks kvplane moves between them and its tiers.

* ``layout``: :class:`~kvplane.engine.kv.layout.KVLayout`, the one record of how the caches
  and their chunks are laid out (paged, MLA or packed blocks); every copy asks it.
* ``slots``: a chunk's slots prepared for copying (per block or per slot).
* ``copies``: gather a chunk from the caches, scatter it back (torch's index kernels, any
  device; runs of chunks batched on CUDA).
* ``cpu_blocks``: the same for packed CPU caches, as ``memcpy`` of whole blocks.
* ``transfers``: one engine's copies on the device: side streams, a lock, copy timings.
* ``checksums``: digests of the KV at given slots (the internal API's check).
"""
