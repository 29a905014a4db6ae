"""Fashion-MNIST from its standard idx files (gzipped or not): the embedded default dataset.

Debian's `dataset-fashion-mnist` installs the four files under /usr/share/datasets/fashion-mnist.
The arrays are small (47 MB for train), so they are parsed once per process and kept in memory.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import zlib

import numpy as np
from PIL import Image

from saev_store.datasets.base import ImageSource, sha256_hex
from saev_store.datasets.images import to_rgb
from saev_store.errors import UserError

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
SPLITS: dict[str, tuple[tuple[str, str], ...]] = {
    "train": (("train", "train"),),
    "test": (("test", "t10k"),),
    "all": (("train", "train"), ("test", "t10k")),
}
"""Split -> ((image-id prefix, file prefix), ...) in the order their images are concatenated."""

_IDX_UBYTE = 0x08
_HOW_TO_GET = (
    "Install them with `apt-get install dataset-fashion-mnist` (Debian; it puts them in "
    f"{DEFAULT_ROOT}) or pass --data DIR pointing at a directory holding the idx files."
)


class FashionMnist(ImageSource):
    """Fashion-MNIST's 28x28 grayscale images (returned as RGB) with their 10 class labels.

    Splits: "train" (60000 images), "test" (10000), "all" (train then test). Image ids are
    "train/<i>" and "test/<i>" with `i` the index inside that file.
    """

    kind = "fashion-mnist"

    def __init__(self, root: str | None = None, split: str | None = None):
        self.root = os.path.abspath(root if root is not None else DEFAULT_ROOT)
        self.split = "train" if split is None else split
        if self.split not in SPLITS:
            raise UserError(f"Fashion-MNIST has no split {self.split!r}; pass one of {', '.join(SPLITS)}.")
        self.class_names = list(CLASS_NAMES)
        if not os.path.isdir(self.root):
            raise UserError(f"Fashion-MNIST directory {self.root} does not exist. {_HOW_TO_GET}")
        self._parts = [(prefix, _find(self.root, f"{stem}-images-idx3-ubyte"), _find(self.root, f"{stem}-labels-idx1-ubyte"))
                       for prefix, stem in SPLITS[self.split]]
        # Labels are tiny: parse them now so len() and labels() are free and a bad file fails early.
        # Image files are only header-checked now and parsed on first use.
        label_arrays = []
        for _, images_fpath, labels_fpath in self._parts:
            labels, _ = read_idx(labels_fpath, ndim=1)
            n_images, *_ = read_idx_dims(images_fpath, ndim=3)
            if n_images != len(labels):
                raise UserError(f"{images_fpath} holds {n_images} images but {labels_fpath} holds {len(labels)} labels; "
                                f"the files do not belong together. {_HOW_TO_GET}")
            if len(labels) and labels.max() >= len(CLASS_NAMES):
                raise UserError(f"{labels_fpath} has label {labels.max()}, but Fashion-MNIST has {len(CLASS_NAMES)} "
                                f"classes; the file is not Fashion-MNIST's. {_HOW_TO_GET}")
            label_arrays.append(labels.astype(np.int32))
        self._counts = [len(labels) for labels in label_arrays]
        self._labels = np.concatenate(label_arrays)
        self._images: np.ndarray | None = None  # (n, h, w) uint8, parsed lazily
        self._fingerprint: str | None = None

    def __getstate__(self):
        # Workers re-read the files (under a second) instead of receiving 47+ MB through a pipe.
        state = self.__dict__.copy()
        state["_images"] = None
        return state

    def __len__(self) -> int:
        return len(self._labels)

    def labels(self) -> np.ndarray:
        return self._labels.copy()

    def image_ids(self) -> list[str]:
        return [f"{prefix}/{i}" for (prefix, _, _), n in zip(self._parts, self._counts) for i in range(n)]

    def load(self, i: int, draft=None) -> Image.Image:
        i = self._check_index(i)
        return to_rgb(Image.fromarray(self._all_images()[i], "L"))

    def options(self) -> dict:
        return {}

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._all_images()
        return self._fingerprint

    def _all_images(self) -> np.ndarray:
        if self._images is None:
            arrays, digests = [], []
            for _, images_fpath, labels_fpath in self._parts:
                images, images_sha = read_idx(images_fpath, ndim=3)
                _, labels_sha = read_idx(labels_fpath, ndim=1)
                arrays.append(images)
                digests += [images_sha, labels_sha]
            shapes = {a.shape[1:] for a in arrays}
            if len(shapes) > 1:
                raise UserError(f"Fashion-MNIST files in {self.root} have different image sizes {sorted(shapes)}; "
                                f"they do not belong together. {_HOW_TO_GET}")
            self._images = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
            # Hash of the decompressed bytes: the same data gzipped or not has the same fingerprint.
            self._fingerprint = sha256_hex([self.split, *digests])
        return self._images


def _find(root: str, name: str) -> str:
    for fname in (name, name + ".gz"):
        fpath = os.path.join(root, fname)
        if os.path.isfile(fpath):
            return fpath
    raise UserError(f"Fashion-MNIST file {name}[.gz] is missing from {root}. {_HOW_TO_GET}")


def _read_bytes(fpath: str, n: int = -1) -> bytes:
    """The file's (decompressed) bytes, all of them or the first n."""
    try:
        if fpath.endswith(".gz"):
            with gzip.open(fpath, "rb") as f:
                return f.read(n)
        with open(fpath, "rb") as f:
            return f.read(n)
    except (OSError, EOFError, zlib.error) as err:
        raise UserError(f"Cannot read {fpath} ({err}); the file is corrupt or truncated. {_HOW_TO_GET}") from err


def _parse_header(fpath: str, raw: bytes, ndim: int) -> tuple[int, ...]:
    if len(raw) < 4 + 4 * ndim:
        raise UserError(f"{fpath} is too short for an idx header; the file is corrupt or truncated. {_HOW_TO_GET}")
    zero, dtype_code, file_ndim = raw[:2], raw[2], raw[3]
    if zero != b"\0\0" or dtype_code != _IDX_UBYTE or file_ndim != ndim:
        magic = int.from_bytes(raw[:4], "big")
        raise UserError(f"{fpath} starts with magic number 0x{magic:08x}, expected 0x{0x0800 | ndim:08x} "
                        f"(idx, unsigned bytes, {ndim} dims); it is not the right idx file. {_HOW_TO_GET}")
    return struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])


def read_idx_dims(fpath: str, ndim: int) -> tuple[int, ...]:
    """The dimensions in an idx file's header, reading only the header."""
    return _parse_header(fpath, _read_bytes(fpath, 4 + 4 * ndim), ndim)


def read_idx(fpath: str, ndim: int) -> tuple[np.ndarray, str]:
    """Parse an idx file of unsigned bytes: (array with the header's dims, sha256 hex of the raw bytes).

    Raises UserError naming the file when the magic number, the number of dimensions or the file size
    disagree with the header.
    """
    raw = _read_bytes(fpath)
    dims = _parse_header(fpath, raw, ndim)
    offset = 4 + 4 * ndim
    n_expected = offset + int(np.prod(dims, dtype=np.int64))
    if len(raw) != n_expected:
        raise UserError(f"{fpath} is {len(raw)} bytes (decompressed) but its header {list(dims)} needs {n_expected}; "
                        f"the file is corrupt or truncated. {_HOW_TO_GET}")
    arr = np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)
    return arr, hashlib.sha256(raw).hexdigest()
