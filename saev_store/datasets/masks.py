"""Per-pixel label masks beside an image dataset: where they come from and how they are read.

    cfg = MaskConfig(masks="/data/ade20k/annotations")           # folder dataset: PNG label maps
    cfg = MaskConfig(mask_column="annotation")                   # hf-disk dataset: a column of label maps
    cfg = MaskConfig(masks="pixels")                             # fashion-mnist: the image's own pixels
    masks = create_mask_source(cfg, src)                         # src: the ImageSource the store records
    m_hw = masks.load(i)                                         # (height, width) int32 at the image's size

Three sources:
* `folder`: image `DATA/<rel>/<name>.<ext>` has its mask at `MASKS/<rel>/<name>.png` (same relative
  path, extension .png). A mask is a single-channel PNG of class indices: mode L or P (8-bit; a
  palette image's indices are the classes), I;16 or I (wider). Colour-coded RGB masks are refused.
* `hf-column`: a column of an hf-disk dataset holding such PNGs (an Image feature, bytes or paths).
* `fashion-mnist-pixels`: Fashion-MNIST's own pixels: a pixel brighter than `threshold` (0-255) is the
  item, labelled with the image's class + 1; every other pixel is background 0. So the 11 segmentation
  classes are 0 = background, k + 1 = Fashion-MNIST class k ("T-shirt/top" is 1, "Ankle boot" 10).

A mask must have the image's size (after the image's EXIF rotation): it then goes through the image's
resize and crop (`saev_store.patch_labels.mask_to_input`). Pixels equal to `ignore_value` carry no
label (`IGNORE`). Every problem (missing mask, wrong size, colour mask, class index out of range) is a
UserError naming the mask file.
"""

from __future__ import annotations

import abc
import dataclasses
import io
import os

import numpy as np
from PIL import Image

from saev_store.datasets.base import ImageSource, sha256_hex
from saev_store.errors import UserError
from saev_store.options import option
from saev_store.patch_labels import IGNORE, MAX_CLASS, RULES

PIXELS = "pixels"
"""`--masks pixels`: the Fashion-MNIST source."""
LABEL_MODES = ("1", "L", "P", "I;16", "I;16L", "I;16B", "I;16N", "I")
"""PIL modes a label-map PNG may have (one channel of integers)."""
_EXIF_ORIENTATION = 0x0112


@dataclasses.dataclass(frozen=True)
class MaskConfig:
    """Where a store's per-pixel label masks come from and how patches are labelled from them."""

    masks: str | None = None
    """Folder datasets: the directory of PNG label maps (same relative path as each image, extension .png).
    Fashion-MNIST: `pixels` (the item's own pixels: foreground = its class + 1, background 0)."""
    mask_column: str | None = None
    """hf-disk datasets: the column holding each image's label map."""
    rule: str = option("majority", flag="--patch-labels", choices=RULES)
    """How a patch's pixel labels become its label: `majority` (most common) or `prefer-fg` (most common
    non-background label; background only when the patch holds nothing else)."""
    background: int = option(0, flag="--mask-background")
    """The background class `prefer-fg` passes over."""
    ignore_value: int | None = option(None, flag="--mask-ignore")
    """Mask value meaning "no label" (e.g. 255 for Pascal VOC's borders); such pixels do not vote and
    patches made only of them are ignored by the heads."""
    threshold: int = option(10, flag="--mask-threshold")
    """Fashion-MNIST `pixels`: a pixel is the item when its value (0-255) is above this."""
    class_names_fpath: str | None = option(None, flag="--mask-classes")
    """Text file naming the mask classes, one per line (line k names class k); default: the source's
    own names (Fashion-MNIST) or "0".."max"."""

    def __post_init__(self):
        if self.masks is not None and self.mask_column is not None:
            raise UserError("give either --masks (folder datasets, or `pixels` for fashion-mnist) or --mask-column "
                            "(hf-disk datasets), not both.")
        if self.rule not in RULES:
            raise UserError(f"--patch-labels {self.rule!r} is unknown; choose one of {', '.join(RULES)}.")
        if not 0 <= self.background <= MAX_CLASS:
            raise UserError(f"--mask-background {self.background} must be a class index in 0..{MAX_CLASS}.")
        if self.ignore_value is not None and self.ignore_value < 0:
            raise UserError(f"--mask-ignore {self.ignore_value} must be a mask value >= 0.")
        if not 0 <= self.threshold <= 254:
            raise UserError(f"--mask-threshold {self.threshold} must be in 0..254 (pixel values are 0..255).")
        if self.class_names_fpath is not None and not os.path.isfile(self.class_names_fpath):
            raise UserError(f"--mask-classes {self.class_names_fpath} is not a file; give a text file with one class name per line.")

    @property
    def enabled(self) -> bool:
        """Whether any mask source was given."""
        return self.masks is not None or self.mask_column is not None

    def class_names(self) -> list[str] | None:
        """The names read from `class_names_fpath`, or None."""
        if self.class_names_fpath is None:
            return None
        with open(self.class_names_fpath, encoding="utf-8") as f:
            names = [line.rstrip("\n").rstrip("\r") for line in f]
        while names and not names[-1].strip():
            names.pop()
        if not names:
            raise UserError(f"--mask-classes {self.class_names_fpath} names no class; write one name per line.")
        return names


class MaskSource(abc.ABC):
    """Label masks of every image of one ImageSource, by the same index. Picklable (DataLoader workers)."""

    kind: str
    """folder, hf-column or fashion-mnist-pixels."""
    dataset_kind: str
    """The kind of image dataset this source reads masks beside."""
    option: str
    """The option that selects this source, for messages."""
    class_names: list[str] | None
    """Mask class k is class_names[k]; None when the source does not name them."""

    def __init__(self, src: ImageSource, ignore_value: int | None, class_names: list[str] | None):
        if src.kind != self.dataset_kind:
            others = ", ".join(f"{c.option} for {c.dataset_kind}" for c in MaskSource.__subclasses__() if c is not type(self))
            raise UserError(f"{self.option} reads masks of a {self.dataset_kind} dataset; this store's dataset is {src.kind!r} "
                            f"(use {others}).")
        self.src = src
        self.ignore_value = ignore_value
        self.class_names = class_names

    def __len__(self) -> int:
        return len(self.src)

    @abc.abstractmethod
    def load(self, i: int) -> np.ndarray:
        """Mask of image i: (height, width) int32 class indices at the image's own size, IGNORE where none."""

    @abc.abstractmethod
    def describe(self) -> dict:
        """JSON-able identity (kind, where, fingerprint); stored with the patch labels."""

    def _finish(self, m: np.ndarray, what: str) -> np.ndarray:
        """Ignore value -> IGNORE, then check the indices against the int16 range and the class names."""
        m = m.astype(np.int32, copy=False)
        if self.ignore_value is not None:
            m = np.where(m == self.ignore_value, IGNORE, m)
        labelled = m[m != IGNORE]
        if labelled.size:
            lo, hi = int(labelled.min()), int(labelled.max())
            limit = MAX_CLASS if self.class_names is None else len(self.class_names) - 1
            if lo < 0 or hi > limit:
                bad = lo if lo < 0 else hi
                names = "" if self.class_names is None else f" (--mask-classes names {len(self.class_names)} classes)"
                raise UserError(f"mask {what} holds class {bad}, outside 0..{limit}{names}; fix the mask, name more classes, "
                                "or set --mask-ignore to that value.")
        return m


def read_label_map(fp, what: str) -> np.ndarray:
    """A single-channel integer PNG (path, bytes or file object) -> (h, w) int32; UserError otherwise."""
    try:
        with Image.open(io.BytesIO(fp) if isinstance(fp, (bytes, bytearray)) else fp) as img:
            img.load()
            mode = img.mode
            if mode not in LABEL_MODES:
                raise UserError(f"mask {what} is a {mode} image; a label map is a single-channel PNG of class indices "
                                f"(mode {', '.join(LABEL_MODES[1:4])} or I). Convert colour-coded masks to indices first.")
            arr = np.asarray(img)
    except UserError:
        raise
    except Exception as err:  # PIL's grab-bag of decode errors
        raise UserError(f"cannot read mask {what}: {type(err).__name__}: {err}. Repair or replace the file.") from err
    return arr.astype(np.int32)


def _display_size(fp) -> tuple[int, int]:
    """(width, height) of an image after its EXIF rotation, reading only the header."""
    with Image.open(io.BytesIO(fp) if isinstance(fp, (bytes, bytearray)) else fp) as img:
        w, h = img.size
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _check_size(m: np.ndarray, image_wh: tuple[int, int], what: str, image_what: str) -> None:
    if (m.shape[1], m.shape[0]) != tuple(image_wh):
        raise UserError(f"mask {what} is {m.shape[1]}x{m.shape[0]} but its image {image_what} is {image_wh[0]}x{image_wh[1]}; "
                        "a mask must have its image's size (it is resized and cropped with it).")


class FolderMasks(MaskSource):
    """PNG label maps in a folder mirroring an image folder's relative paths."""

    kind, dataset_kind, option = "folder", "folder", "--masks DIR"

    def __init__(self, src: ImageSource, masks_dpath: str, ignore_value: int | None = None, class_names: list[str] | None = None):
        super().__init__(src, ignore_value, class_names)
        self.root = os.path.abspath(masks_dpath)
        if not os.path.isdir(self.root):
            raise UserError(f"mask folder {self.root} does not exist; pass --masks with the folder of PNG label maps.")
        self._ids = src.image_ids()
        self._rel = [os.path.splitext(rel)[0] + ".png" for rel in self._ids]
        missing = [r for r in self._rel if not os.path.isfile(self._fpath(r))]
        if missing:
            raise UserError(f"{len(missing)} of {len(self._rel)} images have no mask in {self.root} (first: {missing[0]}); "
                            "each image DATA/<path>/<name>.<ext> needs MASKS/<path>/<name>.png.")
        self._fingerprint: str | None = None

    def _fpath(self, rel: str) -> str:
        return os.path.join(self.root, *rel.split("/"))

    def load(self, i: int) -> np.ndarray:
        fpath = self._fpath(self._rel[i])
        m = read_label_map(fpath, fpath)
        image_fpath = os.path.join(self.src.root, *self._ids[i].split("/"))
        _check_size(m, _display_size(image_fpath), fpath, image_fpath)
        return self._finish(m, fpath)

    def describe(self) -> dict:
        if self._fingerprint is None:
            self._fingerprint = sha256_hex(p for rel in self._rel for p in (rel, str(os.path.getsize(self._fpath(rel)))))
        return {"kind": self.kind, "root": self.root, "ignore_value": self.ignore_value, "fingerprint": self._fingerprint}


class HfColumnMasks(MaskSource):
    """Label maps in a column of the hf-disk dataset the images come from."""

    kind, dataset_kind, option = "hf-column", "hf-disk", "--mask-column COL"

    def __init__(self, src: ImageSource, column: str, ignore_value: int | None = None, class_names: list[str] | None = None):
        super().__init__(src, ignore_value, class_names)
        self.column = column
        self.image_column = src.options()["image_column"]
        ds = self._open()
        if column not in ds.column_names:
            raise UserError(f"dataset {src.root} has no mask column {column!r}; its columns are {', '.join(ds.column_names)}.")
        self._ds = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_ds"] = None  # reopened (memory-mapped) in each worker
        return state

    def _open(self):
        import datasets

        obj = datasets.load_from_disk(self.src.root)
        return obj[self.src.split] if isinstance(obj, datasets.DatasetDict) else obj

    def _rows(self):
        if self._ds is None:
            import datasets

            ds = self._open().select_columns([self.column, self.image_column])
            for col in (self.column, self.image_column):
                if isinstance(ds.features[col], datasets.Image):
                    ds = ds.cast_column(col, datasets.Image(decode=False))
            self._ds = ds
        return self._ds

    def _raw(self, value, what: str):
        """A column value -> bytes or a path PIL can open."""
        if isinstance(value, dict):  # Image(decode=False): {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        if value is None:
            raise UserError(f"{what} is empty; every row needs a mask.")
        if isinstance(value, str):
            return value if os.path.isabs(value) else os.path.join(self.src.root, value)
        if isinstance(value, Image.Image):
            buf = io.BytesIO()
            value.save(buf, format="PNG")
            return buf.getvalue()
        return bytes(value)

    def load(self, i: int) -> np.ndarray:
        row = self._rows()[int(i)]
        what = f"column {self.column!r} row {i} of {self.src.root}"
        m = read_label_map(self._raw(row[self.column], what), what)
        image = self._raw(row[self.image_column], f"column {self.image_column!r} row {i}")
        _check_size(m, _display_size(image), what, f"row {i}")
        return self._finish(m, what)

    def describe(self) -> dict:
        return {"kind": self.kind, "column": self.column, "ignore_value": self.ignore_value,
                "fingerprint": self.src.fingerprint()}


class FashionMnistPixels(MaskSource):
    """Fashion-MNIST's items as their own masks: pixel > threshold -> class + 1, else background 0."""

    kind, dataset_kind, option = "fashion-mnist-pixels", "fashion-mnist", "--masks pixels"

    def __init__(self, src: ImageSource, threshold: int = 10):
        super().__init__(src, None, ["background", *src.class_names])
        self.threshold = int(threshold)
        self._labels = src.labels()

    def load(self, i: int) -> np.ndarray:
        px = np.asarray(self.src.load(int(i)), dtype=np.uint8)[..., 0]  # gray replicated into RGB
        return np.where(px > self.threshold, int(self._labels[i]) + 1, 0).astype(np.int32)

    def describe(self) -> dict:
        return {"kind": self.kind, "threshold": self.threshold, "ignore_value": None, "fingerprint": self.src.fingerprint()}


def create_mask_source(cfg: MaskConfig, src: ImageSource) -> MaskSource:
    """The mask source `cfg` names for the images of `src`."""
    if not cfg.enabled:
        raise UserError("no masks given: pass --masks DIR (folder datasets), --masks pixels (fashion-mnist) or --mask-column (hf-disk).")
    names = cfg.class_names()
    if cfg.mask_column is not None:
        return HfColumnMasks(src, cfg.mask_column, cfg.ignore_value, names)
    if cfg.masks == PIXELS:
        if names is not None or cfg.ignore_value is not None:
            raise UserError("--masks pixels names its own classes (background + Fashion-MNIST's); drop --mask-classes and --mask-ignore.")
        return FashionMnistPixels(src, cfg.threshold)
    return FolderMasks(src, cfg.masks, cfg.ignore_value, names)


def mask_source_from_description(desc: dict, src: ImageSource, *, masks_root: str | None = None,
                                 class_names: list[str] | None = None) -> MaskSource:
    """Reopen the mask source a store recorded (`describe()`), e.g. for pixel-level evaluation.
    `masks_root` points a folder source at where its masks are now."""
    kind = desc.get("kind")
    if kind == FolderMasks.kind:
        return FolderMasks(src, masks_root or desc["root"], desc.get("ignore_value"), class_names)
    if kind == HfColumnMasks.kind:
        return HfColumnMasks(src, desc["column"], desc.get("ignore_value"), class_names)
    if kind == FashionMnistPixels.kind:
        return FashionMnistPixels(src, desc["threshold"])
    raise UserError(f"the store's masks came from {kind!r}, which this saev-store does not know.")
