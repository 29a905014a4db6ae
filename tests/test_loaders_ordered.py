"""OrderedLoader against the arrays the store was built from."""

import threading

import numpy as np
import pytest
import torch
from conftest import make_store

from saev_store.loaders import ImageBlock, OrderedLoader

torch.set_num_threads(1)


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((45, 5, 6)).astype(np.float32) * 2 - 0.5
    valid = rng.random(45) > 0.2
    labels = rng.integers(0, 3, 45).astype(np.int32)
    st = make_store(tmp_path / "s.zarr", {"h": x}, images_per_chunk=4, valid=valid, labels=labels)
    return st, x, valid, labels


@pytest.mark.parametrize("block_images", [1, 3, 4, 10, 100])
@pytest.mark.parametrize("tokens,sl", [("patches", slice(1, 5)), ("cls", slice(0, 1)), ("all", slice(0, 5))])
def test_blocks_walk_valid_images_in_order(data, block_images, tokens, sl):
    st, x, valid, labels = data
    mask = np.ones(45, dtype=bool)
    mask[10:20] = False
    loader = OrderedLoader(st, "h", tokens=tokens, block_images=block_images, image_mask=mask)
    blocks = list(loader)
    assert len(blocks) == len(loader)
    want = np.flatnonzero(valid & mask)
    images = np.concatenate([b.images for b in blocks])
    np.testing.assert_array_equal(images, want)
    assert all(isinstance(b, ImageBlock) and len(b.images) == block_images for b in blocks[:-1])
    for b in blocks:
        assert b.acts.dtype == torch.float32 and b.images.dtype == np.int64 and b.labels.dtype == np.int32
        assert b.acts.shape == (len(b.images), sl.stop - sl.start, 6)
        np.testing.assert_array_equal(b.acts.numpy(), x[b.images][:, sl])
        np.testing.assert_array_equal(b.labels, labels[b.images])
    assert len(list(loader)) == len(blocks), "a second pass yields the same blocks"


def test_normalized_blocks_match_float64(data):
    st, x, valid, _ = data
    rows = x[valid][:, 1:5].reshape(-1, 6).astype(np.float64)
    mean = rows.mean(axis=0)
    scale = np.sqrt(6) / np.sqrt(np.mean(np.sum((rows - mean) ** 2, axis=1)))
    for b in OrderedLoader(st, "h", normalize=True, block_images=6):
        np.testing.assert_allclose(b.acts.numpy(), (x[b.images][:, 1:5].astype(np.float64) - mean) * scale, rtol=1e-5, atol=1e-5)


def test_break_stops_readers(data):
    st, _, _, _ = data
    loader = OrderedLoader(st, "h", block_images=2, n_readers=3)
    for i, _ in enumerate(loader):
        if i == 2:
            break
    loader.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("saev-reader")]
