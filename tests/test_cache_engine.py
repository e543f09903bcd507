import pytest
import torch

from kvplane.config import EngineConfig
from kvplane.engine.events import ChunkAdmitted, ChunkEvicted
from kvplane.engine.kv.copies import gather
from kvplane.engine.kv.layout import allocate_kv_caches
from kvplane.errors import BadRequest
from kvplane.process import EngineProcess
from tests.support import run_threads

SHAPES = [
    dict(kv_num_layers=2, kv_num_heads=2, kv_head_size=16, kv_dtype="bfloat16"),
    dict(kv_num_layers=3, kv_num_heads=1, kv_head_size=8, kv_dtype="float32"),
    dict(kv_num_layers=2, kv_num_heads=4, kv_head_size=8, kv_dtype="float16"),
    dict(kv_num_layers=2, kv_num_heads=1, kv_head_size=32, kv_dtype="bfloat16", use_mla=True),
    dict(kv_num_layers=2, kv_num_heads=2, kv_head_size=16, kv_dtype="float8_e4m3fn"),
    dict(kv_num_layers=1, kv_num_heads=1, kv_head_size=64, kv_dtype="float8_e5m2", use_mla=True),
]


def make_runtime(device="cpu", **overrides):
    base = dict(chunk_size=16, kv_block_size=4, kv_num_blocks=64, max_local_cpu_size=0.01)
    base.update(overrides)
    return EngineProcess(EngineConfig(**base), device=device)


def random_slots(rt, n, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(rt.layout.num_slots, generator=gen)[:n]


def kv_at(layout, caches, slots):
    return gather(layout, caches, slots).cpu().view(torch.uint8)


@pytest.mark.parametrize(
    "shape", SHAPES, ids=lambda s: f"{s['kv_dtype']}-{'mla' if s.get('use_mla') else 'paged'}"
)
def test_store_clear_retrieve_round_trip(device, shape):
    rt = make_runtime(device, **shape)
    engine = rt.cache_engine
    tokens = list(range(1000, 1000 + 45))  # 2 full chunks + a partial one
    slots = random_slots(rt, 45, 1)
    expected = kv_at(rt.layout, rt.kv_caches, slots)
    result = engine.store(tokens, rt.kv_caches, slots)
    assert (result.num_tokens, result.num_chunks) == (45, 3)
    assert engine.lookup(tokens) == 45
    for cache in rt.kv_caches:  # "clear the GPU-side cache"
        cache.zero_()
    new_slots = random_slots(rt, 45, 2)
    got = engine.retrieve(tokens, rt.kv_caches, new_slots)
    assert got.num_tokens == 45 and got.num_chunks == 3
    assert torch.equal(kv_at(rt.layout, rt.kv_caches, new_slots), expected)
    rt.stop()


def test_retrieve_stops_at_missing_middle_chunk(device):
    rt = make_runtime(device)
    engine = rt.cache_engine
    tokens = list(range(64))
    slots = random_slots(rt, 64, 3)
    engine.store(tokens, rt.kv_caches, slots)
    keys = engine.keys_for(tokens)
    rt.storage.cpu.remove(keys[2])
    assert engine.lookup(tokens) == 32
    dst = allocate_kv_caches(rt.layout, device)
    assert engine.retrieve(tokens, dst, slots).num_tokens == 32
    assert torch.equal(
        kv_at(rt.layout, dst, slots[:32]), kv_at(rt.layout, rt.kv_caches, slots[:32])
    )
    assert not kv_at(rt.layout, dst, slots[32:]).any()


def test_shared_prefix_hits_partially_and_store_skips_held_chunks():
    rt = make_runtime()
    engine = rt.cache_engine
    slots = random_slots(rt, 64, 4)
    engine.store(list(range(40)), rt.kv_caches, slots)
    longer = list(range(32)) + [7] * 32
    assert engine.lookup(longer) == 32
    result = engine.store(longer, rt.kv_caches, slots)
    assert result.num_chunks == 2 and result.num_tokens == 64


def test_events_min_retrieve_tokens_and_freeze():
    rt = make_runtime()
    engine = rt.cache_engine
    events = rt.storage.subscribe("test")
    slots = random_slots(rt, 32, 5)
    engine.store(list(range(32)), rt.kv_caches, slots)
    assert [type(e) for e in events.take_events()] == [ChunkAdmitted, ChunkAdmitted]
    rt.config_store.update({"min_retrieve_tokens": 64})
    assert engine.retrieve(list(range(32)), rt.kv_caches, slots).num_tokens == 0
    rt.config_store.update({"min_retrieve_tokens": 0})
    engine.frozen = True
    assert engine.store(list(range(100, 132)), rt.kv_caches, slots).num_tokens == 0
    assert engine.retrieve(list(range(32)), rt.kv_caches, slots).num_tokens == 32
    assert events.take_events() == []


def test_freeze_holds_tier_events_and_delivers_them_when_lifted(tmp_path):
    rt = make_runtime(local_disk=f"file://{tmp_path / 'disk'}", max_local_disk_size=0.01)
    engine, storage = rt.cache_engine, rt.storage
    cpu, disk = "LocalCPUBackend", "LocalDiskBackend"
    sub = storage.subscribe("test")
    tokens = list(range(48))
    engine.store(tokens, rt.kv_caches, random_slots(rt, 48, 7))
    assert storage.flush(10)
    keys = engine.keys_for(tokens)
    events = sub.take_events()
    assert sorted(events) == sorted(ChunkAdmitted(k, t) for k in keys for t in (cpu, disk))

    engine.frozen = True
    assert engine.clear([cpu]) == (3, 48)
    assert storage.cpu.set_hot_cache(False) == 0
    # a queued lower-tier write landing while frozen, then removed: only its last event counts
    extra = engine.keys_for(list(range(500, 516)))[0]
    tier = storage.backends[disk]
    assert tier.put(extra, tier.get(keys[1]))
    assert tier.remove(extra) and tier.remove(keys[0])
    assert sub.take_events() == []  # nothing leaves while frozen
    assert engine.lookup(tokens) == 0

    engine.frozen = False
    assert sub.take_events() == [ChunkEvicted(k, cpu) for k in keys] + [
        ChunkEvicted(extra, disk),
        ChunkEvicted(keys[0], disk),
    ]
    engine.frozen = True
    engine.frozen = False
    assert sub.take_events() == []  # delivered once
    storage.cpu.set_hot_cache(True)
    engine.store(list(range(900, 916)), rt.kv_caches, random_slots(rt, 16, 8))
    assert storage.flush(10)
    (key,) = engine.keys_for(list(range(900, 916)))
    assert sub.take_events() == [ChunkAdmitted(key, cpu), ChunkAdmitted(key, disk)]
    assert not sub.take_resync() and sub.dropped == 0
    rt.stop()


def test_full_tier_refuses_cleanly_and_pins_survive():
    # 0.0001 GB / 16 tokens * 2 layers * 2 * 4 heads * 64 * 2 bytes -> 16 pages
    rt = make_runtime(
        kv_num_layers=2,
        kv_num_heads=4,
        kv_head_size=64,
        kv_num_blocks=512,
        max_local_cpu_size=0.0001,
    )
    engine = rt.cache_engine
    pages = rt.storage.cpu.pool.num_pages
    slots = random_slots(rt, 16, 6)
    first = list(range(16))
    engine.store(first, rt.kv_caches, slots)
    assert engine.pin(first) == 16
    for i in range(1, pages * 2):
        engine.store([i * 1000 + t for t in range(16)], rt.kv_caches, slots)
    assert engine.lookup(first) == 16
    cpu = rt.storage.cpu
    for k in cpu.keys():
        cpu.pin(k)
    before = rt.metrics.refused_stores._value.get()
    assert engine.store(list(range(10**6, 10**6 + 16)), rt.kv_caches, slots).num_tokens == 0
    assert rt.metrics.refused_stores._value.get() == before + 1


def test_bad_slot_mapping_is_rejected():
    rt = make_runtime()
    with pytest.raises(BadRequest):
        rt.cache_engine.store(list(range(10)), rt.kv_caches, torch.arange(5))
    with pytest.raises(BadRequest):
        rt.cache_engine.store(list(range(10)), rt.kv_caches, torch.arange(10) + 10**6)


def test_four_threads_store_and_retrieve_concurrently(device):
    rt = make_runtime(device, max_local_cpu_size=0.002)
    engine = rt.cache_engine
    prompts = [list(range(s, s + 48)) for s in (0, 0, 500, 900)]
    prompts[1] = list(range(32)) + [9] * 16  # shares two chunks with prompt 0
    errors: list = []

    # Every thread reads the same source slots, so a chunk's bytes do not depend on which
    # thread stored it first, and each retrieve must reproduce the source exactly.
    slots = random_slots(rt, 48, 10)
    expected = kv_at(rt.layout, rt.kv_caches, slots)

    def worker(i):
        try:
            dst = allocate_kv_caches(rt.layout, device)
            for _ in range(15):
                engine.store(prompts[i], rt.kv_caches, slots)
                got = engine.retrieve(prompts[i], dst, slots).num_tokens
                if got != 48:
                    errors.append(f"thread {i} retrieved {got} tokens")
                elif not torch.equal(kv_at(rt.layout, dst, slots), expected):
                    errors.append(f"thread {i} read corrupted KV")
                for cache in dst:
                    cache.zero_()
        except Exception as exc:  # surfaced below
            errors.append(exc)

    run_threads(worker, 4, timeout=120)
    assert errors == []


def test_metrics_count_what_happened():
    rt = make_runtime(max_local_cpu_size=0.001)  # 16 pages of 64 KiB
    engine = rt.cache_engine

    def sample(name, **labels):
        return rt.metrics.registry.get_sample_value(name, labels or None) or 0.0

    tokens = list(range(45))
    slots = random_slots(rt, 45, 7)
    nbytes = rt.layout.chunk_nbytes(16) * 2 + rt.layout.chunk_nbytes(13)
    engine.store(tokens, rt.kv_caches, slots)
    assert sample("kvplane_stored_tokens_total") == 45
    assert sample("kvplane_stored_bytes_total") == nbytes
    assert sample("kvplane_store_seconds_count") == 1
    engine.store(tokens, rt.kv_caches, slots)  # all held: nothing new
    assert sample("kvplane_stored_bytes_total") == nbytes
    rt.storage.cpu.remove(engine.keys_for(tokens)[1])
    assert sample("kvplane_evictions_total", tier="LocalCPUBackend") == 1
    assert engine.retrieve(tokens, rt.kv_caches, slots).num_tokens == 16
    assert sample("kvplane_retrieved_tokens_total") == 16
    assert sample("kvplane_retrieved_bytes_total") == rt.layout.chunk_nbytes(16)
    assert (sample("kvplane_chunk_hits_total"), sample("kvplane_chunk_misses_total")) == (1, 1)
    assert sample("kvplane_retrieve_seconds_count") == 1
    # Memory pressure: every page is taken, so LRU evictions are counted per tier.
    pages = rt.storage.cpu.pool.num_pages
    for i in range(pages + 3):
        engine.store([10**5 + i * 100 + t for t in range(16)], rt.kv_caches, slots[:16])
    assert sample("kvplane_evictions_total", tier="LocalCPUBackend") >= 1 + 3
    assert len(rt.storage.cpu.keys()) == pages
    rt.stop()


def test_four_threads_under_eviction_pressure_read_only_exact_prefixes(device):
    layout_page = make_runtime().layout.chunk_nbytes(16)
    rt = make_runtime(device, max_local_cpu_size=6 * layout_page / 2**30)  # 6 pages
    assert rt.storage.cpu.pool.num_pages == 6
    engine = rt.cache_engine
    prompts = [list(range(s, s + 48)) for s in (0, 1000, 2000, 3000)]  # 12 chunks in all
    slots = random_slots(rt, 48, 11)
    errors: list = []
    retrieved: list[int] = []

    def worker(i):
        try:
            dst = allocate_kv_caches(rt.layout, device)
            for n in range(20):
                prompt = prompts[(i + n) % 4]
                engine.store(prompt, rt.kv_caches, slots)
                got = engine.retrieve(prompt, dst, slots).num_tokens
                retrieved.append(got)
                if got % 16 or not torch.equal(
                    kv_at(rt.layout, dst, slots[:got]), kv_at(rt.layout, rt.kv_caches, slots[:got])
                ):
                    errors.append(f"thread {i}: {got} tokens, corrupted or not chunk-aligned")
                for cache in dst:
                    cache.zero_()
        except Exception as exc:  # surfaced below
            errors.append(exc)

    run_threads(worker, 4, timeout=120)
    assert errors == []
    assert any(retrieved), "nothing was ever retrieved"
    cpu = rt.storage.cpu
    assert rt.storage.cpu.pool.free_pages == rt.storage.cpu.pool.num_pages - len(
        cpu.keys()
    )  # no page leaked
    assert rt.metrics.registry.get_sample_value(
        "kvplane_evictions_total", {"tier": "LocalCPUBackend"}
    )
    rt.stop()


def test_caches_of_another_layout_are_refused_and_no_page_leaks():
    rt = make_runtime()
    engine = rt.cache_engine
    slots = torch.arange(40)
    wrong = {
        "fewer layers": rt.kv_caches[:1],
        "more layers": rt.kv_caches + rt.kv_caches,
        "other dtype": [c.float() for c in rt.kv_caches],
        "other heads": allocate_kv_caches(rt.layout._replace(num_kv_heads=2)),
        "other blocks": allocate_kv_caches(rt.layout._replace(num_blocks=128)),
    }
    for name, caches in wrong.items():
        with pytest.raises(BadRequest, match="kv_caches must be"):
            engine.store(list(range(40)), caches, slots)
        with pytest.raises(BadRequest, match="kv_caches must be"):
            engine.retrieve(list(range(40)), caches, slots)
        assert rt.storage.cpu.pool.free_pages == rt.storage.cpu.pool.num_pages, name
    assert rt.storage.cpu.keys() == []
    rt.stop()


def test_a_failing_copy_gives_its_pages_back(monkeypatch):
    rt = make_runtime()
    engine = rt.cache_engine

    def broken_copy(layout, kv_caches, items, copy_stream=None):
        raise RuntimeError("device lost")

    # Fault injection at the copy step of the real engine.
    monkeypatch.setattr("kvplane.engine.kv.transfers.gather_many", broken_copy)
    with pytest.raises(RuntimeError, match="device lost"):
        engine.store(list(range(40)), rt.kv_caches, torch.arange(40))
    assert rt.storage.cpu.pool.free_pages == rt.storage.cpu.pool.num_pages
    assert rt.storage.cpu.keys() == []
    rt.stop()
