"""Decode one image file safely and convert any PIL mode to 8-bit RGB.

Two jobs live here because every source shares them: `decode_image` turns bytes on disk into an RGB
`PIL.Image` without ever letting a bad file crash the recorder (truncated, corrupt, decompression
bomb -> `BadImageError`), at full size unless the caller opts into reduced JPEG decoding
(`JpegDraft`); `to_rgb` defines once, for every PIL mode, what RGB pixels an image means.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from saev_store.datasets.base import BadImageError

BACKGROUND_RGB = (255, 255, 255)
"""Transparent pixels are composited over white (the way image viewers and browsers show them)."""

_JPEG_MAGIC = b"\xff\xd8\xff"
_MAX_DRAFT_SCALE = 8  # libjpeg's DCT scaling decodes at 1/1, 1/2, 1/4 or 1/8 size, nothing else.

ImageInput = str | os.PathLike | bytes | io.IOBase


@dataclasses.dataclass(frozen=True)
class JpegDraft:
    """Opt-in reduced JPEG decoding (libjpeg's DCT scaling, PIL's `Image.draft`).

    A JPEG decoded at 1/2, 1/4 or 1/8 scale never holds its full-size pixels in memory and decodes
    several times faster, but its pixels are not those of a full-size decode resized by the model's
    library (tens of grey levels apart on ordinary photos). Without a JpegDraft every image decodes
    at full size, as `Image.open(p)` does.
    """

    min_side: int
    """Both sides of the decoded image stay >= this: the largest side the consumer's resize produces."""
    above_px: int = 0
    """Only JPEGs with more than this many pixels are reduced (the recorder's --jpeg-draft-mpx)."""

    def __post_init__(self):
        if self.min_side < 1 or self.above_px < 0:
            raise ValueError(f"JpegDraft(min_side={self.min_side}, above_px={self.above_px}): min_side must be >= 1, above_px >= 0")


def decode_image(src: ImageInput, image_id: str, draft: JpegDraft | None = None) -> Image.Image:
    """Decode `src` (a path, the file's bytes, or a binary file object) to an RGB image.

    * Full size by default, like `Image.open(src)`, including PIL's decompression-bomb rule: a
      warning over `PIL.Image.MAX_IMAGE_PIXELS` (89 Mpx by default), `BadImageError` over twice that.
    * `draft` (opt-in): a JPEG over `draft.above_px` pixels is decoded at the smallest 1/2, 1/4 or 1/8
      scale that keeps both its sides >= `draft.min_side`; a JPEG over MAX_IMAGE_PIXELS is decoded at
      a scale that fits under it (PIL's bomb check is skipped for it: the full-size image is never
      in memory). Any image still over 2 * MAX_IMAGE_PIXELS raises `BadImageError`. Other formats
      always decode at full size.
    * Truncated or corrupt files raise `BadImageError` (PIL's LOAD_TRUNCATED_IMAGES is left alone).

    The result has EXIF orientation applied and is converted with `to_rgb`.
    """
    if isinstance(src, (bytes, bytearray, memoryview)):
        src = io.BytesIO(bytes(src))
    with contextlib.ExitStack() as stack:
        try:
            fp = stack.enter_context(open(src, "rb")) if isinstance(src, (str, os.PathLike)) else src
            img = stack.enter_context(_open(fp, draft))
            _draft(img, draft)
            img.load()
        except Exception as err:  # PIL raises a grab-bag (OSError, SyntaxError, ValueError, struct.error...)
            raise BadImageError(image_id, _reason(err)) from err
        try:
            return to_rgb(img)
        except ValueError as err:
            raise BadImageError(image_id, str(err)) from err


def _open(fp, draft: JpegDraft | None) -> Image.Image:
    """Open a binary file object lazily (header only). With a draft, JPEGs bypass PIL's bomb check."""
    head = fp.read(len(_JPEG_MAGIC))
    fp.seek(0)
    if draft is not None and head == _JPEG_MAGIC:
        # PIL's bomb check lives in Image.open and would refuse (or warn about) a huge JPEG that draft()
        # can decode at reduced size. The plugin class parses only the header; _draft then checks the
        # size that will actually be decoded. (This also reads an MPO's first picture, as Image.open does.)
        return JpegImagePlugin.JpegImageFile(fp)
    try:
        return Image.open(fp)
    except Image.DecompressionBombError as err:
        fix = ("record with --jpeg-draft-mpx to decode large JPEGs at reduced size, or downscale the file"
               if head == _JPEG_MAGIC else "Only JPEGs can be decoded at reduced size; downscale the file")
        raise ValueError(f"{err} {fix}") from err


def _draft(img: Image.Image, draft: JpegDraft | None) -> None:
    """Ask a JPEG to decode at reduced size when `draft` allows it; refuse what stays over PIL's limit."""
    if draft is None:
        return  # Image.open already applied PIL's own bomb rule
    max_pixels = Image.MAX_IMAGE_PIXELS
    w, h = img.size
    if img.format == "JPEG":
        min_side = draft.min_side if w * h > draft.above_px else None
        scale = draft_scale(w, h, min_side, max_pixels)
        if scale > 1:
            img.draft(img.mode, (max(1, w // scale), max(1, h // scale)))
    w, h = img.size
    if max_pixels is not None and w * h > 2 * max_pixels:
        raise ValueError(
            f"{w}x{h} = {w * h} pixels even at 1/{_MAX_DRAFT_SCALE} scale is over PIL's decompression-bomb "
            f"limit of {2 * max_pixels} pixels; downscale the file"
        )


def draft_scale(w: int, h: int, min_side: int | None, max_pixels: int | None) -> int:
    """The JPEG decode scale divisor (1, 2, 4 or 8) for a w x h image.

    Halve while the image is over `max_pixels`, or while halving keeps both sides >= `min_side`.
    """
    scale = 1
    while scale < _MAX_DRAFT_SCALE:
        over_budget = max_pixels is not None and -(-w // scale) * -(-h // scale) > max_pixels
        halving_fits = min_side is not None and min(w, h) // (2 * scale) >= min_side
        if not (over_budget or halving_fits):
            break
        scale *= 2
    return scale


def _reason(err: Exception) -> str:
    if isinstance(err, UnidentifiedImageError):  # PIL's message only repeats the file object's repr
        return "not an image PIL can read (unknown format, or a damaged or empty header)"
    msg = str(err).strip()
    return f"{type(err).__name__}: {msg}" if msg else type(err).__name__


def to_rgb(img: Image.Image) -> Image.Image:
    """A new 8-bit RGB image with the same content as `img`, in any PIL mode.

    * EXIF orientation is applied first (`ImageOps.exif_transpose`).
    * Transparency (RGBA, LA, PA, P or L or RGB with a `transparency` entry, premultiplied RGBa/La) is
      composited over white: `round((c * a + 255 * (255 - a)) / 255)`.
    * `1` -> 0 or 255; `L` -> gray replicated; `P` -> palette lookup.
    * `CMYK` -> `round((255 - c) * (255 - k) / 255)` per channel.
    * 16-bit grayscale (`I;16`, `I;16L`, `I;16B`, `I;16N`) -> `round(v / 257)`, mapping 0..65535 onto
      0..255 (no clipping). `I` (32-bit int) is treated the same when all values lie in 0..65535,
      otherwise stretched from its min..max to 0..255.
    * `F` (float) -> `round(v * 255)` when all values lie in [0, 1], otherwise stretched from its
      min..max to 0..255; NaN becomes 0.
    * Other modes PIL can convert (YCbCr, HSV, LAB, RGBX) use `Image.convert("RGB")`.

    Raises ValueError for a mode that cannot be converted.
    """
    img = ImageOps.exif_transpose(img)  # always a new image, so closing the source file is safe
    mode = img.mode
    if mode in ("RGBA", "LA", "PA") or (mode in ("P", "L", "RGB", "1") and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint8)
        return _over_background(rgba[..., :3], rgba[..., 3], premultiplied=False)
    if mode in ("RGBa", "La"):
        arr = np.asarray(img, dtype=np.uint8)
        rgb = arr[..., :3] if mode == "RGBa" else np.repeat(arr[..., :1], 3, axis=-1)
        return _over_background(rgb, arr[..., -1], premultiplied=True)
    if mode == "RGB":
        return img
    if mode == "1":
        gray = np.where(np.asarray(img, dtype=bool), 255, 0).astype(np.uint8)
        return _gray_to_rgb(gray)
    if mode in ("L", "P"):
        return img.convert("RGB")
    if mode == "CMYK":
        cmyk = np.asarray(img, dtype=np.int32)
        inv_k = 255 - cmyk[..., 3:4]
        rgb = ((255 - cmyk[..., :3]) * inv_k + 127) // 255  # integer round-half-up of x / 255
        return Image.fromarray(rgb.astype(np.uint8), "RGB")
    if mode.startswith("I;16"):
        v = np.asarray(img).astype(np.int64)
        return _gray_to_rgb(((v + 128) // 257).astype(np.uint8))  # round(v / 257)
    if mode == "I":
        v = np.asarray(img).astype(np.int64)
        if v.size == 0 or (v.min() >= 0 and v.max() <= 65535):
            return _gray_to_rgb(((v + 128) // 257).astype(np.uint8))
        return _gray_to_rgb(_stretch(v.astype(np.float64)))
    if mode == "F":
        v = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if v.size == 0 or (v.min() >= 0.0 and v.max() <= 1.0):
            return _gray_to_rgb(np.floor(v * 255.0 + 0.5).astype(np.uint8))
        return _gray_to_rgb(_stretch(v))
    try:
        return img.convert("RGB")
    except ValueError as err:
        raise ValueError(f"cannot convert PIL mode {mode!r} to RGB ({err})") from err


def _over_background(rgb: np.ndarray, alpha: np.ndarray, *, premultiplied: bool) -> Image.Image:
    c = rgb.astype(np.int32)
    a = alpha.astype(np.int32)[..., None]
    bg = np.asarray(BACKGROUND_RGB, dtype=np.int32)
    fg = c * 255 if premultiplied else c * a  # a premultiplied channel already holds c * a / 255
    out = (fg + bg * (255 - a) + 127) // 255
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")


def _gray_to_rgb(gray_u8: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(gray_u8[..., None], 3, axis=-1), "RGB")


def _stretch(v: np.ndarray) -> np.ndarray:
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return np.zeros(v.shape, dtype=np.uint8)
    return np.floor((v - lo) * (255.0 / (hi - lo)) + 0.5).astype(np.uint8)
