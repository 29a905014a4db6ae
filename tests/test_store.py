"""The store API against independent oracles: numpy arrays in, the same bits out."""

import json
import os

import numpy as np
import pytest
import torch

from conftest import make_store
from saev_store import format as fmt
from saev_store.errors import UserError
from saev_store.layout import TokenLayout
from saev_store.store import HookSpec, create_store, open_store
from saev_store.verify import verify


def test_round_trip_float32_is_bitwise(tmp_path, rng):
    x = rng.standard_normal((10, 5, 6)).astype(np.float32)
    y = rng.standard_normal((10, 2, 3)).astype(np.float32)
    labels = rng.integers(0, 4, 10).astype(np.int32)
    make_store(tmp_path / "s.zarr", {"a": x, "b.c": y}, labels=labels, images_per_chunk=3)
    st = open_store(tmp_path / "s.zarr")
    assert st.read("a", 0, 10).tobytes() == x.tobytes()
    assert st.read("b.c", 0, 10).tobytes() == y.tobytes()
    assert np.array_equal(st.read_chunk("a", 3), x[9:10])
    assert st.labels().tolist() == labels.tolist()
    assert st.image_ids() == [f"img{i}" for i in range(10)]
    assert st.valid().all() and st.done().all() and st.complete
    assert st.n_chunks == 4 and st.chunk_bounds(3) == (9, 10)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_dtypes_match_torch_rounding(tmp_path, rng, dtype):
    """A second implementation of the rounding (torch's casts) is the oracle."""
    x = (rng.standard_normal((6, 5, 7)) * 10).astype(np.float32)
    make_store(tmp_path / "s.zarr", {"h": x}, store_dtype=dtype)
    st = open_store(tmp_path / "s.zarr")
    want = torch.from_numpy(x).to(getattr(torch, dtype)).float().numpy()
    assert st.read("h", 0, 6).tobytes() == want.tobytes()
    raw = st.acts("h")
    assert raw.dtype == np.dtype(fmt.ON_DISK_DTYPE[dtype])
    assert raw.attrs["dtype"] == dtype
    assert os.path.getsize(st.chunk_fpath("h", 0)) == 4 * 5 * 7 * 2 + 4  # half the bytes, plus the crc


def test_bf16_rounding_edge_cases():
    x = np.array([1.0, -0.0, np.inf, -np.inf, 3.0e38, 1e-40, np.nan, 1.00390625, 1.01171875], dtype=np.float32)
    got = fmt.bf16_to_f32(fmt.bf16_bits(x))
    want = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    assert np.array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    assert got[ok].tobytes() == want[ok].tobytes()


def test_statistics_equal_float64_numpy(tmp_path, rng):
    x = (rng.standard_normal((11, 5, 4)) * 3 + 7).astype(np.float32)
    valid = np.ones(11, dtype=bool)
    valid[[2, 7]] = False
    make_store(tmp_path / "s.zarr", {"h": x}, valid=valid, images_per_chunk=4)
    st = open_store(tmp_path / "s.zarr")
    for sel, idx in [("all", slice(None)), ("patches", slice(1, None)), ("cls", slice(0, 1))]:
        rows = x[valid][:, idx].reshape(-1, 4).astype(np.float64)
        mu = rows.mean(0)
        m = st.moments("h", sel)
        assert m.n_rows == rows.shape[0]
        np.testing.assert_allclose(m.mean, mu, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(m.rms_norm, np.sqrt(((rows - mu) ** 2).sum(1).mean()), rtol=1e-6)
        np.testing.assert_allclose(m.mean_norm, np.linalg.norm(rows, axis=1).mean(), rtol=1e-6)
        norm = st.normalizer("h", sel)
        z = norm.apply(x[0, idx])
        want = (x[0, idx].astype(np.float64) - mu) * np.sqrt(4) / np.sqrt(((rows - mu) ** 2).sum(1).mean())
        np.testing.assert_allclose(z, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(norm.invert(z), x[0, idx], rtol=1e-5, atol=1e-4)
    grp = st._root[fmt.stats_path("h", "patches")]
    assert set(grp.attrs) == set(fmt.STATS_FIELDS)


def test_chunks_are_whole_images_between_8_and_64_mib(tmp_path):
    lay = TokenLayout(n_tokens=197, cls=0, grid=(14, 14), grid_start=1)
    st = create_store(tmp_path / "s.zarr", n_images=10_000, hooks={"h": HookSpec(768, lay)})
    chunk_bytes = st.images_per_chunk * 197 * 768 * 4
    assert 8 << 20 <= chunk_bytes <= 64 << 20
    assert st.acts("h").chunks == (st.images_per_chunk, 197, 768)
    codecs = [type(c).__name__ for c in st.acts("h").metadata.codecs]
    assert codecs == ["BytesCodec", "Crc32cCodec"]


def test_chunk_file_is_raw_bytes_plus_crc32c(tmp_path, rng):
    """The documented byte layout (FORMAT.md) checked with an independent crc32c implementation."""
    import crc32c

    x = rng.standard_normal((8, 3, 5)).astype(np.float32)
    st = make_store(tmp_path / "s.zarr", {"h": x}, images_per_chunk=4)
    raw = open(st.chunk_fpath("h", 1), "rb").read()
    assert raw[:-4] == x[4:8].astype("<f4").tobytes()
    assert int.from_bytes(raw[-4:], "little") == crc32c.crc32c(raw[:-4])


def test_flipped_byte_is_reported_by_verify_and_by_reading(tmp_path, rng):
    x = rng.standard_normal((8, 3, 5)).astype(np.float32)
    st = make_store(tmp_path / "s.zarr", {"h": x}, images_per_chunk=4)
    assert verify(open_store(tmp_path / "s.zarr")) == []
    fpath = st.chunk_fpath("h", 1)
    data = bytearray(open(fpath, "rb").read())
    data[17] ^= 0x10
    open(fpath, "wb").write(bytes(data))
    st = open_store(tmp_path / "s.zarr")
    problems = verify(st)
    assert [(p.array, p.chunk) for p in problems] == [("acts/h", 1)]
    with pytest.raises(ValueError, match="checksum"):
        st.read("h", 4, 8)
    assert np.array_equal(st.read("h", 0, 4), x[:4])  # other chunks still read


def test_missing_chunk_and_unfinished_store_are_reported(tmp_path, rng):
    x = rng.standard_normal((8, 3, 5)).astype(np.float32)
    st = make_store(tmp_path / "s.zarr", {"h": x}, images_per_chunk=4, finalize=False)
    os.remove(st.chunk_fpath("h", 0))
    problems = [str(p) for p in verify(open_store(tmp_path / "s.zarr"))]
    assert any("acts/h chunk 0: chunk file is missing" in p for p in problems)
    assert any("statistics were never written" in p for p in problems)


def test_reader_refuses_other_format_versions(tmp_path, rng):
    make_store(tmp_path / "s.zarr", {"h": rng.standard_normal((2, 2, 2)).astype(np.float32)})
    meta_fpath = tmp_path / "s.zarr" / "zarr.json"
    meta = json.loads(meta_fpath.read_text())
    meta["attributes"]["saev_store"]["format_version"] = 2
    meta_fpath.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="version 2"):
        open_store(tmp_path / "s.zarr")


def test_open_errors_name_the_problem(tmp_path):
    with pytest.raises(UserError, match="no store at"):
        open_store(tmp_path / "nope.zarr")
    (tmp_path / "notastore").mkdir()
    (tmp_path / "notastore" / "x.txt").write_text("keep me")
    lay = TokenLayout(n_tokens=1, grid=(1, 1))
    with pytest.raises(UserError, match="not a saev-store"):
        create_store(tmp_path / "notastore", n_images=1, hooks={"h": HookSpec(1, lay)}, overwrite=True)
    assert (tmp_path / "notastore" / "x.txt").exists()


def test_write_refuses_non_finite_and_read_only(tmp_path):
    lay = TokenLayout(n_tokens=2, grid=(1, 2))
    st = create_store(tmp_path / "s.zarr", n_images=2, hooks={"h": HookSpec(3, lay)})
    x = np.zeros((2, 2, 3), dtype=np.float32)
    x[1, 0, 0] = np.nan
    with pytest.raises(UserError, match="NaN"):
        st.write_block(0, {"h": x})
    assert not st.done()[0]
    with pytest.raises(UserError, match="read-only"):
        open_store(tmp_path / "s.zarr").write_block(0, {"h": np.zeros((2, 2, 3), np.float32)})
    with pytest.raises(UserError, match="not complete"):
        st.normalizer("h", "patches")


def test_invalid_images_are_excluded_from_statistics_but_kept_as_rows(tmp_path, rng):
    x = rng.standard_normal((4, 2, 3)).astype(np.float32)
    valid = np.array([True, False, True, True])
    st = make_store(tmp_path / "s.zarr", {"h": x}, valid=valid, layouts={"h": TokenLayout(2, grid=(1, 2))})
    assert st.valid().tolist() == valid.tolist()
    assert st.moments("h", "all").n_rows == 6


def test_pending_chunks_partition_across_writers(tmp_path):
    lay = TokenLayout(n_tokens=1, grid=(1, 1))
    st = create_store(tmp_path / "s.zarr", n_images=10, hooks={"h": HookSpec(2, lay)}, images_per_chunk=2)
    st.write_block(1, {"h": np.ones((2, 1, 2), np.float32)})
    parts = [st.pending_chunks(r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == [0, 2, 3, 4]
    assert all(i % 3 == r for r, p in enumerate(parts) for i in p)


def test_remote_store_through_zarrs_fsspec_store(rng):
    """A URL goes through zarr's own stores (here fsspec's in-memory filesystem, standing in for
    s3:// or gs://): writing, reading, verifying and loading take zarr's path, not the local fast path."""
    from saev_store.loaders import ShuffledLoader

    x = rng.standard_normal((10, 5, 3)).astype(np.float32)
    url = f"memory://bucket/{rng.integers(1 << 30)}/s.zarr"
    st = create_store(url, n_images=10, hooks={"h": HookSpec(3, TokenLayout(5, cls=0, grid=(2, 2), grid_start=1))}, images_per_chunk=4)
    assert st.chunk_fpath("h", 0) is None
    for i in st.pending_chunks():
        a, b = st.chunk_bounds(i)
        st.write_block(i, {"h": x[a:b]}, labels=np.arange(a, b))
    st.finalize()
    remote = open_store(url)
    assert remote.read("h", 0, 10).tobytes() == x.tobytes()
    assert remote.complete and verify(remote) == [] and remote.labels().tolist() == list(range(10))
    rows = np.concatenate([b.numpy() for b in ShuffledLoader(remote, "h", batch_size=7, normalize=False)])
    want = x[:, 1:].reshape(-1, 3)
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, want.tolist()))
