"""Image datasets the recorder reads by index: one factory, three kinds.

    src = create_dataset("fashion-mnist")                       # Debian's idx files, split "train"
    src = create_dataset("folder", root="/data/imagenet", split="val")
    src = create_dataset("hf-disk", root="/data/ds", split="train", image_column="img")
    img = src.load(0)            # PIL RGB image; BadImageError for a file that cannot be decoded
    src = reopen_dataset(store.attrs["dataset"])                # the dataset a store recorded
"""

from __future__ import annotations

import os
import re

from saev_store.datasets.base import BadImageError, ImageSource
from saev_store.datasets.images import JpegDraft, decode_image, to_rgb
from saev_store.errors import UserError

__all__ = ["DATASET_KINDS", "create_dataset", "infer_kind", "reopen_dataset", "recorded_description", "list_datasets",
           "dataset_help", "ImageSource", "BadImageError", "JpegDraft", "to_rgb", "decode_image"]

_KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "fashion-mnist": ("Fashion-MNIST idx files (default root /usr/share/datasets/fashion-mnist; "
                      "splits train, test, all)", ()),
    "folder": ("a directory of image files, one subfolder per class (or flat: unlabeled)", ()),
    "hf-disk": ("a Hugging Face datasets directory written by save_to_disk", ("image_column", "label_column")),
}
"""kind -> (one-line description, options it accepts)."""
DATASET_KINDS: tuple[str, ...] = tuple(_KINDS)
"""The dataset kinds, named once (RecordConfig's `dataset` choices)."""


def list_datasets() -> list[str]:
    """Dataset kinds `create_dataset` accepts (for a CLI's choices)."""
    return list(_KINDS)


def dataset_help(kind: str) -> str:
    """One-line description of a dataset kind (for CLI help)."""
    if kind not in _KINDS:
        raise UserError(f"Unknown dataset kind {kind!r}; pass one of {', '.join(_KINDS)}.")
    return _KINDS[kind][0]


_IDX_IMAGES = re.compile(r".+-images-idx3-ubyte(\.gz)?")
_HF_DISK_FILES = (("dataset_dict.json",), ("dataset_info.json", "state.json"))
"""What `save_to_disk` writes at the top of a DatasetDict, or of a Dataset."""


def infer_kind(root: str) -> tuple[str, str]:
    """The dataset kind of directory `root` and why: idx image files -> fashion-mnist, a `datasets`
    save_to_disk directory -> hf-disk, anything else -> folder (of images)."""
    if not os.path.isdir(root):
        from saev_store.datasets.fashion_mnist import DEFAULT_ROOT

        raise UserError(f"--data {root} is not a directory, so there is no dataset to infer the kind of; pass an existing "
                        f"directory (Fashion-MNIST: `apt-get install dataset-fashion-mnist` puts its idx files in {DEFAULT_ROOT}).")
    names = set(os.listdir(root))
    if any(_IDX_IMAGES.fullmatch(n) for n in names):
        return "fashion-mnist", "it holds idx image files"
    if any(all(f in names for f in files) for files in _HF_DISK_FILES):
        return "hf-disk", "it holds a datasets save_to_disk directory"
    return "folder", "it holds neither idx files nor a datasets save_to_disk directory"


def create_dataset(kind: str, root: str | None = None, split: str | None = None, **options) -> ImageSource:
    """Open a dataset of kind `kind` ("fashion-mnist", "folder" or "hf-disk") at `root`.

    `split`: fashion-mnist: "train" (default), "test" or "all"; folder: the subfolder `root/split`
    when it exists, else ignored; hf-disk: required for a DatasetDict, ignored for a Dataset.
    `options` (hf-disk only): `image_column` (default "image"), `label_column` (default "label" when
    present, else unlabeled). Options passed as None count as not given.

    Raises UserError for an unknown kind or option, or a missing/invalid dataset.
    """
    if kind not in _KINDS:
        raise UserError(f"Unknown dataset kind {kind!r}; pass one of {', '.join(_KINDS)}.")
    options = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(options) - set(_KINDS[kind][1]))
    if unknown:
        accepted = ", ".join(_KINDS[kind][1]) or "none"
        raise UserError(f"Dataset kind {kind!r} does not take option(s) {', '.join(unknown)} (it accepts: {accepted}).")
    if kind == "fashion-mnist":
        from saev_store.datasets.fashion_mnist import FashionMnist

        return FashionMnist(root, split)
    if kind == "folder":
        from saev_store.datasets.folder import ImageFolder

        return ImageFolder(root, split)
    from saev_store.datasets.hf_disk import HfDisk

    return HfDisk(root, split, **options)


def recorded_description(described: dict | None) -> dict | None:
    """A store's recorded dataset (`ImageSource.describe()`) as this version describes the same images:
    older folder stores recorded with a split named the split folder itself as root (see
    `folder.reopen_root`). Everything else is returned as it is."""
    if not described or described.get("kind") != "folder" or not described.get("root"):
        return described
    from saev_store.datasets.folder import reopen_root

    return {**described, "root": reopen_root(described["root"], described.get("split") or "")}


def reopen_dataset(described: dict, root: str | None = None) -> ImageSource:
    """Open the dataset a store recorded (`store.attrs["dataset"]`) again; `root` replaces the recorded
    root when the dataset moved. Raises UserError when it cannot be opened (the caller compares
    `fingerprint()` with the recorded one to know it is unchanged)."""
    given = dict(described, root=root) if root else described
    d = recorded_description(given)
    return create_dataset(d["kind"], root=d.get("root"), split=d.get("split") or None, **(d.get("options") or {}))
