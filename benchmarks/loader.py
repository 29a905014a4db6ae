"""Loader benchmark: the figures in benchmarks/README.md ("## Loader").

    .venv/bin/python benchmarks/loader.py --dir /tmp/saev-bench --size-mb 1536 --seconds 8

Builds ViT-B/16-shaped stores of random activations (CLS + 14x14 patches, d=768, float32) in
--dir, then measures, each against a raw sequential read of the same files in the same run:
1. the shuffled loader at the defaults, cold and warm;
2. chunk sizes 8 / 32 / 64 MiB (cold);
3. reads in flight (n_readers 1 / 2 / 4 / 8, cold), and reader threads against reader processes;
4. the sharding codec (32 MiB shards of one-image inner chunks) read through zarr;
5. distinct images per batch against buffer size, measured here and simulated for a 1M-image store.
Prints markdown tables. Stores are deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import os
import shutil
import sys
import time

import numpy as np

from saev_store.bench import (
    Evictor,
    bench,
    chunk_files,
    loader_read,
    make_bench_store,
    perfect_distinct,
    raw_read,
    simulate_distinct,
)
from saev_store.loaders import DEFAULT_BUFFER_MB, DEFAULT_N_READERS
from saev_store.store import open_store


def p(*a):
    print(*a, flush=True)


def read_one(fpath: str) -> int:
    """Read a whole file with one readinto (used by threads and by processes)."""
    size = os.path.getsize(fpath)
    buf = bytearray(size)
    with open(fpath, "rb", buffering=0) as f:
        return f.readinto(buf)


def readers_compare(fpaths: list[str], seconds: float, n: int, kind: str) -> float:
    """MB/s reading whole chunk files in a random order with n threads or n processes, cold."""
    rng = np.random.default_rng(0)
    order = [fpaths[i] for i in rng.permutation(len(fpaths))] * 50
    Pool = cf.ThreadPoolExecutor if kind == "threads" else lambda max_workers: cf.ProcessPoolExecutor(max_workers, mp_context=mp.get_context("spawn"))
    with Pool(max_workers=n) as pool:
        list(pool.map(read_one, fpaths[:n]))  # start the workers before timing
        got = 0
        with Evictor(fpaths):
            t0 = time.perf_counter()
            futures = [pool.submit(read_one, f) for f in order[: 2 * n]]
            k = 2 * n
            while time.perf_counter() - t0 < seconds:
                got += futures.pop(0).result()
                futures.append(pool.submit(read_one, order[k % len(order)]))
                k += 1
            dt = time.perf_counter() - t0
            for f in futures:
                f.cancel()
    return got / 2**20 / dt


def sharded_reads(dpath: str, size_mb: float, seconds: float) -> tuple[float, float]:
    """(whole-shard MB/s, one-image partial-read MB/s) of a ShardingCodec array read through zarr, cold."""
    import zarr
    import zarr.codecs

    t, d = 197, 768
    per_image = t * d * 4
    n = int(size_mb * 2**20 // per_image)
    shard_images = (32 << 20) // per_image
    arr = zarr.create_array(
        dpath, shape=(n, t, d), dtype="float32", chunks=(1, t, d), shards=(shard_images, t, d),
        compressors=None, serializer=zarr.codecs.BytesCodec(), overwrite=True,
    )
    rng = np.random.default_rng(0)
    for a in range(0, n, shard_images):
        b = min(a + shard_images, n)
        arr[a:b] = rng.random((b - a, t, d), dtype=np.float32)
    fpaths = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(dpath, "c")) for f in fs]
    out = []
    for whole in (True, False):
        with Evictor(fpaths):
            got, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                if whole:
                    a = int(rng.integers(0, -(-n // shard_images))) * shard_images
                    got += arr[a : min(a + shard_images, n)].nbytes
                else:
                    got += arr[int(rng.integers(0, n))].nbytes
            out.append(got / 2**20 / (time.perf_counter() - t0))
    return out[0], out[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/saev-bench", help="Where to build the stores (needs ~2x --size-mb free).")
    ap.add_argument("--size-mb", type=float, default=1536, help="Size of each benchmark store.")
    ap.add_argument("--seconds", type=float, default=8.0, help="Length of each measurement.")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--keep", action="store_true", help="Keep the stores.")
    ap.add_argument("--quick", action="store_true", help="Only the default measurement (cold and warm).")
    args = ap.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    s, B = args.seconds, args.batch_size
    p(f"# saev-store loader benchmark: {os.cpu_count()} CPUs, store {args.size_mb:.0f} MiB, {s:.0f} s per measurement, batch {B}")

    stores = {}

    def store_for(chunk_mib):
        if chunk_mib not in stores:
            path = os.path.join(args.dir, f"bench-{chunk_mib}mib.zarr")
            t0 = time.perf_counter()
            if os.path.exists(os.path.join(path, "zarr.json")):
                stores[chunk_mib] = open_store(path)
            else:
                stores[chunk_mib] = make_bench_store(path, size_mb=args.size_mb, chunk_mib=chunk_mib)
            p(f"<!-- store {path}: {stores[chunk_mib].n_images} images, {stores[chunk_mib].images_per_chunk} per chunk, ready in {time.perf_counter() - t0:.0f} s -->")
        return stores[chunk_mib]

    try:
        st = store_for(32)
        p("\n## Defaults (32 MiB chunks, buffer %d MiB, %d readers)\n" % (DEFAULT_BUFFER_MB, DEFAULT_N_READERS))
        p("| mode | raw MB/s | loader MB/s | patches/s | ratio | distinct img/batch | perfect | ratio | buffer MiB |")
        p("|---|---|---|---|---|---|---|---|---|")
        for warm in (False, True):
            r = bench(st, warm=warm, batch_size=B, seconds=s)
            lo = r.loader
            p(f"| {'warm' if warm else 'cold'} | {r.raw.mb_s:.0f} | {lo.mb_s:.0f} | {lo.rows_s:,.0f} | {r.ratio:.2f} | "
              f"{lo.distinct_images:.0f} | {r.perfect_distinct:.0f} | {r.distinct_ratio:.2f} | {lo.buffer_bytes / 2**20:.0f} |")
        if args.quick:
            return

        p("\n## Chunk size (cold, defaults otherwise)\n")
        p("| chunk | images/chunk | raw MB/s | loader MB/s | ratio | distinct img/batch | start-up s |")
        p("|---|---|---|---|---|---|---|")
        for mib in (8, 32, 64):
            st_c = store_for(mib)
            r = bench(st_c, batch_size=B, seconds=s)
            p(f"| {mib} MiB | {st_c.images_per_chunk} | {r.raw.mb_s:.0f} | {r.loader.mb_s:.0f} | {r.ratio:.2f} | "
              f"{r.loader.distinct_images:.0f} | {r.loader.startup_s:.1f} |")
            if mib != 32 and not args.keep:
                shutil.rmtree(st_c.path)
                del stores[mib]

        p("\n## Reads in flight (cold, 32 MiB chunks)\n")
        fpaths = chunk_files(st, "vit")
        raw = raw_read(fpaths, seconds=s)
        p(f"raw sequential read in this run: {raw.mb_s:.0f} MB/s\n")
        p("| n_readers | loader MB/s | ratio | whole-chunk reads, threads MB/s | processes MB/s |")
        p("|---|---|---|---|---|")
        for n in (1, 2, 4, 8):
            lo = loader_read(st, "vit", seconds=s, batch_size=B, n_readers=n)
            th = readers_compare(fpaths, s / 2, n, "threads")
            pr = readers_compare(fpaths, s / 2, n, "processes")
            p(f"| {n} | {lo.mb_s:.0f} | {lo.mb_s / raw.mb_s:.2f} | {th:.0f} | {pr:.0f} |")

        p("\n## Sharding codec through zarr (cold; 32 MiB shards of one-image inner chunks)\n")
        whole, part = sharded_reads(os.path.join(args.dir, "sharded.zarr"), args.size_mb, s)
        p("| read | MB/s | ratio to raw |")
        p("|---|---|---|")
        p(f"| whole shard | {whole:.0f} | {whole / raw.mb_s:.2f} |")
        p(f"| one image (partial shard read) | {part:.0f} | {part / raw.mb_s:.3f} |")
        shutil.rmtree(os.path.join(args.dir, "sharded.zarr"), ignore_errors=True)

        p("\n## Shuffle buffer size: distinct images per batch of %d (32 MiB chunks)\n" % B)
        n_img = st.n_images
        per = int(st.hook("vit").layout.n_patches)
        big = 1_000_000
        p(f"| buffer MiB | this store ({n_img} images): measured | simulated | perfect | 1M-image store: simulated | perfect | ratio |")
        p("|---|---|---|---|---|---|---|")
        for mb in (256, 512, 1024, 2048):
            rows = int(mb * 2**20) // (768 * 4)
            lo = loader_read(st, "vit", seconds=min(s, 4), batch_size=B, buffer_mb=mb, cold=False)
            sim = simulate_distinct(n_img, per, st.images_per_chunk, B, rows)
            sim_big = simulate_distinct(big, per, st.images_per_chunk, B, rows)
            pb = perfect_distinct(big, per, B)
            p(f"| {mb} | {lo.distinct_images:.0f} | {sim:.0f} | {perfect_distinct(n_img, per, B):.0f} | {sim_big:.0f} | {pb:.0f} | {sim_big / pb:.2f} |")
    finally:
        if not args.keep:
            for st_ in stores.values():
                shutil.rmtree(st_.path, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
