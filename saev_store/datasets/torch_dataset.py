"""A torch Dataset over an ImageSource for the recorder's DataLoader: bad images become flagged rows.

A bad image must not kill a DataLoader worker (the whole run would die with a worker traceback), so
`__getitem__` catches `BadImageError` and returns a zero image with `ok=False` and the reason (what
is wrong, naming the file for file-backed sources); the recorder then stops with a message naming the
image, or with --skip-bad records the image as invalid.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from PIL import Image

from saev_store.datasets.base import BadImageError, ImageSource
from saev_store.datasets.images import JpegDraft

Transform = Callable[[Image.Image], torch.Tensor]


class RecordBatch(NamedTuple):
    """One collated batch of `RecordDataset` items."""

    index: torch.Tensor
    """(b,) int64 dataset index of each image."""
    images: torch.Tensor
    """(b, 3, H, W) float32 transformed images; all zeros where `ok` is False."""
    ok: torch.Tensor
    """(b,) bool: False where the image could not be decoded."""
    errors: list[str]
    """Per image, "" or `BadImageError.reason` (without the "repair or --skip-bad" advice, which the
    caller adds once, with the image id)."""


class RecordDataset(torch.utils.data.Dataset):
    """`src` images `indices` (all when None) through `transform`, as `(index, image, ok, error)`.

    * `transform` maps an RGB PIL image to a float tensor (3, H, W) of one fixed shape (the model's
      preprocessing). It must be picklable for num_workers > 0 (torchvision transforms are).
    * `draft` is passed to `src.load`: None decodes every image at full size; a `JpegDraft` opts into
      reduced JPEG decoding.
    * `image_shape`: shape of the zero image returned for a bad image; by default the shape
      `transform` gives a blank image (computed once per process, only when needed).

    Picklable: sources hold paths and open their files lazily in each worker.
    """

    def __init__(self, src: ImageSource, transform: Transform, indices: Sequence[int] | None = None, *,
                 draft: JpegDraft | None = None, image_shape: tuple[int, int, int] | None = None):
        self.src = src
        self.transform = transform
        n = len(src)
        # range(n), not a list: a reader of a ten-million-image dataset needs no index list.
        self.indices = range(n) if indices is None else [int(i) for i in indices]
        bad = [] if indices is None else [i for i in self.indices if not 0 <= i < n]
        if bad:
            raise IndexError(f"RecordDataset: indices {bad[:5]} are outside the dataset's 0..{n - 1}.")
        self.draft = draft
        self.image_shape = None if image_shape is None else tuple(image_shape)
        self._blank_like: tuple[tuple[int, ...], torch.dtype] | None = None

    @classmethod
    def model_input(cls, src: ImageSource, pre, indices: Sequence[int] | None = None) -> "RecordDataset":
        """Images as the model's input under PreprocessConfig `pre`: decoded as `pre` says (full size
        unless it opts into JPEG drafting), resized and cropped, as (3, H, W) uint8. The recorder feeds
        the model these and the exemplar tiles show them: one decode path, so a tile is pixel for pixel
        what the model saw."""
        return cls(src, pre.to_uint8, indices, draft=pre.jpeg_draft())

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple[int, torch.Tensor, bool, str]:
        index = self.indices[j]
        try:
            img = self.src.load(index, draft=self.draft)
        except BadImageError as err:
            return index, self._blank(), False, err.reason
        return index, self._apply(img), True, ""

    def _apply(self, img: Image.Image) -> torch.Tensor:
        x = self.transform(img)
        if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[0] != 3:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"RecordDataset: transform must return a (3, H, W) tensor, got {got}.")
        # uint8 stays uint8 (the recorder normalizes on the model's device); anything else is float32.
        return x if x.dtype == torch.uint8 else x.to(torch.float32)

    def _blank(self) -> torch.Tensor:
        """Zeros standing in for an unreadable image, in the shape and dtype the transform gives
        (probed once per process on a blank image: the transforms resize/crop to a fixed size)."""
        if self._blank_like is None:
            probe = self._apply(Image.new("RGB", (256, 256)))
            self._blank_like = (probe.shape if self.image_shape is None else self.image_shape, probe.dtype)
        shape, dtype = self._blank_like
        return torch.zeros(shape, dtype=dtype)


def collate(items: list[tuple[int, torch.Tensor, bool, str]]) -> RecordBatch:
    """Stack `RecordDataset` items into a `RecordBatch` (use as the DataLoader's collate_fn)."""
    index, images, ok, errors = zip(*items)
    return RecordBatch(
        index=torch.tensor(index, dtype=torch.int64),
        images=torch.stack(images),
        ok=torch.tensor(ok, dtype=torch.bool),
        errors=list(errors),
    )
