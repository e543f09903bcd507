"""Host memory for the CPU tier: one slab allocated up front, cut into chunk-sized pages.

Every page holds one chunk (a full chunk's bytes; a partial or compressed chunk uses a
prefix of it), so allocation is a pop from a free list and never fragments. The slab is
pinned when CUDA is present so host<->device copies run at PCIe speed. A page carries a
reference count: the tier holds one reference, and a reader or a queued lower-tier write
holds another while it uses the bytes, so an evicted page is reused only once nobody reads
it. ``allocate`` returns None when every page is taken; it never raises for a full pool.
"""

from __future__ import annotations

import threading

import torch

from kvplane.errors import Unavailable

__all__ = ["HostMemoryPool", "MemoryPage"]


class MemoryPage:
    """One page of the slab. ``data`` is a 1-D uint8 view of ``page_nbytes`` bytes."""

    __slots__ = ("_pool", "data", "index", "refcount")

    def __init__(self, pool: HostMemoryPool, index: int, data: torch.Tensor) -> None:
        self._pool = pool
        self.index = index
        self.data = data
        self.refcount = 0

    def retain(self) -> MemoryPage:
        self._pool._retain(self)
        return self

    def release(self) -> None:
        self._pool._release(self)


class HostMemoryPool:
    """Fixed-size pages over one slab. Thread-safe."""

    def __init__(self, page_nbytes: int, num_pages: int, *, pin: bool | None = None) -> None:
        if page_nbytes <= 0:
            raise ValueError("page_nbytes must be positive")
        if pin is None:
            pin = torch.cuda.is_available()
        self.page_nbytes = page_nbytes
        self.num_pages = max(0, num_pages)
        self.pinned = bool(pin and self.num_pages)
        nbytes = self.page_nbytes * self.num_pages
        try:
            self._slab = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)
        except RuntimeError as exc:  # torch's allocators report a failed allocation so
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "out of memory"
            raise Unavailable(
                f"cannot allocate a {'pinned ' if self.pinned else ''}host slab of "
                f"{nbytes} bytes ({reason})"
            ) from None
        self._pages = [
            MemoryPage(self, i, self._slab[i * page_nbytes : (i + 1) * page_nbytes])
            for i in range(self.num_pages)
        ]
        self._free = list(reversed(range(self.num_pages)))
        self._lock = threading.Lock()

    @classmethod
    def for_capacity(
        cls, capacity_bytes: int, page_nbytes: int, *, pin: bool | None = None
    ) -> HostMemoryPool:
        return cls(page_nbytes, capacity_bytes // page_nbytes, pin=pin)

    @property
    def capacity_bytes(self) -> int:
        return self.page_nbytes * self.num_pages

    @property
    def free_pages(self) -> int:
        with self._lock:
            return len(self._free)

    @property
    def used_bytes(self) -> int:
        return (self.num_pages - self.free_pages) * self.page_nbytes

    def allocate(self) -> MemoryPage | None:
        """A page with refcount 1, or None when the pool is full."""
        with self._lock:
            if not self._free:
                return None
            page = self._pages[self._free.pop()]
            page.refcount = 1
            return page

    def _retain(self, page: MemoryPage) -> None:
        with self._lock:
            if page.refcount <= 0:
                raise RuntimeError(f"page {page.index} retained after it was freed")
            page.refcount += 1

    def _release(self, page: MemoryPage) -> None:
        with self._lock:
            if page.refcount <= 0:
                raise RuntimeError(f"page {page.index} released more often than retained")
            page.refcount -= 1
            if page.refcount == 0:
                self._free.append(page.index)
