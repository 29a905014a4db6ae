"""The ordered loader for evaluation and exemplar mining: images in order, in blocks.

    for block in OrderedLoader("acts.zarr", "blocks.10", block_images=64):
        block.acts    # torch.float32 (n, T, d): the selected tokens of n images
        block.images  # np.int64 (n,): their image indices, increasing
        block.labels  # np.int32 (n,): their labels (-1 unlabeled)

Only valid (and masked-in) images appear. Chunks are read ahead by reader threads; a block may
span chunks, and every block but the last holds exactly `block_images` images.
"""

from __future__ import annotations

import collections
import os
import weakref
from typing import Iterator, NamedTuple

import numpy as np
import torch

from .. import format as fmt
from ..stats import Normalizer
from ..store import Store
from .chunks import ChunkReader, as_store, make_selection
from .prefetch import Prefetcher


class ImageBlock(NamedTuple):
    """Consecutive selected images of one hook."""

    acts: torch.Tensor
    """float32 (n, T, d): the selected tokens (normalized when the loader normalizes)."""
    images: np.ndarray
    """int64 (n,): image indices in the store, increasing."""
    labels: np.ndarray
    """int32 (n,): labels, -1 when unlabeled."""


class OrderedLoader:
    """Blocks of whole images in store order; iterable any number of times."""

    def __init__(
        self,
        store: Store | str | os.PathLike,
        hook: str,
        *,
        tokens: str = "patches",
        normalize: bool = False,
        block_images: int | None = None,
        image_mask: np.ndarray | None = None,
        n_readers: int = 2,
    ):
        """
        tokens: "patches", "cls" or "all". normalize: apply the stored normalization (Normalizer).
        block_images: images per block (default: the store's images per chunk).
        image_mask: bool (n_images,) of images to include, combined with the store's valid mask.
        n_readers: chunk reads in flight.
        """
        self.store = as_store(store)
        self.hook = hook
        self._reader = ChunkReader(self.store, hook)
        self.d = self._reader.info.d
        self._sel = make_selection(self.store, hook, tokens, image_mask)
        self.n_tokens = self._sel.n_sel_tokens
        """T: tokens per image in the selection."""
        self.block_images = int(block_images or self._sel.images_per_chunk)
        if self.block_images < 1:
            raise ValueError(f"block_images={block_images} must be at least 1.")
        self.n_readers = int(n_readers)
        self.normalize = bool(normalize)
        self.normalizer = self.store.normalizer(hook, tokens) if normalize else Normalizer.identity(self.d)
        self._mean32 = self.normalizer.mean.astype(np.float32)
        self._scale32 = np.float32(self.normalizer.scale)
        self.n_images = int(self._sel.images.sum())
        """Images the loader yields."""
        self._labels = self.store.labels()
        self._active: weakref.WeakSet = weakref.WeakSet()

    def __len__(self) -> int:
        return -(-self.n_images // self.block_images)

    def __iter__(self) -> Iterator[ImageBlock]:
        it = self._blocks()
        self._active.add(it)
        return it

    def _pieces(self, fetch: Prefetcher) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(float32 (m, T, d), image indices) for every chunk holding selected images, in order."""
        chunks = [i for i in range(self.store.n_chunks) if self._sel.chunk_images(i).size]
        t0, t = self._sel.tok0, self._sel.n_sel_tokens
        queue = collections.deque()
        nxt = 0
        while nxt < len(chunks) or queue:
            while nxt < len(chunks) and fetch.can_submit():
                queue.append(fetch.submit(chunks[nxt]))
                nxt += 1
            p = queue.popleft()
            off = self._sel.chunk_images(p.chunk)
            raw = fetch.result(p)
            # Fancy indexing copies, so the pool buffer can go back before the piece is used.
            x = fmt.decode_acts(raw[off, t0 : t0 + t], self._reader.info.store_dtype)
            fetch.release(p)
            yield np.ascontiguousarray(x, dtype=np.float32), p.chunk * self._sel.images_per_chunk + off

    def _blocks(self) -> Iterator[ImageBlock]:
        fetch = Prefetcher(self._reader, n_readers=self.n_readers, depth=self.n_readers + 1)
        try:
            held: list[tuple[np.ndarray, np.ndarray]] = []
            n_held = 0
            for x, images in self._pieces(fetch):
                held.append((x, images))
                n_held += images.size
                while n_held >= self.block_images:
                    block, held, n_held = self._take(held, self.block_images)
                    yield block
            if n_held:
                block, held, n_held = self._take(held, n_held)
                yield block
        finally:
            fetch.close()

    def _take(self, held, n):
        """The first n held images as an ImageBlock, and what is left."""
        xs, ims, got = [], [], 0
        while got < n:
            x, images = held[0]
            k = min(n - got, images.size)
            xs.append(x[:k])
            ims.append(images[:k])
            got += k
            if k == images.size:
                held.pop(0)
            else:
                held[0] = (x[k:], images[k:])
        x = xs[0] if len(xs) == 1 else np.concatenate(xs)
        if self.normalize:
            x -= self._mean32  # in place: these rows are this block's alone
            x *= self._scale32
        images = np.concatenate(ims).astype(np.int64)
        return ImageBlock(torch.from_numpy(np.ascontiguousarray(x)), images, self._labels[images]), held, sum(i.size for _, i in held)

    def close(self) -> None:
        """Stop the readers of any iteration still open."""
        for it in list(self._active):
            it.close()
        self._active.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
