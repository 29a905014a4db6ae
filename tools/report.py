"""`saev-tools report`: a static HTML report of a topk folder that opens from disk, with no server and no CDN.

    from tools.report import build_report
    res = build_report("runs/demo/topk")            # -> runs/demo/topk/report/index.html

Layout of the report folder:

    index.html                  the SAEs, with links
    assets/report.css, report.js
    <sae>/index.html            every latent in a table sortable by clicking its headers and filterable with
                                numeric min/max inputs (frequency, mean activation, entropy); the scatter and
                                the histogram
    <sae>/latents/<i>.html      one latent: statistics, exemplar grids with heatmaps (by max, by mean and by
                                PatchSAE's score), exemplar table, class-level counts (ours and PatchSAE's)
    <sae>/images/*.png

Pages are built for the chosen latents (default: `max_pages` latents that fire, spread over the frequency
range; each page costs 2 grids of k images); the table lists every latent and links those with a page.
"""

from __future__ import annotations

import html
import importlib.resources
import os
import pathlib
import shutil
import sys
import urllib.parse
from typing import NamedTuple, Sequence

import numpy as np

from saev_store.errors import UserError

from .accumulate import PATCHSAE_RANKING, RANKING_TITLES
from .images import ImageReader
from .config import GridStyle, ReportConfig
from .render import exemplar_grid, pick_latents, plot_freq_hist, plot_patchsae_scatter, plot_scatter, reader_for
from .topk import TopkData, list_saes, load_topk

ASSETS = ("report.css", "report.js")
# (data key, header, description for the tooltip, getter on LatentStats, format)
_COLUMNS = (
    ("freq", "freq (patch)", "fraction of patches where the latent is > 0", lambda s: s.freq_patch, "{:.3g}"),
    ("freq_image", "freq (image)", "fraction of images with at least one patch > 0", lambda s: s.freq_image, "{:.3g}"),
    ("mean", "mean act.", "mean value over the patches where the latent is > 0", lambda s: s.mean_active, "{:.3g}"),
    ("max", "max act.", "largest value over all patches", lambda s: s.max_act, "{:.3g}"),
    ("entropy", "entropy (top by max)", "label entropy (nats) of the top images by max patch activation", lambda s: s.top["max"].entropy, "{:.3f}"),
    ("count", "count > tau", "patches above tau over the whole store", lambda s: s.count_dataset, "{:d}"),
)
_PATCHSAE_COLUMNS = (
    ("ps_freq", "PatchSAE freq", "PatchSAE's activated frequency: fraction of images whose score (the mean over all the "
     "image's tokens, CLS included) is > 0", lambda s: s.patchsae_freq, "{:.3g}"),
    ("ps_mean", "PatchSAE mean act.", "PatchSAE's mean activation: the mean score over the images where it is > 0",
     lambda s: s.patchsae_mean_act, "{:.3g}"),
    ("ps_entropy", "PatchSAE entropy", "label entropy (nats) of the top images by PatchSAE's score",
     lambda s: s.top[PATCHSAE_RANKING].entropy, "{:.3f}"),
)
"""PatchSAE's statistics (tools/accumulate.py), shown when the topk folder has them."""


def _columns(s) -> tuple:
    return _COLUMNS + (_PATCHSAE_COLUMNS if s.has_patchsae else ())


class ReportResult(NamedTuple):
    """What `build_report` wrote."""

    index_fpath: str
    """The report's entry page (open it in a browser)."""
    pages: dict
    """SAE name -> latents that got a page."""
    warning: str | None
    """Why exemplar images are grey, or None."""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _page(title: str, body: str, depth: int) -> str:
    up = "../" * depth
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_e(title)}</title><link rel=\"stylesheet\" href=\"{up}assets/report.css\"></head>\n"
        f"<body>\n{body}\n<script src=\"{up}assets/report.js\"></script>\n</body></html>\n"
    )


def _fmt(fmt: str, v) -> str:
    if isinstance(v, (float, np.floating)) and not np.isfinite(v):
        return ""
    return fmt.format(int(v) if fmt == "{:d}" else float(v))


def _data_value(v) -> str:
    if isinstance(v, (float, np.floating)) and not np.isfinite(v):
        return ""
    return repr(float(v)) if isinstance(v, (float, np.floating)) else str(int(v))


def build_report(topk_dpath: str | os.PathLike, out_dpath: str | os.PathLike | None = None, **options) -> ReportResult:
    """Write the HTML report of a topk folder; returns the path of its index.html. `options` are
    ReportConfig fields: `saes` (default all), `latents` that get a page (default `max_pages` spread over
    the frequency range, per SAE), the grid style, `data_root`, `quiet`."""
    cfg = ReportConfig(out_dpath=None if out_dpath is None else str(out_dpath), **options)
    saes, latents, max_pages, style, data_root, quiet = cfg.saes, cfg.latents, cfg.max_pages, cfg.style, cfg.data_root, cfg.quiet
    names = list(saes) if saes else list_saes(topk_dpath)
    out = pathlib.Path(cfg.out_dpath) if cfg.out_dpath is not None else pathlib.Path(topk_dpath) / "report"
    out.mkdir(parents=True, exist_ok=True)
    (out / "assets").mkdir(exist_ok=True)
    for a in ASSETS:
        src = importlib.resources.files("tools").joinpath("templates", a)
        (out / "assets" / a).write_bytes(src.read_bytes())

    pages, rows, index, reader, image_ids = {}, [], None, None, None
    for name in names:
        data = load_topk(topk_dpath, name)
        if reader is None:  # the folder's SAEs share one store: open it and its dataset (fingerprint, image cache) once
            index, reader, image_ids = data.index, reader_for(data, data_root=data_root), _image_ids(data)
        pages[name] = _build_sae(data, out / name, latents, max_pages, reader, image_ids, style, quiet)
        s = data.stats
        alive = s.n_patches_active > 0
        rows.append(
            f"<tr><td><a href=\"{urllib.parse.quote(name)}/index.html\">{_e(name)}</a></td><td>{s.n_patches_active.size}</td>"
            f"<td>{int(alive.sum())}</td><td>{(np.median(s.freq_patch[alive]) if alive.any() else 0):.3g}</td><td>{len(pages[name])}</td></tr>"
        )
    warning = reader.warning
    body = (
        "<h1>saev-tools report</h1>"
        f"<p class=\"meta\">store {_e(index['store'])}, hook {_e(index['hook'])}, {index['n_images']} images, "
        f"{index['n_patches']} patches per image, k={index['k']}, tau={index['tau']}</p>"
        + (f"<p class=\"warning\">{_e(warning)}</p>" if warning else "")
        + "<table><thead><tr><th>SAE</th><th>latents</th><th>fire</th><th>median freq</th><th>pages</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )
    index_fpath = out / "index.html"
    index_fpath.write_text(_page("saev-tools report", body, 0))
    if warning:  # shown even with quiet: grey tiles need explaining
        print(f"warning: {warning}", file=sys.stderr)
    return ReportResult(str(index_fpath), pages, warning)


def _build_sae(
    data: TopkData, out: pathlib.Path, latents, max_pages: int, reader: ImageReader, image_ids: list[str] | None, style: GridStyle, quiet: bool
) -> list[int]:
    """One SAE's folder of the report; returns the latents that got a page."""
    from tqdm.auto import tqdm

    s = data.stats
    d_sae = s.n_patches_active.size
    if latents is None:
        chosen = pick_latents(s, max_pages)
    else:
        chosen = sorted({int(i) for i in latents})
        bad = [i for i in chosen if not 0 <= i < d_sae]
        if bad:
            raise UserError(f"latent(s) {bad} are outside 0..{d_sae - 1} of SAE {data.name!r}.")
    if out.exists():
        shutil.rmtree(out)  # pages of an earlier report would link to latents this one has no page for
    (out / "images").mkdir(parents=True)
    (out / "latents").mkdir()
    plot_scatter(s, out / "images" / "scatter.png")
    if s.has_patchsae:
        plot_patchsae_scatter(s, out / "images" / "scatter_patchsae.png")
    plot_freq_hist(s, out / "images" / "freq_hist.png")
    chosen_set = set(chosen)
    for j, i in enumerate(tqdm(chosen, desc=f"report {data.name}", unit="latent", disable=quiet)):
        for r in s.top:
            exemplar_grid(data, i, r, reader, style).save(out / "images" / f"latent_{i}_{r}.png")
        prev_i = chosen[j - 1] if j > 0 else None
        next_i = chosen[j + 1] if j + 1 < len(chosen) else None
        (out / "latents" / f"{i}.html").write_text(_latent_page(data, i, image_ids, prev_i, next_i, reader.warning))
    (out / "index.html").write_text(_sae_index(data, chosen_set, reader.warning))
    return chosen


def _image_ids(data: TopkData) -> list[str] | None:
    from saev_store.store import open_store

    try:
        return open_store(data.index["store"]).image_ids()
    except Exception:  # the store moved: the report still shows indices
        return None


def _sae_index(data: TopkData, with_page: set, warning: str | None) -> str:
    s, ix = data.stats, data.index
    # Each column once: freq and mean are properties that compute the whole (L,) vector on every access.
    columns = _columns(s)
    values = [(key, get(s), fmt) for key, _, _, get, fmt in columns]
    head = "<th data-key=\"latent\" title=\"latent index\">latent</th>" + "".join(
        f"<th data-key=\"{key}\" title=\"{_e(desc)}\">{_e(label)}</th>" for key, label, desc, _, _ in columns
    )
    body_rows = []
    for i in range(s.n_patches_active.size):
        attrs = f" data-latent=\"{i}\" data-page=\"{int(i in with_page)}\"" + "".join(f" data-{key}=\"{_data_value(v[i])}\"" for key, v, _ in values)
        first = f"<td><a href=\"latents/{i}.html\">{i}</a></td>" if i in with_page else f"<td class=\"nopage\">{i}</td>"
        cells = "".join(f"<td>{_fmt(fmt, v[i])}</td>" for _, v, fmt in values)
        body_rows.append(f"<tr{attrs}>{first}{cells}</tr>")

    def bounds(key, label):
        return (
            f"<fieldset><legend>{_e(label)}</legend>"
            f"<label>min <input type=\"number\" step=\"any\" data-key=\"{key}\" data-bound=\"min\" id=\"{key}-min\"></label> "
            f"<label>max <input type=\"number\" step=\"any\" data-key=\"{key}\" data-bound=\"max\" id=\"{key}-max\"></label></fieldset>"
        )

    body = (
        f"<div class=\"nav\"><a href=\"../index.html\">all SAEs</a></div>"
        f"<h1>SAE {_e(data.name)}</h1>"
        f"<p class=\"meta\">{s.n_patches_active.size} latents; store {_e(ix['store'])}, hook {_e(ix['hook'])}, {ix['n_images']} images x "
        f"{ix['n_patches']} patches; top {ix['k']} exemplars per latent; counts above tau={ix['tau']}. "
        f"Latents in grey have no page (pass --latents to build theirs).</p>"
        + (f"<p class=\"warning\">{_e(warning)}</p>" if warning else "")
        + "<div class=\"plots\"><img src=\"images/scatter.png\" alt=\"frequency vs mean activation, colour: entropy of the top images by max\">"
        + ("<img src=\"images/scatter_patchsae.png\" alt=\"PatchSAE frequency vs mean activation, colour: entropy of the top "
           "images by PatchSAE's score\">" if s.has_patchsae else "")
        + "<img src=\"images/freq_hist.png\" alt=\"frequency histogram\"></div>"
        "<form id=\"filters\" onsubmit=\"return false\">"
        + bounds("freq", "freq (patch)")
        + bounds("mean", "mean act.")
        + bounds("entropy", "entropy (top by max)")
        + (bounds("ps_freq", "PatchSAE freq") + bounds("ps_entropy", "PatchSAE entropy") if s.has_patchsae else "")
        + "<label><input type=\"checkbox\" id=\"pages-only\"> with a page only</label>"
        f"<span><span id=\"n-shown\">{s.n_patches_active.size}</span> of {s.n_patches_active.size} latents shown</span></form>"
        f"<table id=\"latents\" class=\"sortable\"><thead><tr>{head}</tr></thead><tbody>\n"
        + "\n".join(body_rows)
        + "\n</tbody></table>"
    )
    return _page(f"SAE {data.name}", body, 1)


def _latent_page(data: TopkData, i: int, image_ids, prev_i, next_i, warning) -> str:
    s, ix = data.stats, data.index
    class_names = data.class_names
    nav = "<div class=\"nav\"><a href=\"../index.html\">all latents</a>"
    if prev_i is not None:
        nav += f"<a href=\"{prev_i}.html\">&larr; latent {prev_i}</a>"
    if next_i is not None:
        nav += f"<a href=\"{next_i}.html\">latent {next_i} &rarr;</a>"
    nav += "</div>"
    stat_rows = "".join(f"<tr><th title=\"{_e(desc)}\">{_e(label)}</th><td>{_fmt(fmt, get(s)[i])}</td></tr>" for _, label, desc, get, fmt in _columns(s))
    stat_rows += (
        f"<tr><th>entropy (top by mean)</th><td>{_fmt('{:.3f}', s.top['mean'].entropy[i])}</td></tr>"
        f"<tr><th>active patches</th><td>{int(s.n_patches_active[i])}</td></tr>"
        f"<tr><th>active images</th><td>{int(s.n_images_active[i])} of {s.n_images}</td></tr>"
    )

    def label_name(lab: int) -> str:
        if lab < 0:
            return ""
        return class_names[lab] if class_names and lab < len(class_names) else str(lab)

    sections = []
    for r in s.top:
        ex = s.top[r]
        filled = np.nonzero(ex.images[i] >= 0)[0]
        rows = "".join(
            f"<tr><td>{j + 1}</td><td>{int(ex.images[i, j])}</td><td>{_e(image_ids[int(ex.images[i, j])]) if image_ids else ''}</td>"
            f"<td>{_e(label_name(int(ex.labels[i, j])))}</td><td>{float(ex.values[i, j]):.4g}</td></tr>"
            for j in filled
        )
        sections.append(
            f"<h2>Top images {RANKING_TITLES[r]}</h2>"
            + (f"<img class=\"grid\" src=\"../images/latent_{i}_{r}.png\" alt=\"latent {i} exemplars {r}\">" if filled.size else "<p>This latent never fires.</p>")
            + ("<table><thead><tr><th>rank</th><th>image</th><th>id</th><th>label</th><th>score</th></tr></thead>"
               f"<tbody>{rows}</tbody></table>" if filled.size else "")
        )
    def class_table(title: str, counts) -> str:
        total = int(counts.sum())
        order = np.argsort(-counts, kind="stable")[:10]
        rows = "".join(
            f"<tr><td>{_e(label_name(int(c)))}</td><td>{int(counts[c])}</td><td>{(counts[c] / total if total else 0):.1%}</td></tr>" for c in order if counts[c] > 0
        )
        return f"<h2>{_e(title)}</h2>" + (
            f"<table><thead><tr><th>class</th><th>count</th><th>share</th></tr></thead><tbody>{rows}</tbody></table>" if rows else "<p>None.</p>")

    cls = ""
    if s.count_class.shape[0]:
        cls = class_table(f"Patches above tau={ix['tau']} per class", s.count_class[:, i])
        if s.has_patchsae:
            cls += class_table(f"PatchSAE's class counts: tokens above tau={ix['tau']} per class, CLS included",
                               s.patchsae_count_class[:, i])
    body = (
        nav
        + f"<h1>Latent {i} <span class=\"meta\">of SAE {_e(data.name)}</span></h1>"
        + (f"<p class=\"warning\">{_e(warning)}</p>" if warning else "")
        + f"<table class=\"stats\"><tbody>{stat_rows}</tbody></table>"
        + "".join(sections)
        + cls
    )
    return _page(f"latent {i} - {data.name}", body, 2)
