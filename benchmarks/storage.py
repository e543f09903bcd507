"""Disk and Redis tier throughput beside the plain baseline on the same bytes, in one run.

Chunks are Llama-3.1-8B-shaped (32 layers, K/V, 256 tokens, 8 KV heads, head 128, bf16:
32 MiB each); ``--gb`` GiB of them (1 GiB = 32 chunks by default).

- Disk: ``LocalDiskBackend.put``/``get`` (header, checksum, temp file + rename; read and
  verify) beside a plain Python ``open().write()``/``readinto()`` of the same payloads into
  the same directory. Both read back through the page cache (no root to drop it). And a
  disk hit promoted into a resident CPU tier, as a load does (read straight into its pages,
  and read then copied, the path before), beside a plain ``readinto()`` of the same files
  into one resident buffer.
- Redis: ``RemoteBackend.put``/``get`` (framing, checksum, circuit breaker) beside raw
  ``SET``/``GET`` of the same payload bytes through the same pooled client, against a
  redis-server this script starts on a free loopback port (stopped by PID at the end).

Best of ``--repeat`` runs each. The last line is one JSON object with the figures.

    python benchmarks/storage.py [--gb 1.0] [--repeat 3] [--dir /tmp] [--machine NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kvplane.engine.backends.cpu import LocalCPUBackend
from kvplane.engine.backends.disk import LocalDiskBackend
from kvplane.engine.backends.redis_server import redis_server_args
from kvplane.engine.backends.remote import RemoteBackend
from kvplane.engine.chunk import KVChunk
from kvplane.engine.memory_pool import HostMemoryPool
from kvplane.engine.storage_manager import StorageManager
from kvplane.keys import CacheKey

CHUNK_SHAPE = (32, 2, 256, 8, 128)


def best_seconds(run: Callable[[], object], repeat: int, reset: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(repeat):
        reset()
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_chunks(total_bytes: int) -> list[tuple[CacheKey, KVChunk]]:
    per = 1
    for d in CHUNK_SHAPE:
        per *= d
    per *= 2
    n = max(1, total_bytes // per)
    gen = torch.Generator().manual_seed(0)
    chunks = []
    for i in range(n):
        kv = torch.randn(CHUNK_SHAPE, generator=gen).to(torch.bfloat16)
        key = CacheKey("bench/llama-8b", 1, 0, "bfloat16", i + 1)
        chunks.append((key, KVChunk.from_kv(kv, CHUNK_SHAPE[2])))
    return chunks


def bench_disk(chunks: list[tuple[CacheKey, KVChunk]], base: Path, repeat: int) -> dict[str, float]:
    total = sum(c.nbytes for _, c in chunks)
    payloads = [c.payload.numpy() for _, c in chunks]
    tier_dir, plain_dir = base / "tier", base / "plain"

    def fresh(d: Path) -> Callable[[], None]:
        def reset() -> None:
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)

        return reset

    holder: dict[str, LocalDiskBackend] = {}

    def reset_tier() -> None:
        fresh(tier_dir)()
        holder["disk"] = LocalDiskBackend(tier_dir, 4 * total)

    def tier_write() -> None:
        for key, chunk in chunks:
            if not holder["disk"].put(key, chunk):
                raise RuntimeError("disk tier refused a chunk")

    def plain_write() -> None:
        for i, p in enumerate(payloads):
            with open(plain_dir / f"{i}.bin", "wb") as f:
                f.write(memoryview(p))

    def tier_read() -> None:
        for key, _ in chunks:
            if holder["disk"].get(key) is None:
                raise RuntimeError("disk tier lost a chunk")

    def plain_read() -> None:
        for i, p in enumerate(payloads):
            buf = bytearray(p.nbytes)
            with open(plain_dir / f"{i}.bin", "rb", buffering=0) as f:
                f.readinto(buf)

    # A disk hit promoted into a resident CPU tier (what a load does): read straight into
    # its pages, or (lands_payloads off) read into a buffer of its own and copied there;
    # the baseline reads the same files into one resident buffer, over and over.
    nbytes = chunks[0][1].nbytes
    promote: dict[str, StorageManager] = {}
    resident = torch.empty(nbytes, dtype=torch.uint8)
    resident.fill_(0)

    def reset_promote(lands: bool) -> Callable[[], None]:
        def reset() -> None:
            pool = HostMemoryPool(nbytes, len(chunks), pin=False, prefault=True)
            pool.prefaulted.wait()
            disk = holder["disk"]
            disk.lands_payloads = lands  # type: ignore[misc]
            promote["storage"] = StorageManager([LocalCPUBackend(pool), disk])

        return reset

    def promote_read() -> None:
        storage = promote["storage"]
        for key, _ in chunks:
            with storage.read(key) as chunk:
                if chunk is None:
                    raise RuntimeError("disk tier lost a chunk")

    def plain_into_resident() -> None:
        view = resident.numpy().data
        for i in range(len(payloads)):
            with open(plain_dir / f"{i}.bin", "rb", buffering=0) as f:
                f.readinto(view)

    w_tier = best_seconds(tier_write, repeat, reset_tier)
    w_plain = best_seconds(plain_write, repeat, fresh(plain_dir))
    r_tier = best_seconds(tier_read, repeat, lambda: None)
    r_plain = best_seconds(plain_read, repeat, lambda: None)
    p_land = best_seconds(promote_read, repeat, reset_promote(True))
    p_copy = best_seconds(promote_read, repeat, reset_promote(False))
    p_plain = best_seconds(plain_into_resident, repeat, lambda: None)
    shutil.rmtree(base, ignore_errors=True)
    gb = total / 1e9
    return {
        "disk_write_gbps": gb / w_tier,
        "file_write_gbps": gb / w_plain,
        "disk_read_gbps": gb / r_tier,
        "file_read_gbps": gb / r_plain,
        "promote_landed_gbps": gb / p_land,
        "promote_copied_gbps": gb / p_copy,
        "file_into_resident_gbps": gb / p_plain,
    }


def bench_redis(
    chunks: list[tuple[CacheKey, KVChunk]], workdir: Path, repeat: int
) -> dict[str, float]:
    port = free_port()
    proc = subprocess.Popen(
        redis_server_args(port, workdir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        remote = RemoteBackend(f"redis://127.0.0.1:{port}", timeout_s=30.0)
        client = remote.client
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        total = sum(c.nbytes for _, c in chunks)
        raw = [(f"raw:{k.to_str()}", c.payload.numpy().tobytes()) for k, c in chunks]

        def put() -> None:
            for key, chunk in chunks:
                if not remote.put(key, chunk):
                    raise RuntimeError("remote tier dropped a chunk")

        def get() -> None:
            for key, _ in chunks:
                if remote.get(key) is None:
                    raise RuntimeError("remote tier lost a chunk")

        def raw_set() -> None:
            for name, data in raw:
                client.set(name, data)

        def raw_get() -> None:
            for name, _ in raw:
                if client.get(name) is None:
                    raise RuntimeError("raw GET missed")

        flush = client.flushall
        p = best_seconds(put, repeat, flush)
        s = best_seconds(raw_set, repeat, flush)
        put()
        raw_set()
        g = best_seconds(get, repeat, lambda: None)
        rg = best_seconds(raw_get, repeat, lambda: None)
        remote.close()
    finally:
        proc.terminate()
        proc.wait(10)
    gb = total / 1e9
    return {
        "redis_put_gbps": gb / p,
        "raw_set_gbps": gb / s,
        "redis_get_gbps": gb / g,
        "raw_get_gbps": gb / rg,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gb", type=float, default=1.0, help="GiB of chunks")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--machine", default=f"{os.cpu_count()}-core {platform.machine()}")
    args = parser.parse_args()
    chunks = make_chunks(int(args.gb * 2**30))
    total = sum(c.nbytes for _, c in chunks)
    base = Path(tempfile.mkdtemp(prefix="kvplane-bench-", dir=args.dir))
    print(
        f"machine: {args.machine}; {len(chunks)} chunks of {chunks[0][1].nbytes >> 20} MiB"
        f" = {total / 1e9:.2f} GB; disk dir {base}; best of {args.repeat}"
    )
    disk = bench_disk(chunks, base / "disk", args.repeat)
    print(
        f"disk tier write {disk['disk_write_gbps']:.2f} GB/s vs plain file write "
        f"{disk['file_write_gbps']:.2f} GB/s"
    )
    print(
        f"disk tier read  {disk['disk_read_gbps']:.2f} GB/s vs plain file read  "
        f"{disk['file_read_gbps']:.2f} GB/s"
    )
    print(
        f"disk hit into the CPU tier {disk['promote_landed_gbps']:.2f} GB/s read into its pages, "
        f"{disk['promote_copied_gbps']:.2f} GB/s read and copied, vs plain file read into "
        f"a resident buffer {disk['file_into_resident_gbps']:.2f} GB/s"
    )
    redis_dir = base / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    red = bench_redis(chunks, redis_dir, args.repeat)
    shutil.rmtree(base, ignore_errors=True)
    print(
        f"redis tier put  {red['redis_put_gbps']:.2f} GB/s vs raw SET {red['raw_set_gbps']:.2f} GB/s"
    )
    print(
        f"redis tier get  {red['redis_get_gbps']:.2f} GB/s vs raw GET {red['raw_get_gbps']:.2f} GB/s"
    )
    result = {
        "machine": args.machine,
        "bytes": total,
        "disk_write_ratio": round(disk["disk_write_gbps"] / disk["file_write_gbps"], 3),
        "disk_read_ratio": round(disk["disk_read_gbps"] / disk["file_read_gbps"], 3),
        "promote_ratio": round(disk["promote_landed_gbps"] / disk["file_into_resident_gbps"], 3),
        "promote_landed_vs_copied": round(
            disk["promote_landed_gbps"] / disk["promote_copied_gbps"], 3
        ),
        "redis_put_ratio": round(red["redis_put_gbps"] / red["raw_set_gbps"], 3),
        "redis_get_ratio": round(red["redis_get_gbps"] / red["raw_get_gbps"], 3),
        **{k: round(v, 3) for k, v in {**disk, **red}.items()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
