"""The shuffled loader for training: whole chunks in a random order, rows mixed in a buffer.

    loader = ShuffledLoader("acts.zarr", "blocks.10", batch_size=4096, n_rows=100_000_000)
    for x_bd in loader:                     # torch.float32 (B, d), pinned when CUDA is present
        ...
    state = loader.state_dict()             # JSON-able; a new loader + load_state_dict resumes exactly

Order: chunk order per epoch and the rank split come from `Plan`, the batch draws from a generator
seeded by (seed, rank, world_size); reader threads only fetch the planned chunks ahead of time and
are consumed in plan order. So the stream of batches is a pure function of the arguments and the
store, whatever the timing of the reads, and a position is just the number of batches yielded.
Restoring replays the buffer's bookkeeping for that many batches without touching activations
(about 0.2 ms a batch at the default buffer), then reads only the chunks whose rows are still in
the buffer (about a buffer's worth of data).

Epochs run into each other: the buffer keeps mixing across an epoch boundary, so there is no
short batch between epochs. With n_epochs=1 the stream is every selected row exactly once.

Distributed (rank, world_size): every epoch's rows are split between ranks (plan.py) so that each
rank reads its own chunks and holds floor(R/W) or ceil(R/W) of the epoch's R rows. Every rank yields
the same number of batches, as DDP needs: with drop_last=False, ceil(max rows / B) batches, the
last few on a rank with fewer rows one row short, so all rows are used; with drop_last=True,
floor(min rows / B) full batches, the rows left over at the end are not used. With n_rows, every
rank yields n_rows // world_size rows (n_rows counts rows over the whole world).
"""

from __future__ import annotations

import collections
import itertools
import math
import os
from typing import Iterator

import crc32c
import numpy as np
import torch

from ..errors import UserError
from ..stats import Normalizer
from ..store import Store
from .buffer import ShuffleBuffer
from .chunks import ChunkReader, as_store, copy_rows, make_selection, row_gids
from .plan import BUFFER_SALT, Plan, Segment, batch_size_at
from .prefetch import Pending, Prefetcher

DEFAULT_BUFFER_MB = 1024
"""Shuffle buffer size; benchmarks/README.md ("Loader") has the measurement behind it."""
DEFAULT_N_READERS = 4
"""Chunk reads in flight."""
STATE_FORMAT = "saev_store.ShuffledLoader/1"


class ShuffledLoader:
    """Shuffled (B, d) batches of one hook's selected rows; see the module docstring."""

    def __init__(
        self,
        store: Store | str | os.PathLike,
        hook: str,
        *,
        batch_size: int,
        tokens: str = "patches",
        normalize: bool = True,
        seed: int = 0,
        n_epochs: int = 1,
        n_rows: int | None = None,
        buffer_mb: float = DEFAULT_BUFFER_MB,
        n_readers: int = DEFAULT_N_READERS,
        rank: int = 0,
        world_size: int = 1,
        with_coords: bool = False,
        image_mask: np.ndarray | None = None,
        drop_last: bool = False,
        pin_memory: bool | None = None,
    ):
        """
        store: a Store or a path to one. hook: the hook to read.
        batch_size: rows per batch (B). tokens: "patches", "cls" or "all".
        normalize: subtract the stored mean and scale so mean ||x||^2 = d (Normalizer); raw otherwise.
        seed: chooses the chunk orders and the draws. n_epochs: passes over the data, unless n_rows
        is given: then it runs as many epochs as needed for n_rows rows over the whole world.
        buffer_mb: shuffle buffer size in MiB (in the store's dtype). n_readers: chunk reads in flight.
        rank, world_size: this process's share for distributed training.
        with_coords: yield (x_bd, coords_b2) with coords int64 [image, stored token index].
        image_mask: bool (n_images,) of images to use (combined with the store's valid mask).
        drop_last: only full batches. pin_memory: pin batches (default: when CUDA is available).
        """
        if batch_size < 1:
            raise UserError(f"batch_size={batch_size} must be at least 1.")
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"rank={rank} must be in 0..world_size-1 (world_size={world_size}).")
        if n_rows is None and (n_epochs is None or n_epochs < 1):
            raise UserError(f"n_epochs={n_epochs} must be at least 1 (or give n_rows).")
        if n_rows is not None and n_rows < world_size:
            raise UserError(f"n_rows={n_rows} gives no rows to each of {world_size} ranks; ask for more rows.")
        if n_readers < 1:
            raise UserError(f"n_readers={n_readers} must be at least 1.")
        if not buffer_mb > 0:
            raise UserError(f"buffer_mb={buffer_mb} must be positive.")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise UserError(f"seed={seed!r} must be a non-negative integer.")

        self.store = as_store(store)
        self.hook = hook
        self.tokens = tokens
        self.batch_size = int(batch_size)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.n_epochs = None if n_rows is not None else int(n_epochs)
        self.n_rows = None if n_rows is None else int(n_rows)
        self.drop_last = bool(drop_last)
        self.with_coords = bool(with_coords)
        self.n_readers = int(n_readers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)

        self._reader = ChunkReader(self.store, hook)
        info = self._reader.info
        self.d = info.d
        self._sel = make_selection(self.store, hook, tokens, image_mask)
        self.n_tokens = self._sel.n_sel_tokens
        """T: rows per image in the selection."""
        self._plan = Plan(self._sel.rows_per_chunk(), seed=self.seed, rank=self.rank, world_size=self.world_size)
        if self._plan.n_rows_epoch < self.world_size:
            raise UserError(f"the selection holds {self._plan.n_rows_epoch} rows, fewer than world_size={world_size} ranks.")
        self.n_rows_per_epoch = self._plan.rank_rows(self.rank)
        """Rows of one epoch that this rank reads."""

        if self.n_rows is not None:
            per_rank = [self.n_rows // self.world_size] * self.world_size
        else:
            per_rank = [self.n_epochs * self._plan.rank_rows(r) for r in range(self.world_size)]
        b = self.batch_size
        if self.drop_last:
            self.n_batches = min(per_rank) // b
            if self.n_batches == 0:
                raise UserError(f"with drop_last, {min(per_rank)} rows per rank make no full batch of {b}; lower batch_size.")
            self._rows_total = self.n_batches * b
        else:
            self.n_batches = -(-max(per_rank) // b)
            self._rows_total = per_rank[self.rank]
        """Rows this rank yields in all."""

        self.normalizer = self.store.normalizer(hook, tokens) if normalize else Normalizer.identity(self.d)
        self._mean32 = self.normalizer.mean.astype(np.float32)
        self._scale32 = np.float32(self.normalizer.scale)
        self.normalize = bool(normalize)

        itemsize = self._reader.disk_dtype.itemsize
        self.buffer_rows = int(buffer_mb * 2**20) // (self.d * itemsize)
        """Shuffle buffer capacity in rows, from buffer_mb."""
        k_max = info.images_per_chunk * self.n_tokens
        if self.buffer_rows < k_max + b:
            need_mb = math.ceil((k_max + b) * self.d * itemsize / 2**20 * 1000) / 1000
            raise UserError(
                f"buffer_mb={buffer_mb} holds {self.buffer_rows} rows, but one chunk of hook {hook!r} gives up to {k_max} rows "
                f"and a batch takes {b}: use buffer_mb >= {need_mb:g}."
            )
        # The buffer never holds more than the rows still to yield plus one segment: cap it there.
        self._capacity = min(self.buffer_rows, self._rows_total + k_max)
        self._depth = self.n_readers + 2
        self._closed = False
        self._fetch: Prefetcher | None = None
        self._start(0)

    # ---- sizes ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Batches this loader yields from the start."""
        return self.n_batches

    @property
    def n_rows_total(self) -> int:
        """Rows this rank yields from the start."""
        return self._rows_total

    @property
    def buffer_bytes(self) -> int:
        """Memory of the shuffle buffer (data + row ids) plus the read-ahead pool."""
        row = self.d * self._reader.disk_dtype.itemsize + 3 * 8  # data + live, free, slot_gid
        return self._capacity * row + self._depth * (self._reader.file_nbytes if self._reader.fast else 0)

    # ---- the stream -------------------------------------------------------------------------------
    def _start(self, step: int) -> None:
        """Position the loader before batch `step`: fresh at 0, else by a dry replay."""
        self._close_fetch()
        rng = np.random.default_rng([self.seed, self.rank, self.world_size, BUFFER_SALT])
        self._segments: Iterator[Segment] = self._plan.segments(self.n_epochs)
        self._ahead: collections.deque[tuple[Segment, Pending | None]] = collections.deque()
        self._rows_queued = 0  # rows of the segments taken from self._segments
        self._rows_in = 0  # rows appended to the buffer
        self._step = 0
        self._rows_out = 0
        self._buf = ShuffleBuffer(self._capacity, self.d, self._reader.disk_dtype, rng, dry=step > 0)
        while self._step < step:
            self._fill()
            pos = self._buf.draw(self._next_size())
            self._buf.remove(pos)
            self._rows_out += pos.shape[0]
            self._step += 1
        if self._buf.dry:
            # Segments the replay queued but did not append go back in front, to be read for real.
            queued = [seg for seg, _ in self._ahead]
            self._ahead.clear()
            self._rows_queued -= sum(seg.n_rows for seg in queued)
            self._segments = itertools.chain(queued, self._segments)
            self._hydrate()

    def _hydrate(self) -> None:
        """Turn a replayed (ids only) buffer into a real one by reading the chunks its rows are in."""
        dry = self._buf
        buf = ShuffleBuffer(self._capacity, self.d, self._reader.disk_dtype, dry.rng)
        buf.copy_state(dry)
        slots = buf.live[: buf.n]
        ipc, nt = self._sel.images_per_chunk, self._sel.n_tokens
        images, toks = np.divmod(buf.slot_gid[slots], nt)
        chunks = images // ipc
        order = np.argsort(chunks, kind="stable")
        bounds = np.flatnonzero(np.diff(chunks[order])) + 1
        fetch = Prefetcher(self._reader, n_readers=self.n_readers, depth=self._depth)

        def fill(p, g):
            raw = fetch.result(p)
            buf.data[slots[g]] = raw[images[g] - p.chunk * ipc, toks[g]]
            fetch.release(p)

        try:
            queue = collections.deque()
            for g in np.split(order, bounds) if order.size else []:
                while not fetch.can_submit():
                    fill(*queue.popleft())
                queue.append((fetch.submit(int(chunks[g[0]])), g))
            while queue:
                fill(*queue.popleft())
        finally:
            fetch.close()
        self._buf = buf

    def _next_size(self) -> int:
        return batch_size_at(self._step, self.n_batches, self._rows_total, self.batch_size)

    def _top_up(self) -> None:
        """Queue the next planned segments (and start their reads) while buffers are free."""
        while len(self._ahead) < self._depth and self._rows_queued < self._rows_total:
            if not self._buf.dry and self._fetch is None:
                self._fetch = Prefetcher(self._reader, n_readers=self.n_readers, depth=self._depth)
            if not self._buf.dry and not self._fetch.can_submit():
                return
            seg = next(self._segments, None)
            if seg is None:
                return
            self._rows_queued += seg.n_rows
            self._ahead.append((seg, None if self._buf.dry else self._fetch.submit(seg.chunk)))

    def _fill(self) -> None:
        """Append planned segments while they fit and their rows are still needed."""
        self._top_up()
        while self._ahead and self._rows_in < self._rows_total:
            seg, pending = self._ahead[0]
            if self._buf.n + seg.n_rows > self._buf.capacity:
                break
            self._ahead.popleft()
            img_off = self._sel.chunk_images(seg.chunk)
            slots = self._buf.append(row_gids(seg.chunk, self._sel, img_off, seg.lo, seg.hi))
            if pending is not None:
                copy_rows(self._fetch.result(pending), self._sel, img_off, seg.lo, seg.hi, self._buf.data, slots)
                self._fetch.release(pending)
            self._rows_in += seg.n_rows
            self._top_up()

    def __iter__(self):
        return self

    def __next__(self):
        if self._closed or self._step >= self.n_batches:
            self.close()
            raise StopIteration
        b = self._next_size()
        self._fill()
        pos = self._buf.draw(b)
        rows = self._buf.live[pos]
        x = torch.empty((b, self.d), dtype=torch.float32, pin_memory=self.pin_memory)
        x_np = x.numpy()
        data = self._buf.data
        if data.dtype == np.float32:
            np.take(data, rows, axis=0, out=x_np, mode="clip")
        elif data.dtype == np.uint16:  # bfloat16 bits: the high half of a float32
            np.left_shift(np.take(data, rows, axis=0).astype(np.uint32), 16, out=x_np.view(np.uint32))
        else:
            x_np[...] = np.take(data, rows, axis=0)
        if self.normalize:
            x_np -= self._mean32
            x_np *= self._scale32
        out = x
        if self.with_coords:
            image, token = np.divmod(self._buf.slot_gid[rows], self._sel.n_tokens)
            out = (x, torch.from_numpy(np.stack([image, token], axis=1)))
        self._buf.remove(pos)
        self._step += 1
        self._rows_out += b
        if self._step >= self.n_batches:
            self._close_fetch()
        return out

    # ---- position ---------------------------------------------------------------------------------
    def _config(self) -> dict:
        sel_crc = crc32c.crc32c(np.packbits(self._sel.images).tobytes())
        return {
            "hook": self.hook,
            "tokens": self.tokens,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "n_epochs": self.n_epochs,
            "n_rows": self.n_rows,
            "drop_last": self.drop_last,
            "buffer_rows": self.buffer_rows,
            "n_images": self.store.n_images,
            "images_per_chunk": self._sel.images_per_chunk,
            "selection_crc32c": sel_crc,
        }

    def state_dict(self) -> dict:
        """The position (batches yielded) and everything the stream depends on; JSON-able."""
        return {"format": STATE_FORMAT, "step": self._step, "rows_yielded": self._rows_out, "config": self._config()}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly after the batches `state` had yielded (same store, same arguments)."""
        if state.get("format") != STATE_FORMAT:
            raise UserError(f"loader state has format {state.get('format')!r}, expected {STATE_FORMAT!r}; it is not a ShuffledLoader state.")
        mine, theirs = self._config(), state.get("config", {})
        diff = [f"{k}: saved {theirs.get(k)!r}, now {v!r}" for k, v in mine.items() if theirs.get(k) != v]
        if diff:
            raise UserError(
                "cannot resume the loader: it was saved with other settings (" + "; ".join(diff) + "). "
                "Resume with the same store, hook, tokens, batch size, seed, epochs/rows, buffer, image mask and rank/world size."
            )
        step = int(state["step"])
        if not 0 <= step <= self.n_batches:
            raise UserError(f"loader state is at batch {step}, outside 0..{self.n_batches}.")
        if self._closed:
            self._closed = False
        self._start(step)

    # ---- lifetime ---------------------------------------------------------------------------------
    def _close_fetch(self) -> None:
        if self._fetch is not None:
            self._fetch.close()
            self._fetch = None
        if getattr(self, "_ahead", None):
            self._ahead.clear()

    def close(self) -> None:
        """Stop the readers and free the buffers; iteration then ends. Safe to call twice."""
        if getattr(self, "_closed", True) and getattr(self, "_fetch", None) is None:
            return
        self._closed = True
        self._close_fetch()
        if getattr(self, "_buf", None) is not None:
            self._buf.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
