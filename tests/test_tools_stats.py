"""Per-latent statistics and top-k exemplars against brute-force numpy over all activations (float64)."""

import numpy as np
import pytest
import scipy.stats
import torch

import tools.topk as topk_mod
from saev_store.errors import UserError
from tools.accumulate import LatentAccumulator, label_entropy
from tools.topk import load_topk, run_topk
from tools_helpers import (HOOK, assert_matches_oracle, assert_matches_patchsae, make_sae, make_store, oracle_latents,
                           oracle_patchsae, oracle_stats)

torch.set_num_threads(2)
GRID = (4, 4)


@pytest.mark.parametrize("block,chunk", [(60, None), (60, 4), (7, 3), (1, None)])
def test_accumulator_matches_bruteforce_on_any_blocking(block, chunk):
    # Quarter-integer latents with many exact ties (zeros and repeats) exercise the tie rule.
    rng = np.random.default_rng(block)
    n, t, n_lat, k = 60, 16, 30, 5
    z = np.maximum(rng.integers(-6, 4, size=(n, t, n_lat)) / 4, 0).astype(np.float32)
    images = np.sort(rng.choice(500, size=n, replace=False)).astype(np.int64)
    labels = rng.integers(-1, 4, size=n).astype(np.int32)
    o = oracle_stats(z, images, labels, k=k, tau=0.2, n_classes=4)
    acc = LatentAccumulator(n_lat, t, k=k, tau=0.2, n_classes=4, chunk_images=chunk)
    parts = []
    for s in range(0, n, block):
        parts.append(acc.update(torch.from_numpy(z[s : s + block]), images[s : s + block], labels[s : s + block]))
    counts = type(parts[0])(*(np.concatenate([getattr(p, f) for p in parts]) for f in parts[0]._fields))
    assert_matches_oracle(acc.result(), o, counts, images)


def test_accumulator_refuses_unordered_blocks():
    acc = LatentAccumulator(3, 2, k=2)
    acc.update(torch.ones(2, 2, 3), np.array([4, 5]), np.array([0, 0]))
    with pytest.raises(ValueError, match="increasing"):
        acc.update(torch.ones(1, 2, 3), np.array([5]), np.array([0]))


def test_label_entropy_matches_scipy():
    rng = np.random.default_rng(3)
    values = rng.random((50, 8)).astype(np.float32)
    labels = rng.integers(-1, 5, size=(50, 8))
    values[0] = 0  # no mass: NaN
    labels[1] = -1  # no labeled exemplar: NaN
    got = label_entropy(values, labels)
    assert np.isnan(got[0]) and np.isnan(got[1])
    for row in range(2, 50):
        mass = np.bincount(labels[row][labels[row] >= 0], weights=values[row][labels[row] >= 0], minlength=5)
        assert got[row] == pytest.approx(scipy.stats.entropy(mass), rel=1e-9)


@pytest.fixture
def small_store(tmp_path):
    path = tmp_path / "s.zarr"
    x, labels, valid = make_store(path, 45, d=8, grid=GRID, images_per_chunk=8)
    return path, x, labels, valid


def test_topk_pass_matches_bruteforce(small_store, tmp_path):
    path, x, labels, valid = small_store
    saes = {"a": make_sae(8, 24, seed=1), "b": make_sae(8, 40, seed=2)}
    res = run_topk(saes, path, tmp_path / "out", k=6, tau=0.2, block_images=5, quiet=True)
    assert res.n_images == int(valid.sum()) and res.n_blocks > 1
    for name, sae in saes.items():
        z, images = oracle_latents(x, valid, sae, GRID)
        o = oracle_stats(z, images, labels[valid], k=6, tau=0.2, n_classes=3)
        data = load_topk(tmp_path / "out", name)  # read back from the files a script would load
        assert data.index["n_images"] == int(valid.sum()) and data.grid == GRID and data.class_names == ["a", "b", "c"]
        assert_matches_oracle(data.stats, o, data.image_counts(), images)
        # The test data has ties and latents that fire rarely: the comparison above covers both.
        assert (data.stats.top["max"].images == -1).any() or (o["n_images_active"] >= 6).all()


def test_store_over_memory_budget_equals_whole_store(small_store, tmp_path, monkeypatch):
    path, *_ = small_store
    saes = {"a": make_sae(8, 24, seed=1), "b": make_sae(8, 40, seed=2)}
    whole = run_topk(saes, path, tmp_path / "whole", k=4, block_images=10_000, quiet=True)
    monkeypatch.setattr(topk_mod, "_COUNTS_FLUSH", 50)  # the sparse counts reach disk in many appends too
    # A budget that holds about three images forces many blocks (not aligned to the store's chunks).
    per_image_mb = 12 * 17 * 8 / 2**20  # tools.topk.plan_block_images: 12 * T * d bytes per image (T: all tokens)
    small = run_topk(saes, path, tmp_path / "small", k=4, memory_mb=3 * per_image_mb, quiet=True)
    assert whole.n_blocks == 1 and small.n_blocks >= 10 and small.block_images == 3
    for name in saes:
        a, b = load_topk(tmp_path / "whole", name), load_topk(tmp_path / "small", name)
        for f in ("n_patches_active", "n_images_active", "max_act", "count_dataset", "count_class"):
            np.testing.assert_array_equal(getattr(a.stats, f), getattr(b.stats, f))
        np.testing.assert_allclose(a.stats.sum_active, b.stats.sum_active, rtol=1e-12)
        for r in ("max", "mean"):
            for f in ("values", "images", "labels", "patches", "entropy"):
                np.testing.assert_array_equal(getattr(a.stats.top[r], f), getattr(b.stats.top[r], f))
        ca, cb = a.image_counts(), b.image_counts()
        for f in ca._fields:
            np.testing.assert_array_equal(getattr(ca, f), getattr(cb, f))


def test_several_saes_share_one_read(small_store, tmp_path, monkeypatch):
    path, *_ = small_store
    saes = {f"s{i}": make_sae(8, 16, seed=i) for i in range(3)}
    calls = []
    real = topk_mod.iter_image_blocks

    def counting(*args, **kwargs):
        calls.append(1)
        yield from real(*args, **kwargs)

    monkeypatch.setattr(topk_mod, "iter_image_blocks", counting)
    run_topk(saes, path, tmp_path / "all", k=3, block_images=6, quiet=True)
    assert len(calls) == 1
    # ... and processing them together changes nothing for any of them.
    run_topk({"s1": saes["s1"]}, path, tmp_path / "one", k=3, block_images=6, quiet=True)
    a, b = load_topk(tmp_path / "all", "s1").stats, load_topk(tmp_path / "one", "s1").stats
    np.testing.assert_array_equal(a.top["max"].images, b.top["max"].images)
    np.testing.assert_array_equal(a.count_class, b.count_class)


def test_errors_are_user_errors(small_store, tmp_path):
    path, *_ = small_store
    with pytest.raises(UserError, match="width 5"):
        run_topk({"a": make_sae(5, 8)}, path, tmp_path / "o", quiet=True)
    run_topk({"a": make_sae(8, 8)}, path, tmp_path / "o", quiet=True)
    with pytest.raises(UserError, match="--overwrite"):
        run_topk({"a": make_sae(8, 8)}, path, tmp_path / "o", quiet=True)
    with pytest.raises(UserError, match="hook"):
        run_topk({"a": make_sae(8, 8)}, path, tmp_path / "p", hook="nope", quiet=True)
    # A crashed earlier run leaves OUT.partial; the next run replaces it and finishes.
    (tmp_path / "q.partial").mkdir()
    (tmp_path / "q.partial" / "junk").write_text("x")
    run_topk({"a": make_sae(8, 8)}, path, tmp_path / "q", quiet=True)
    assert not (tmp_path / "q.partial").exists() and (tmp_path / "q" / "index.json").is_file()
    assert HOOK in load_topk(tmp_path / "q").index["hook"]


@pytest.mark.parametrize("tokens", ["all", "patches"])
def test_topk_mines_the_tokens_the_sae_was_trained_on(small_store, tmp_path, tokens):
    """An SAE trained on all tokens is mined on all of them (CLS included: its +50 offset shows in every
    statistic), its heatmaps still on the patch grid; a patch SAE on the patches only."""
    path, x, labels, valid = small_store
    sae = make_sae(8, 24, seed=3, tokens=tokens)
    run_topk({"a": sae}, path, tmp_path / "out", k=4, block_images=6, quiet=True)
    z, images = oracle_latents(x, valid, sae, GRID, tokens=tokens)
    grid = slice(1, 17) if tokens == "all" else None
    o = oracle_stats(z, images, labels[valid], k=4, tau=0.2, n_classes=3, grid=grid)
    data = load_topk(tmp_path / "out")
    assert data.index["saes"]["a"]["tokens"] == tokens
    assert_matches_oracle(data.stats, o, data.image_counts(), images, entropy_rtol=1e-6)


@pytest.mark.parametrize("tokens", ["patches", "all"])
def test_patchsae_statistics_match_bruteforce(small_store, tmp_path, tokens):
    """PatchSAE's image score is the mean over ALL the image's tokens, CLS included (the store's CLS is
    offset by +50, so leaving it out or counting it twice shows), also for an SAE trained on patches."""
    path, x, labels, valid = small_store
    sae = make_sae(8, 24, seed=5, tokens=tokens)
    run_topk({"a": sae}, path, tmp_path / "out", k=4, tau=0.2, block_images=6, quiet=True)
    data = load_topk(tmp_path / "out")
    z_all, images = oracle_latents(x, valid, sae, GRID, tokens="all")
    assert data.index["rankings"] == ["max", "mean", "patchsae"] and data.index["has_cls"]
    o = oracle_patchsae(z_all, images, labels[valid], k=4, tau=0.2, n_classes=3, grid=slice(1, 17))
    assert_matches_patchsae(data.stats, o)
    assert not np.array_equal(data.stats.patchsae_n_images_active, data.stats.n_images_active) or tokens == "all"
    # ours are unchanged by computing PatchSAE's beside them
    z, _ = oracle_latents(x, valid, sae, GRID, tokens=tokens)
    ours = oracle_stats(z, images, labels[valid], k=4, tau=0.2, n_classes=3, grid=slice(1, 17) if tokens == "all" else None)
    assert_matches_oracle(data.stats, ours, entropy_rtol=1e-6)
    run_topk({"a": sae}, path, tmp_path / "off", k=4, block_images=6, patchsae=False, quiet=True)
    off = load_topk(tmp_path / "off")
    assert not off.stats.has_patchsae and off.index["rankings"] == ["max", "mean"]


def test_topk_refuses_tokens_it_cannot_mine(small_store, tmp_path):
    path, *_ = small_store
    with pytest.raises(UserError, match="'cls' tokens.*heatmap"):
        run_topk({"a": make_sae(8, 8, tokens="cls")}, path, tmp_path / "o", quiet=True)
    with pytest.raises(UserError, match="--tokens"):
        run_topk({"a": make_sae(8, 8, tokens=None)}, path, tmp_path / "o", quiet=True)
    with pytest.raises(UserError, match="trained on 'all' tokens, not 'patches'"):
        run_topk({"a": make_sae(8, 8, tokens="all")}, path, tmp_path / "o", tokens="patches", quiet=True)
    run_topk({"a": make_sae(8, 8, tokens=None)}, path, tmp_path / "o", tokens="patches", quiet=True)


def test_pass_latents_are_bitwise_sae_encode(small_store, tmp_path):
    # Random float weights (not dyadic): the pass's in-place chunked encoder must give exactly sae.encode's
    # latents, so every statistic equals an accumulator fed sae.encode of all valid patches in one block.
    path, x, labels, valid = small_store
    g = torch.Generator().manual_seed(7)
    w = {"W_enc": torch.randn(8, 48, generator=g), "W_dec": torch.randn(48, 8, generator=g), "b_enc": torch.randn(48, generator=g) - 1,
         "b_dec": torch.randn(8, generator=g)}
    from trainers.sae_io import SAE

    sae = SAE({"architecture": "standard", "d_in": 8, "d_sae": 48}, w, {"hook": HOOK, "tokens": "patches"})
    run_topk({"a": sae}, path, tmp_path / "out", k=5, tau=0.3, block_images=7, quiet=True)
    xs = torch.from_numpy(x[valid].reshape(-1, 8))  # every stored token: the pass encodes CLS too
    z = sae.encode(xs).reshape(-1, 17, 48)
    acc = LatentAccumulator(48, 17, k=5, tau=0.3, n_classes=3, chunk_images=10_000, grid_tokens=(1, 16))
    images = np.nonzero(valid)[0]
    ref_counts = acc.update(z, images, labels[valid])
    ref, got = acc.result(), load_topk(tmp_path / "out").stats
    for f in ("n_patches_active", "n_images_active", "max_act", "count_dataset", "count_class"):
        np.testing.assert_array_equal(getattr(got, f), getattr(ref, f), err_msg=f)
    np.testing.assert_allclose(got.sum_active, ref.sum_active, rtol=1e-12)
    for r in ("max", "mean"):
        for f in ("values", "images", "labels", "patches", "entropy"):
            np.testing.assert_array_equal(getattr(got.top[r], f), getattr(ref.top[r], f), err_msg=f"{r} {f}")
    counts = load_topk(tmp_path / "out").image_counts()
    for f in counts._fields:
        np.testing.assert_array_equal(getattr(counts, f), getattr(ref_counts, f))
