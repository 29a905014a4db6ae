"""Heatmap grids over the images as the model saw them, read back through the store's recorded dataset."""

import shutil

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from saev_store.datasets import create_dataset
from saev_store.models.preprocess import PreprocessConfig
from saev_store.store import open_store
from tools.images import ImageReader, heatmap_tile
from tools.render import GridStyle, pick_latents, render
from tools.topk import load_topk, run_topk
from tools_helpers import make_sae, make_store

torch.set_num_threads(2)
GRID = (4, 4)
PRE = PreprocessConfig(image_size=(32, 32), resize=36, crop="center", interpolation="bilinear")
N = 30


def _pil_view(fpath):
    """Oracle for the model's view: PIL resize of the shorter side to 36 (long side truncated), center 32x32 crop."""
    img = Image.open(fpath).convert("RGB")
    w, h = img.size
    nw, nh = (36, int(36 * h / w)) if w <= h else (int(36 * w / h), 36)
    img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = int(round((nw - 32) / 2)), int(round((nh - 32) / 2))
    return np.asarray(img.crop((left, top, left + 32, top + 32)), dtype=np.int16)


@pytest.fixture
def world(tmp_path):
    """A folder dataset of 40x50 images, a store recorded from it, and the topk folder of one SAE."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for i in range(N):
        cls = ["cat", "dog", "eel"][i % 3]
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)).save(root / cls / f"{i:03d}.png")
    src = create_dataset("folder", root=str(root))
    store = tmp_path / "s.zarr"
    make_store(store, N, grid=GRID, dataset=src.describe(), preprocessing=PRE.to_dict(), class_names=src.class_names, labels=src.labels(), p_invalid=0.1)
    run_topk({"a": make_sae(8, 12, seed=4)}, store, tmp_path / "topk", k=4, quiet=True)
    files = {i: str(root / rel) for i, rel in enumerate(src.image_ids())}
    return tmp_path, files


def test_reader_shows_the_recorders_resize_and_crop(world):
    tmp_path, files = world
    reader = ImageReader.for_store_attrs(open_store(tmp_path / "s.zarr").attrs)
    for i in (0, 7, 29):
        got = reader.get(i).astype(np.int16)
        assert got.shape == (32, 32, 3)
        assert np.abs(got - _pil_view(files[i])).max() <= 1


def test_heatmap_tile_blends_each_patch():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    patches = np.zeros(16, np.float32)
    patches[[0, 5, 15]] = [2.0, 1.0, 4.0]
    tile = np.asarray(heatmap_tile(img, patches, GRID, vmax=4.0, alpha=0.5, cmap="viridis"), dtype=np.float64)
    cmap = matplotlib.colormaps["viridis"]
    for p in range(16):
        r, c = divmod(p, 4)
        block = tile[8 * r : 8 * r + 8, 8 * c : 8 * c + 8]
        v = patches[p] / 4.0
        want = img[8 * r : 8 * r + 8, 8 * c : 8 * c + 8] * (1 - 0.5 * v) + np.asarray(cmap(round(v * 255) / 255)[:3]) * 255 * 0.5 * v
        assert np.abs(block - want).max() <= 1.0, p
    grey = np.asarray(heatmap_tile(None, np.zeros(16), GRID, 1.0, size_hw=(20, 20)))
    assert grey.shape == (20, 20, 3) and (grey == 128).all()


def _tiles(png, n, size):
    """Split a grid image (pad 2) into its n tiles."""
    arr = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
    out = []
    for j in range(n):
        r, c = divmod(j, 4)
        y, x = 2 + r * (size + 2), 2 + c * (size + 2)
        out.append(arr[y : y + size, x : x + size])
    return out


def test_render_shows_each_exemplar_image_under_its_heatmap(world):
    tmp_path, files = world
    data = load_topk(tmp_path / "topk")
    latents = pick_latents(data.stats, 3)
    res = render(tmp_path / "topk", latents=latents, style=GridStyle(tile_px=32), quiet=True)
    assert res.warning is None and set(res.grids) == set(latents)
    checked = 0
    for i in latents:
        for r in ("max", "mean"):
            ex = data.stats.top[r]
            filled = np.nonzero(ex.images[i] >= 0)[0]
            for j, tile in zip(filled, _tiles(res.grids[i][r], filled.size, 32)):
                oracle = _pil_view(files[int(ex.images[i, j])])
                off = (ex.patches[i, j] == 0).reshape(GRID)
                on = ~off
                mask_off = np.kron(off, np.ones((8, 8), bool))
                # Where the latent is off the pixels are the image's own; where on, the heatmap changes them.
                assert np.abs(tile[mask_off] - oracle[mask_off]).max() <= 1
                if on.any():
                    mask_on = np.kron(on, np.ones((8, 8), bool))
                    assert np.abs(tile[mask_on] - oracle[mask_on]).max() > 1
                checked += 1
    assert checked >= 6
    for fpath in (res.scatter_fpath, res.hist_fpath):
        with Image.open(fpath) as im:
            assert im.size[0] > 100 and im.size[1] > 100


def test_render_without_the_dataset_warns_and_draws_on_grey(world):
    tmp_path, _ = world
    shutil.rmtree(tmp_path / "data")
    data = load_topk(tmp_path / "topk")
    i = pick_latents(data.stats, 1)[0]
    res = render(tmp_path / "topk", latents=[i], style=GridStyle(tile_px=32), quiet=True, rankings=("max",))
    assert res.warning and "dataset" in res.warning
    ex = data.stats.top["max"]
    filled = np.nonzero(ex.images[i] >= 0)[0]
    for j, tile in zip(filled, _tiles(res.grids[i]["max"], filled.size, 32)):
        off = np.kron((ex.patches[i, j] == 0).reshape(GRID), np.ones((8, 8), bool))
        assert (tile[off] == 128).all()


def test_render_with_moved_dataset_uses_data_root(world):
    tmp_path, _ = world
    shutil.move(tmp_path / "data", tmp_path / "moved")
    res = render(tmp_path / "topk", latents=[0], quiet=True, data_root=str(tmp_path / "moved"))
    assert res.warning is None


def test_changed_dataset_is_not_shown(world):
    tmp_path, files = world
    Image.new("RGB", (40, 50)).save(files[3])  # same count, different content: the fingerprint differs
    reader = ImageReader.for_store_attrs(open_store(tmp_path / "s.zarr").attrs)
    assert reader.src is None and "changed" in reader.warning


def test_pick_latents_spreads_over_frequency(world):
    tmp_path, _ = world
    s = load_topk(tmp_path / "topk").stats
    alive = np.nonzero(s.n_images_active > 0)[0]
    got = pick_latents(s, 3)
    assert len(got) == min(3, alive.size) and got == sorted(got) and set(got) <= set(alive.tolist())
    if alive.size > 3:
        assert s.freq_image[got].min() == s.freq_image[alive].min()
        assert s.freq_image[got].max() == s.freq_image[alive].max()
    assert pick_latents(s, 10_000) == alive.tolist()


def _split_layout(tmp_path, fpaths):
    """The default split layout, DIR/train/<class>/<image> and DIR/val/<class>/<image>, from the odd photos."""
    dpath = tmp_path / "splits"
    for j, fpath in enumerate(fpaths):
        (dpath / "train" / f"c{j % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(fpath, dpath / "train" / f"c{j % 2}" / fpath.name)
    (dpath / "val" / "c0").mkdir(parents=True)
    shutil.copy(fpaths[0], dpath / "val" / "c0" / fpaths[0].name)
    return dpath


def _as_uint8(fed, st):
    """The recorder's float input back to 8-bit RGB (H, W, 3): exact, since it was (u / 255 - mean) / std."""
    pre = PreprocessConfig.from_dict(st.attrs["preprocessing"])
    mean, std = torch.tensor(pre.mean).view(3, 1, 1), torch.tensor(pre.std).view(3, 1, 1)
    u8 = ((fed * std + mean) * 255).round()
    assert u8.min() >= 0 and u8.max() <= 255
    return u8.to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def split_world(odd_images, tmp_path_factory):
    """EfficientNet-Lite0 recorded with `--data DIR --split train` over odd-sized JPEG photos and PNGs."""
    from conftest import record_fed

    _, fpaths = odd_images
    tmp_path = tmp_path_factory.mktemp("split_world")
    dpath = _split_layout(tmp_path, fpaths)
    st, fed = record_fed(tmp_path / "lite0.zarr", dataset="folder", data=str(dpath), split="train", layers=(15,))
    return tmp_path, dpath, st, _as_uint8(fed, st)


def test_tiles_are_the_models_input_pixel_for_pixel(odd_images, tmp_path):
    """Exemplar tiles go through the recorder's own decode path: each equals what the model was fed, as
    8-bit RGB, for full-size decoding (the default) and for opt-in drafting (recorded in the store)."""
    from conftest import record_fed

    root, _ = odd_images
    for name, draft in (("full", None), ("draft", 0)):
        opt_in = {} if draft is None else {"jpeg_draft_mpx": draft}
        st, fed = record_fed(tmp_path / f"{name}.zarr", dataset="folder", data=str(root), layers=(15,), **opt_in)
        fed_u8 = _as_uint8(fed, st)
        reader = ImageReader.for_store_attrs(st.attrs)
        assert reader.warning is None
        for i in range(st.n_images):  # 480x480 and 640x480 JPEGs: the tile reader used to decode them at 1/2 scale
            np.testing.assert_array_equal(reader.get(i), fed_u8[i], err_msg=f"{name} {st.image_ids()[i]}")
        assert st.attrs["preprocessing"]["jpeg_draft_mpx"] == draft
        if draft is None:
            full = fed_u8
    changed = [st.image_ids()[i] for i in range(st.n_images) if not np.array_equal(fed_u8[i], full[i])]
    assert changed and all(rel.endswith(".jpg") for rel in changed)  # drafting changes JPEG pixels, only those


def test_split_folder_store_reopens_and_renders_real_pixels(split_world):
    """`--data DIR --split train` records (DIR, train), which reopens the same images: render draws the
    model's input, not grey. A store recorded before the fix, (DIR/train, train), still opens."""
    tmp_path, dpath, st, fed_u8 = split_world
    assert (st.attrs["dataset"]["root"], st.attrs["dataset"]["split"]) == (str(dpath), "train")
    legacy = {**st.attrs, "dataset": {**st.attrs["dataset"], "root": str(dpath / "train")}}
    for attrs in (st.attrs, legacy):
        reader = ImageReader.for_store_attrs(attrs)
        assert reader.warning is None
        np.testing.assert_array_equal(reader.get(1), fed_u8[1])
    hook, grid = "_blocks.15", st.hook("_blocks.15").layout.grid
    sae = make_sae(st.hook(hook).d, 8, seed=2)
    sae.extra["hook"] = hook
    run_topk({"a": sae}, st.path, tmp_path / "topk", k=4, quiet=True)
    data = load_topk(tmp_path / "topk")
    latents = pick_latents(data.stats, 2)
    res = render(tmp_path / "topk", latents=latents, style=GridStyle(tile_px=224), quiet=True, rankings=("max",))
    assert res.warning is None and latents
    px = 224 // grid[0]
    n_off = 0
    for i in latents:
        ex = data.stats.top["max"]
        filled = np.nonzero(ex.images[i] >= 0)[0]
        for j, tile in zip(filled, _tiles(res.grids[i]["max"], filled.size, 224)):
            off = np.kron((ex.patches[i, j] == 0).reshape(grid), np.ones((px, px), bool))
            # Where the latent is off the tile is the model's input, exactly; not grey.
            np.testing.assert_array_equal(tile[off], fed_u8[int(ex.images[i, j])][off])
            n_off += int(off.sum())
    assert n_off > 0
