"""RecordDataset through a DataLoader: workers give the same tensors as the main process; bad images flagged."""

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from saev_store.datasets import create_dataset
from saev_store.datasets.torch_dataset import RecordBatch, RecordDataset, collate

datasets.disable_progress_bars()
SIDE = 8


def to_tensor_8(img: Image.Image) -> torch.Tensor:
    """Module-level (picklable) transform: resize to 8x8, scale to [0, 1], CHW."""
    arr = np.asarray(img.resize((SIDE, SIDE), Image.BILINEAR), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def _folder(tmp_path):
    root = tmp_path / "imgs"
    arrays = {}
    rng = np.random.default_rng(0)
    for k, (cls, name) in enumerate([("a", "0.png"), ("a", "1.jpg"), ("b", "2.png"), ("b", "3.png"), ("c", "4.png")]):
        (root / cls).mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)  # already 8x8: resize is the identity
        Image.fromarray(arr).save(root / cls / name, **({"quality": 95} if name.endswith(".jpg") else {}))
        arrays[f"{cls}/{name}"] = arr
    bad = root / "b" / "3.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    return root, arrays


def _collect(loader):
    batches = list(loader)
    assert all(isinstance(b, RecordBatch) for b in batches)
    return (torch.cat([b.index for b in batches]), torch.cat([b.images for b in batches]),
            torch.cat([b.ok for b in batches]), sum((b.errors for b in batches), []))


@pytest.mark.parametrize("context", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_workers_match_main_process_and_flag_bad_images(tmp_path, context):
    root, arrays = _folder(tmp_path)
    src = create_dataset("folder", root=str(root))
    indices = [4, 3, 0, 1, 2]
    ds = RecordDataset(src, to_tensor_8, indices)
    serial = _collect(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=0, collate_fn=collate))
    parallel = _collect(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate,
                                                    multiprocessing_context=context))
    for s, p in zip(serial[:3], parallel[:3]):
        assert torch.equal(s, p)
    assert serial[3] == parallel[3]
    index, images, ok, errors = serial
    assert index.tolist() == indices and index.dtype == torch.int64
    assert images.shape == (5, 3, SIDE, SIDE) and images.dtype == torch.float32
    ids = src.image_ids()
    assert ok.tolist() == [ids[i] != "b/3.png" for i in indices]
    j_bad = indices.index(ids.index("b/3.png"))
    assert str(root / "b" / "3.png") in errors[j_bad] and "not an image PIL can read" in errors[j_bad]
    assert torch.count_nonzero(images[j_bad]) == 0
    for j, i in enumerate(indices):
        if ok[j] and not ids[i].endswith(".jpg"):  # lossless files: exact oracle
            expected = torch.from_numpy(arrays[ids[i]].transpose(2, 0, 1).astype(np.float32) / 255.0)
            assert torch.equal(images[j], expected), ids[i]
        if ok[j]:
            assert errors[j] == ""


def test_other_sources_pickle_into_workers(tmp_path):
    rng = np.random.default_rng(3)
    arrays = [rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8) for _ in range(4)]
    datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in arrays], "label": [0, 1, 0, 1]},
                               features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
                               ).save_to_disk(str(tmp_path / "hf"))
    src = create_dataset("hf-disk", root=str(tmp_path / "hf"))
    ds = RecordDataset(src, to_tensor_8)
    _, images, ok, _ = _collect(torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate))
    assert ok.all()
    expected = torch.stack([torch.from_numpy(a.transpose(2, 0, 1).astype(np.float32) / 255.0) for a in arrays])
    assert torch.equal(images, expected)


def test_blank_shape_and_bad_indices(tmp_path):
    root, _ = _folder(tmp_path)
    src = create_dataset("folder", root=str(root))
    ds = RecordDataset(src, to_tensor_8, [src.image_ids().index("b/3.png")], image_shape=(3, 5, 7))
    index, image, ok, error = ds[0]
    assert image.shape == (3, 5, 7) and not ok and "b/3.png" in error
    with pytest.raises(IndexError, match="outside"):
        RecordDataset(src, to_tensor_8, [0, 5])
    with pytest.raises(ValueError, match="transform must return a \\(3, H, W\\) tensor"):
        RecordDataset(src, lambda img: torch.zeros(SIDE, SIDE))[0]
