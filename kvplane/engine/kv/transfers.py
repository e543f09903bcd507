"""One engine's copies between its paged caches and chunk tensors, on the caches' device.

On CUDA, an engine's transfers are serialized by a lock and run on two side streams, one
for kernels and one for host<->device copies, so they overlap the host's work without
racing the caller's stream. On CPU the copies are synchronous, and their time and bytes go
to the engine's metrics (on CUDA they are only queued here; the transfer benchmark
measures them instead).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence

import torch

from kvplane.engine.kv.copies import gather_many, scatter_many
from kvplane.engine.kv.layout import KVLayout
from kvplane.engine.kv.slots import Copies
from kvplane.engine.metrics import EngineMetrics

__all__ = ["Transfers"]


class Transfers:
    def __init__(self, layout: KVLayout, metrics: EngineMetrics) -> None:
        self.layout = layout
        self.metrics = metrics
        self._cuda_lock = threading.Lock()

    @contextlib.contextmanager
    def on_device(self, kv_caches: Sequence[torch.Tensor]) -> Iterator[torch.cuda.Stream | None]:
        """Hold this engine's device for one store or retrieve: its kernels run on a side
        stream, and a copy stream is yielded for :meth:`gather` and :meth:`scatter` (None on
        CPU); both are synchronized on exit."""
        if not kv_caches or kv_caches[0].device.type != "cuda":
            yield None
            return
        device = kv_caches[0].device
        with self._cuda_lock:
            stream = torch.cuda.Stream(device=device)
            copy_stream = torch.cuda.Stream(device=device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                yield copy_stream
            stream.wait_stream(copy_stream)
            stream.synchronize()

    def gather(
        self,
        kv_caches: Sequence[torch.Tensor],
        copies: Copies,
        copy_stream: torch.cuda.Stream | None,
    ) -> None:
        """:func:`~kvplane.engine.kv.copies.gather_many`, timed as the store's copies."""
        with self._timed("store", kv_caches, copies):
            gather_many(self.layout, kv_caches, copies, copy_stream)

    def scatter(
        self,
        kv_caches: Sequence[torch.Tensor],
        copies: Copies,
        copy_stream: torch.cuda.Stream | None,
    ) -> None:
        """:func:`~kvplane.engine.kv.copies.scatter_many`, timed as the retrieve's copies."""
        with self._timed("retrieve", kv_caches, copies):
            scatter_many(self.layout, kv_caches, copies, copy_stream)

    @staticmethod
    def wait(kv_caches: Sequence[torch.Tensor]) -> None:
        """Until the current stream's copies are done (chunk pages may be reused after)."""
        if kv_caches and kv_caches[0].device.type == "cuda":
            torch.cuda.current_stream(kv_caches[0].device).synchronize()

    @contextlib.contextmanager
    def _timed(self, op: str, kv_caches: Sequence[torch.Tensor], copies: Copies) -> Iterator[None]:
        if not copies or not kv_caches or kv_caches[0].device.type != "cpu":
            yield
            return
        start = time.perf_counter()
        yield
        self.metrics.copy_seconds.labels(op).inc(time.perf_counter() - start)
        self.metrics.copied_bytes.labels(op).inc(
            sum(kv.numel() * kv.element_size() for _, kv in copies)
        )
