"""Patch labels in a store: `saev-store add-labels` and `record --masks`, their sources, resuming, checks.

Oracles: the patch labels of each image computed directly from its mask file (read with PIL here,
through the hand-checked geometry and rules of test_patch_labels); Fashion-MNIST's masks rebuilt from
the idx files with numpy alone; a bitwise comparison of an interrupted run with an uninterrupted one;
and a v1 store recorded before patch labels existed (tests/fixtures/v1_store.tar.gz, written by the
main branch of that day; conftest's `v1_store`) compared with what today's recorder writes.
"""

import gzip
import os
import pathlib
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from saev_store import add_labels as add_labels_mod
from saev_store.add_labels import AddLabelsConfig, add_labels
from saev_store.cli import main as cli
from saev_store.datasets.masks import MaskConfig
from saev_store.errors import UserError
from saev_store.models.preprocess import PreprocessConfig
from saev_store.patch_labels import IGNORE, mask_to_input, patch_labels
from saev_store.record import RecordConfig, record
from saev_store.store import Store, open_store
from saev_store.verify import verify

FMNIST = "/usr/share/datasets/fashion-mnist"
SIZES = [(40, 30), (33, 50), (64, 64), (45, 36), (36, 45), (50, 40), (41, 37)]


def _blobs(rng, w, h):
    """A label map of 2-4 rectangles of classes 1..3 on background 0, a few pixels 255 (ignore)."""
    m = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(2, 5))):
        x0, y0 = int(rng.integers(0, w - 4)), int(rng.integers(0, h - 4))
        m[y0 : y0 + int(rng.integers(4, h)), x0 : x0 + int(rng.integers(4, w))] = int(rng.integers(1, 4))
    m[rng.random((h, w)) < 0.02] = 255
    return m


def make_folder(root: pathlib.Path, rng):
    """data/{a,b}/img<k>.png|jpg and masks/{a,b}/img<k>.png; one JPEG rotated by EXIF (its mask has the
    displayed size); masks in modes L, P and I;16. Returns {image id: mask array}."""
    truth = {}
    for k, (w, h) in enumerate(SIZES):
        cls = "ab"[k % 2]
        (root / "data" / cls).mkdir(parents=True, exist_ok=True)
        (root / "masks" / cls).mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        if k == 3:  # stored landscape, shown portrait: EXIF orientation 6 (rotate 90 degrees)
            exif = Image.Exif()
            exif[0x0112] = 6
            img.save(root / "data" / cls / f"img{k}.jpg", exif=exif)
            rel, (w, h) = f"{cls}/img{k}.jpg", (h, w)
        else:
            img.save(root / "data" / cls / f"img{k}.png")
            rel = f"{cls}/img{k}.png"
        m = _blobs(rng, w, h)
        mpath = root / "masks" / cls / f"img{k}.png"
        if k == 1:
            p = Image.fromarray(m, "L").convert("P")
            p.putpalette(list(rng.integers(0, 255, 768, dtype=np.uint8)))
            p.save(mpath)
        elif k == 2:
            Image.fromarray(m.astype(np.uint16)).save(mpath)  # I;16
        else:
            Image.fromarray(m, "L").save(mpath)
        truth[rel] = m
    return truth


def expected_labels(truth, ids, pre, grid, rule="majority"):
    out = []
    for rel in ids:
        m = truth[rel].astype(np.int64)
        m[m == 255] = IGNORE
        out.append(patch_labels(mask_to_input(m, pre), grid, rule))
    return np.stack(out)


PRE32 = PreprocessConfig(image_size=32, resize=36)


def store_of(path, src, pre: PreprocessConfig, grids=((8, 8), (4, 4)), n=None):
    """A store of `src`'s images (zero activations: labelling never reads them) with one hook per grid,
    recording the dataset and preprocessing as the recorder would."""
    from conftest import make_store
    from saev_store.layout import TokenLayout

    n = n or len(src)
    acts = {f"_blocks.{j}": np.zeros((n, h * w, 2), np.float32) for j, (h, w) in enumerate(grids)}
    layouts = {f"_blocks.{j}": TokenLayout.cnn(h, w) for j, (h, w) in enumerate(grids)}
    make_store(path, acts, images_per_chunk=3, layouts=layouts, labels=src.labels()[:n],
               metadata={"dataset": src.describe(), "preprocessing": pre.to_dict(), "class_names": src.class_names},
               image_ids=src.image_ids()[:n])
    return str(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from saev_store.datasets import create_dataset

    root = tmp_path_factory.mktemp("folder")
    truth = make_folder(root, np.random.default_rng(3))
    plain = store_of(root / "plain.zarr", create_dataset("folder", root=str(root / "data")), PRE32)
    return root, truth, plain


def _copy(src: str, dst: pathlib.Path) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _masks(root, **kw):
    return MaskConfig(masks=str(root / "masks"), ignore_value=255, **kw)


def test_add_labels_gives_each_patch_its_masks_label(folder, tmp_path):
    root, truth, plain = folder
    out = _copy(plain, tmp_path / "s.zarr")
    res = add_labels(AddLabelsConfig(store=out, masks=_masks(root), num_workers=0, quiet=True))
    st = open_store(out)
    pre = PreprocessConfig.from_dict(st.attrs["preprocessing"])
    assert sorted(res["grids"]) == ["4x4", "8x8"] and res["chunks_written"] == st.n_chunks
    for key, grid in (("8x8", (8, 8)), ("4x4", (4, 4))):
        np.testing.assert_array_equal(st.patch_labels(key), expected_labels(truth, st.image_ids(), pre, grid))
        attrs = st.patch_label_sets()[key]
        assert attrs["complete"] and attrs["class_names"] == ["0", "1", "2", "3"] and attrs["rule"] == "majority"
        assert attrs["source"]["kind"] == "folder" and attrs["source"]["ignore_value"] == 255
    assert verify(st) == []
    assert st.patch_label_key("_blocks.1") == "4x4"


def test_record_with_masks_writes_the_labels_in_the_same_pass(folder, tmp_path):
    root, truth, _ = folder
    out = str(tmp_path / "r.zarr")
    record(RecordConfig(out=out, dataset="folder", data=str(root / "data"), image_size=32, layers=(1, 3), images_per_chunk=3,
                        num_workers=0, quiet=True, masks=_masks(root, rule="prefer-fg")))
    st = open_store(out)
    pre = PreprocessConfig.from_dict(st.attrs["preprocessing"])
    assert pre.interpolation == "bicubic" and pre.image_size == (32, 32)  # the model's own preprocessing, not PRE32
    np.testing.assert_array_equal(st.patch_labels("8x8"), expected_labels(truth, st.image_ids(), pre, (8, 8), "prefer-fg"))
    np.testing.assert_array_equal(st.patch_labels("4x4"), expected_labels(truth, st.image_ids(), pre, (4, 4), "prefer-fg"))
    assert st.patch_label_sets()["8x8"]["complete"]
    # Rerunning the same command finds it complete; other mask settings point to add-labels.
    assert record(RecordConfig(out=out, dataset="folder", data=str(root / "data"), image_size=32, layers=(1, 3), images_per_chunk=3,
                               num_workers=0, quiet=True, masks=_masks(root, rule="prefer-fg")))["already_complete"]
    with pytest.raises(UserError, match="add-labels"):
        record(RecordConfig(out=out, dataset="folder", data=str(root / "data"), image_size=32, layers=(1, 3), images_per_chunk=3,
                            num_workers=0, quiet=True, masks=_masks(root)))


def test_an_interrupted_add_labels_resumes_to_the_same_bytes(folder, tmp_path, monkeypatch):
    root, _, plain = folder
    ref = _copy(plain, tmp_path / "ref.zarr")
    add_labels(AddLabelsConfig(store=ref, masks=_masks(root), num_workers=0, quiet=True))
    out = _copy(plain, tmp_path / "s.zarr")
    real = Store.write_patch_labels
    calls = []

    def dies_after_three(self, key, i, labels):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append((key, i))
        real(self, key, i, labels)

    monkeypatch.setattr(Store, "write_patch_labels", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        add_labels(AddLabelsConfig(store=out, masks=_masks(root), num_workers=0, quiet=True))
    monkeypatch.setattr(Store, "write_patch_labels", real)
    st = open_store(out)
    assert int(st.patch_labels_done("4x4").sum() + st.patch_labels_done("8x8").sum()) == 3
    assert any(p.array.startswith("patch_labels") for p in verify(st))
    res = add_labels(AddLabelsConfig(store=out, masks=_masks(root), num_workers=0, quiet=True))
    assert res["chunks_written"] == st.n_chunks - 1  # the chunk done in both grids is kept
    for key in ("4x4", "8x8"):
        for i in range(st.n_chunks):
            rel = pathlib.Path("patch_labels", key, "labels", "c", str(i), "0")
            assert (pathlib.Path(out) / rel).read_bytes() == (pathlib.Path(ref) / rel).read_bytes()
    assert verify(open_store(out)) == []


def test_verify_names_a_corrupt_label_chunk(folder, tmp_path):
    root, _, plain = folder
    out = _copy(plain, tmp_path / "s.zarr")
    add_labels(AddLabelsConfig(store=out, masks=_masks(root), num_workers=0, quiet=True))
    fpath = pathlib.Path(out) / "patch_labels" / "8x8" / "labels" / "c" / "1" / "0"
    raw = bytearray(fpath.read_bytes())
    raw[5] ^= 0xFF
    fpath.write_bytes(bytes(raw))
    problems = verify(open_store(out))
    assert [(p.array, p.chunk) for p in problems] == [("patch_labels/8x8/labels", 1)]


def test_other_settings_are_refused_unless_overwrite(folder, tmp_path):
    root, truth, plain = folder
    out = _copy(plain, tmp_path / "s.zarr")
    add_labels(AddLabelsConfig(store=out, masks=_masks(root), num_workers=0, quiet=True))
    res = add_labels(AddLabelsConfig(store=out, masks=_masks(root), num_workers=0, quiet=True))
    assert res["already_complete"] and res["chunks_written"] == 0
    with pytest.raises(UserError, match="rule: store has 'majority'"):
        add_labels(AddLabelsConfig(store=out, masks=_masks(root, rule="prefer-fg"), num_workers=0, quiet=True))
    names = tmp_path / "names.txt"
    names.write_text("sky\ngrass\nsand\nsea\n")
    r = CliRunner().invoke(cli, ["add-labels", out, "--masks", str(root / "masks"), "--mask-ignore", "255", "--patch-labels",
                                 "prefer-fg", "--mask-classes", str(names), "--overwrite", "--quiet", "--num-workers", "0"])
    assert r.exit_code == 0, r.output
    assert "patch labels 4x4: 4 classes (sky, grass, sand, sea)" in r.output
    st = open_store(out)
    pre = PreprocessConfig.from_dict(st.attrs["preprocessing"])
    np.testing.assert_array_equal(st.patch_labels("4x4"), expected_labels(truth, st.image_ids(), pre, (4, 4), "prefer-fg"))
    assert st.patch_label_sets()["4x4"]["class_names"] == ["sky", "grass", "sand", "sea"]


def test_mask_problems_are_one_clear_error(folder, tmp_path):
    root, _, plain = folder
    bad = tmp_path / "masks"
    shutil.copytree(root / "masks", bad)

    def run():
        out = _copy(plain, tmp_path / f"s{len(list(tmp_path.iterdir()))}.zarr")
        add_labels(AddLabelsConfig(store=out, masks=MaskConfig(masks=str(bad), ignore_value=255), num_workers=0, quiet=True))

    (bad / "b" / "img1.png").unlink()
    with pytest.raises(UserError, match=r"1 of 7 images have no mask .*b/img1.png"):
        run()
    Image.new("RGB", (33, 50)).save(bad / "b" / "img1.png")
    with pytest.raises(UserError, match="is a RGB image; a label map is a single-channel PNG"):
        run()
    Image.new("L", (50, 33)).save(bad / "b" / "img1.png")  # transposed
    with pytest.raises(UserError, match="is 50x33 but its image .* is 33x50"):
        run()
    Image.new("L", (33, 50), 9).save(bad / "b" / "img1.png")
    names = tmp_path / "names.txt"
    names.write_text("bg\nx\ny\nz\n")
    with pytest.raises(UserError, match=r"holds class 9, outside 0..3 \(--mask-classes names 4 classes\)"):
        add_labels(AddLabelsConfig(store=_copy(plain, tmp_path / "n.zarr"),
                                   masks=MaskConfig(masks=str(bad), ignore_value=255, class_names_fpath=str(names)),
                                   num_workers=0, quiet=True))
    with pytest.raises(UserError, match="--masks pixels reads masks of a fashion-mnist dataset; this store's dataset is 'folder' \\(use --masks DIR for folder"):
        add_labels(AddLabelsConfig(store=_copy(plain, tmp_path / "p.zarr"), masks=MaskConfig(masks="pixels"), num_workers=0, quiet=True))


def test_hf_disk_mask_column_gives_the_folders_labels(folder, tmp_path):
    import datasets

    root, truth, plain = folder
    ids = open_store(plain).image_ids()
    rows = {"image": [str(root / "data" / rel) for rel in ids],
            "mask": [str(root / "masks" / (os.path.splitext(rel)[0] + ".png")) for rel in ids]}
    ds = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).cast_column("mask", datasets.Image())
    ds.save_to_disk(str(tmp_path / "hf"))
    from saev_store.datasets import create_dataset

    out = store_of(tmp_path / "h.zarr", create_dataset("hf-disk", root=str(tmp_path / "hf")), PRE32)
    add_labels(AddLabelsConfig(store=out, masks=MaskConfig(mask_column="mask", ignore_value=255), num_workers=0, quiet=True))
    st = open_store(out)
    np.testing.assert_array_equal(st.patch_labels("4x4"), expected_labels(truth, ids, PRE32, (4, 4)))
    assert st.patch_label_sets()["4x4"]["source"]["kind"] == "hf-column"


def _fmnist_oracle(n: int, image_size: int, resize: int, grid: int, threshold: int = 10):
    """Fashion-MNIST masks and their patch labels with numpy alone: pixel > threshold -> class + 1;
    nearest resize of 28 px to `resize` (PIL's rule: source = floor((u + 0.5) * 28 / resize)), centre
    crop, equal cells, majority (ties to the lower class)."""
    with gzip.open(f"{FMNIST}/train-images-idx3-ubyte.gz") as f:
        px = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    with gzip.open(f"{FMNIST}/train-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:n].astype(np.int64)
    src = np.floor((np.arange(resize) + 0.5) * 28 / resize).astype(int)
    off = int(round((resize - image_size) / 2))
    keep = src[off : off + image_size]
    out = np.zeros((n, grid * grid), np.int64)
    for i in range(n):
        m = np.where(px[i] > threshold, labels[i] + 1, 0)[np.ix_(keep, keep)]
        cell = image_size // grid
        for r in range(grid):
            for c in range(grid):
                out[i, r * grid + c] = np.bincount(m[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell].ravel(), minlength=11).argmax()
    return out


def test_a_v1_store_from_before_patch_labels_opens_and_reads_unchanged(v1_store, tmp_path):
    st = open_store(v1_store)
    assert st.patch_label_sets() == {} and st.complete and verify(st) == []
    with pytest.raises(UserError, match="add-labels"):
        st.patch_label_key("_blocks.3")
    # Today's recorder, same command, writes the same activations, labels and statistics: equal up to
    # one float16 step where the float32 forward rounds differently (BLAS threads differ between runs).
    out = str(tmp_path / "now.zarr")
    record(RecordConfig(out=out, limit=16, image_size=16, layers=(3,), store_dtype="float16", images_per_chunk=4, num_workers=0, quiet=True))
    now = open_store(out)
    np.testing.assert_allclose(st.read("_blocks.3", 0, 16), now.read("_blocks.3", 0, 16), rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(st.labels(), now.labels())
    assert st.image_ids() == now.image_ids()
    np.testing.assert_allclose(st.normalizer("_blocks.3", "patches").mean, now.normalizer("_blocks.3", "patches").mean, rtol=1e-4, atol=1e-4)


def test_fashion_mnist_pixels_number_background_and_classes_apart(v1_store):
    out = str(v1_store)
    r = CliRunner().invoke(cli, ["add-labels", out, "--masks", "pixels", "--quiet", "--num-workers", "0"])
    assert r.exit_code == 0, r.output
    st = open_store(out)
    attrs = st.patch_label_sets()["2x2"]
    assert attrs["class_names"][0] == "background" and attrs["class_names"][1:] == st.class_names
    np.testing.assert_array_equal(st.patch_labels("2x2"), _fmnist_oracle(16, image_size=16, resize=18, grid=2))
    assert verify(st) == []


def test_fashion_mnist_pixels_match_the_numpy_oracle_at_the_demo_geometry(tmp_path):
    """The demo's geometry: EfficientNet-Lite0's preprocessing at 112 px (resize 128), grid 7x7."""
    from saev_store.datasets import create_dataset

    pre = PreprocessConfig(image_size=112, resize=128, mean=(0.498,) * 3, std=(0.502,) * 3)
    out = store_of(tmp_path / "d.zarr", create_dataset("fashion-mnist", root=FMNIST), pre, grids=((7, 7),), n=12)
    add_labels(AddLabelsConfig(store=out, masks=MaskConfig(masks="pixels"), num_workers=0, quiet=True))
    st = open_store(out)
    lab = st.patch_labels("7x7")
    np.testing.assert_array_equal(lab, _fmnist_oracle(12, image_size=112, resize=128, grid=7))
    labels = st.labels()
    for i in range(12):  # every patch is background or the image's own class + 1
        assert set(np.unique(lab[i])) <= {0, labels[i] + 1}


def test_add_labels_cli_refuses_a_store_without_patch_grids(tmp_path):
    from conftest import make_store
    from saev_store.layout import TokenLayout

    make_store(tmp_path / "c.zarr", {"h": np.zeros((4, 1, 3), np.float32)}, layouts={"h": TokenLayout(n_tokens=1, cls=0)},
               metadata={"dataset": {"kind": "fashion-mnist", "root": FMNIST, "split": "train"},
                         "preprocessing": PreprocessConfig().to_dict()})
    r = CliRunner().invoke(cli, ["add-labels", str(tmp_path / "c.zarr"), "--masks", "pixels", "--quiet"])
    assert r.exit_code == 2 and "stores patch tokens" in r.output


def test_add_labels_module_docstring_names_the_cli():
    assert "saev-store add-labels" in add_labels_mod.__doc__
