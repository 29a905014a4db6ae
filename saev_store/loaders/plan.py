"""The order a shuffled loader reads chunks in: a pure function of (seed, epoch, rank, world_size).

Each epoch permutes the chunks that hold selected rows (the permutation is the same on every
rank). Laid end to end in that order, the epoch's R selected rows are cut into `world_size`
contiguous ranges of floor(R/W) or ceil(R/W) rows; rank r takes rows [floor(rR/W), floor((r+1)R/W)).
So ranks read disjoint rows whose union is the whole epoch, every rank's row count is within one
of the others, and at most W-1 boundary chunks per epoch are read (in part) by two ranks. Splitting
whole chunks round-robin instead would leave ranks a chunk's rows apart (thousands of rows), which
DDP, needing equal steps, would have to drop.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np

PLAN_SALT = 0x5AE5
BUFFER_SALT = 0xB0FF


class Segment(NamedTuple):
    """Selected rows [lo, hi) of one chunk, in epoch `epoch` of a rank's stream."""

    chunk: int
    lo: int
    hi: int
    epoch: int

    @property
    def n_rows(self) -> int:
        return self.hi - self.lo


class Plan:
    """Chunk order and rank split for every epoch."""

    def __init__(self, rows_per_chunk: np.ndarray, *, seed: int, rank: int, world_size: int):
        self.rows_per_chunk = np.asarray(rows_per_chunk, dtype=np.int64)
        self.chunks = np.flatnonzero(self.rows_per_chunk > 0)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.n_rows_epoch = int(self.rows_per_chunk.sum())
        """R: selected rows of one epoch over all ranks."""

    def rank_range(self, r: int) -> tuple[int, int]:
        """Rank r's rows [lo, hi) of the epoch's row sequence."""
        w, n = self.world_size, self.n_rows_epoch
        return r * n // w, (r + 1) * n // w

    def rank_rows(self, r: int) -> int:
        lo, hi = self.rank_range(r)
        return hi - lo

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's chunk order (identical on every rank)."""
        rng = np.random.default_rng([self.seed, epoch, PLAN_SALT])
        return rng.permutation(self.chunks)

    def epoch_segments(self, epoch: int) -> list[Segment]:
        """This rank's segments of one epoch, in reading order."""
        order = self.order(epoch)
        rows = self.rows_per_chunk[order]
        ends = np.cumsum(rows)
        starts = ends - rows
        lo, hi = self.rank_range(self.rank)
        first = int(np.searchsorted(ends, lo, side="right"))
        out = []
        for j in range(first, len(order)):
            if starts[j] >= hi:
                break
            a, b = max(lo, starts[j]), min(hi, ends[j])
            if b > a:
                out.append(Segment(int(order[j]), int(a - starts[j]), int(b - starts[j]), epoch))
        return out

    def segments(self, n_epochs: int | None) -> Iterator[Segment]:
        """This rank's segments epoch after epoch; forever when n_epochs is None."""
        epoch = 0
        while n_epochs is None or epoch < n_epochs:
            yield from self.epoch_segments(epoch)
            epoch += 1


def rows_before(step: int, n_batches: int, n_rows: int, batch_size: int) -> int:
    """Rows in batches 0..step-1 of `n_batches` batches that together hold `n_rows` rows.

    Batches are full until only as many rows are left as the remaining batches need (one each), so
    a rank holding a few rows fewer than its peers still yields the same number of non-empty
    batches. Batch j has min(B, R_j - (n - j - 1)) rows, R_j the rows left before it; by induction
    the rows before `step` are min(step * B, n_rows - (n - step)). Needs n <= n_rows <= n * B.
    """
    return min(step * batch_size, n_rows - (n_batches - step))


def batch_size_at(step: int, n_batches: int, n_rows: int, batch_size: int) -> int:
    """Rows in batch `step` (see `rows_before`)."""
    return rows_before(step + 1, n_batches, n_rows, batch_size) - rows_before(step, n_batches, n_rows, batch_size)
