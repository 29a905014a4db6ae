"""Store images as the model saw them, patch heatmaps over them, and grids of tiles.

Store image i is dataset image i of the dataset the store records (`store.attrs["dataset"]`). It is read
through the recorder's own decode path (`RecordDataset.model_input` with the store's preprocessing), so a
tile is the model's input as 8-bit RGB pixel for pixel and a heatmap's patch grid lies on the pixels the
patches covered. When the dataset cannot be opened (moved, deleted, changed since recording) every tile is
a grey square under its heatmap and `ImageReader.warning` says why; nothing crashes.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
from PIL import Image

GREY = 128
DEFAULT_TILE_PX = 112


class ImageReader:
    """Reads store images (uint8 RGB, model view) from the store's recorded dataset, or none when unavailable."""

    def __init__(self, dataset: dict | None, preprocessing: dict | None, n_store_images: int, *, data_root: str | None = None):
        self.warning: str | None = None
        """Why images are not shown, or None when they are."""
        self.preprocess = None
        if preprocessing:
            try:
                from saev_store.models.preprocess import PreprocessConfig

                self.preprocess = PreprocessConfig.from_dict(preprocessing)
            except Exception as err:  # an older or foreign store: fall back to the image's own size
                self.warning = f"the store's preprocessing {preprocessing} could not be read ({err}); images are shown unresized"
        self.size_hw = tuple(self.preprocess.image_size) if self.preprocess else None
        self.src = self._open(dataset, n_store_images, data_root)
        self._inputs = None
        if self.src is not None and self.preprocess is not None:
            from saev_store.datasets.torch_dataset import RecordDataset

            self._inputs = RecordDataset.model_input(self.src, self.preprocess)
        # Exemplars repeat across latents; a small per-reader cache saves re-decoding them.
        self.get = functools.lru_cache(maxsize=512)(self._get)

    def _open(self, dataset: dict | None, n_store_images: int, data_root: str | None):
        if not dataset or not dataset.get("kind"):
            self.warning = "the store records no dataset, so exemplars are shown as heatmaps on grey"
            return None
        root = data_root or dataset.get("root")
        try:
            from saev_store.datasets import reopen_dataset

            src = reopen_dataset(dataset, root=data_root)
        except Exception as err:  # missing folder, moved files, a dataset kind this install lacks...
            self.warning = (
                f"cannot open the store's dataset ({dataset.get('kind')} at {root}): {err}; exemplars are shown as heatmaps "
                "on grey (pass --data-root to point at the images)"
            )
            return None
        if len(src) < n_store_images:
            self.warning = f"the dataset at {root} holds {len(src)} images but the store {n_store_images}; it is not the recorded dataset, so heatmaps are shown on grey"
            return None
        want = dataset.get("fingerprint")
        if want:
            try:
                got = src.fingerprint()
            except Exception as err:
                got = f"unreadable ({err})"
            if got != want:
                self.warning = f"the dataset at {root} changed since recording (fingerprint {got} != {want}); heatmaps are shown on grey"
                return None
        return src

    @classmethod
    def for_store_attrs(cls, attrs: dict, *, data_root: str | None = None) -> "ImageReader":
        return cls(attrs.get("dataset"), attrs.get("preprocessing"), int(attrs.get("n_images", 0)), data_root=data_root)

    def _get(self, i: int) -> np.ndarray | None:
        """Image i as the model saw it, (H, W, 3) uint8; None when it cannot be shown."""
        if self.src is None:
            return None
        try:
            if self._inputs is None:  # a store without preprocessing: the image as decoded
                return np.asarray(self.src.load(int(i)), dtype=np.uint8)
            _, x_chw, ok, reason = self._inputs[int(i)]
        except Exception as err:  # one bad image: show grey for it, say so once
            reason, ok = str(err), False
        if not ok:
            warnings.warn(f"image {i} could not be read ({reason}); its tile is grey.", stacklevel=2)
            return None
        return x_chw.permute(1, 2, 0).numpy()


@functools.lru_cache(maxsize=8)
def _colormap_lut(name: str) -> np.ndarray:
    import matplotlib

    return (matplotlib.colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.float32)


def heatmap_tile(
    image_hw3: np.ndarray | None,
    patches_t: np.ndarray,
    grid: tuple[int, int],
    vmax: float,
    *,
    size_hw: tuple[int, int] | None = None,
    alpha: float = 0.6,
    cmap: str = "inferno",
) -> Image.Image:
    """The patch values (T,) as a heatmap over an image (or grey): each patch's square is coloured by value/vmax
    and blended with opacity alpha * value/vmax, so patches where the latent is off show the plain image."""
    h_g, w_g = grid
    if image_hw3 is None:
        size_hw = size_hw or (DEFAULT_TILE_PX, DEFAULT_TILE_PX)
        image_hw3 = np.full((*size_hw, 3), GREY, dtype=np.uint8)
    h, w = image_hw3.shape[:2]
    v = np.asarray(patches_t, dtype=np.float32).reshape(h_g, w_g) / (vmax if vmax > 0 else 1.0)
    v = np.clip(v, 0, 1)
    # Nearest upsampling: each patch shows as the block of pixels it was computed from.
    v_hw = np.asarray(Image.fromarray(v).resize((w, h), Image.Resampling.NEAREST), dtype=np.float32)
    color = _colormap_lut(cmap)[np.rint(v_hw * 255).astype(np.int64)]
    a = (alpha * v_hw)[..., None]
    out = image_hw3.astype(np.float32) * (1 - a) + color * a
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def grid_image(tiles: list[Image.Image], n_cols: int, *, pad: int = 2, bg=(255, 255, 255)) -> Image.Image:
    """Tiles (same size) in rows of n_cols with `pad` pixels between them."""
    if not tiles:
        return Image.new("RGB", (1, 1), bg)
    w, h = tiles[0].size
    n_cols = max(1, min(n_cols, len(tiles)))
    n_rows = -(-len(tiles) // n_cols)
    out = Image.new("RGB", (n_cols * (w + pad) + pad, n_rows * (h + pad) + pad), bg)
    for j, t in enumerate(tiles):
        r, c = divmod(j, n_cols)
        out.paste(t if t.size == (w, h) else t.resize((w, h)), (pad + c * (w + pad), pad + r * (h + pad)))
    return out


def fit_tile(img: Image.Image, max_px: int) -> Image.Image:
    """Shrink a tile so its longer side is at most max_px (small images are enlarged to it, pixelated)."""
    w, h = img.size
    s = max_px / max(w, h)
    if abs(s - 1) < 1e-9:
        return img
    return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.NEAREST if s > 1 else Image.Resampling.LANCZOS)
