"""The on-disk format, version 1: names, field tables and sizing rules.

`FORMAT.md` beside this file is the human spec; `tests/test_format_doc.py` parses its field tables and
checks them against the tables here, so the two cannot drift. Everything that knows a path or an
attribute name of the store imports it from this module.
"""

from __future__ import annotations

import math

import numpy as np

FORMAT_VERSION = 1
"""Bumped when a reader of the previous version would misread a new store."""

ATTRS_KEY = "saev_store"
"""All of our metadata lives under this one key of the root group's attributes."""

# Paths inside the group.
ACTS = "acts"
LABELS = "labels"
IMAGE_IDS = "image_ids"
VALID = "valid"
DONE = "done"
STATS = "stats"
PATCH_LABELS = "patch_labels"
"""Optional group: one subgroup of per-patch labels per patch grid (`patch_labels/7x7`)."""
PATCH_LABELS_ARRAY = "labels"
PATCH_LABELS_DONE = "done"

STORE_DTYPES = ("float32", "float16", "bfloat16")
"""Logical activation dtypes. bfloat16 is kept as its raw 16-bit pattern in a uint16 array."""

ON_DISK_DTYPE = {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}

MIN_CHUNK_BYTES = 8 << 20
MAX_CHUNK_BYTES = 64 << 20
DEFAULT_CHUNK_BYTES = 32 << 20

# Field tables: name -> one-line meaning. FORMAT.md repeats them (a test compares the two).
ROOT_FIELDS: dict[str, str] = {
    "format_version": "int; the store format version (this document: 1). Readers refuse other versions.",
    "software_version": "str; the saev-store version that created the store.",
    "created": "str; ISO-8601 UTC time the store was created.",
    "n_images": "int; images in the store (the first axis of every per-image array).",
    "images_per_chunk": "int; images per chunk, the same for every hook; the unit of writing and resuming.",
    "n_chunks": "int; ceil(n_images / images_per_chunk).",
    "store_dtype": "str; float32, float16 or bfloat16 (bfloat16 stored as raw uint16 bits).",
    "hooks": "object; hook name -> hook entry (table below).",
    "tokens": "str; which tokens were kept: all, patches or cls.",
    "keep_registers": "bool; whether ViT register tokens were kept.",
    "seed": "int or null; seed of the run that recorded the store.",
    "model": "object or null; the model's description: backend, name, spec, weights path, weights_sha256.",
    "dataset": "object or null; the dataset's description: kind, root (the dataset directory as given, --data), split, "
               "n_images, class_names, options, fingerprint; reopening kind at root with split gives the same images.",
    "preprocessing": "object or null; how an image file became the model input (table below).",
    "class_names": "list of str or null; label index -> class name.",
    "complete": "bool; true once every chunk is done and the statistics are written.",
}

HOOK_FIELDS: dict[str, str] = {
    "n_tokens": "int; tokens stored per image (axis 1 of the hook's array).",
    "d": "int; width of one token (axis 2); channels C for a CNN hook.",
    "layout": "object; token layout: n_tokens, cls, registers, grid, grid_start.",
    "module": "str or null; the module path the hook captured, as the model names it.",
}

LAYOUT_FIELDS: dict[str, str] = {
    "n_tokens": "int; equals the hook's n_tokens.",
    "cls": "int or null; index of the CLS token.",
    "registers": "list of int; indices of kept register tokens.",
    "grid": "[h, w] or null; patch grid, row-major.",
    "grid_start": "int; index of the first patch token.",
}

PREPROCESSING_FIELDS: dict[str, str] = {
    "image_size": "[height, width]; the model input in pixels.",
    "resize": "int or null; crop center: the shorter side is resized to this; crop none: null.",
    "crop": "str; center (resize the shorter side, centre crop) or none (resize the whole image to image_size).",
    "interpolation": "str; PIL resampling filter: nearest, bilinear, bicubic, lanczos, box or hamming.",
    "mean": "[r, g, b]; subtracted after scaling pixels to [0, 1].",
    "std": "[r, g, b]; divides after the mean is subtracted.",
    "crop_offset": "str; round: the crop starts at round((resized - crop) / 2), half to even (torchvision, timm, open_clip); "
                   "floor: at (resized - crop) // 2 (HF image processors).",
    "jpeg_draft_mpx": "float or null; null: every image decoded at full size; else JPEGs over this many megapixels decoded "
                      "at 1/2, 1/4 or 1/8 scale, both sides staying >= resize.",
}

ARRAYS: dict[str, str] = {
    "acts/<hook>": "(n_images, n_tokens, d) store dtype; chunks (images_per_chunk, n_tokens, d); bytes + crc32c.",
    "labels": "(n_images,) int32; -1 when unlabeled; chunks (images_per_chunk,).",
    "image_ids": "(n_images,) string; file path or dataset key; chunks (images_per_chunk,).",
    "valid": "(n_images,) bool; false for images that could not be read (--skip-bad) or are not written yet.",
    "done": "(n_chunks,) bool; chunk i is complete in every array above; chunks (1,).",
    "stats/<hook>/block_sums": "(n_chunks, n_sel, d + 3) float64; per chunk and selection: row sum, sum of squared norms, sum of norms, row count.",
    "stats/<hook>/<sel>/mean": "(d,) float64; mean row, written when recording completes.",
    "patch_labels/<grid>/labels": "(n_images, h*w) int16, optional; class of each patch token in grid order, -1 = ignore; chunks (images_per_chunk, h*w); bytes + crc32c.",
    "patch_labels/<grid>/done": "(n_chunks,) bool, optional; chunk i of the labels is written; chunks (1,).",
}

OPTIONAL_ARRAYS = ("patch_labels/<grid>/labels", "patch_labels/<grid>/done")
"""Arrays a store may lack: stores recorded without masks (and every store written before patch
labels existed) have no `patch_labels` group and read exactly as before."""

PATCH_LABEL_FIELDS: dict[str, str] = {
    "grid": "[h, w]; the patch grid these labels are for; every hook with this grid uses them.",
    "image_size": "[height, width]; the model input that the grid cuts into equal cells.",
    "rule": "str; majority or prefer-fg: how the pixel labels of a patch become its label.",
    "background": "int; the class prefer-fg passes over.",
    "ignore_index": "int; the stored label of a patch that carries no class (-1).",
    "class_names": "list of str or null; class k is class_names[k]; set by the time the labels are complete.",
    "source": "object; where the masks came from: kind (folder, hf-column, fashion-mnist-pixels), root, column or threshold, ignore_value, fingerprint.",
    "software_version": "str; the saev-store version that wrote the labels.",
    "created": "str; ISO-8601 UTC time the labels were started.",
    "complete": "bool; true once every chunk is done.",
}

STATS_FIELDS: dict[str, str] = {
    "n_rows": "int; rows the statistics cover.",
    "rms_norm": "float; sqrt(mean ||x - mean||^2); normalization scales it to sqrt(d).",
    "mean_norm": "float; mean ||x|| of the raw rows.",
}

BLOCK_SUMS = "block_sums"
"""Per hook, one (n_chunks, n_sel, d + 3) float64 array: for each chunk and token selection (in the
order of the array's `selections` attribute) the columns are [sum of rows (d), sum of squared row
norms, sum of row norms, row count]. One small write per chunk instead of one per statistic."""


def acts_path(hook: str) -> str:
    return f"{ACTS}/{hook}"


def patch_labels_path(key: str, array: str | None = None) -> str:
    """`patch_labels/<key>` (the group) or `patch_labels/<key>/<array>`; key is "<h>x<w>"."""
    return f"{PATCH_LABELS}/{key}" if array is None else f"{PATCH_LABELS}/{key}/{array}"


def grid_key(grid) -> str:
    """The name of a patch grid's label set: "14x14"."""
    return f"{int(grid[0])}x{int(grid[1])}"


def stats_path(hook: str, tokens: str | None = None) -> str:
    return f"{STATS}/{hook}" if tokens is None else f"{STATS}/{hook}/{tokens}"


def check_hook_name(name: str) -> str:
    """Hook names become folder names: reject what a path cannot hold."""
    if not name or "/" in name or name.startswith(".") or name.strip() != name:
        raise ValueError(f"hook name {name!r} cannot be a store folder: use a module path like 'blocks.10'.")
    return name


def images_per_chunk_for(bytes_per_image: int, n_images: int, target_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Whole images per chunk so the largest hook's chunk is near `target_bytes` (8-64 MiB)."""
    if not MIN_CHUNK_BYTES <= target_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk target {target_bytes} bytes is outside 8-64 MiB.")
    n = max(1, target_bytes // max(1, bytes_per_image))
    return int(min(n, max(1, n_images)))


def n_chunks_for(n_images: int, images_per_chunk: int) -> int:
    return math.ceil(n_images / images_per_chunk)


def bf16_bits(x_f32: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit pattern (uint16), rounding to nearest even, NaN kept NaN."""
    x = np.ascontiguousarray(x_f32, dtype=np.float32).view(np.uint32)
    rounding = ((x >> 16) & 1) + np.uint32(0x7FFF)
    out = ((x + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(x_f32)
    if nan.any():
        out[nan] = np.uint16(0x7FC0)
    return out


def bf16_to_f32(bits_u16: np.ndarray) -> np.ndarray:
    """bfloat16 bit pattern (uint16) -> float32, exactly."""
    return (np.asarray(bits_u16, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def encode_acts(x: np.ndarray, store_dtype: str) -> np.ndarray:
    """float32 activations -> the array stored on disk."""
    if store_dtype == "float32":
        return np.asarray(x, dtype=np.float32)
    if store_dtype == "float16":
        return np.asarray(x, dtype=np.float16)
    if store_dtype == "bfloat16":
        return bf16_bits(x)
    raise ValueError(f"unknown store dtype {store_dtype!r}; choose one of {STORE_DTYPES}.")


def decode_acts(raw: np.ndarray, store_dtype: str) -> np.ndarray:
    """The stored array -> float32 activations."""
    if store_dtype == "bfloat16":
        return bf16_to_f32(raw)
    return np.asarray(raw, dtype=np.float32)
