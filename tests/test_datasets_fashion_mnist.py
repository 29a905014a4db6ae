"""Fashion-MNIST idx reader against an independent numpy parser and hand-written idx files."""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest

from saev_store.datasets import create_dataset
from saev_store.errors import UserError

DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"
needs_debian = pytest.mark.skipif(
    not os.path.isfile(os.path.join(DEBIAN_ROOT, "t10k-labels-idx1-ubyte.gz")),
    reason="dataset-fashion-mnist is not installed",
)


def _oracle(stem):
    """Minimal reader: fixed offsets 16 (images) and 8 (labels), 28x28, no header checks."""
    with gzip.open(os.path.join(DEBIAN_ROOT, f"{stem}-images-idx3-ubyte.gz")) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(os.path.join(DEBIAN_ROOT, f"{stem}-labels-idx1-ubyte.gz")) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return images, labels


@needs_debian
@pytest.mark.parametrize("split,stem,n", [("train", "train", 60000), ("test", "t10k", 10000)])
def test_debian_files_match_oracle(split, stem, n):
    src = create_dataset("fashion-mnist", root=None, split=split)
    images, labels = _oracle(stem)
    assert len(src) == n == len(labels)
    assert src.labels().dtype == np.int32
    np.testing.assert_array_equal(src.labels(), labels.astype(np.int32))
    assert src.class_names[0] == "T-shirt/top" and src.class_names[9] == "Ankle boot" and len(src.class_names) == 10
    for i in (0, 1, n // 2, n - 1):
        img = src.load(i)
        assert img.mode == "RGB" and img.size == (28, 28)
        arr = np.asarray(img)
        for c in range(3):
            np.testing.assert_array_equal(arr[..., c], images[i])
    ids = src.image_ids()
    assert ids[0] == f"{split}/0" and ids[-1] == f"{split}/{n - 1}" and len(ids) == n


@needs_debian
def test_debian_all_split_is_train_then_test():
    src = create_dataset("fashion-mnist", split="all")
    train_images, train_labels = _oracle("train")
    test_images, test_labels = _oracle("t10k")
    assert len(src) == 70000
    np.testing.assert_array_equal(src.labels(), np.concatenate([train_labels, test_labels]))
    np.testing.assert_array_equal(np.asarray(src.load(59999))[..., 0], train_images[59999])
    np.testing.assert_array_equal(np.asarray(src.load(60000))[..., 1], test_images[0])
    ids = src.image_ids()
    assert ids[59999] == "train/59999" and ids[60000] == "test/0"
    d = src.describe()
    assert d["kind"] == "fashion-mnist" and d["split"] == "all" and d["n_images"] == 70000
    assert d["root"] == DEBIAN_ROOT and d["fingerprint"].startswith("sha256:")
    assert d["fingerprint"] != create_dataset("fashion-mnist", split="train").describe()["fingerprint"]


def _idx_bytes(arr: np.ndarray, magic_type=0x08) -> bytes:
    return bytes([0, 0, magic_type, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def _write_split(dpath, stem, images, labels, gz, magic_images=0x08):
    for name, arr in ((f"{stem}-images-idx3-ubyte", images), (f"{stem}-labels-idx1-ubyte", labels)):
        data = _idx_bytes(arr, magic_images if "images" in name else 0x08)
        if gz:
            with gzip.open(os.path.join(dpath, name + ".gz"), "wb") as f:
                f.write(data)
        else:
            with open(os.path.join(dpath, name), "wb") as f:
                f.write(data)


def _synthetic(tmp_path, name, gz, seed=0):
    rng = np.random.default_rng(seed)
    dpath = tmp_path / name
    dpath.mkdir()
    tr_x, tr_y = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8), rng.integers(0, 10, 5, dtype=np.uint8)
    te_x, te_y = rng.integers(0, 256, (2, 4, 3), dtype=np.uint8), rng.integers(0, 10, 2, dtype=np.uint8)
    _write_split(dpath, "train", tr_x, tr_y, gz)
    _write_split(dpath, "t10k", te_x, te_y, gz)
    return str(dpath), (tr_x, tr_y, te_x, te_y)


@pytest.mark.parametrize("gz", [True, False])
def test_synthetic_round_trip(tmp_path, gz):
    root, (tr_x, tr_y, te_x, te_y) = _synthetic(tmp_path, "d", gz)
    src = create_dataset("fashion-mnist", root=root, split="all")
    assert len(src) == 7
    np.testing.assert_array_equal(src.labels(), np.concatenate([tr_y, te_y]))
    expected = np.concatenate([tr_x, te_x])
    for i in range(7):
        arr = np.asarray(src.load(i))
        assert arr.shape == (4, 3, 3)  # (h, w, rgb): idx dims are (n, rows, cols)
        np.testing.assert_array_equal(arr, np.repeat(expected[i][..., None], 3, axis=-1))
    assert src.image_ids() == [f"train/{i}" for i in range(5)] + ["test/0", "test/1"]
    clone = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(np.asarray(clone.load(6)), np.asarray(src.load(6)))
    with pytest.raises(IndexError):
        src.load(7)


def test_fingerprint_follows_content_not_compression(tmp_path):
    gz_root, _ = _synthetic(tmp_path, "gz", gz=True, seed=1)
    raw_root, _ = _synthetic(tmp_path, "raw", gz=False, seed=1)
    other_root, _ = _synthetic(tmp_path, "other", gz=False, seed=2)
    fp = lambda root: create_dataset("fashion-mnist", root=root).describe()["fingerprint"]  # noqa: E731
    assert fp(gz_root) == fp(raw_root)
    assert fp(gz_root) != fp(other_root)


def test_corrupt_header_names_file(tmp_path):
    dpath = tmp_path / "bad"
    dpath.mkdir()
    x, y = np.zeros((3, 2, 2), np.uint8), np.zeros(3, np.uint8)
    _write_split(str(dpath), "train", x, y, gz=True, magic_images=0x09)  # 0x09 = signed bytes: wrong type
    with pytest.raises(UserError, match="train-images-idx3-ubyte.gz starts with magic number 0x00000903"):
        create_dataset("fashion-mnist", root=str(dpath))


def test_truncated_file_names_file(tmp_path):
    dpath = tmp_path / "short"
    dpath.mkdir()
    _write_split(str(dpath), "train", np.zeros((3, 2, 2), np.uint8), np.zeros(3, np.uint8), gz=False)
    fpath = dpath / "train-images-idx3-ubyte"
    fpath.write_bytes(fpath.read_bytes()[:-1])
    src = create_dataset("fashion-mnist", root=str(dpath))  # only the header is read up front
    with pytest.raises(UserError, match="train-images-idx3-ubyte is 27 bytes.*needs 28"):
        src.load(0)


def test_mismatched_counts_and_labels(tmp_path):
    dpath = tmp_path / "mismatch"
    dpath.mkdir()
    _write_split(str(dpath), "train", np.zeros((3, 2, 2), np.uint8), np.zeros(4, np.uint8), gz=False)
    with pytest.raises(UserError, match="3 images but .* 4 labels"):
        create_dataset("fashion-mnist", root=str(dpath))
    dpath = tmp_path / "label11"
    dpath.mkdir()
    _write_split(str(dpath), "train", np.zeros((2, 2, 2), np.uint8), np.array([1, 11], np.uint8), gz=False)
    with pytest.raises(UserError, match="label 11"):
        create_dataset("fashion-mnist", root=str(dpath))


def test_missing_dir_and_files_say_apt_get(tmp_path):
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        create_dataset("fashion-mnist", root=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="train-images-idx3-ubyte.*missing.*apt-get install dataset-fashion-mnist"):
        create_dataset("fashion-mnist", root=str(tmp_path / "empty"))


def test_bad_split_and_options(tmp_path):
    root, _ = _synthetic(tmp_path, "d", gz=False)
    with pytest.raises(UserError, match="no split 'val'.*train, test, all"):
        create_dataset("fashion-mnist", root=root, split="val")
    with pytest.raises(UserError, match="does not take option"):
        create_dataset("fashion-mnist", root=root, image_column="img")
    with pytest.raises(UserError, match="Unknown dataset kind 'mnist'"):
        create_dataset("mnist", root=root)
    assert len(create_dataset("fashion-mnist", root=root, split="test", image_column=None)) == 2
