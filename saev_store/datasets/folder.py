"""A directory of image files: ImageFolder layout (one subfolder per class) or a flat, unlabeled folder.

Layout rules, decided once:
* `root/<class>/**/<image>`: labeled. Class names are the subfolders that hold at least one image,
  sorted; images may sit at any depth below their class folder.
* `root/<image>` with no class subfolders: unlabeled (labels -1, class_names None).
* Images both directly in root and in subfolders: refused (ambiguous).
* Splits: when `root/<split>` is a directory it is used (`root=/data/imagenet, split="val"` reads
  `/data/imagenet/val`); `root` stays `/data/imagenet`, so the recorded (root, split) pair reopens the
  same images. Otherwise `split` is ignored and recorded as "", unless every subfolder of root is
  named like a split (train, val, test...), which is refused so splits never become classes.
* Files: extensions .jpg .jpeg .png .bmp .gif .webp .tif .tiff in any letter case; names starting with
  "." are skipped (macOS "._x.jpg" resource forks, .DS_Store, hidden folders). Symlinks are followed.
* Order: images are sorted by relative path, compared folder by folder; image ids are those
  relative paths with "/" separators.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from saev_store.datasets.base import BadImageError, ImageSource, sha256_hex
from saev_store.datasets.images import JpegDraft, decode_image
from saev_store.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLIT_NAMES = frozenset({"train", "training", "val", "valid", "validation", "test", "testing"})


class ImageFolder(ImageSource):
    """Images under a directory, labeled by their top-level subfolder (see the module docstring)."""

    kind = "folder"

    def __init__(self, root: str | None, split: str | None = None):
        if root is None:
            raise UserError("The folder dataset needs a directory: pass --data DIR.")
        root = os.path.abspath(root)
        if not os.path.isdir(root):
            raise UserError(f"Image folder {root} does not exist or is not a directory; pass --data DIR.")
        self.root = root
        self._images_dpath, self.split = _pick_split(root, split)
        self._rel_fpaths, self.class_names, self._labels = _scan(self._images_dpath)
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self._rel_fpaths)

    def labels(self) -> np.ndarray:
        return self._labels.copy()

    def image_ids(self) -> list[str]:
        return list(self._rel_fpaths)

    def load(self, i: int, draft: JpegDraft | None = None) -> Image.Image:
        i = self._check_index(i)
        rel = self._rel_fpaths[i]
        fpath = os.path.join(self._images_dpath, *rel.split("/"))
        try:
            return decode_image(fpath, rel, draft)
        except BadImageError as err:
            raise BadImageError(rel, f"{err.reason} (file {fpath})") from err

    def options(self) -> dict:
        return {}

    def fingerprint(self) -> str:
        # Names and sizes, not contents: hashing a million JPEGs would take longer than recording them,
        # and mtimes change on every copy. One stat per file.
        if self._fingerprint is None:
            parts = [self.split, *(self.class_names or [])]
            for rel in self._rel_fpaths:
                parts += [rel, str(os.stat(os.path.join(self._images_dpath, *rel.split("/"))).st_size)]
            self._fingerprint = sha256_hex(parts)
        return self._fingerprint


def reopen_root(root: str, split: str) -> str:
    """The root that reopens a recorded (root, split) pair.

    Stores recorded before the pair was fixed hold the split folder itself as root (`DIR/train` with
    split "train", from `--data DIR --split train`); that pair, where `DIR/train/train` does not exist,
    means `DIR`. Every other pair is returned unchanged.
    """
    norm = os.path.normpath(root)
    if split and os.path.basename(norm) == split and not os.path.isdir(os.path.join(norm, split)):
        return os.path.dirname(norm)
    return root


def _pick_split(root: str, split: str | None) -> tuple[str, str]:
    if split:
        split_dpath = os.path.join(root, split)
        if os.path.isdir(split_dpath):
            return split_dpath, split
    subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if subdirs and all(name.lower() in SPLIT_NAMES for name in subdirs):
        asked = f"has no split {split!r}" if split else "holds split folders"
        raise UserError(f"Image folder {root} {asked}: its subfolders are {', '.join(subdirs)}. "
                        f"Pass --split with one of them (or point --data at the split folder).")
    return root, ""


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _walk_images(dpath: str, rel_prefix: tuple[str, ...], seen: set[str]) -> list[tuple[str, ...]]:
    """Relative paths (as tuples of parts) of every image below dpath, following symlinks once."""
    real = os.path.realpath(dpath)
    if real in seen:  # a symlink cycle or a second link to the same folder
        return []
    seen.add(real)
    found = []
    with os.scandir(dpath) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        if e.name.startswith("."):
            continue
        if e.is_dir():
            found += _walk_images(e.path, (*rel_prefix, e.name), seen)
        elif e.is_file() and _is_image(e.name):
            found.append((*rel_prefix, e.name))
    return found


def _scan(root: str) -> tuple[list[str], list[str] | None, np.ndarray]:
    rel_parts = sorted(_walk_images(root, (), set()))
    if not rel_parts:
        raise UserError(f"Image folder {root} holds no images (looked for {' '.join(IMAGE_EXTENSIONS)}, any case, "
                        "at any depth); pass --data with a folder of images.")
    flat = [p for p in rel_parts if len(p) == 1]
    nested = [p for p in rel_parts if len(p) > 1]
    rel_fpaths = ["/".join(p) for p in rel_parts]
    if not nested:
        return rel_fpaths, None, np.full(len(rel_parts), -1, dtype=np.int32)
    if flat:
        classes = sorted({p[0] for p in nested})
        raise UserError(f"Image folder {root} has {len(flat)} images directly in it (e.g. {flat[0][0]}) and class "
                        f"subfolders ({', '.join(classes[:5])}{'...' if len(classes) > 5 else ''}); put every image in "
                        "a class subfolder (labeled) or all of them directly in the folder (unlabeled).")
    class_names = sorted({p[0] for p in nested})
    index = {name: k for k, name in enumerate(class_names)}
    labels = np.array([index[p[0]] for p in rel_parts], dtype=np.int32)
    return rel_fpaths, class_names, labels
