"""`saev-tools`: thin command-line faces over tools.topk.run_topk, tools.render.render, tools.report.build_report
and tools.heads.train_heads.

Each command's options are the fields of its config (tools/config.py, tools/heads/config.py), made into flags by
saev_store/options.py.

    saev-tools topk demo/run && saev-tools report demo/run/topk
"""

from __future__ import annotations

import os

import click

from saev_store.errors import UserError, cli_class
from saev_store.options import build, given, options

from .config import RenderConfig, ReportConfig, TopkConfig
from .heads.config import HeadConfig

ON_INTERRUPT = "nothing is kept from an interrupted command; rerun it."


@click.group(cls=cli_class(click.Group, ON_INTERRUPT), context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main():
    """Mine SAE features: exemplars and per-latent statistics, heatmap grids, an HTML report."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every process would mine the whole store into the same folder: refuse instead of racing.
        raise UserError("saev-tools runs in one process (topk is one ordered pass for every SAE); run it without "
                        "torchrun or accelerate launch, with --device cuda for a GPU.")


def _fields(cfg) -> dict:
    """A config's fields as keywords (the functions take them so; the CLI validated them as a config first)."""
    import dataclasses

    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


@main.command()
@click.argument("run_or_sae", type=click.Path(file_okay=False))
@options(TopkConfig)
def topk(run_or_sae, **params):
    """One pass over the store for every SAE of RUN_OR_SAE: exemplars, frequencies, counts, entropy."""
    from .topk import run_topk

    res = run_topk(run_or_sae, **_fields(build(TopkConfig, params, explicit=given())))
    click.echo(
        f"{len(res.names)} SAE(s), {res.n_images} images in {res.n_blocks} block(s) of {res.block_images}: "
        f"{res.patches_per_s:,.0f} patches/s"
    )
    click.echo(f"topk: {res.out_dpath}")


@main.command()
@click.argument("topk_dpath", type=click.Path(exists=True, file_okay=False))
@options(RenderConfig)
def render(topk_dpath, **params):
    """Exemplar grids with patch heatmaps, the frequency/activation scatter and the frequency histogram."""
    from .render import render as render_fn

    res = render_fn(topk_dpath, **_fields(build(RenderConfig, params, explicit=given())))
    click.echo(f"{len(res.grids)} latent(s) rendered")
    click.echo(f"render: {res.out_dpath}")


@main.command()
@click.argument("topk_dpath", type=click.Path(exists=True, file_okay=False))
@options(ReportConfig)
def report(topk_dpath, **params):
    """A static HTML report (opens from disk): sortable, filterable latent index and a page per latent."""
    from .report import build_report

    res = build_report(topk_dpath, **_fields(build(ReportConfig, params, explicit=given())))
    click.echo(f"report: {res.index_fpath}")


@main.command()
@options(HeadConfig)
def head(**params):
    """Train a grid of linear heads (lr x weight decay) together on one hook of STORE; keep the best."""
    from .heads import train_heads

    cfg = build(HeadConfig, params, explicit=given())
    run = train_heads(cfg)
    level = "image" if cfg.task == "classify" else "patch"
    select = "accuracy" if cfg.task == "classify" else "miou"
    for m in run.members:
        v = m["metrics"][level][select]
        mark = "  <- kept" if m["index"] == run.best else ""
        click.echo(f"  lr {m['lr']:<8g} wd {m['weight_decay']:<8g} held-out {level} {select} {100 * (v or 0):6.2f}{mark}")
    for lvl, m in run.metrics.items():
        line = f"{cfg.hook} {cfg.task}, {lvl} level: top-1 {100 * (m['accuracy'] or 0):.2f}%, mean per-class accuracy {100 * (m['mean_class_accuracy'] or 0):.2f}%"
        if cfg.task == "segment":
            line += f", mIoU {100 * (m['miou'] or 0):.2f}"
        click.echo(line)
    if run.info.get("pixel_eval_note"):
        click.echo(f"note: {run.info['pixel_eval_note']}")
    click.echo(f"head: {run.out_dpath}")


if __name__ == "__main__":
    main()
