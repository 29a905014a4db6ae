"""What every image dataset looks like to the recorder: `ImageSource`, and the error for one bad image."""

from __future__ import annotations

import abc
import hashlib
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from saev_store.errors import UserError

if TYPE_CHECKING:
    from saev_store.datasets.images import JpegDraft


class BadImageError(UserError):
    """One image cannot be decoded (unreadable, corrupt, truncated, too large, unsupported mode).

    It is a `UserError` because the fix is the user's: repair or delete the file, or record with
    `--skip-bad` so the image is marked invalid instead of stopping the run.
    """

    def __init__(self, image_id: str, reason: str):
        self.image_id = image_id
        """The image's stable key (`ImageSource.image_ids()[i]`)."""
        self.reason = reason
        """What is wrong with it, in words."""
        super().__init__(
            f"Cannot read image {image_id!r}: {reason}. Repair or delete it, or record with --skip-bad to "
            "mark it invalid."
        )

    def __reduce__(self):
        # Exception pickles as cls(*self.args) = cls(message), which would lose the two fields and fail;
        # DataLoader workers and multiprocessing need the exception to round-trip.
        return (type(self), (self.image_id, self.reason))


class ImageSource(abc.ABC):
    """A finite, indexed, read-only collection of images with optional integer labels.

    Indices run `0 .. len(src) - 1` in a fixed order, so a store's row `i` always means the same image.
    Sources are picklable and cheap to pickle: file handles and decoded arrays are opened lazily in
    each process (DataLoader workers) and dropped when pickled.
    """

    kind: str
    """Registry name: "fashion-mnist", "folder" or "hf-disk"."""
    root: str
    """Absolute path of the dataset's directory (`--data`): `create_dataset(kind, root, split)` reopens
    the same images (a folder's split is read from root/split)."""
    split: str
    """The split that was read ("train", "val", ...), or "" when the source has no splits."""
    class_names: list[str] | None
    """Name of each label value (`labels() == k` means `class_names[k]`); None when unlabeled."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of images."""

    @abc.abstractmethod
    def labels(self) -> np.ndarray:
        """(n,) int32 label per image, -1 when unlabeled. Never decodes an image."""

    @abc.abstractmethod
    def image_ids(self) -> list[str]:
        """A stable key per image: a relative file path, or "split/index" for array-backed datasets."""

    @abc.abstractmethod
    def load(self, i: int, draft: JpegDraft | None = None) -> Image.Image:
        """Image `i` in RGB mode, decoded at full size.

        `draft` opts into reduced JPEG decoding (see `JpegDraft`; sources without JPEG files ignore it).
        Raises `BadImageError` for an image that cannot be decoded.
        """

    @abc.abstractmethod
    def options(self) -> dict:
        """Kind-specific settings that change what is read (column names...), JSON-able."""

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """"sha256:<hex>" of the content list; it changes when the images or labels change."""

    def describe(self) -> dict:
        """JSON-able identity of this dataset; the recorder refuses to resume a store when it differs."""
        return {
            "kind": self.kind,
            "root": self.root,
            "split": self.split,
            "n_images": len(self),
            "class_names": None if self.class_names is None else list(self.class_names),
            "options": self.options(),
            "fingerprint": self.fingerprint(),
        }

    def _check_index(self, i: int) -> int:
        n = len(self)
        if not isinstance(i, (int, np.integer)) or not 0 <= i < n:
            raise IndexError(f"{self.kind} dataset at {self.root}: index {i!r} is outside 0..{n - 1}.")
        return int(i)

    def __repr__(self) -> str:
        split = f", split={self.split!r}" if self.split else ""
        return f"{type(self).__name__}(root={self.root!r}{split}, n_images={len(self)})"


def sha256_hex(parts) -> str:
    """"sha256:<hex>" of an iterable of str/bytes parts, each length-prefixed so boundaries count."""
    h = hashlib.sha256()
    for part in parts:
        b = part.encode() if isinstance(part, str) else bytes(part)
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return "sha256:" + h.hexdigest()
