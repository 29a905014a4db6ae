"""Loader throughput against the disk: the measurements behind `saev-store bench` and benchmarks/loader.py.

Cold means the store's pages are not in the page cache. A store that fits in RAM turns cold into
warm within seconds (read-ahead pulls pages in, the cache keeps them), hiding the random-access
cost a store much larger than RAM pays. So a cold phase drops the store's pages first and keeps
dropping them (posix_fadvise DONTNEED on every chunk file, `EVICT_INTERVAL_S` apart) from a
background thread while it measures. The raw baseline reads the same files sequentially with big
reads under the same eviction, in the same run, and the loader is reported as a ratio to it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from typing import NamedTuple

import numpy as np

from .errors import UserError
from .layout import TokenSelection
from .loaders import DEFAULT_BUFFER_MB, DEFAULT_N_READERS, ShuffledLoader
from .loaders.chunks import as_store
from .options import check_choices
from .store import Store

EVICT_INTERVAL_S = 0.1
"""Ten evictions a second: read-ahead never gets to keep much of the store."""
RAW_READ_BYTES = 32 << 20
"""Read size of the raw baseline (big sequential reads)."""


def chunk_files(store: Store, hook: str) -> list[str]:
    """The chunk files of one hook of a local store, in chunk order."""
    fpaths = [store.chunk_fpath(hook, i) for i in range(store.n_chunks)]
    if fpaths[0] is None:
        raise UserError(f"{store.path} is not a local store; the benchmark needs chunk files it can evict from the page cache.")
    return fpaths


def drop_pages(fpaths: list[str]) -> None:
    """Ask the kernel to drop these files' pages from the page cache (clean pages go at once)."""
    for fpath in fpaths:
        fd = os.open(fpath, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cache_pages(fpaths: list[str]) -> None:
    """Read the files once so their pages are cached (for --warm)."""
    buf = bytearray(RAW_READ_BYTES)
    for fpath in fpaths:
        with open(fpath, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


class Evictor:
    """Context manager: drops the files' pages every `interval_s` from a background thread."""

    def __init__(self, fpaths: list[str], interval_s: float = EVICT_INTERVAL_S, enabled: bool = True):
        self.fpaths, self.interval_s, self.enabled = fpaths, interval_s, enabled
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.n_sweeps = 0

    def _run(self):
        while not self._stop.wait(self.interval_s):
            drop_pages(self.fpaths)
            self.n_sweeps += 1

    def __enter__(self):
        if self.enabled:
            drop_pages(self.fpaths)
            self._thread = threading.Thread(target=self._run, name="saev-evictor", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class RawResult(NamedTuple):
    """A sequential read of the chunk files."""

    n_bytes: int
    seconds: float

    @property
    def mb_s(self) -> float:
        return self.n_bytes / 2**20 / self.seconds


def raw_read(fpaths: list[str], *, seconds: float, cold: bool = True) -> RawResult:
    """Read the files in order with `RAW_READ_BYTES` reads (again from the first when time is left)."""
    buf = bytearray(RAW_READ_BYTES)
    n = 0
    with Evictor(fpaths, enabled=cold):
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while time.perf_counter() < deadline:
            for fpath in fpaths:
                with open(fpath, "rb", buffering=0) as f:
                    while k := f.readinto(buf):
                        n += k
                if time.perf_counter() >= deadline:
                    break
        dt = time.perf_counter() - t0
    return RawResult(n, dt)


class LoaderResult(NamedTuple):
    """The shuffled loader, measured from its first batch (its start-up reported apart)."""

    n_rows: int
    """Rows yielded after the first batch."""
    n_batches: int
    seconds: float
    """Wall time from the first batch to the last."""
    startup_s: float
    """Construction to first batch: filling the buffer."""
    bytes_per_row: float
    """Store bytes per yielded row (whole images are read, so unselected tokens count too)."""
    distinct_images: float
    """Mean distinct images per full batch."""
    buffer_bytes: int
    """Shuffle buffer plus read-ahead pool."""

    @property
    def rows_s(self) -> float:
        return self.n_rows / self.seconds

    @property
    def mb_s(self) -> float:
        return self.n_rows * self.bytes_per_row / 2**20 / self.seconds


def loader_read(
    store: Store,
    hook: str,
    *,
    seconds: float,
    cold: bool = True,
    batch_size: int = 4096,
    buffer_mb: float = DEFAULT_BUFFER_MB,
    n_readers: int = DEFAULT_N_READERS,
    tokens: str = "patches",
    seed: int = 0,
) -> LoaderResult:
    """Iterate the shuffled loader for `seconds` after its first batch, counting distinct images."""
    info = store.hook(hook)
    with Evictor(chunk_files(store, hook), enabled=cold):
        t0 = time.perf_counter()
        loader = ShuffledLoader(
            store, hook, batch_size=batch_size, tokens=tokens, normalize=False, seed=seed, n_epochs=10**6,
            buffer_mb=buffer_mb, n_readers=n_readers, with_coords=True,
        )
        try:
            next(loader)
            t1 = time.perf_counter()
            deadline = t1 + seconds
            n_rows = n_batches = 0
            distinct = []
            while time.perf_counter() < deadline:
                x, coords = next(loader)
                n_rows += x.shape[0]
                n_batches += 1
                if x.shape[0] == batch_size:
                    distinct.append(np.unique(coords[:, 0].numpy()).size)
            t2 = time.perf_counter()
            buffer_bytes = loader.buffer_bytes
            t_sel = loader.n_tokens
        finally:
            loader.close()
    bytes_per_row = info.bytes_per_image / t_sel
    return LoaderResult(n_rows, n_batches, t2 - t1, t1 - t0, bytes_per_row, float(np.mean(distinct)) if distinct else 0.0, buffer_bytes)


def perfect_distinct(n_images: int, rows_per_image: int, batch_size: int) -> float:
    """Expected distinct images among `batch_size` rows drawn without replacement from all rows.

    An image is missed when all draws come from the other images' rows:
    C(R - T, B) / C(R, B) with R = n_images * T rows; exact, through log-gamma.
    """
    r, t, b = n_images * rows_per_image, rows_per_image, batch_size
    if b > r:
        raise ValueError(f"batch of {b} rows from {r} rows")
    if r - t < b:
        return float(n_images)
    log_miss = math.lgamma(r - t + 1) - math.lgamma(r - t - b + 1) - math.lgamma(r + 1) + math.lgamma(r - b + 1)
    return n_images * (1.0 - math.exp(log_miss))


class BenchResult(NamedTuple):
    """One `saev-store bench` run."""

    store: str
    hook: str
    cold: bool
    store_bytes: int
    """Bytes of the hook's chunk files."""
    raw: RawResult
    loader: LoaderResult
    perfect_distinct: float
    """Distinct images per batch a perfect shuffle gives (expected)."""

    @property
    def ratio(self) -> float:
        return self.loader.mb_s / self.raw.mb_s

    @property
    def distinct_ratio(self) -> float:
        return self.loader.distinct_images / self.perfect_distinct


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What `saev-store bench` measures (its options, saev_store/options.py)."""

    hook: str | None = None
    """Hook to read (default: the store's first hook)."""
    warm: bool = False
    """Measure with the store in the page cache instead of evicting it."""
    batch_size: int = 4096
    """Rows per batch."""
    buffer_mb: float = DEFAULT_BUFFER_MB
    """Shuffle buffer size in MiB."""
    n_readers: int = DEFAULT_N_READERS
    """Chunk reads in flight."""
    tokens: TokenSelection = "patches"
    """Token selection."""
    seconds: float = 10.0
    """Length of each measurement."""

    def __post_init__(self):
        check_choices(self)
        if self.batch_size < 1 or self.n_readers < 1 or not self.buffer_mb > 0 or not self.seconds > 0:
            raise UserError("bench needs --batch-size >= 1, --n-readers >= 1, --buffer-mb > 0 and --seconds > 0.")


def bench(store: Store | str | os.PathLike, cfg: BenchConfig | None = None, **options) -> BenchResult:
    """Raw sequential read, then the shuffled loader, on the same chunk files, cold unless `cfg.warm`;
    `options` are BenchConfig fields (`bench(store, hook="h", seconds=2)`)."""
    cfg = dataclasses.replace(cfg or BenchConfig(), **options)
    warm, batch_size, seconds, tokens = cfg.warm, cfg.batch_size, cfg.seconds, cfg.tokens
    store = as_store(store)
    hook = cfg.hook or store.hooks[0]
    info = store.hook(hook)
    fpaths = chunk_files(store, hook)
    if warm:
        cache_pages(fpaths)
    raw = raw_read(fpaths, seconds=seconds, cold=not warm)
    if warm:
        cache_pages(fpaths)
    res = loader_read(
        store, hook, seconds=seconds, cold=not warm, batch_size=batch_size, buffer_mb=cfg.buffer_mb, n_readers=cfg.n_readers,
        tokens=tokens,
    )
    n_sel = int(store.valid().sum())
    t_sel = info.layout.indices(tokens).size
    perfect = perfect_distinct(n_sel, t_sel, batch_size)
    store_bytes = sum(os.path.getsize(f) for f in fpaths)
    return BenchResult(store.path, hook, not warm, store_bytes, raw, res, perfect)


def format_bench(r: BenchResult) -> str:
    """The human summary `saev-store bench` prints."""
    mode = "cold (pages evicted every %.1f s)" % EVICT_INTERVAL_S if r.cold else "warm (page cache)"
    lo = r.loader
    return "\n".join(
        [
            f"store {r.store}, hook {r.hook}: {r.store_bytes / 2**30:.2f} GiB of chunks, {mode}",
            f"raw sequential read : {r.raw.mb_s:8.1f} MB/s",
            f"shuffled loader     : {lo.mb_s:8.1f} MB/s, {lo.rows_s:,.0f} rows/s  ratio {r.ratio:.3f}",
            f"  start-up (buffer fill) {lo.startup_s:.2f} s, {lo.n_batches} batches measured",
            f"distinct images/batch: {lo.distinct_images:.1f} vs perfect shuffle {r.perfect_distinct:.1f}  ratio {r.distinct_ratio:.3f}",
            f"buffer memory       : {lo.buffer_bytes / 2**20:.0f} MiB (shuffle buffer + read-ahead)",
        ]
    )


def make_bench_store(
    path: str | os.PathLike,
    *,
    size_mb: float,
    d: int = 768,
    grid: int = 14,
    chunk_mib: int = 32,
    store_dtype: str = "float32",
    seed: int = 0,
    overwrite: bool = True,
) -> Store:
    """A ViT-B/16-shaped store (CLS + grid x grid patches, width d) of random activations."""
    from .layout import TokenLayout
    from .store import HookSpec, create_store

    n_tokens = 1 + grid * grid
    itemsize = 4 if store_dtype == "float32" else 2
    n_images = max(1, int(size_mb * 2**20 // (n_tokens * d * itemsize)))
    layout = TokenLayout(n_tokens=n_tokens, cls=0, grid=(grid, grid), grid_start=1)
    st = create_store(
        path, n_images=n_images, hooks={"vit": HookSpec(d=d, layout=layout)}, store_dtype=store_dtype,
        chunk_bytes=chunk_mib << 20, overwrite=overwrite,
    )
    rng = np.random.default_rng(seed)
    for i in st.pending_chunks():
        a, b = st.chunk_bounds(i)
        x = rng.random((b - a, n_tokens, d), dtype=np.float32)
        st.write_block(i, {"vit": x}, labels=np.arange(a, b) % 10)
    st.finalize()
    return st


def simulate_distinct(
    n_images: int, rows_per_image: int, images_per_chunk: int, batch_size: int, buffer_rows: int, *, n_batches: int = 200, seed: int = 0
) -> float:
    """Mean distinct images per batch of the loader's buffer on a store of any size, without data.

    Runs the loader's plan and buffer on row ids only (the same fill rule: append the next chunk
    whenever it fits), skipping the first buffer-full of batches so the buffer is in steady state.
    It lets the benchmark state the mixing a store far larger than this machine's disk would get.
    """
    from .loaders.buffer import ShuffleBuffer
    from .loaders.plan import BUFFER_SALT, Plan

    n_chunks = -(-n_images // images_per_chunk)
    rows = np.full(n_chunks, images_per_chunk * rows_per_image, dtype=np.int64)
    rows[-1] = (n_images - (n_chunks - 1) * images_per_chunk) * rows_per_image
    plan = Plan(rows, seed=seed, rank=0, world_size=1)
    segments = plan.segments(None)
    buf = ShuffleBuffer(buffer_rows, 1, np.float32, np.random.default_rng([seed, 0, 1, BUFFER_SALT]), dry=True)
    seg = next(segments)
    warmup = buffer_rows // batch_size
    out = []
    for step in range(warmup + n_batches):
        while buf.n + seg.n_rows <= buf.capacity:
            r = np.arange(seg.lo, seg.hi, dtype=np.int64)
            buf.append(seg.chunk * images_per_chunk + r // rows_per_image)  # ids here are images
            seg = next(segments)
        pos = buf.draw(batch_size)
        if step >= warmup:
            out.append(np.unique(buf.slot_gid[buf.live[pos]]).size)
        buf.remove(pos)
    return float(np.mean(out))
