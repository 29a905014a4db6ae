"""Patch labels from label masks: the two rules on hand-made masks with known answers, and the crop
geometry against the image path (a marked pixel lands in the patch the image preprocessing puts it in).

Oracles: answers worked out by hand; the image path itself (`PreprocessConfig.to_uint8` of an image
with a bright square where the mask has its marked class).
"""

import numpy as np
import pytest
from PIL import Image

from saev_store.models.preprocess import PreprocessConfig, input_geometry
from saev_store.patch_labels import IGNORE, cell_index, mask_to_input, patch_labels

I = IGNORE  # noqa: E741


def test_majority_and_prefer_fg_on_a_hand_made_mask():
    m = np.array([
        [0, 0, 1, 1],
        [0, 2, 1, 3],
        [I, I, 3, 3],
        [I, I, 0, 3],
    ])
    # 2x2 grid of 2x2 cells: top-left {0,0,0,2}, top-right {1,1,1,3}, bottom-left all ignored, bottom-right {3,3,0,3}.
    np.testing.assert_array_equal(patch_labels(m, (2, 2), "majority"), [0, 1, I, 3])
    np.testing.assert_array_equal(patch_labels(m, (2, 2), "prefer-fg", background=0), [2, 1, I, 3])
    # With background 3, prefer-fg passes over 3 in the bottom-right cell.
    np.testing.assert_array_equal(patch_labels(m, (2, 2), "prefer-fg", background=3), [0, 1, I, 0])


def test_ties_go_to_the_lowest_class_and_background_only_cells_stay_background():
    m = np.array([[5, 2], [2, 5]])
    assert patch_labels(m, (1, 1), "majority").tolist() == [2]
    assert patch_labels(np.zeros((2, 2), int), (1, 1), "prefer-fg").tolist() == [0]
    assert patch_labels(np.array([[0, I], [I, I]]), (1, 1), "prefer-fg").tolist() == [0]
    assert patch_labels(np.full((2, 2), I), (1, 1), "majority").tolist() == [I]


def test_unequal_cells_split_at_floor_edges():
    # 5 rows into 2 cells: rows 0-1 and 2-4 (edges floor(0), floor(2.5)=2, 5).
    np.testing.assert_array_equal(cell_index(5, 2), [0, 0, 1, 1, 1])
    m = np.zeros((5, 1), int)
    m[2:] = 7
    assert patch_labels(m, (2, 1), "majority").tolist() == [0, 7]


def test_mask_geometry_by_hand():
    """300x200 (w x h): shorter side 200 -> 256, so 384x256; centre crop 224 starts at x 80, y 16.
    Original x 150..199 -> resized 192..255 -> cropped 112..175 -> patch columns 7..10; y 100..149 ->
    128..191 -> 112..175 -> rows 7..10 (16-px patches)."""
    pp = PreprocessConfig(image_size=224, resize=256)
    assert input_geometry(pp, 300, 200) == ((384, 256), (80, 16, 304, 240))
    mask = np.zeros((200, 300), int)
    mask[100:150, 150:200] = 4
    lab = patch_labels(mask_to_input(mask, pp), (14, 14), "majority").reshape(14, 14)
    want = np.zeros((14, 14), int)
    want[7:11, 7:11] = 4
    np.testing.assert_array_equal(lab, want)


def test_mask_to_input_keeps_labels_and_ignore():
    pp = PreprocessConfig(image_size=(20, 30), resize=None, crop="none")
    m = np.arange(12).reshape(3, 4) - 1  # -1 = IGNORE at the corner
    out = mask_to_input(m, pp)
    assert out.shape == (20, 30) and set(np.unique(out)) == set(np.unique(m))


@pytest.mark.parametrize("size_wh,pp", [
    ((300, 200), PreprocessConfig(image_size=224, resize=256, interpolation="bicubic")),
    ((171, 263), PreprocessConfig(image_size=(112, 112), resize=128, interpolation="bilinear")),
    ((90, 70), PreprocessConfig(image_size=(64, 96), resize=None, crop="none")),
])
def test_a_marked_square_lands_where_the_image_path_puts_it(size_wh, pp):
    """For random spots: the image path (to_uint8) brightens patch P; the mask path labels P."""
    rng = np.random.default_rng(1)
    w, h = size_wh
    g = (pp.image_size[0] // 16, pp.image_size[1] // 16)
    rows, cols = cell_index(pp.image_size[0], g[0]), cell_index(pp.image_size[1], g[1])
    g_box = input_geometry(pp, w, h)
    for _ in range(12):
        # A 7x7 spot whose resized centre falls inside the crop box.
        while True:
            x0, y0 = int(rng.integers(0, w - 7)), int(rng.integers(0, h - 7))
            sx, sy = g_box.resized_wh[0] / w, g_box.resized_wh[1] / h
            cx, cy = (x0 + 3.5) * sx - g_box.box[0], (y0 + 3.5) * sy - g_box.box[1]
            if 4 <= cx < pp.image_size[1] - 4 and 4 <= cy < pp.image_size[0] - 4:
                break
        img = np.zeros((h, w, 3), np.uint8)
        img[y0 : y0 + 7, x0 : x0 + 7] = 255
        x_hw = pp.to_uint8(Image.fromarray(img)).numpy()[0].astype(np.float64)
        cell = rows[:, None] * g[1] + cols[None, :]
        brightest = int(np.argmax(np.bincount(cell.ravel(), weights=x_hw.ravel(), minlength=g[0] * g[1])))
        mask = np.zeros((h, w), int)
        mask[y0 : y0 + 7, x0 : x0 + 7] = 3
        lab = patch_labels(mask_to_input(mask, pp), g, "prefer-fg")
        assert lab[brightest] == 3, (x0, y0)
        assert set(np.flatnonzero(lab == 3)) <= set(np.flatnonzero(np.bincount(cell.ravel(), weights=x_hw.ravel(), minlength=lab.size) > 0))
