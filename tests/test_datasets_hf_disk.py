"""hf-disk: datasets saved with save_to_disk, read back through create_dataset."""

import io
import pickle

import datasets
import numpy as np
import pytest
from PIL import Image

from saev_store.datasets import BadImageError, create_dataset
from saev_store.errors import UserError

datasets.disable_progress_bars()


def _png_bytes(arr, mode=None):
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, "PNG")
    return buf.getvalue()


def _arrays(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (4, 6, 3), dtype=np.uint8) for _ in range(n)]


def _image_dataset(arrays, labels, names=("cat", "dog", "eel")):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names))})
    return datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in arrays], "label": labels}, features=features)


def test_dataset_with_image_and_classlabel(tmp_path, monkeypatch):
    arrays = _arrays(4)
    rgba = np.random.default_rng(9).integers(0, 256, (4, 6, 4), dtype=np.uint8)
    ds = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(a) for a in arrays] + [Image.fromarray(rgba, "RGBA")], "label": [2, 0, 1, 0, 1]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog", "eel"])}),
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    # labels() and load() must not go through datasets' own decoder: labels never decode, images are
    # decoded by our decoder (truncation and bomb handling).
    def refuse(*args, **kwargs):
        raise AssertionError("datasets decoded an image")

    monkeypatch.setattr(datasets.Image, "decode_example", refuse)
    src = create_dataset("hf-disk", root=str(tmp_path / "ds"), split="train")  # plain Dataset: split ignored
    assert len(src) == 5 and src.split == ""
    assert src.class_names == ["cat", "dog", "eel"]
    np.testing.assert_array_equal(src.labels(), np.array([2, 0, 1, 0, 1], np.int32))
    assert src.labels().dtype == np.int32
    assert src.image_ids() == ["0", "1", "2", "3", "4"]
    for i, arr in enumerate(arrays):
        np.testing.assert_array_equal(np.asarray(src.load(i)), arr)
    a = rgba[..., 3:].astype(np.float64) / 255
    expected = np.round(rgba[..., :3] * a + 255 * (1 - a)).astype(np.uint8)  # composited over white
    np.testing.assert_array_equal(np.asarray(src.load(4)), expected)
    d = src.describe()
    assert d["kind"] == "hf-disk" and d["n_images"] == 5 and d["options"] == {"image_column": "image", "label_column": "label"}
    clone = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(np.asarray(clone.load(2)), arrays[2])


def test_dataset_dict_needs_a_split(tmp_path):
    train, test = _arrays(3, 1), _arrays(2, 2)
    dd = datasets.DatasetDict({"train": _image_dataset(train, [0, 1, 2]), "test": _image_dataset(test, [2, 2])})
    dd.save_to_disk(str(tmp_path / "dd"))
    src = create_dataset("hf-disk", root=str(tmp_path / "dd"), split="test")
    assert len(src) == 2 and src.split == "test" and src.image_ids() == ["test/0", "test/1"]
    np.testing.assert_array_equal(src.labels(), [2, 2])
    np.testing.assert_array_equal(np.asarray(src.load(1)), test[1])
    with pytest.raises(UserError, match="DatasetDict; pass --split with one of (train, test|test, train)"):
        create_dataset("hf-disk", root=str(tmp_path / "dd"))
    with pytest.raises(UserError, match="no split 'val'"):
        create_dataset("hf-disk", root=str(tmp_path / "dd"), split="val")
    fp_train = create_dataset("hf-disk", root=str(tmp_path / "dd"), split="train").describe()["fingerprint"]
    assert fp_train != src.describe()["fingerprint"]


def test_missing_columns_and_unlabeled(tmp_path):
    arrays = _arrays(2)
    ds = datasets.Dataset.from_dict({"img": [Image.fromarray(a) for a in arrays], "caption": ["a", "b"]},
                                    features=datasets.Features({"img": datasets.Image(), "caption": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "ds"))
    root = str(tmp_path / "ds")
    with pytest.raises(UserError, match="no image column 'image'; its columns are img, caption"):
        create_dataset("hf-disk", root=root)
    with pytest.raises(UserError, match="no label column 'label'; its columns are img, caption"):
        create_dataset("hf-disk", root=root, image_column="img", label_column="label")
    src = create_dataset("hf-disk", root=root, image_column="img")  # no "label" column: unlabeled
    assert src.class_names is None
    np.testing.assert_array_equal(src.labels(), [-1, -1])
    np.testing.assert_array_equal(np.asarray(src.load(1)), arrays[1])
    # String labels: class names are the sorted distinct strings.
    src = create_dataset("hf-disk", root=root, image_column="img", label_column="caption")
    assert src.class_names == ["a", "b"]
    np.testing.assert_array_equal(src.labels(), [0, 1])
    with pytest.raises(UserError, match="holds .*Image.*expected a ClassLabel"):
        create_dataset("hf-disk", root=root, image_column="img", label_column="img")
    with pytest.raises(UserError, match="not a dataset written by datasets' save_to_disk"):
        create_dataset("hf-disk", root=str(tmp_path))


def test_path_and_bytes_columns_and_bad_rows(tmp_path):
    arrays = _arrays(3, 5)
    root = tmp_path / "ds"
    (tmp_path / "files").mkdir()
    abs_fpath = tmp_path / "files" / "abs.png"
    abs_fpath.write_bytes(_png_bytes(arrays[0]))
    good = _png_bytes(arrays[1])
    ds = datasets.Dataset.from_dict({
        "path": [str(abs_fpath), "rel.png", "missing.png"],
        "blob": [good, good[: len(good) // 2], b"junk"],
        "label": [3, 0, None],
    })
    ds.save_to_disk(str(root))
    (root / "rel.png").write_bytes(_png_bytes(arrays[2]))  # relative paths resolve against the dataset dir
    src = create_dataset("hf-disk", root=str(root), image_column="path")
    assert src.class_names == ["0", "1", "2", "3"]
    np.testing.assert_array_equal(src.labels(), [3, 0, -1])
    np.testing.assert_array_equal(np.asarray(src.load(0)), arrays[0])
    np.testing.assert_array_equal(np.asarray(src.load(1)), arrays[2])
    with pytest.raises(BadImageError, match="'2'.*missing.png"):
        src.load(2)
    src = create_dataset("hf-disk", root=str(root), image_column="blob")
    np.testing.assert_array_equal(np.asarray(src.load(0)), arrays[1])
    for i in (1, 2):
        with pytest.raises(BadImageError) as info:
            src.load(i)
        assert info.value.image_id == str(i)
    with pytest.raises(UserError, match="Image column 'label'.*expected an Image feature"):
        create_dataset("hf-disk", root=str(root), image_column="label")


def test_fingerprint_changes_with_content(tmp_path):
    import shutil

    _image_dataset(_arrays(3, 1), [0, 1, 2]).save_to_disk(str(tmp_path / "a"))
    fp = lambda name: create_dataset("hf-disk", root=str(tmp_path / name)).describe()["fingerprint"]  # noqa: E731
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    assert fp("a") == fp("copy")  # a copy elsewhere is the same dataset
    # Same state.json, different rows in the arrow file.
    _image_dataset(_arrays(4, 2), [0, 1, 2, 2]).save_to_disk(str(tmp_path / "b"))
    shutil.copytree(tmp_path / "a", tmp_path / "swapped")
    (arrow,) = (tmp_path / "swapped").glob("*.arrow")
    shutil.copyfile(next((tmp_path / "b").glob("*.arrow")), arrow)
    assert fp("swapped") != fp("a")
