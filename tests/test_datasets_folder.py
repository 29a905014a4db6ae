"""Image folders: layout, labels, ids, per-mode RGB conversion against hand-computed numpy, bad files."""

import os
import pickle

import numpy as np
import pytest
from PIL import Image

from saev_store.datasets import BadImageError, create_dataset, reopen_dataset, to_rgb
from saev_store.errors import UserError

H, W = 5, 7


def _composite_white(rgb, alpha):
    """Straight-alpha RGB over white, rounded, in float64."""
    a = alpha.astype(np.float64)[..., None] / 255.0
    return np.round(rgb.astype(np.float64) * a + 255.0 * (1.0 - a)).astype(np.uint8)


def _gray3(g):
    return np.repeat(g[..., None], 3, axis=-1).astype(np.uint8)


def _make_mode_images(rng):
    """name -> (PIL image to save, file extension, expected RGB (H, W, 3) uint8)."""
    cases = {}
    g = rng.integers(0, 256, (H, W), dtype=np.uint8)
    cases["gray_L"] = (Image.fromarray(g, "L"), ".png", _gray3(g))

    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    idx = rng.integers(0, 256, (H, W), dtype=np.uint8)
    idx[0, 0] = idx[1, 1] = 7
    p = Image.frombytes("P", (W, H), idx.tobytes())
    p.putpalette(palette.flatten().tolist())
    cases["palette_P"] = (p, ".png", palette[idx])
    pt = p.copy()
    pt.info["transparency"] = 7
    expected = palette[idx].copy()
    expected[idx == 7] = 255  # the transparent index shows the white background
    cases["palette_P_transparent"] = (pt, ".png", expected)

    rgba = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    rgba[0, :, 3] = 0
    rgba[1, :, 3] = 255
    cases["rgba"] = (Image.fromarray(rgba, "RGBA"), ".png", _composite_white(rgba[..., :3], rgba[..., 3]))

    la = rng.integers(0, 256, (H, W, 2), dtype=np.uint8)
    la[0, 0, 1] = 0
    cases["gray_alpha_LA"] = (Image.fromarray(la, "LA"), ".png", _composite_white(_gray3(la[..., 0]), la[..., 1]))

    cmyk = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    c = cmyk.astype(np.float64)
    expected = np.round((255.0 - c[..., :3]) * (255.0 - c[..., 3:]) / 255.0).astype(np.uint8)
    cases["cmyk"] = (Image.fromarray(cmyk, "CMYK"), ".tif", expected)

    v16 = rng.integers(0, 65536, (H, W), dtype=np.uint16)
    v16[0, 0], v16[0, 1], v16[0, 2] = 0, 65535, 128 * 257 + 129  # ends of the range and a rounding case
    img16 = Image.fromarray(v16)
    assert img16.mode == "I;16"
    cases["gray16"] = (img16, ".png", _gray3(np.round(v16.astype(np.float64) / 257.0)))

    bits = rng.integers(0, 2, (H, W)).astype(bool)
    cases["bilevel_1"] = (Image.fromarray(bits), ".png", _gray3(np.where(bits, 255, 0)))
    return cases


@pytest.fixture()
def mode_tree(tmp_path):
    rng = np.random.default_rng(0)
    cases = _make_mode_images(rng)
    root = tmp_path / "modes"
    root.mkdir()
    expected = {}
    for name, (img, ext, exp) in cases.items():
        img.save(root / f"{name}{ext}")
        expected[f"{name}{ext}"] = exp
    return root, expected


def test_each_mode_converts_to_expected_rgb(mode_tree):
    root, expected = mode_tree
    src = create_dataset("folder", root=str(root))
    ids = src.image_ids()
    assert sorted(ids) == ids == sorted(expected)
    for i, image_id in enumerate(ids):
        img = src.load(i)
        assert img.mode == "RGB", image_id
        np.testing.assert_array_equal(np.asarray(img), expected[image_id], err_msg=image_id)


def test_in_memory_modes():
    # I: 16-bit range is scaled like I;16; out of range is stretched min..max.
    v = np.array([[0, 257, 65535], [32896, 1000, 2]], dtype=np.int32)
    np.testing.assert_array_equal(np.asarray(to_rgb(Image.fromarray(v, "I"))), _gray3(np.round(v / 257.0)))
    v = np.array([[-100, 0, 100000]], dtype=np.int32)
    exp = np.round((v - v.min()) * 255.0 / (v.max() - v.min()))
    np.testing.assert_array_equal(np.asarray(to_rgb(Image.fromarray(v, "I"))), _gray3(exp))
    f = np.array([[0.0, 0.5, 1.0, 0.25]], dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(to_rgb(Image.fromarray(f, "F"))), _gray3(np.round(f.astype(np.float64) * 255)))
    f = np.array([[-2.0, 0.0, 6.0]], dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(to_rgb(Image.fromarray(f, "F"))), _gray3(np.array([[0, 64, 255]])))
    # Premultiplied RGBa: channel already scaled by alpha, background adds (255 - a).
    rgba = np.array([[[100, 50, 0, 128], [10, 20, 30, 255]]], dtype=np.uint8)
    premul = Image.fromarray(rgba, "RGBA").convert("RGBa")
    p = np.asarray(premul).astype(np.float64)
    exp = np.round(p[..., :3] + 255.0 * (255.0 - p[..., 3:]) / 255.0).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(to_rgb(premul)), exp)


def test_exif_orientation_applied(tmp_path):
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    (tmp_path / "r").mkdir()
    img.save(tmp_path / "r" / "rot.png", exif=exif)
    out = np.asarray(create_dataset("folder", root=str(tmp_path / "r")).load(0))
    np.testing.assert_array_equal(out, np.rot90(arr, k=-1))


def _save_rgb(fpath, seed=0, size=(6, 4)):
    os.makedirs(os.path.dirname(fpath), exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(fpath)
    return arr


def test_class_tree_labels_ids_and_skips(tmp_path):
    root = tmp_path / "tree"
    _save_rgb(root / "dog" / "c.PNG", 1)
    _save_rgb(root / "cat" / "sub" / "b.png", 2)
    _save_rgb(root / "cat" / "a.png", 3)
    _save_rgb(root / "cat-b" / "z.bmp", 4)
    _save_rgb(root / "cat" / ".hidden.png", 5)
    _save_rgb(root / ".trash" / "x.png", 6)
    (root / "cat" / "._a.png").write_bytes(b"\x00\x05\x16\x07 resource fork")  # macOS AppleDouble junk
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "empty_class").mkdir()
    src = create_dataset("folder", root=str(root), split="train")  # no train/ subfolder: split ignored
    assert src.split == ""
    assert src.class_names == ["cat", "cat-b", "dog"]
    assert src.image_ids() == ["cat/a.png", "cat/sub/b.png", "cat-b/z.bmp", "dog/c.PNG"]
    np.testing.assert_array_equal(src.labels(), np.array([0, 0, 1, 2], np.int32))
    assert src.labels().dtype == np.int32
    np.testing.assert_array_equal(np.asarray(src.load(1)), _save_rgb(tmp_path / "oracle" / "b.png", 2))
    d = src.describe()
    assert d["kind"] == "folder" and d["n_images"] == 4 and d["class_names"] == ["cat", "cat-b", "dog"]
    assert d["root"] == str(root)
    clone = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(np.asarray(clone.load(3)), np.asarray(src.load(3)))


def test_flat_folder_is_unlabeled(tmp_path):
    root = tmp_path / "flat"
    for k, name in enumerate(["b.jpg", "a.JPEG", "c.webp", "d.gif", "e.tiff"]):
        _save_rgb(root / name, k)
    src = create_dataset("folder", root=str(root))
    assert src.class_names is None
    assert src.image_ids() == ["a.JPEG", "b.jpg", "c.webp", "d.gif", "e.tiff"]
    np.testing.assert_array_equal(src.labels(), np.full(5, -1, np.int32))
    assert all(src.load(i).size == (6, 4) for i in range(5))
    assert src.describe()["class_names"] is None


def test_split_subfolders(tmp_path):
    root = tmp_path / "splits"
    _save_rgb(root / "train" / "x" / "1.png")
    _save_rgb(root / "train" / "y" / "2.png")
    _save_rgb(root / "val" / "y" / "3.png")
    src = create_dataset("folder", root=str(root), split="val")
    assert src.split == "val" and src.root == str(root)
    assert src.image_ids() == ["y/3.png"] and src.class_names == ["y"]
    # The recorded (root, split) pair reopens the same images: same ids, same fingerprint.
    d = src.describe()
    again = create_dataset("folder", root=d["root"], split=d["split"])
    assert again.image_ids() == src.image_ids() and again.fingerprint() == d["fingerprint"]
    assert reopen_dataset(d).fingerprint() == d["fingerprint"]
    # Stores recorded before the fix hold root=<root>/val with split "val"; that pair still reopens them.
    legacy = {**d, "root": str(root / "val")}
    assert reopen_dataset(legacy).fingerprint() == d["fingerprint"]
    assert np.array_equal(np.asarray(reopen_dataset(legacy).load(0)), np.asarray(src.load(0)))
    with pytest.raises(UserError, match="holds split folders.*train, val.*--split"):
        create_dataset("folder", root=str(root))
    with pytest.raises(UserError, match="no split 'test'.*train, val"):
        create_dataset("folder", root=str(root), split="test")


def test_empty_missing_and_mixed_folders(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="holds no images"):
        create_dataset("folder", root=str(tmp_path / "empty"))
    with pytest.raises(UserError, match="does not exist"):
        create_dataset("folder", root=str(tmp_path / "missing"))
    with pytest.raises(UserError, match="--data"):
        create_dataset("folder", root=None)
    _save_rgb(tmp_path / "mixed" / "loose.png")
    _save_rgb(tmp_path / "mixed" / "cls" / "a.png")
    with pytest.raises(UserError, match="directly in it .*loose.png.*class subfolders"):
        create_dataset("folder", root=str(tmp_path / "mixed"))


def test_fingerprint_tracks_names_and_sizes(tmp_path):
    root = tmp_path / "fp"
    _save_rgb(root / "a" / "1.png", 0)
    _save_rgb(root / "b" / "2.png", 1)
    fp0 = create_dataset("folder", root=str(root)).describe()["fingerprint"]
    assert fp0 == create_dataset("folder", root=str(root)).describe()["fingerprint"]
    _save_rgb(root / "b" / "2.png", 1, size=(9, 9))  # same name, different content and size
    fp1 = create_dataset("folder", root=str(root)).describe()["fingerprint"]
    _save_rgb(root / "b" / "3.png", 2)
    fp2 = create_dataset("folder", root=str(root)).describe()["fingerprint"]
    assert len({fp0, fp1, fp2}) == 3


@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_truncated_and_corrupt_files_raise_bad_image(tmp_path, ext):
    root = tmp_path / "bad"
    _save_rgb(root / "ok" / f"good{ext}", 0, size=(64, 64))
    _save_rgb(root / "ok" / f"cut{ext}", 1, size=(64, 64))
    full = (root / "ok" / f"cut{ext}").read_bytes()
    (root / "ok" / f"cut{ext}").write_bytes(full[: len(full) // 2])
    (root / "ok" / f"text{ext}").write_text("this is not an image")
    (root / "ok" / f"zero{ext}").write_bytes(b"")
    src = create_dataset("folder", root=str(root))
    assert src.image_ids() == [f"ok/cut{ext}", f"ok/good{ext}", f"ok/text{ext}", f"ok/zero{ext}"]
    assert src.load(1).size == (64, 64)
    for i in (0, 2, 3):
        with pytest.raises(BadImageError) as info:
            src.load(i)
        err = info.value
        assert err.image_id == src.image_ids()[i]
        assert src.image_ids()[i] in str(err) and str(root) in str(err) and "--skip-bad" in str(err)
        assert isinstance(err, UserError)
        clone = pickle.loads(pickle.dumps(err))
        assert (clone.image_id, clone.reason, str(clone)) == (err.image_id, err.reason, str(err))
    with pytest.raises(BadImageError, match="truncated"):
        src.load(0)
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
