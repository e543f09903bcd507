import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvplane.engine.backends.cpu import LocalCPUBackend
from kvplane.engine.chunk import KVChunk
from kvplane.engine.events import ChunkAdmitted, ChunkEvicted
from kvplane.engine.memory_pool import HostMemoryPool
from kvplane.keys import CacheKey
from tests.support import run_threads

PAGE = 64


def key(i: int) -> CacheKey:
    return CacheKey("m", 1, 0, "float32", i)


def chunk(value: int) -> KVChunk:
    return KVChunk.from_kv(torch.full((PAGE // 4,), float(value)), 1)


def tier(pages: int) -> LocalCPUBackend:
    return LocalCPUBackend(HostMemoryPool(PAGE, pages, pin=False))


def test_pool_refcounts_and_full_pool():
    pool = HostMemoryPool(PAGE, 2, pin=False)
    a, b = pool.allocate(), pool.allocate()
    assert a is not None and b is not None and pool.allocate() is None
    a.retain()
    a.release()
    assert pool.free_pages == 0
    a.release()
    assert pool.free_pages == 1
    assert pool.used_bytes == PAGE


def test_lru_evicts_least_recently_used_and_emits_events():
    t = tier(3)
    events = []
    t.set_event_sink(events.append)
    for i in range(3):
        assert t.put(key(i), chunk(i))
    assert t.get(key(0)) is not None  # touch 0: LRU order is now 1, 2, 0
    assert t.put(key(3), chunk(3))
    assert t.keys() == [key(2), key(0), key(3)]
    assert ChunkEvicted(key(1), "LocalCPUBackend") in events
    assert events[0] == ChunkAdmitted(key(0), "LocalCPUBackend")
    assert torch.equal(t.get(key(3)).kv(), chunk(3).kv())


def test_pinned_chunks_are_never_evicted_and_full_of_pins_refuses():
    t = tier(2)
    t.put(key(0), chunk(0))
    t.put(key(1), chunk(1))
    assert t.pin(key(0))
    t.put(key(2), chunk(2))
    assert t.contains(key(0)) and not t.contains(key(1))
    t.pin(key(2))
    assert t.put(key(3), chunk(3)) is False
    assert t.refused_stores == 1
    assert set(t.keys()) == {key(0), key(2)}
    t.unpin(key(0))
    assert t.put(key(3), chunk(3))
    assert not t.contains(key(0))


def test_in_use_chunk_is_not_evicted_nor_reused():
    t = tier(1)
    t.put(key(0), chunk(0))
    with t.read(key(0)) as held:
        assert t.put(key(1), chunk(1)) is False  # the only page is being read
        assert torch.equal(held.kv(), chunk(0).kv())
    assert t.put(key(1), chunk(1))


def test_hot_cache_off_drops_entries_and_keeps_nothing_new():
    t = tier(4)
    t.put(key(0), chunk(0))
    t.pin(key(0))
    assert t.set_hot_cache(False) == 1
    assert t.keys() == [] and t.pool.free_pages == 4
    assert t.put(key(1), chunk(1)) is False
    t.set_hot_cache(True)
    assert t.put(key(1), chunk(1))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["put", "pin", "unpin", "get", "remove", "capacity"]),
            st.integers(0, 9),
        ),
        max_size=80,
    )
)
def test_accounting_never_exceeds_limit(ops):
    t = tier(4)
    limit = 4
    for op, i in ops:
        if op == "put":
            stored = t.put(key(i), chunk(i))
            pinned = sum(t.is_pinned(k) for k in t.keys())
            assert stored or t.contains(key(i)) or pinned >= limit
        elif op == "capacity":
            assert t.set_capacity(i * PAGE) == min(i, 4) * PAGE
            limit = min(i, 4)
        elif op == "get":
            got = t.get(key(i))
            assert got is None or torch.equal(got.kv(), chunk(i).kv())
        else:
            getattr(t, op)(key(i))
        pinned = sum(t.is_pinned(k) for k in t.keys())
        assert len(t.keys()) <= max(limit, pinned)
        assert t.pool.used_bytes <= t.pool.capacity_bytes
        assert t.pool.free_pages == 4 - len(t.keys())


def test_concurrent_puts_and_reads_keep_data_intact():
    t = tier(8)
    errors = []

    def worker(seed):
        try:
            for n in range(300):
                i = (seed * 7 + n) % 20
                t.put(key(i), chunk(i))
                got = t.get(key(i))
                if got is not None and not torch.equal(got.kv(), chunk(i).kv()):
                    errors.append(i)
        except Exception as exc:
            errors.append(exc)

    run_threads(worker, 4, timeout=60)
    assert errors == []
    assert t.pool.free_pages == 8 - len(t.keys())


def test_capacity_shrinks_by_lru_keeps_pins_and_grows_back_to_the_slab():
    t = tier(4)
    events = []
    t.set_event_sink(events.append)
    for i in range(4):
        t.put(key(i), chunk(i))
    t.pin(key(0))
    t.get(key(1))  # LRU order now 0 (pinned), 2, 3, 1
    assert t.set_capacity(2 * PAGE + 5) == 2 * PAGE  # whole pages
    assert t.keys() == [key(0), key(1)]
    assert [e for e in events if isinstance(e, ChunkEvicted)] == [
        ChunkEvicted(key(2), "LocalCPUBackend"),
        ChunkEvicted(key(3), "LocalCPUBackend"),
    ]
    assert t.put(key(5), chunk(5))  # evicts 1, the only unpinned entry
    assert t.keys() == [key(0), key(5)]
    assert t.pool.free_pages == 2  # the slab is larger, the tier uses only its capacity
    t.set_capacity(PAGE)
    assert t.keys() == [key(0)]  # pinned: stays although it fills the capacity
    refused = t.refused_stores
    assert t.put(key(6), chunk(6)) is False
    assert t.refused_stores == refused + 1
    assert t.set_capacity(100 * PAGE) == 4 * PAGE  # never beyond the slab
    for i in range(6, 9):
        assert t.put(key(i), chunk(i))
    assert len(t.keys()) == 4 and t.pool.free_pages == 0


def test_slab_is_pinned_exactly_when_cuda_is_present():
    pool = HostMemoryPool(PAGE, 4)
    assert pool.pinned == torch.cuda.is_available()
    page = pool.allocate()
    assert page is not None and page.data.is_pinned() == torch.cuda.is_available()
    # Every page is a view of the one slab allocated up front.
    assert page.data.untyped_storage().data_ptr() == pool._slab.untyped_storage().data_ptr()


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 5),
    st.lists(
        st.tuples(st.sampled_from(["put", "get", "pin", "unpin", "remove"]), st.integers(0, 7)),
        max_size=60,
    ),
)
def test_lru_order_matches_a_reference_model(pages, ops):
    """Exact eviction order: the least recently put or read unpinned entry goes first."""
    t = tier(pages)
    model: dict[int, bool] = {}  # key -> pinned, in LRU order (dicts keep insertion order)
    for op, i in ops:
        if op == "put":
            expect = True
            if i in model:
                model[i] = model.pop(i)
            else:
                if len(model) >= pages:
                    victim = next((k for k, pinned in model.items() if not pinned), None)
                    if victim is None:
                        expect = False
                    else:
                        del model[victim]
                if expect:
                    model[i] = False
            assert t.put(key(i), chunk(i)) is expect
        elif op == "get":
            got = t.get(key(i))
            assert (got is not None) == (i in model)
            if i in model:
                model[i] = model.pop(i)
                assert torch.equal(got.kv(), chunk(i).kv())
        elif op in ("pin", "unpin"):
            assert getattr(t, op)(key(i)) == (i in model)
            if i in model:
                model[i] = op == "pin"
        else:
            assert t.remove(key(i)) == (i in model)
            model.pop(i, None)
        assert t.keys() == [key(k) for k in model]


def _resident_bytes(view: torch.Tensor) -> int:
    """Bytes of ``view``'s memory that are resident now (mincore(2) on its pages)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    start = view.data_ptr() // page * page
    length = view.data_ptr() + view.numel() - start
    vec = (ctypes.c_ubyte * (-(-length // page)))()
    rc = libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), vec)
    assert rc == 0, ctypes.get_errno()
    return sum(b & 1 for b in vec) * page


def test_prefault_makes_the_slab_resident_and_leaves_stored_bytes_alone():
    page_bytes, pages = 1 << 20, 64
    cold = HostMemoryPool(page_bytes, pages, pin=False)
    assert cold.prefaulted.is_set()  # nothing to wait for without prefault
    assert _resident_bytes(cold._slab) < page_bytes * pages // 2  # pages fault in on use
    warm = HostMemoryPool(page_bytes, pages, pin=False, prefault=True)
    # chunks land while the slab is being made resident: their bytes must stay
    written = []
    for i in range(8):
        p = warm.allocate()
        assert p is not None
        p.data.fill_(i + 1)
        written.append(p)
    assert warm.prefaulted.wait(30)
    assert _resident_bytes(warm._slab) == page_bytes * pages
    for i, p in enumerate(written):
        assert bool((p.data == i + 1).all())
