"""ShuffledLoader against the arrays the store was built from (numpy, float64 where it matters)."""

import json
import os
import threading

import numpy as np
import pytest
import torch
from conftest import make_store

from saev_store.errors import UserError
from saev_store.layout import TokenLayout
from saev_store.loaders import ShuffledLoader

torch.set_num_threads(1)

N, T, D, IPC = 61, 5, 8, 4  # 16 chunks, the last one partial; tokens = CLS + 2x2 grid
TOK = {"all": (0, 5), "patches": (1, 5), "cls": (0, 1)}


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((N, T, D)) * 3 + 1).astype(np.float32)
    valid = rng.random(N) > 0.15
    labels = rng.integers(0, 4, N).astype(np.int32)
    st = make_store(tmp_path / "s.zarr", {"h": x}, images_per_chunk=IPC, valid=valid, labels=labels)
    return st, x, valid


def all_rows(images_mask, tokens):
    a, b = TOK[tokens]
    ims = np.flatnonzero(images_mask)
    return {(int(i), t) for i in ims for t in range(a, b)}


def run(loader):
    xs, cs = [], []
    for x, c in loader:
        xs.append(x.numpy().copy())
        cs.append(c.numpy().copy())
    return xs, cs


def check_rows(xs, cs, x):
    for xb, cb in zip(xs, cs):
        assert xb.dtype == np.float32 and cb.dtype == np.int64
        np.testing.assert_array_equal(xb, x[cb[:, 0], cb[:, 1]])


@pytest.mark.parametrize("tokens", ["patches", "cls", "all"])
@pytest.mark.parametrize("n_readers", [1, 3])
def test_one_epoch_every_row_once(data, tokens, n_readers):
    st, x, valid = data
    # A buffer of a few chunks, so rows are drawn while later chunks still stream in.
    loader = ShuffledLoader(st, "h", batch_size=7, tokens=tokens, normalize=False, with_coords=True, n_readers=n_readers, buffer_mb=0.002)
    xs, cs = run(loader)
    coords = np.concatenate(cs)
    got = [tuple(r) for r in coords.tolist()]
    assert len(got) == len(set(got)) == loader.n_rows_per_epoch
    assert set(got) == all_rows(valid, tokens)
    check_rows(xs, cs, x)
    assert all(len(b) == 7 for b in xs[:-1]) and 1 <= len(xs[-1]) <= 7
    assert len(xs) == len(loader)


def test_image_mask_and_two_epochs(data):
    st, x, valid = data
    mask = np.zeros(N, dtype=bool)
    mask[::3] = True
    loader = ShuffledLoader(st, "h", batch_size=5, normalize=False, with_coords=True, image_mask=mask, n_epochs=2, buffer_mb=0.002)
    xs, cs = run(loader)
    coords = [tuple(r) for r in np.concatenate(cs).tolist()]
    want = all_rows(valid & mask, "patches")
    assert set(coords) == want
    counts = {}
    for r in coords:
        counts[r] = counts.get(r, 0) + 1
    assert set(counts.values()) == {2}
    check_rows(xs, cs, x)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_partition_the_epoch(data, world_size, drop_last):
    st, x, valid = data
    per_rank, n_batches = [], []
    for rank in range(world_size):
        loader = ShuffledLoader(
            st, "h", batch_size=6, normalize=False, with_coords=True, rank=rank, world_size=world_size, drop_last=drop_last, buffer_mb=0.002
        )
        xs, cs = run(loader)
        check_rows(xs, cs, x)
        per_rank.append([tuple(r) for r in np.concatenate(cs).tolist()])
        n_batches.append(len(xs))
        assert all(len(b) > 0 for b in xs)
        if drop_last:
            assert all(len(b) == 6 for b in xs)
    assert len(set(n_batches)) == 1, "DDP needs the same number of steps on every rank"
    union = [r for rows in per_rank for r in rows]
    assert len(union) == len(set(union)), "ranks overlap"
    whole = all_rows(valid, "patches")
    if drop_last:
        assert set(union) <= whole and len(whole) - len(union) < world_size * 6 + world_size
    else:
        assert set(union) == whole
        sizes = [len(r) for r in per_rank]
        assert max(sizes) - min(sizes) <= 1


def test_same_seed_same_order_any_readers(data):
    st, _, _ = data
    a = run(ShuffledLoader(st, "h", batch_size=9, with_coords=True, seed=3, n_readers=1, buffer_mb=0.002))
    b = run(ShuffledLoader(st, "h", batch_size=9, with_coords=True, seed=3, n_readers=4, buffer_mb=0.002))
    c = run(ShuffledLoader(st, "h", batch_size=9, with_coords=True, seed=4, n_readers=4, buffer_mb=0.002))
    for u, v in zip(a[0] + a[1], b[0] + b[1]):
        np.testing.assert_array_equal(u, v)
    assert not all(np.array_equal(u, v) for u, v in zip(a[1], c[1]))


@pytest.mark.parametrize(
    "kw",
    [
        dict(n_epochs=2),
        dict(n_rows=500, world_size=2, rank=1),
        dict(n_epochs=1, drop_last=True, world_size=3, rank=2),
    ],
)
def test_restore_continues_exactly(data, kw):
    st, _, _ = data
    args = dict(batch_size=7, with_coords=True, seed=5, buffer_mb=0.002, n_readers=2, **kw)
    full = run(ShuffledLoader(st, "h", **args))
    n = len(full[0])
    for stop in (0, 1, n // 3, n - 1, n):
        first = ShuffledLoader(st, "h", **args)
        head = [next(first) for _ in range(stop)]
        state = json.loads(json.dumps(first.state_dict()))
        first.close()
        resumed = ShuffledLoader(st, "h", **args)
        resumed.load_state_dict(state)
        tail = run(resumed)
        xs = [h[0].numpy() for h in head] + tail[0]
        cs = [h[1].numpy() for h in head] + tail[1]
        assert len(xs) == n
        for u, v in zip(xs + cs, full[0] + full[1]):
            np.testing.assert_array_equal(u, v)


def test_restore_refuses_other_settings(data):
    st, _, _ = data
    a = ShuffledLoader(st, "h", batch_size=7, seed=1, buffer_mb=0.002)
    next(a)
    b = ShuffledLoader(st, "h", batch_size=7, seed=2, buffer_mb=0.002)
    with pytest.raises(UserError, match="seed"):
        b.load_state_dict(a.state_dict())


def test_n_rows_spans_epochs(data):
    st, _, valid = data
    r = int(valid.sum()) * 4
    loader = ShuffledLoader(st, "h", batch_size=64, with_coords=True, n_rows=2 * r + r // 2, buffer_mb=0.004)
    xs, cs = run(loader)
    assert sum(len(b) for b in xs) == 2 * r + r // 2 == loader.n_rows_total
    coords = [tuple(c) for c in np.concatenate(cs).tolist()]
    counts = np.array(list({c: coords.count(c) for c in set(coords)}.values()))
    assert set(coords) == all_rows(valid, "patches") and counts.max() <= 3


def test_normalization_matches_float64(data):
    st, x, valid = data
    rows = x[valid][:, 1:5].reshape(-1, D).astype(np.float64)
    mean = rows.mean(axis=0)
    scale = np.sqrt(D) / np.sqrt(np.mean(np.sum((rows - mean) ** 2, axis=1)))
    loader = ShuffledLoader(st, "h", batch_size=16, with_coords=True, buffer_mb=0.002)
    xs, cs = run(loader)
    for xb, cb in zip(xs, cs):
        want = (x[cb[:, 0], cb[:, 1]].astype(np.float64) - mean) * scale
        np.testing.assert_allclose(xb, want, rtol=1e-5, atol=1e-5)
    all_x = np.concatenate(xs).astype(np.float64)
    np.testing.assert_allclose(np.mean(np.sum(all_x**2, axis=1)), D, rtol=1e-5)
    np.testing.assert_allclose(loader.normalizer.mean, mean, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("store_dtype,torch_dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_half_stores_decode_like_torch(tmp_path, store_dtype, torch_dtype):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((20, 5, 8)).astype(np.float32)
    st = make_store(tmp_path / "h.zarr", {"h": x}, images_per_chunk=3, store_dtype=store_dtype)
    want = torch.from_numpy(x).to(torch_dtype).float().numpy()
    xs, cs = run(ShuffledLoader(st, "h", batch_size=8, tokens="all", normalize=False, with_coords=True, buffer_mb=0.001))
    assert sum(len(b) for b in xs) == 100
    check_rows(xs, cs, want)


def test_cnn_layout_without_cls(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((10, 6, 4)).astype(np.float32)
    st = make_store(tmp_path / "c.zarr", {"conv": x}, images_per_chunk=3, layouts={"conv": TokenLayout.cnn(2, 3)})
    xs, cs = run(ShuffledLoader(st, "conv", batch_size=8, normalize=False, with_coords=True))
    assert {tuple(c) for c in np.concatenate(cs).tolist()} == {(i, t) for i in range(10) for t in range(6)}
    with pytest.raises(UserError, match="cls"):
        ShuffledLoader(st, "conv", batch_size=8, tokens="cls")


def test_user_errors(data, tmp_path):
    st, _, _ = data
    with pytest.raises(UserError, match="no hook 'nope'"):
        ShuffledLoader(st, "nope", batch_size=4)
    with pytest.raises(UserError, match="image_mask"):
        ShuffledLoader(st, "h", batch_size=4, image_mask=np.ones(3, dtype=bool))
    with pytest.raises(UserError, match="buffer_mb"):
        ShuffledLoader(st, "h", batch_size=4, buffer_mb=1e-5)
    with pytest.raises(UserError, match="rank"):
        ShuffledLoader(st, "h", batch_size=4, rank=2, world_size=2)
    with pytest.raises(UserError, match="no image"):
        ShuffledLoader(st, "h", batch_size=4, image_mask=np.zeros(N, dtype=bool))
    x = np.ones((8, 5, 8), np.float32)
    part = make_store(tmp_path / "p.zarr", {"h": x}, images_per_chunk=4, finalize=False)
    part.array("done")[1] = False
    with pytest.raises(UserError, match="incomplete"):
        ShuffledLoader(str(tmp_path / "p.zarr"), "h", batch_size=4, normalize=False)


def reader_threads():
    return [t for t in threading.enumerate() if t.name.startswith("saev-reader")]


def test_no_leaks_on_break_exhaust_restore(data):
    st, _, _ = data
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    children_before = child_pids()  # other tests' processes (browsers, workers) may still be exiting
    assert not reader_threads()
    loader = ShuffledLoader(st, "h", batch_size=7, n_readers=3, buffer_mb=0.002)
    for i, _ in enumerate(loader):
        if i == 3:
            break
    assert reader_threads()
    state = loader.state_dict()
    loader.close()
    assert not reader_threads()
    with ShuffledLoader(st, "h", batch_size=7, n_readers=3, buffer_mb=0.002) as again:
        again.load_state_dict(state)
        next(again)
    assert not reader_threads()
    exhausted = ShuffledLoader(st, "h", batch_size=7, n_readers=3, buffer_mb=0.002)
    list(exhausted)
    assert not reader_threads()
    dropped = ShuffledLoader(st, "h", batch_size=7, n_readers=3, buffer_mb=0.002)
    next(dropped)
    del dropped
    assert not reader_threads()
    assert not (set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()) - shm_before
    assert child_pids() - children_before == set()


def child_pids():
    out = set()
    for tid in os.listdir(f"/proc/{os.getpid()}/task"):
        with open(f"/proc/{os.getpid()}/task/{tid}/children") as f:
            out |= set(f.read().split())
    return out
