"""Host memory for the CPU tier: one slab allocated up front, cut into chunk-sized pages.

Every page holds one chunk (a full chunk's bytes; a partial or compressed chunk uses a
prefix of it), so allocation is a pop from a free list and never fragments. The slab is
pinned when CUDA is present so host<->device copies run at PCIe speed. A page carries a
reference count: the tier holds one reference, and a reader or a queued lower-tier write
holds another while it uses the bytes, so an evicted page is reused only once nobody reads
it. ``allocate`` returns None when every page is taken; it never raises for a full pool.

With ``prefault`` an unpinned slab's memory is made resident by a background thread at
the lowest priority, ahead of the stores (see :func:`_prefault`).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import threading
import time

import torch

from kvplane.errors import Unavailable

__all__ = ["HostMemoryPool", "MemoryPage"]

log = logging.getLogger(__name__)

#: madvise(2) advice that faults pages in writable without changing their bytes (Linux
#: 5.14); Python 3.11's mmap module does not name it.
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
#: Bytes made resident per madvise call: small enough that the thread is easy to preempt.
_PREFAULT_STEP = 32 << 20


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

    def __init__(
        self, page_nbytes: int, num_pages: int, *, pin: bool | None = None, prefault: bool = False
    ) -> None:
        if page_nbytes <= 0:
            raise ValueError("page_nbytes must be positive")
        if pin is None:
            pin = torch.cuda.is_available()
        self.page_nbytes = page_nbytes
        self.num_pages = max(0, num_pages)
        self.pinned = bool(pin and self.num_pages)
        nbytes = self.page_nbytes * self.num_pages
        region = None
        #: set once the slab is resident (at once where there is nothing to prefault)
        self.prefaulted = threading.Event()
        try:
            if self.pinned or not nbytes:
                self._slab = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)
            else:
                region = _huge_page_slab(nbytes)
                self._slab = torch.frombuffer(region, dtype=torch.uint8)
        except (RuntimeError, OSError) as exc:  # torch's allocators report a failure so
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
        if prefault and region is not None:
            args = (region, self.prefaulted)
            threading.Thread(
                target=_prefault, args=args, name="kvplane-prefault", daemon=True
            ).start()
        else:
            self.prefaulted.set()

    @classmethod
    def for_capacity(
        cls,
        capacity_bytes: int,
        page_nbytes: int,
        *,
        pin: bool | None = None,
        prefault: bool = False,
    ) -> HostMemoryPool:
        return cls(page_nbytes, capacity_bytes // page_nbytes, pin=pin, prefault=prefault)

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


def _huge_page_slab(nbytes: int) -> mmap.mmap:
    """``nbytes`` of anonymous memory the kernel may back with transparent huge pages.

    The slab's pages are first written when chunks land in them (stores, peer fetches), and
    on a VM a first write costs a page fault per 4 KB: measured on this project's 2-core VM,
    32 MB written into fresh memory took 27 ms against 7.5 ms into touched memory, 10.5 ms
    with huge pages (512x fewer faults), which also make every later copy miss the TLB less.
    Where THP is off or unknown the advice is a no-op and the slab is ordinary memory."""
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        with contextlib.suppress(OSError):  # a kernel without THP: ordinary pages
            region.madvise(advice)
    return region


def _prefault(region: mmap.mmap, done: threading.Event) -> None:
    """Make the slab resident, front to back (pages are handed out from the front), at the
    lowest CPU priority. On a VM a page's first write is a fault the host must back: 21 MB
    of fresh slab took 70-150 ms to store into against 5 ms into resident memory on this
    project's 2-core VM, which made every store of a filling tier (a no-reuse workload's
    every store) that much slower inside vLLM's step. MADV_POPULATE_WRITE faults the pages
    in without writing a byte, so chunks stored meanwhile are left as they are. A kernel
    without it (before 5.14) leaves the slab to fill on first use, as before."""
    start = time.perf_counter()
    with contextlib.suppress(OSError, AttributeError):  # per-thread priority: Linux only
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    try:
        for offset in range(0, len(region), _PREFAULT_STEP):
            region.madvise(_MADV_POPULATE_WRITE, offset, min(_PREFAULT_STEP, len(region) - offset))
    except (OSError, ValueError) as exc:  # an old kernel (EINVAL), or a closed region
        log.info("CPU tier slab not prefaulted (%s): its pages fault in on first use", exc)
    else:
        log.info(
            "CPU tier slab of %d MB resident in %.1f s",
            len(region) >> 20,
            time.perf_counter() - start,
        )
    finally:
        done.set()
