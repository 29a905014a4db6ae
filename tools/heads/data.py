"""Training rows and held-out rows of a head's task, read from the store.

* classify: one row per image, the CLS token or the mean of the patch tokens (normalized with the
  store's statistics of those tokens). One ordered pass over the store extracts them (n_images x d
  float32 in memory: 3.9 GB for ImageNet-1k at d = 768); every epoch then shuffles them in memory.
* segment: one row per patch token with its patch label; each epoch is one shuffled pass over the
  store (`ShuffledLoader`, whole chunks mixed in its buffer). Rows labelled IGNORE are dropped from
  each batch before the heads see it.

Either way every head of the grid gets the same batches.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from saev_store.errors import UserError
from saev_store.loaders import OrderedLoader, ShuffledLoader
from saev_store.patch_labels import IGNORE
from saev_store.stats import Normalizer
from saev_store.store import Store


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(seed) * 1_000_003 + int(epoch)


class ClassifyRows:
    """Image rows (CLS or patch mean) of the training and held-out images, in memory."""

    def __init__(self, st: Store, hook: str, tokens: str, normalize: bool, train_mask: np.ndarray, eval_mask: np.ndarray,
                 n_readers: int = 4):
        sel = "cls" if tokens == "cls" else "patches"
        self.normalizer = st.normalizer(hook, sel) if normalize else Normalizer.identity(st.hook(hook).d)
        self.x_train, self.y_train = self._extract(st, hook, sel, normalize, train_mask, n_readers)
        self.x_eval, self.y_eval = self._extract(st, hook, sel, normalize, eval_mask, n_readers)

    @staticmethod
    def _extract(st: Store, hook: str, sel: str, normalize: bool, mask: np.ndarray, n_readers: int):
        xs, ys = [], []
        with OrderedLoader(st, hook, tokens=sel, normalize=normalize, image_mask=mask, n_readers=n_readers) as loader:
            for block in loader:
                xs.append(block.acts[:, 0] if sel == "cls" else block.acts.mean(dim=1))
                ys.append(torch.from_numpy(block.labels.astype(np.int64)))
        return torch.cat(xs), torch.cat(ys)

    @property
    def n_train_rows(self) -> int:
        return int(self.x_train.shape[0])

    def batches(self, epoch: int, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.from_numpy(np.random.default_rng(_epoch_seed(seed, epoch)).permutation(self.n_train_rows))
        for a in range(0, order.numel(), batch_size):
            idx = order[a : a + batch_size]
            yield self.x_train[idx], self.y_train[idx]

    def eval_rows(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, None]]:
        yield self.x_eval, self.y_eval, None


class SegmentRows:
    """Patch rows with their patch labels: shuffled passes for training, ordered blocks for evaluation."""

    def __init__(self, st: Store, hook: str, key: str, normalize: bool, train_mask: np.ndarray, eval_mask: np.ndarray,
                 buffer_mb: float = 1024, n_readers: int = 4):
        self.st, self.hook, self.normalize = st, hook, normalize
        self.train_mask, self.eval_mask = train_mask, eval_mask
        self.buffer_mb, self.n_readers = buffer_mb, n_readers
        self.normalizer = st.normalizer(hook, "patches") if normalize else Normalizer.identity(st.hook(hook).d)
        self.grid_start = st.hook(hook).layout.grid_start
        self.labels_np = st.patch_labels(key)  # int16 (n_images, P): 0.7 GB for ImageNet-1k at 16x16
        self.n_train_rows = int((self.labels_np[train_mask] != IGNORE).sum())

    def batches(self, epoch: int, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = ShuffledLoader(self.st, self.hook, batch_size=batch_size, tokens="patches", normalize=self.normalize,
                                seed=_epoch_seed(seed, epoch), n_epochs=1, buffer_mb=self.buffer_mb, n_readers=self.n_readers,
                                with_coords=True, image_mask=self.train_mask, pin_memory=False)
        with loader:
            for x, coords in loader:
                c = coords.numpy()
                y = torch.from_numpy(self.labels_np[c[:, 0], c[:, 1] - self.grid_start].astype(np.int64))
                keep = y != IGNORE
                if bool(keep.all()):
                    yield x, y
                elif bool(keep.any()):
                    yield x[keep], y[keep]

    def eval_rows(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
        """(patch rows (n*P, d), their labels (n*P,), the block's image indices (n,)) per block of held-out images."""
        with OrderedLoader(self.st, self.hook, tokens="patches", normalize=self.normalize, image_mask=self.eval_mask,
                           n_readers=self.n_readers) as loader:
            for block in loader:
                n, p, d = block.acts.shape
                yield block.acts.reshape(n * p, d), torch.from_numpy(self.labels_np[block.images].reshape(-1).astype(np.int64)), block.images


def split_images(st: Store, labeled: np.ndarray, held_out_frac: float, seed: int, max_eval_images: int | None):
    """(train mask, held-out mask) over images: the held-out draw is saev-train's (by image, seeded),
    restricted to the labeled images."""
    from trainers.run import held_out_mask

    valid = st.valid() & labeled
    if valid.sum() < 2:
        raise UserError(f"{st.path} has {int(valid.sum())} valid labelled images; a head needs at least two (one to train, one to hold out).")
    held = held_out_mask(valid, held_out_frac, seed)
    train = valid & ~held
    if max_eval_images is not None:
        held[np.flatnonzero(held)[max_eval_images:]] = False
    return train, held
