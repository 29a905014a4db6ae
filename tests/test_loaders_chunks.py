"""The fast chunk reader against zarr's own read, bit for bit, and its corruption checks."""

import numpy as np
import pytest
from conftest import make_store

import saev_store.loaders.chunks as chunks
from saev_store.loaders import ChunkCorruptError, ChunkReader, OrderedLoader, ShuffledLoader


@pytest.mark.parametrize("store_dtype", ["float32", "float16", "bfloat16"])
def test_fast_path_equals_zarr_bitwise(tmp_path, store_dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((23, 5, 6)).astype(np.float32)
    st = make_store(tmp_path / "s.zarr", {"h": x}, images_per_chunk=4, store_dtype=store_dtype)
    fast, slow = ChunkReader(st, "h", fast=True), ChunkReader(st, "h", fast=False)
    assert fast.fast and not slow.fast
    z = st.acts("h")
    buf = fast.new_buffer()
    for i in range(st.n_chunks):
        a, b = st.chunk_bounds(i)
        got = fast.read(i, buf)
        want = np.asarray(z[a:b])
        assert got.shape == want.shape
        assert got.tobytes() == want.tobytes()
        assert slow.read(i).tobytes() == want.tobytes()


def test_loaders_same_on_zarr_fallback(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((30, 5, 6)).astype(np.float32)
    valid = rng.random(30) > 0.2
    st = make_store(tmp_path / "s.zarr", {"h": x}, images_per_chunk=4, valid=valid)

    def stream():
        loader = ShuffledLoader(st, "h", batch_size=9, with_coords=True, buffer_mb=0.002)
        out = [(a.numpy().copy(), c.numpy().copy()) for a, c in loader]
        blocks = [(b.acts.numpy().copy(), b.images) for b in OrderedLoader(st, "h", block_images=7)]
        return loader._reader.fast, out, blocks

    fast, a, blocks_a = stream()
    monkeypatch.setattr(chunks, "fast_path_ok", lambda store, hook: False)
    slow, b, blocks_b = stream()
    assert fast and not slow
    for (xa, ca), (xb, cb) in zip(a, b):
        assert xa.tobytes() == xb.tobytes() and np.array_equal(ca, cb)
    assert len(blocks_a) == len(blocks_b)
    for (xa, ia), (xb, ib) in zip(blocks_a, blocks_b):
        assert xa.tobytes() == xb.tobytes() and np.array_equal(ia, ib)


def test_non_default_codecs_use_zarr(tmp_path):
    x = np.ones((8, 5, 6), np.float32)
    st = make_store(tmp_path / "s.zarr", {"h": x}, images_per_chunk=4)
    meta = tmp_path / "s.zarr" / "acts" / "h" / "zarr.json"
    meta.write_text(meta.read_text().replace('"crc32c"', '"zstd"'))
    assert not chunks.fast_path_ok(st, "h")


def test_corrupt_and_truncated_chunks_are_named(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((12, 5, 6)).astype(np.float32)
    st = make_store(tmp_path / "s.zarr", {"h": x}, images_per_chunk=4)
    fpath = st.chunk_fpath("h", 1)
    raw = bytearray(open(fpath, "rb").read())
    raw[17] ^= 0x40
    open(fpath, "wb").write(bytes(raw))
    with pytest.raises(ChunkCorruptError, match=r"chunk 1 \(images 4..7\).*crc32c"):
        ChunkReader(st, "h").read(1)
    with pytest.raises(ChunkCorruptError, match="chunk 1"):
        list(ShuffledLoader(st, "h", batch_size=4, normalize=False))
    open(fpath, "wb").write(bytes(raw[:-10]))
    with pytest.raises(ChunkCorruptError, match="chunk 1.*truncated"):
        ChunkReader(st, "h").read(1)
