"""Per-patch class labels from per-pixel label masks: the geometry and the two aggregation rules.

    from saev_store.patch_labels import mask_to_input, patch_labels
    m_hw = mask_to_input(mask_hw, preprocess)              # the mask as the model's input pixels (nearest)
    lab_p = patch_labels(m_hw, grid=(14, 14), rule="majority")   # (196,) int16, IGNORE where nothing votes

A mask goes through exactly the image's geometric preprocessing (`PreprocessConfig.resize_crop`, the
function the image path uses, with nearest resampling so no new label values appear). The model input
(H, W) is then cut into the hook's grid of equal cells: patch row r covers input rows
floor(r * H / h) .. floor((r + 1) * H / h) - 1, and likewise for columns (for a ViT, H = h * patch
size and the cells are its patches; for a CNN they are its stride blocks).

The rules are saev's (`pixel_agg`): `majority` takes the most common label of the cell's pixels;
`prefer-fg` takes the most common label other than `background`, and `background` only when the cell
holds nothing else. Pixels labelled IGNORE (the mask's ignore value) do not vote; a cell whose pixels
are all ignored is IGNORE. Ties go to the lowest class index.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

IGNORE = -1
"""The stored label of a patch (or pixel) that carries no class; heads skip it."""
RULES: tuple[str, ...] = ("majority", "prefer-fg")
MAX_CLASS = np.iinfo(np.int16).max
"""Patch labels are int16 on disk: classes 0..32767."""


def cell_index(n_pixels: int, n_cells: int) -> np.ndarray:
    """(n_pixels,) int64: the cell each pixel row (or column) falls in, for n_cells equal cells."""
    edges = (np.arange(n_cells + 1, dtype=np.int64) * n_pixels) // n_cells
    return np.repeat(np.arange(n_cells, dtype=np.int64), np.diff(edges))


def mask_to_input(mask_hw: np.ndarray, preprocess) -> np.ndarray:
    """A (h0, w0) integer label map (IGNORE allowed) -> (H, W) int32 at the model input of `preprocess`
    (a PreprocessConfig): the image's resize and crop, nearest resampling."""
    m = np.ascontiguousarray(mask_hw, dtype=np.int32)
    if m.ndim != 2:
        raise ValueError(f"mask_to_input: a label mask is 2-D (height, width), got shape {m.shape}.")
    out = preprocess.resize_crop(Image.fromarray(m, "I"), "nearest")
    return np.asarray(out, dtype=np.int32)


def patch_labels(mask_hw: np.ndarray, grid: tuple[int, int], rule: str = "majority", background: int = 0) -> np.ndarray:
    """(H, W) labels at the model input -> (h*w,) int16 patch labels in row-major grid order."""
    if rule not in RULES:
        raise ValueError(f"patch label rule {rule!r} is unknown; choose one of {', '.join(RULES)}.")
    m = np.asarray(mask_hw)
    gh, gw = int(grid[0]), int(grid[1])
    if m.ndim != 2 or m.shape[0] < gh or m.shape[1] < gw:
        raise ValueError(f"patch_labels: mask of shape {m.shape} cannot be cut into a {gh}x{gw} grid.")
    n_cells = gh * gw
    cell_hw = cell_index(m.shape[0], gh)[:, None] * gw + cell_index(m.shape[1], gw)[None, :]
    lab = m.astype(np.int64).ravel()
    keep = lab != IGNORE
    lab, cell = lab[keep], cell_hw.ravel()[keep]
    out = np.full(n_cells, IGNORE, dtype=np.int16)
    if lab.size == 0:
        return out
    n_cls = int(lab.max()) + 1
    counts = np.bincount(cell * n_cls + lab, minlength=n_cells * n_cls).reshape(n_cells, n_cls)
    voted = counts.sum(axis=1) > 0
    if rule == "prefer-fg" and 0 <= background < n_cls:
        has_bg = counts[:, background] > 0
        counts[:, background] = 0
        fg = counts.sum(axis=1) > 0
        out[fg] = counts[fg].argmax(axis=1)
        out[~fg & has_bg] = background
        return out
    out[voted] = counts[voted].argmax(axis=1)  # argmax: ties go to the lowest class
    return out


class PatchLabeler:
    """Image index -> its patch labels for every grid of a store: mask, image geometry, rule.

    Picklable (it holds the mask source and plain settings), so DataLoader workers can run it."""

    def __init__(self, masks, preprocess, grids: dict[str, tuple[int, int]], rule: str = "majority", background: int = 0):
        if rule not in RULES:
            raise ValueError(f"patch label rule {rule!r} is unknown; choose one of {', '.join(RULES)}.")
        self.masks = masks
        """A MaskSource (saev_store.datasets.masks)."""
        self.preprocess = preprocess
        self.grids = {k: (int(g[0]), int(g[1])) for k, g in grids.items()}
        self.rule = rule
        self.background = int(background)

    def __call__(self, i: int) -> dict[str, np.ndarray]:
        m_hw = mask_to_input(self.masks.load(i), self.preprocess)
        return {k: patch_labels(m_hw, g, self.rule, self.background) for k, g in self.grids.items()}
