"""Several chunk reads in flight, consumed in the order they were asked for.

Reader threads, not processes: a read is one `readinto` syscall and a crc32c pass, both of which
release the GIL, so threads keep the disk busy without copying chunks between processes or
leaving shared memory behind (benchmarks/README.md, "Readers", has the measurement). Each read
fills one buffer of a fixed pool, so memory is bounded by the pool and nothing is allocated per chunk.
"""

from __future__ import annotations

import concurrent.futures as cf
import numpy as np

from .chunks import ChunkReader


class Pending:
    """One chunk read: its future and the pool buffer it fills."""

    __slots__ = ("chunk", "future", "buf")

    def __init__(self, chunk: int, future: cf.Future, buf: np.ndarray | None):
        self.chunk, self.future, self.buf = chunk, future, buf


class Prefetcher:
    """Reads chunks with `n_readers` threads into a pool of `depth` buffers."""

    def __init__(self, reader: ChunkReader, *, n_readers: int, depth: int):
        if n_readers < 1 or depth < 1:
            raise ValueError(f"Prefetcher: n_readers={n_readers} and depth={depth} must be at least 1.")
        self.reader = reader
        self.depth = depth
        self._free: list[np.ndarray | None] = [reader.new_buffer() for _ in range(depth)]
        self._pool = cf.ThreadPoolExecutor(max_workers=n_readers, thread_name_prefix="saev-reader")
        self._out: set[Pending] = set()

    def can_submit(self) -> bool:
        return bool(self._free)

    def submit(self, chunk: int) -> Pending:
        buf = self._free.pop()
        p = Pending(chunk, self._pool.submit(self.reader.read, chunk, buf), buf)
        self._out.add(p)
        return p

    def result(self, p: Pending) -> np.ndarray:
        """The chunk's on-disk array (a view of the pending buffer until `release`)."""
        return p.future.result()

    def release(self, p: Pending) -> None:
        self._out.discard(p)
        self._free.append(p.buf)

    def close(self) -> None:
        """Cancel queued reads, wait for running ones, stop the threads, drop the buffers."""
        for p in self._out:
            p.future.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._out.clear()
        self._free.clear()
