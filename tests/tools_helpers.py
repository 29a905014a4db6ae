"""Shared builders and the brute-force oracle for tests/test_tools_*.py (small stores, dyadic SAEs)."""

from __future__ import annotations

import json
import os

import numpy as np
import safetensors.torch
import torch

from saev_store.layout import TokenLayout
from saev_store.store import HookSpec, create_store
from trainers.sae_io import SAE

HOOK = "blocks.1"


def make_store(path, n_images, *, d=8, grid=(4, 4), images_per_chunk=8, seed=0, p_invalid=0.15, class_names=("a", "b", "c"),
               dataset=None, preprocessing=None, labels=None):
    """A finished store with a CLS token + a patch grid, small integer activations (exact in float32), some
    invalid and some unlabeled images. Returns (x_ntd, labels, valid)."""
    rng = np.random.default_rng(seed)
    n_patches = grid[0] * grid[1]
    layout = TokenLayout(n_tokens=1 + n_patches, cls=0, grid=grid, grid_start=1)
    meta = {"class_names": list(class_names) if class_names else None}
    if dataset is not None:
        meta["dataset"] = dataset
    if preprocessing is not None:
        meta["preprocessing"] = preprocessing
    st = create_store(path, n_images=n_images, hooks={HOOK: HookSpec(d, layout)}, images_per_chunk=images_per_chunk, metadata=meta)
    x = rng.integers(-3, 4, size=(n_images, 1 + n_patches, d)).astype(np.float32)
    x[:, 0] += 50  # the CLS token would dominate every statistic if it leaked into the patch pass
    if labels is None:
        labels = rng.integers(-1, len(class_names) if class_names else 0, size=n_images).astype(np.int32)
    valid = rng.random(n_images) >= p_invalid
    valid[0] = True
    for i in st.pending_chunks():
        s, e = st.chunk_bounds(i)
        st.write_block(i, {HOOK: x[s:e]}, labels=labels[s:e], valid=valid[s:e], image_ids=[f"img/{j}" for j in range(s, e)])
    st.finalize()
    return x, np.asarray(labels, np.int32), valid


def make_sae(d, d_sae, *, seed=0, store=None, tokens="patches"):
    """An SAE whose weights are multiples of 1/8, so with integer inputs every latent is exact in float32 in any
    summation order: thresholds and ties then mean the same thing to the code and to the float64 oracle."""
    rng = np.random.default_rng(seed + 1000)
    w = {
        "W_enc": torch.from_numpy(rng.integers(-2, 3, size=(d, d_sae)) / 4).float(),
        "W_dec": torch.from_numpy(rng.normal(size=(d_sae, d))).float(),
        "b_enc": torch.from_numpy(rng.integers(-6, 2, size=d_sae) / 8).float(),
        "b_dec": torch.from_numpy(rng.integers(-1, 2, size=d) / 2).float(),
    }
    cfg = {"architecture": "standard", "d_in": d, "d_sae": d_sae, "dtype": "float32"}
    return SAE(cfg, w, {"store": None if store is None else str(store), "hook": HOOK, "tokens": tokens})


def export_sae(dpath, sae):
    """Write an SAE the way trainers export it (cfg.json, sae_weights.safetensors, saev_extra.json)."""
    os.makedirs(dpath, exist_ok=True)
    with open(os.path.join(dpath, "cfg.json"), "w") as f:
        json.dump(sae.cfg, f)
    safetensors.torch.save_file({k: getattr(sae, k).detach().contiguous() for k in ("W_enc", "W_dec", "b_enc", "b_dec")},
                                os.path.join(dpath, "sae_weights.safetensors"))
    with open(os.path.join(dpath, "saev_extra.json"), "w") as f:
        json.dump(sae.extra, f)


def oracle_latents(x_ntd, valid, sae, grid, tokens="patches"):
    """float64 numpy latents of the valid images' patch tokens (or all tokens: CLS first, as make_store
    lays them out): (n_valid, T, L), plus the image indices."""
    n_patches = grid[0] * grid[1]
    x = x_ntd[valid][:, 1:1 + n_patches] if tokens == "patches" else x_ntd[valid]
    x = x.astype(np.float64)
    W = sae.W_enc.detach().double().numpy()
    pre = (x - sae.b_dec.detach().double().numpy()) @ W + sae.b_enc.detach().double().numpy()
    assert sae.architecture == "standard", "the oracle implements the ReLU SAE only"
    return np.maximum(pre, 0), np.nonzero(valid)[0].astype(np.int64)


def oracle_stats(z_ntl, images, labels, *, k, tau, n_classes, grid=None):
    """Brute force over ALL latents at once, float64: every statistic tools/accumulate.py documents, over
    every token of `z_ntl`; an exemplar's heatmap is the tokens `grid` (a slice; default all)."""
    z = np.asarray(z_ntl, dtype=np.float64)
    n, t, n_lat = z.shape
    grid = slice(None) if grid is None else grid
    out = {
        "n_patches_active": (z > 0).sum(axis=(0, 1)),
        "n_images_active": (z > 0).any(axis=1).sum(axis=0),
        "sum_active": np.where(z > 0, z, 0).sum(axis=(0, 1)),
        "max_act": np.maximum(z.max(axis=(0, 1)), 0),
        "count_image": (z > tau).sum(axis=1),
        "count_dataset": (z > tau).sum(axis=(0, 1)),
    }
    out["freq_patch"] = out["n_patches_active"] / (n * t)
    out["freq_image"] = out["n_images_active"] / n
    out["mean_active"] = np.array([z[..., j][z[..., j] > 0].mean() if (z[..., j] > 0).any() else 0.0 for j in range(n_lat)])
    cc = np.zeros((n_classes, n_lat), dtype=np.int64)
    for i in range(n):
        if 0 <= labels[i] < n_classes:
            cc[labels[i]] += out["count_image"][i]
    out["count_class"] = cc
    for name, score in (("max", z.max(axis=1)), ("mean", z.mean(axis=1))):
        imgs = np.full((n_lat, k), -1, dtype=np.int64)
        vals = np.zeros((n_lat, k))
        labs = np.full((n_lat, k), -1, dtype=np.int64)
        patches = np.zeros((n_lat, k, len(range(t)[grid])))
        ent = np.full(n_lat, np.nan)
        for j in range(n_lat):
            pos = np.nonzero(score[:, j] > 0)[0]
            best = sorted(pos, key=lambda i: (-score[i, j], images[i]))[:k]  # the documented tie rule
            imgs[j, : len(best)] = images[best]
            vals[j, : len(best)] = score[best, j]
            labs[j, : len(best)] = labels[best]
            patches[j, : len(best)] = z[best][:, grid, j]
            mass: dict[int, float] = {}
            for i in best:
                if labels[i] >= 0:
                    mass[int(labels[i])] = mass.get(int(labels[i]), 0.0) + score[i, j]
            total = sum(mass.values())
            if total > 0:
                ent[j] = -sum(m / total * np.log(m / total) for m in mass.values() if m > 0)
        out[f"top_{name}"] = {"images": imgs, "values": vals, "labels": labs, "patches": patches, "entropy": ent}
    return out


def oracle_patchsae(z_all, images, labels, *, k, tau, n_classes, grid):
    """PatchSAE's statistics by brute force in float64, straight from their definitions (tools/accumulate.py,
    after PatchSAE's tasks/compute_sae_feature_data.py): `z_all` (n, T, L) holds the latents of EVERY token of
    each image, CLS included; `grid` is the slice of the patch tokens (the exemplars' heatmaps)."""
    z = np.asarray(z_all, dtype=np.float64)
    n, t, n_lat = z.shape
    score = z.mean(axis=1)  # a_j(img): mean over all tokens
    cnt = (score > 0).sum(axis=0)
    out = {"patchsae_n_images_active": cnt, "patchsae_sum_score": score.sum(axis=0), "patchsae_freq": cnt / n,
           "patchsae_mean_act": np.array([score[score[:, j] > 0, j].mean() if cnt[j] else np.nan for j in range(n_lat)])}
    cc = np.zeros((n_classes, n_lat), dtype=np.int64)
    for i in range(n):
        if 0 <= labels[i] < n_classes:
            cc[labels[i]] += (z[i] > tau).sum(axis=0)  # tokens above tau, CLS included
    out["patchsae_count_class"] = cc
    imgs, vals = np.full((n_lat, k), -1, dtype=np.int64), np.zeros((n_lat, k))
    labs, patches, ent = np.full((n_lat, k), -1, dtype=np.int64), np.zeros((n_lat, k, len(range(t)[grid]))), np.full(n_lat, np.nan)
    for j in range(n_lat):
        best = sorted(np.nonzero(score[:, j] > 0)[0], key=lambda i: (-score[i, j], images[i]))[:k]
        imgs[j, : len(best)], vals[j, : len(best)], labs[j, : len(best)] = images[best], score[best, j], labels[best]
        patches[j, : len(best)] = z[best][:, grid, j]
        w = np.array([score[i, j] for i in best if labels[i] >= 0])
        lab = np.array([labels[i] for i in best if labels[i] >= 0])
        if w.sum() > 0:  # activation-weighted label distribution, natural log
            pl = np.array([w[lab == c].sum() for c in np.unique(lab)]) / w.sum()
            ent[j] = -(pl[pl > 0] * np.log(pl[pl > 0])).sum()
    out["top_patchsae"] = {"images": imgs, "values": vals, "labels": labs, "patches": patches, "entropy": ent}
    return out


def assert_matches_patchsae(stats, o):
    for f in ("patchsae_n_images_active", "patchsae_count_class"):
        np.testing.assert_array_equal(getattr(stats, f), o[f], err_msg=f)
    for f in ("patchsae_sum_score", "patchsae_freq", "patchsae_mean_act"):
        np.testing.assert_allclose(getattr(stats, f), o[f], rtol=1e-6, atol=1e-6, equal_nan=True, err_msg=f)
    e, oo = stats.top["patchsae"], o["top_patchsae"]
    np.testing.assert_array_equal(e.images, oo["images"])
    np.testing.assert_array_equal(e.labels, oo["labels"])
    np.testing.assert_allclose(e.values, oo["values"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(e.patches, oo["patches"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(e.entropy, oo["entropy"], rtol=1e-6, atol=1e-9, equal_nan=True)


def assert_matches_oracle(stats, o, counts=None, valid_images=None, entropy_rtol=1e-9):
    """Compare a LatentStats (and optionally the sparse image counts) with oracle_stats' output. The entropies
    match to 1e-9 on exact (dyadic) latents; a mean over 17 tokens, or latents of trained float32 weights,
    need a looser `entropy_rtol`."""
    for f in ("n_patches_active", "n_images_active", "count_dataset", "count_class"):
        np.testing.assert_array_equal(getattr(stats, f), o[f], err_msg=f)
    for f in ("sum_active", "max_act", "freq_patch", "freq_image", "mean_active"):
        np.testing.assert_allclose(getattr(stats, f), o[f], rtol=1e-6, atol=1e-6, err_msg=f)
    for r in ("max", "mean"):
        e, oo = stats.top[r], o[f"top_{r}"]
        np.testing.assert_array_equal(e.images, oo["images"], err_msg=f"top {r} images")
        np.testing.assert_array_equal(e.labels, oo["labels"], err_msg=f"top {r} labels")
        np.testing.assert_allclose(e.values, oo["values"], rtol=1e-6, atol=1e-6, err_msg=f"top {r} values")
        np.testing.assert_allclose(e.patches, oo["patches"], rtol=1e-6, atol=1e-6, err_msg=f"top {r} patches")
        np.testing.assert_allclose(e.entropy, oo["entropy"], rtol=entropy_rtol, atol=1e-12, equal_nan=True, err_msg=f"top {r} entropy")
    if counts is not None:
        pos = {int(img): j for j, img in enumerate(valid_images)}
        dense = np.zeros_like(o["count_image"])
        dense[[pos[int(i)] for i in counts.images], counts.latents] = counts.counts
        assert (counts.counts > 0).all()
        np.testing.assert_array_equal(dense, o["count_image"])
