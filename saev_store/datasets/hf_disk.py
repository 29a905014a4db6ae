"""A Hugging Face `datasets` dataset saved with `save_to_disk` (a Dataset, or a DatasetDict of splits).

* Image column (default "image"): an `Image` feature, path strings, or raw bytes. Images are read as
  undecoded bytes/paths and decoded by `decode_image`, so truncation, bombs and huge JPEGs are handled
  the same way as for folders. Relative paths are resolved against the dataset directory `root`.
* Label column (default "label"; unlabeled when that column is absent): a `ClassLabel` (its names are
  the class names), integers (class names "0".."max"), or strings (class names are the sorted distinct
  strings). Missing values (None, or ClassLabel's -1) become -1. Labels are read without touching
  the image column.
* Image ids are "<split>/<row>" ("<row>" for a plain Dataset, whose `split` is recorded as "").
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from saev_store.datasets.base import BadImageError, ImageSource, sha256_hex
from saev_store.datasets.images import JpegDraft, decode_image, to_rgb
from saev_store.errors import UserError

DEFAULT_IMAGE_COLUMN = "image"
DEFAULT_LABEL_COLUMN = "label"


def _import_datasets():
    try:
        import datasets
    except ImportError as err:
        raise UserError("The hf-disk dataset needs the `datasets` package: pip install 'saev-store[hf]'.") from err
    return datasets


class HfDisk(ImageSource):
    """Rows of a `datasets.load_from_disk(root)` dataset (see the module docstring)."""

    kind = "hf-disk"

    def __init__(self, root: str | None, split: str | None = None, image_column: str | None = None,
                 label_column: str | None = None):
        if root is None:
            raise UserError("The hf-disk dataset needs the directory written by save_to_disk: pass --data DIR.")
        self.root = os.path.abspath(root)
        self._split_arg = split
        ds, self.split = self._open()
        self.image_column = image_column or DEFAULT_IMAGE_COLUMN
        """Column holding the images."""
        columns = list(ds.column_names)
        if self.image_column not in columns:
            raise UserError(f"Dataset {self.root} has no image column {self.image_column!r}; its columns are "
                            f"{', '.join(columns)}. Pass --image-column with one of them.")
        if label_column is None:
            self.label_column = DEFAULT_LABEL_COLUMN if DEFAULT_LABEL_COLUMN in columns else None
        elif label_column not in columns:
            raise UserError(f"Dataset {self.root} has no label column {label_column!r}; its columns are "
                            f"{', '.join(columns)}. Pass --label-column with one of them, or leave it out for "
                            "unlabeled images.")
        else:
            self.label_column = label_column
        """Column holding the labels, or None when unlabeled."""
        self._image_kind = _image_kind(ds.features[self.image_column], self.image_column, self.root)
        self._n = ds.num_rows
        self._labels, self.class_names = self._read_labels(ds)
        self._ds = None  # the image column, undecoded; opened lazily per process
        self._fingerprint = _fingerprint(ds, self.split, self.image_column, self.label_column)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_ds"] = None  # arrow tables are reopened (memory-mapped) in each worker
        return state

    def _open(self):
        datasets = _import_datasets()
        if not os.path.isdir(self.root):
            raise UserError(f"Dataset directory {self.root} does not exist; pass --data with a directory written by "
                            "datasets' save_to_disk.")
        try:
            obj = datasets.load_from_disk(self.root)
        except FileNotFoundError as err:
            raise UserError(f"{self.root} is not a dataset written by datasets' save_to_disk ({err}); pass --data "
                            "with such a directory, or use --dataset folder for a folder of image files.") from err
        split = self._split_arg
        if isinstance(obj, datasets.DatasetDict):
            splits = list(obj.keys())
            if not split or split not in obj:
                asked = f"has no split {split!r}" if split else "is a DatasetDict"
                raise UserError(f"Dataset {self.root} {asked}; pass --split with one of {', '.join(splits)}.")
            return obj[split], split
        return obj, ""

    def _images(self):
        if self._ds is None:
            ds, _ = self._open()
            ds = ds.select_columns([self.image_column])
            if self._image_kind == "image":
                datasets = _import_datasets()
                ds = ds.cast_column(self.image_column, datasets.Image(decode=False))
            self._ds = ds
        return self._ds

    def _read_labels(self, ds) -> tuple[np.ndarray, list[str] | None]:
        if self.label_column is None:
            return np.full(self._n, -1, dtype=np.int32), None
        datasets = _import_datasets()
        feature = ds.features[self.label_column]
        # One arrow column (the "arrow" format honours any indices mapping); the images are not touched.
        column = ds.select_columns([self.label_column]).with_format("arrow")[:].column(self.label_column)
        is_int = isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))
        if isinstance(feature, datasets.ClassLabel) or is_int:
            labels = column.fill_null(-1).to_numpy().astype(np.int64)
            labels[labels < 0] = -1
            if isinstance(feature, datasets.ClassLabel):
                return labels.astype(np.int32), list(feature.names)
            n_classes = int(labels.max()) + 1 if len(labels) else 0
            return labels.astype(np.int32), [str(k) for k in range(n_classes)]
        if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
            values = column.to_pylist()
            names = sorted({v for v in values if v is not None})
            index = {name: k for k, name in enumerate(names)}
            return np.array([-1 if v is None else index[v] for v in values], dtype=np.int32), names
        raise UserError(f"Label column {self.label_column!r} of {self.root} holds {feature}; expected a ClassLabel, "
                        "integers or strings. Pass --label-column with another column.")

    def __len__(self) -> int:
        return self._n

    def labels(self) -> np.ndarray:
        return self._labels.copy()

    def image_ids(self) -> list[str]:
        prefix = f"{self.split}/" if self.split else ""
        return [f"{prefix}{i}" for i in range(self._n)]

    def load(self, i: int, draft: JpegDraft | None = None) -> Image.Image:
        i = self._check_index(i)
        image_id = f"{self.split}/{i}" if self.split else str(i)
        value = self._images()[i][self.image_column]
        if isinstance(value, dict):  # Image(decode=False): {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        if value is None:
            raise BadImageError(image_id, f"column {self.image_column!r} is empty in this row")
        if isinstance(value, Image.Image):
            return to_rgb(value)
        if isinstance(value, str):
            fpath = value if os.path.isabs(value) else os.path.join(self.root, value)
            try:
                return decode_image(fpath, image_id, draft)
            except BadImageError as err:
                raise BadImageError(image_id, f"{err.reason} (file {fpath})") from err
        return decode_image(io.BytesIO(value), image_id, draft)

    def options(self) -> dict:
        return {"image_column": self.image_column, "label_column": self.label_column}

    def fingerprint(self) -> str:
        return self._fingerprint


def _image_kind(feature, column: str, root: str) -> str:
    datasets = _import_datasets()
    if isinstance(feature, datasets.Image):
        return "image"
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        return "path"
    if isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary"):
        return "bytes"
    raise UserError(f"Image column {column!r} of {root} holds {feature}; expected an Image feature, file paths or "
                    "bytes. Pass --image-column with another column.")


def _fingerprint(ds, split: str, image_column: str, label_column: str | None) -> str:
    """Hash of the arrow files' names and sizes plus each directory's state.json (which holds datasets'
    own content fingerprint): cheap, and it changes when the saved data changes."""
    parts = [split, image_column, label_column or "", str(ds.num_rows)]
    dpaths = []
    for cache_file in ds.cache_files:
        fpath = cache_file["filename"]
        parts += [os.path.basename(fpath), str(os.path.getsize(fpath))]
        if os.path.dirname(fpath) not in dpaths:
            dpaths.append(os.path.dirname(fpath))
    for dpath in dpaths:
        state_fpath = os.path.join(dpath, "state.json")
        if os.path.isfile(state_fpath):
            with open(state_fpath, "rb") as f:
                parts.append(f.read())
    return sha256_hex(parts)
