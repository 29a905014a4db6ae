"""`saev-tools render`: exemplar grids with patch heatmaps, the frequency/activation scatter, the frequency histogram.

    from tools.render import render
    res = render("runs/demo/topk", sae="w1280-l1=5", latents=[3, 17])
    res.grids[3]["max"]          # path of latent 3's grid of top images by max patch activation

Files (in `out_dpath`, default `<topk>/<sae>/render`): `latent_<i>_<ranking>.png` per latent and ranking,
`scatter.png` (log10 patch frequency vs log10 mean activation when active, coloured by the label entropy of
the top images by maximum patch activation; latents that never fire cannot be placed and are counted in the
title), `scatter_patchsae.png` when the folder has PatchSAE's statistics (PatchSAE's own figure: log10
image frequency vs log10 mean image score, coloured by the entropy of its top images) and `freq_hist.png`.
"""

from __future__ import annotations

import math
import os
import pathlib
import sys
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image

from saev_store.errors import UserError

from .accumulate import PATCHSAE_RANKING, RANKING_TITLES, LatentStats
from .config import GridStyle, RenderConfig
from .images import DEFAULT_TILE_PX, ImageReader, fit_tile, grid_image, heatmap_tile
from .topk import TopkData, load_topk


class RenderResult(NamedTuple):
    """What `render` wrote."""

    out_dpath: str
    grids: dict
    """latent -> {ranking: PNG path}."""
    scatter_fpath: str
    hist_fpath: str
    warning: str | None
    """Why images are grey (dataset not found...), or None."""


def pick_latents(stats: LatentStats, n: int) -> list[int]:
    """n latents that fire, spread evenly over the range of image frequencies (rare to common), sorted."""
    alive = np.nonzero(stats.n_images_active > 0)[0]
    if alive.size <= n:
        return [int(i) for i in alive]
    by_freq = alive[np.argsort(stats.freq_image[alive], kind="stable")]
    pos = np.unique(np.round(np.linspace(0, by_freq.size - 1, n)).astype(np.int64))
    return sorted(int(i) for i in by_freq[pos])


def exemplar_grid(data: TopkData, latent: int, ranking: str, reader: ImageReader, style: GridStyle = GridStyle()) -> Image.Image:
    """A latent's exemplars under one ranking, each with its patch values as a heatmap (shared colour scale:
    the largest patch value among the shown exemplars)."""
    ex = data.stats.top[ranking]
    filled = np.nonzero(ex.images[latent] >= 0)[0]
    size_hw = reader.size_hw or (DEFAULT_TILE_PX, DEFAULT_TILE_PX)
    tile_px = style.tile_px or int(np.clip(max(size_hw), 96, 160))  # tiny images are enlarged so a patch is visible
    vmax = float(ex.patches[latent, filled].max()) if filled.size else 1.0
    tiles = [
        fit_tile(heatmap_tile(reader.get(int(ex.images[latent, j])), ex.patches[latent, j], data.grid, vmax, size_hw=size_hw, alpha=style.alpha), tile_px)
        for j in filled
    ]
    if not tiles:  # a latent that never fired: one grey tile says so rather than an empty file
        tiles = [Image.new("RGB", (tile_px, tile_px), (200, 200, 200))]
    return grid_image(tiles, style.n_cols)


def _figure(w_in: float = 5.0, h_in: float = 3.6):
    from matplotlib.figure import Figure

    return Figure(figsize=(w_in, h_in), dpi=100, layout="constrained")


def plot_scatter(stats: LatentStats, fpath: str | os.PathLike, ranking: str = "max") -> None:
    """log10 patch frequency vs log10 mean activation when active, coloured by the label entropy of the
    exemplars of `ranking` (the colour bar says which)."""
    alive = stats.n_patches_active > 0
    x = np.log10(stats.freq_patch[alive])
    y = np.log10(np.maximum(stats.mean_active[alive], np.finfo(np.float64).tiny))
    _entropy_scatter(x, y, stats.top[ranking].entropy[alive], ranking, int((~alive).sum()), fpath,
                     "log10 firing frequency (per patch)", "log10 mean activation when active")


def plot_patchsae_scatter(stats: LatentStats, fpath: str | os.PathLike) -> None:
    """PatchSAE's scatter: log10 image frequency vs log10 mean image score (both PatchSAE's definitions,
    over all tokens), coloured by the label entropy of the top images by that score."""
    alive = stats.patchsae_n_images_active > 0
    x = np.log10(stats.patchsae_freq[alive])
    y = np.log10(np.maximum(stats.patchsae_mean_act[alive], np.finfo(np.float64).tiny))
    _entropy_scatter(x, y, stats.top[PATCHSAE_RANKING].entropy[alive], PATCHSAE_RANKING, int((~alive).sum()), fpath,
                     "log10 PatchSAE frequency (images with score > 0)", "log10 PatchSAE mean activation (score)")


def _entropy_scatter(x, y, ent, ranking: str, n_dead: int, fpath, xlabel: str, ylabel: str) -> None:
    fig = _figure()
    ax = fig.add_subplot()
    has = np.isfinite(ent)
    if (~has).any():
        ax.scatter(x[~has], y[~has], s=6, c="0.6", label="no labeled exemplar", linewidths=0)
    if has.any():
        sc = ax.scatter(x[has], y[has], s=6, c=ent[has], cmap="viridis", linewidths=0)
        fig.colorbar(sc, ax=ax, label=f"label entropy (nats), top images {RANKING_TITLES[ranking].removeprefix('by ')}"[:70])
    if (~has).any() and has.any():
        ax.legend(loc="best", fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{x.size} latents that fire; {n_dead} never fire; colour: entropy of top images {RANKING_TITLES[ranking]}",
                 fontsize=7, wrap=True)
    fig.savefig(fpath)


def plot_freq_hist(stats: LatentStats, fpath: str | os.PathLike) -> None:
    """Histogram of log10 firing frequency per patch; latents that never fire are counted in the title."""
    alive = stats.n_patches_active > 0
    x = np.log10(stats.freq_patch[alive])
    fig = _figure(5.0, 3.0)
    ax = fig.add_subplot()
    if x.size:
        ax.hist(x, bins=min(60, max(10, int(math.sqrt(x.size)))), color="C0")
    ax.set_xlabel("log10 firing frequency (per patch)")
    ax.set_ylabel("latents")
    ax.set_title(f"{stats.n_patches_active.size} latents, {int((~alive).sum())} never fire", fontsize=9)
    fig.savefig(fpath)


def render(topk_dpath: str | os.PathLike, out_dpath: str | os.PathLike | None = None, **options) -> RenderResult:
    """Render grids for `latents` (default: `n_latents` spread over the frequency range), the scatter and
    the histogram of one SAE of a topk folder; `options` are RenderConfig fields."""
    cfg = RenderConfig(out_dpath=None if out_dpath is None else str(out_dpath), **options)
    sae, latents, rankings, style, quiet = cfg.sae, cfg.latents, cfg.rankings, cfg.style, cfg.quiet
    from tqdm.auto import tqdm

    data = load_topk(topk_dpath, sae)
    stats = data.stats
    d_sae = stats.n_patches_active.size
    rankings = tuple(stats.top) if rankings is None else tuple(rankings)
    bad = [r for r in rankings if r not in stats.top]
    if bad:
        raise UserError(f"unknown ranking(s) {', '.join(bad)}; this folder has {', '.join(stats.top)}.")
    if latents is None:
        latents = pick_latents(stats, cfg.n_latents)
    latents = [int(i) for i in latents]
    out_of_range = [i for i in latents if not 0 <= i < d_sae]
    if out_of_range:
        raise UserError(f"latent(s) {out_of_range} are outside 0..{d_sae - 1} of SAE {data.name!r}.")
    out = pathlib.Path(cfg.out_dpath) if cfg.out_dpath is not None else pathlib.Path(topk_dpath) / data.name / "render"
    out.mkdir(parents=True, exist_ok=True)
    reader = reader_for(data, data_root=cfg.data_root)
    if reader.warning:  # shown even with quiet: grey tiles need explaining
        print(f"warning: {reader.warning}", file=sys.stderr)

    grids: dict = {}
    for i in tqdm(latents, desc="render", unit="latent", disable=quiet):
        grids[i] = {}
        for r in rankings:
            fpath = out / f"latent_{i}_{r}.png"
            exemplar_grid(data, i, r, reader, style).save(fpath)
            grids[i][r] = str(fpath)
    scatter_fpath, hist_fpath = out / "scatter.png", out / "freq_hist.png"
    plot_scatter(stats, scatter_fpath)
    if stats.has_patchsae:
        plot_patchsae_scatter(stats, out / "scatter_patchsae.png")
    plot_freq_hist(stats, hist_fpath)
    return RenderResult(str(out), grids, str(scatter_fpath), str(hist_fpath), reader.warning)


def reader_for(data: TopkData, *, data_root: str | None = None) -> ImageReader:
    """The image reader of the store a topk folder was computed from (grey tiles when it is gone)."""
    from saev_store.store import open_store

    try:
        attrs = open_store(data.index["store"]).attrs
    except Exception as err:
        reader = ImageReader(None, None, 0)
        reader.warning = f"cannot open the store {data.index['store']} ({err}); exemplars are shown as heatmaps on grey"
        return reader
    return ImageReader.for_store_attrs(attrs, data_root=data_root)
