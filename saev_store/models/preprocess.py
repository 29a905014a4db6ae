"""Image preprocessing: PIL RGB image -> normalized float tensor (3, H, W).

One small dataclass says everything a store needs to reproduce a model's input: how the file is
decoded, the crop, the resize, the interpolation and the normalization. Each backend fills it from the
model's own configuration (timm's data config, open_clip's preprocess config, an HF image-processor
config); a user may override fields with `with_overrides`.

The transform is plain PIL + numpy and mirrors its library step for step: torchvision's `Resize(int)`
+ `CenterCrop` + `ToTensor` + `Normalize` (timm's, open_clip's and torchvision's evaluation transforms)
or an HF image processor's resize + center_crop + rescale + normalize. Both resize the shorter side
with PIL's antialiased filters (HF's default torchvision backend uses torch's uint8 antialiased
kernels, which agree with PIL within one grey level) and truncate the longer side; they differ only in
where the centre crop starts (`crop_offset`). The geometry lives in one function, `input_geometry`, so
anything that must line up with the model's input pixels (a label mask, a heatmap) uses the same one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np
import torch
from PIL import Image

from saev_store.errors import UserError

if TYPE_CHECKING:
    from saev_store.datasets.images import JpegDraft

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)

# PIL's resampling filters by the names timm, open_clip and torchvision use.
INTERPOLATIONS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
# HF image processors store PIL's integer codes.
_PIL_CODES = {int(v): k for k, v in INTERPOLATIONS.items()}

Crop = Literal["center", "none"]
CropOffset = Literal["round", "floor"]

# Where a centre crop of `crop` pixels starts in `size` pixels, by library.
_CROP_OFFSETS = {
    # torchvision's CenterCrop: int(round((size - crop) / 2.0)), Python's round (half to even).
    "round": lambda size, crop: int(round((size - crop) / 2.0)),
    # HF image processors (both backends): (size - crop) // 2.
    "floor": lambda size, crop: (size - crop) // 2,
}


class Geometry(NamedTuple):
    """Where an input image's pixels go: the whole image is resized to `resized_wh`, then `box` is cut out."""

    resized_wh: tuple[int, int]
    """(width, height) the whole input image is resized to (PIL's order); the input size when unchanged."""
    box: tuple[int, int, int, int]
    """(left, top, right, bottom) of the model input inside the resized image (PIL's crop box)."""


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """How an image becomes a model input. Stored in the store's metadata."""

    image_size: tuple[int, int] = (224, 224)
    """Model input (height, width) in pixels."""
    resize: int | None = 256
    """crop='center': the shorter side is resized to this many pixels (aspect kept), then the center
    `image_size` is cut out; must be >= both sides of `image_size`. crop='none': must be None."""
    crop: Crop = "center"
    """'center' (resize shorter side, center crop) or 'none' (resize the whole image to `image_size`,
    aspect not kept)."""
    interpolation: str = "bicubic"
    """Resampling filter: one of nearest, bilinear, bicubic, lanczos, box, hamming."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel RGB mean, in [0, 1] pixel units, subtracted after scaling pixels to [0, 1]."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel RGB standard deviation, in [0, 1] pixel units."""
    crop_offset: CropOffset = "round"
    """Where the centre crop starts: 'round' = round((resized - crop) / 2), half to even (torchvision's
    CenterCrop: timm, open_clip, torchvision, EfficientNet-Lite); 'floor' = (resized - crop) // 2 (HF image
    processors). They differ by one pixel for a quarter of image sizes."""
    jpeg_draft_mpx: float | None = None
    """None: every image is decoded at full size, as the model's library would. A number opts into
    reduced decoding: JPEGs over this many megapixels decode at 1/2, 1/4 or 1/8 scale with both sides
    staying >= the resize (faster and smaller for huge photos, but not the library's pixels)."""

    def __post_init__(self):
        size = tuple(int(s) for s in self.image_size) if not isinstance(self.image_size, int) else (int(self.image_size),) * 2
        object.__setattr__(self, "image_size", size)
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if self.resize is not None:
            object.__setattr__(self, "resize", int(self.resize))
        if len(size) != 2 or min(size) < 1:
            raise UserError(f"preprocess image_size={self.image_size} must be two positive ints (height, width).")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise UserError(f"preprocess mean={self.mean} and std={self.std} need 3 values each (R, G, B).")
        if min(self.std) <= 0:
            raise UserError(f"preprocess std={self.std} must be positive.")
        if self.interpolation not in INTERPOLATIONS:
            raise UserError(f"preprocess interpolation={self.interpolation!r} is unknown; use one of {sorted(INTERPOLATIONS)}.")
        if self.crop_offset not in _CROP_OFFSETS:
            raise UserError(f"preprocess crop_offset={self.crop_offset!r} is unknown; use 'round' or 'floor'.")
        if self.jpeg_draft_mpx is not None:
            object.__setattr__(self, "jpeg_draft_mpx", float(self.jpeg_draft_mpx))
            if not self.jpeg_draft_mpx >= 0:  # also refuses NaN
                raise UserError(f"--jpeg-draft-mpx {self.jpeg_draft_mpx} must be >= 0 megapixels (or left out: full-size decoding).")
        if self.crop == "center":
            if self.resize is None or self.resize < max(size):
                raise UserError(
                    f"preprocess crop='center' needs resize >= max(image_size)={max(size)}, got resize={self.resize}; "
                    "raise resize or use crop='none'."
                )
        elif self.crop == "none":
            if self.resize is not None:
                raise UserError("preprocess crop='none' resizes straight to image_size; set resize=None.")
        else:
            raise UserError(f"preprocess crop={self.crop!r} is unknown; use 'center' or 'none'.")

    @property
    def crop_pct(self) -> float:
        """Fraction of the resized shorter side kept by the crop (timm's crop_pct); 1.0 for crop='none'."""
        return 1.0 if self.resize is None else max(self.image_size) / self.resize

    def with_overrides(
        self,
        *,
        image_size: int | tuple[int, int] | None = None,
        resize: int | None = None,
        crop: Crop | None = None,
        interpolation: str | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
    ) -> "PreprocessConfig":
        """A copy with some fields replaced. A new image_size without a new resize keeps the crop ratio."""
        changes: dict = {}
        if image_size is not None:
            size = (int(image_size),) * 2 if isinstance(image_size, int) else tuple(int(s) for s in image_size)
            changes["image_size"] = size
            if resize is None and self.resize is not None and (crop or self.crop) == "center":
                # Integer arithmetic keeps e.g. 224/256 -> 448/512 exact.
                changes["resize"] = max(size) * self.resize // max(self.image_size)
        if crop is not None:
            changes["crop"] = crop
            if crop == "none" and resize is None:
                changes["resize"] = None
            if crop == "center" and resize is None and "resize" not in changes and self.resize is None:
                changes["resize"] = max(changes.get("image_size", self.image_size))
        if resize is not None:
            changes["resize"] = resize
        if interpolation is not None:
            changes["interpolation"] = interpolation
        if mean is not None:
            changes["mean"] = tuple(mean)
        if std is not None:
            changes["std"] = tuple(std)
        return dataclasses.replace(self, **changes)

    def jpeg_draft(self) -> "JpegDraft | None":
        """The reduced JPEG decoding this preprocessing opts into, or None (full size). Its min_side is
        the largest side the resize produces, so a drafted image is never upsampled."""
        if self.jpeg_draft_mpx is None:
            return None
        from saev_store.datasets.images import JpegDraft

        return JpegDraft(min_side=self.resize or max(self.image_size), above_px=int(self.jpeg_draft_mpx * 1e6))

    def transform(self, img: Image.Image) -> torch.Tensor:
        """PIL image (any mode; converted to RGB) -> float32 tensor (3, H, W), normalized. Deterministic."""
        return self.normalize(self.to_uint8(img))

    def to_uint8(self, img: Image.Image) -> torch.Tensor:
        """The geometric half of `transform`: resize and crop -> uint8 tensor (3, H, W).

        The recorder's workers return these and `normalize` runs on the model's device: a quarter of
        the bytes through shared memory, pinned memory and the host-to-device copy."""
        img = self.resize_crop(img.convert("RGB"))
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()

    def resize_crop(self, img: Image.Image, interpolation: str | None = None) -> Image.Image:
        """`img` (any mode, kept) through `input_geometry`, resampled with `interpolation` (default: this
        config's). A label mask given interpolation='nearest' lands on exactly the model's input pixels."""
        g = input_geometry(self, *img.size)
        if g.resized_wh != img.size:
            img = img.resize(g.resized_wh, INTERPOLATIONS[interpolation or self.interpolation])
        if g.box != (0, 0, *g.resized_wh):
            img = img.crop(g.box)
        return img

    def normalize(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, H, W) on any device -> float32, scaled to [0, 1] and normalized by mean/std.
        The same IEEE operations in the same order on every device, so CPU and GPU agree bitwise."""
        shape = (3, 1, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x_uint8.device).view(shape)
        std = torch.tensor(self.std, dtype=torch.float32, device=x_uint8.device).view(shape)
        return x_uint8.to(torch.float32).div(255).sub_(mean).div_(std).contiguous()

    __call__ = transform

    def to_dict(self) -> dict:
        return {
            "image_size": list(self.image_size),
            "resize": self.resize,
            "crop": self.crop,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_offset": self.crop_offset,
            "jpeg_draft_mpx": self.jpeg_draft_mpx,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        """Inverse of `to_dict`. A store written before crop_offset and jpeg_draft_mpx existed was
        recorded with the torchvision crop rule and with every JPEG drafted down to the resize: its
        missing keys read as 'round' and 0 megapixels, which reproduce its images exactly."""
        return cls(
            image_size=tuple(d["image_size"]),
            resize=d.get("resize"),
            crop=d.get("crop", "center"),
            interpolation=d.get("interpolation", "bicubic"),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            crop_offset=d.get("crop_offset", "round"),
            jpeg_draft_mpx=d["jpeg_draft_mpx"] if "jpeg_draft_mpx" in d else 0.0,
        )

    @classmethod
    def from_crop_pct(
        cls,
        image_size: int | tuple[int, int],
        crop_pct: float,
        *,
        interpolation: str = "bicubic",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    ) -> "PreprocessConfig":
        """timm's convention: resize the shorter side to floor(max(image_size) / crop_pct), center crop."""
        size = (int(image_size),) * 2 if isinstance(image_size, int) else tuple(int(s) for s in image_size)
        resize = int(math.floor(max(size) / crop_pct))
        return cls(image_size=size, resize=max(resize, max(size)), crop="center", interpolation=interpolation, mean=mean, std=std)


def input_geometry(pp: PreprocessConfig, w: int, h: int) -> Geometry:
    """Where a (w, h) image goes on its way to the model input of `pp`: resize size and crop box.

    crop='center': the shorter side becomes `pp.resize` and the longer side `int(resize * long / short)`
    (truncated: torchvision's Resize(int) and HF's get_resize_output_image_size agree), then a centre
    `image_size` box starts at `pp.crop_offset`'s rule. crop='none': the whole image is resized to
    `image_size` and kept.
    The image path (`to_uint8`) and the label-mask path both go through here, so a mask pixel lands on
    the model-input pixel its image pixel lands on.
    """
    h_out, w_out = pp.image_size
    if pp.crop == "none":
        return Geometry((w_out, h_out), (0, 0, w_out, h_out))
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = pp.resize, int(pp.resize * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    offset = _CROP_OFFSETS[pp.crop_offset]
    left, top = offset(new_w, w_out), offset(new_h, h_out)
    return Geometry((new_w, new_h), (left, top, left + w_out, top + h_out))


def interpolation_name(value) -> str:
    """Normalize an interpolation given as a name, a PIL code, or an enum to one of INTERPOLATIONS."""
    if isinstance(value, str):
        name = value.lower()
        if name == "random":  # timm's training-time option; evaluation uses bicubic.
            return "bicubic"
        if name in INTERPOLATIONS:
            return name
        raise UserError(f"interpolation {value!r} is unknown; use one of {sorted(INTERPOLATIONS)}.")
    if hasattr(value, "value") and isinstance(value.value, str):  # torchvision InterpolationMode
        return interpolation_name(value.value)
    if int(value) in _PIL_CODES:
        return _PIL_CODES[int(value)]
    raise UserError(f"interpolation {value!r} is unknown; use one of {sorted(INTERPOLATIONS)}.")
