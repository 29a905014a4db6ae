"""The shuffle buffer: rows from many images, drawn at random and continuously refilled.

Rows enter a chunk segment at a time into free slots; a batch is B rows drawn uniformly without
replacement from all rows present, and their slots take the next chunk's rows. Every draw sees
the whole buffer, so an image's rows leave it gradually: with capacity C rows and T rows per
image, a batch meets about (C/T) * Ein(B*T/C) distinct images (Ein the entire exponential
integral), against (C/T)(1 - exp(-BT/C)) for a fill-then-drain buffer: 1.6x more at the default.

The buffer keeps every row's global id (image * n_tokens + token) beside its data. The dynamics
depend only on the ids and a seeded generator, never on the data or on reader timing, so the same
buffer can run "dry" (ids only) to replay a position cheaply when a loader is restored.
"""

from __future__ import annotations

import numpy as np


class ShuffleBuffer:
    """Up to `capacity` rows in fixed slots: `data` (on-disk dtype, (capacity, d)) unless dry.

    Rows never move once written: `live[:n]` lists the occupied slots, a draw picks positions in
    it, and removing swaps the list's tail into the picked positions (integers only) and returns
    the slots to a free stack, which the next chunk's rows are scattered into. So each row is
    copied twice in all (scattered in, gathered out), never shuffled around inside the buffer.
    """

    def __init__(self, capacity: int, d: int, dtype: np.dtype, rng: np.random.Generator, *, dry: bool = False):
        self.capacity = int(capacity)
        self.rng = rng
        self.n = 0
        self.live = np.empty(self.capacity, dtype=np.int64)
        """Occupied slots, the first `n` entries, in draw order."""
        self.free = np.arange(self.capacity - 1, -1, -1, dtype=np.int64)
        """Free slots, a stack whose top is the end of the first `capacity - n` entries."""
        self.slot_gid = np.empty(self.capacity, dtype=np.int64)
        """Global row id (image * n_tokens + token) of the row in each slot."""
        # np.empty only reserves address space: pages are committed as rows first arrive.
        self.data = None if dry else np.empty((self.capacity, d), dtype=dtype)

    @property
    def dry(self) -> bool:
        return self.data is None

    def n_free(self) -> int:
        return self.capacity - self.n

    def append(self, gids: np.ndarray) -> np.ndarray:
        """Take slots for rows with these ids; returns the slots, for the caller to fill with data."""
        k = gids.shape[0]
        top = self.n_free()
        if k > top:
            raise RuntimeError(f"shuffle buffer overflow: {k} rows into {top} free slots")
        slots = self.free[top - k : top][::-1].copy()
        self.live[self.n : self.n + k] = slots
        self.slot_gid[slots] = gids
        self.n += k
        return slots

    def draw(self, b: int) -> np.ndarray:
        """B distinct positions of `live`, uniform over the rows present, in random order."""
        if b > self.n:
            raise RuntimeError(f"cannot draw {b} rows from {self.n}")
        return self.rng.choice(self.n, size=b, replace=False)

    def remove(self, pos: np.ndarray) -> None:
        """Drop the rows at positions `pos` (distinct) of `live`; their slots become free."""
        b = pos.shape[0]
        top = self.n_free()
        self.free[top : top + b] = self.live[pos]
        keep_n = self.n - b
        in_tail = pos >= keep_n
        tail_free = np.ones(b, dtype=bool)
        tail_free[pos[in_tail] - keep_n] = False
        self.live[pos[~in_tail]] = self.live[keep_n + np.flatnonzero(tail_free)]
        self.n = keep_n

    def copy_state(self, other: "ShuffleBuffer") -> None:
        """Take another buffer's bookkeeping (not its data): a replayed dry buffer made real."""
        self.n = other.n
        self.live[:] = other.live
        self.free[:] = other.free
        self.slot_gid[:] = other.slot_gid
        self.rng = other.rng

    def release(self) -> None:
        """Free the memory (the buffer is unusable afterwards)."""
        self.live = self.free = self.slot_gid = np.empty(0, dtype=np.int64)
        self.data = None if self.data is None else np.empty((0, self.data.shape[1]), self.data.dtype)
        self.n = 0
        self.capacity = 0
