"""`saev-tools`: thin command-line faces over tools.topk.run_topk, tools.render.render, tools.report.build_report
and tools.heads.train_heads."""

from __future__ import annotations

import click

from saev_store.errors import UserError, cli_errors

from .heads.config import CLASSIFY_TOKENS, TASKS, HeadConfig


class _Group(click.Group):
    """Every command prints a UserError as one line (no traceback) and exits with status 2."""

    def invoke(self, ctx):
        return cli_errors("nothing is kept from an interrupted command; rerun it.")(super().invoke)(ctx)


def _image_options(fn):
    """Options shared by the commands that draw exemplar tiles."""
    for opt in reversed([
        click.option("--cols", "n_cols", default=4, show_default=True, help="Tiles per grid row."),
        click.option("--tile-px", type=click.IntRange(16, 2048), default=None,
                     help="Tile side in pixels [default: the model's input size, kept within 96-160]."),
        click.option("--alpha", default=0.6, show_default=True, help="Heatmap opacity at the latent's largest value."),
        click.option("--data-root", default=None, help="Where the store's dataset lives now, if it moved."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]):
        fn = opt(fn)
    return fn


def _latent_list(value: str | None) -> list[int] | None:
    if not value:
        return None
    try:
        return [int(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        raise UserError(f"--latents {value!r}: give latent indices separated by commas, e.g. --latents 3,17,42.") from None


@click.group(cls=_Group)
def main():
    """Mine SAE features: exemplars and per-latent statistics, heatmap grids, an HTML report."""


@main.command()
@click.argument("run_or_sae", type=click.Path(file_okay=False))
@click.option("--store", "store_path", default=None, help="Activation store (default: the store the SAEs were trained on).")
@click.option("--out", "out_dpath", default=None, help="Output folder (default: RUN_OR_SAE/topk).")
@click.option("--hook", default=None, help="Hook to read (default: the SAEs' hook).")
@click.option("-k", "--k", "k", default=16, show_default=True, help="Exemplars kept per latent and ranking.")
@click.option("--tau", default=0.2, show_default=True, help="A patch counts when the latent's value exceeds tau.")
@click.option("--memory-mb", default=1024.0, show_default=True, help="Budget for one block of activations (latents go in fixed-size chunks).")
@click.option("--block-images", default=None, type=int, help="Images per block (overrides --memory-mb).")
@click.option("--device", default="cpu", show_default=True, help="torch device for the SAEs, e.g. cuda.")
@click.option("--readers", "n_readers", default=4, show_default=True, help="Store chunks read ahead in parallel.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def topk(run_or_sae, store_path, out_dpath, hook, k, tau, memory_mb, block_images, device, n_readers, overwrite, quiet):
    """One pass over the store for every SAE of RUN_OR_SAE: exemplars, frequencies, counts, entropy."""
    from .topk import run_topk

    res = run_topk(
        run_or_sae, store_path, out_dpath, hook=hook, k=k, tau=tau, memory_mb=memory_mb, block_images=block_images,
        device=device, n_readers=n_readers, overwrite=overwrite, quiet=quiet,
    )
    click.echo(
        f"{len(res.names)} SAE(s), {res.n_images} images in {res.n_blocks} block(s) of {res.block_images}: "
        f"{res.patches_per_s:,.0f} patches/s"
    )
    click.echo(f"topk: {res.out_dpath}")


@main.command()
@click.argument("topk_dpath", type=click.Path(exists=True, file_okay=False))
@click.option("--sae", default=None, help="Which SAE of the folder (needed when it holds several).")
@click.option("--latents", default=None, help="Comma-separated latent indices (default: --n-latents spread over frequency).")
@click.option("--n-latents", default=16, show_default=True, help="How many latents when --latents is not given.")
@click.option("--out", "out_dpath", default=None, help="Output folder (default: TOPK/<sae>/render).")
@_image_options
def render(topk_dpath, sae, latents, n_latents, out_dpath, n_cols, tile_px, alpha, data_root, quiet):
    """Exemplar grids with patch heatmaps, the frequency/activation scatter and the frequency histogram."""
    from .render import GridStyle, render as render_fn

    res = render_fn(
        topk_dpath, out_dpath, sae=sae, latents=_latent_list(latents), n_latents=n_latents,
        style=GridStyle(n_cols, tile_px, alpha), data_root=data_root, quiet=quiet,
    )
    click.echo(f"{len(res.grids)} latent(s) rendered")
    click.echo(f"render: {res.out_dpath}")


@main.command()
@click.argument("topk_dpath", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_dpath", default=None, help="Report folder (default: TOPK/report).")
@click.option("--sae", "saes", multiple=True, help="Only these SAEs (repeatable; default all).")
@click.option("--latents", default=None, help="Comma-separated latents that get a page (default: --max-pages spread over frequency).")
@click.option("--max-pages", default=128, show_default=True, help="Latent pages per SAE when --latents is not given.")
@_image_options
def report(topk_dpath, out_dpath, saes, latents, max_pages, n_cols, tile_px, alpha, data_root, quiet):
    """A static HTML report (opens from disk): sortable, filterable latent index and a page per latent."""
    from .render import GridStyle
    from .report import build_report

    res = build_report(
        topk_dpath, out_dpath, saes=list(saes) or None, latents=_latent_list(latents), max_pages=max_pages,
        style=GridStyle(n_cols, tile_px, alpha), data_root=data_root, quiet=quiet,
    )
    click.echo(f"report: {res.index_fpath}")


def _floats(value: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in value.replace(" ", "").split(",") if v)
    except ValueError:
        raise UserError(f"{what} {value!r}: give numbers separated by commas, e.g. 1e-4,1e-3.") from None


@main.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--hook", required=True, help="Hook of the store whose activations the heads read.")
@click.option("--task", default=HeadConfig.task, show_default=True, type=click.Choice(TASKS),
              help="classify: image labels; segment: patch labels (saev-store add-labels).")
@click.option("--tokens", default=None, type=click.Choice(CLASSIFY_TOKENS),
              help="classify: the CLS token or the mean of the patch tokens [default: cls when the hook has one].")
@click.option("--lr", "lrs", default=",".join(f"{v:g}" for v in HeadConfig.lrs), show_default=True, help="Learning rates of the grid.")
@click.option("--wd", "weight_decays", default=",".join(f"{v:g}" for v in HeadConfig.weight_decays), show_default=True,
              help="Weight decays of the grid (AdamW, weights only).")
@click.option("--n-epochs", default=HeadConfig.n_epochs, show_default=True, type=int, help="Passes over the training images.")
@click.option("--batch-size", default=None, type=int, help="Rows per step [default: 512 images (classify), 4096 patches (segment)].")
@click.option("--held-out", "held_out_frac", default=HeadConfig.held_out_frac, show_default=True, type=float,
              help="Fraction of images held out to pick and score the best head.")
@click.option("--max-eval-images", default=None, type=int, help="Cap on held-out images evaluated.")
@click.option("--seed", default=HeadConfig.seed, show_default=True, type=int, help="Split, data order and initialization.")
@click.option("--normalize/--no-normalize", default=HeadConfig.normalize, show_default=True, help="Normalize with the store's statistics (inside the head).")
@click.option("--pixel-eval/--no-pixel-eval", default=HeadConfig.pixel_eval, show_default=True, help="segment: also score every pixel against the masks.")
@click.option("--data-root", default=None, help="Where the store's dataset lives now, if it moved (pixel scores).")
@click.option("--masks-root", default=None, help="Where the store's mask folder lives now, if it moved (pixel scores).")
@click.option("--device", default=HeadConfig.device, show_default=True, help="torch device, e.g. cuda.")
@click.option("--buffer-mb", default=HeadConfig.buffer_mb, show_default=True, type=float, help="segment: the loader's shuffle buffer.")
@click.option("--n-readers", default=HeadConfig.n_readers, show_default=True, type=int, help="Store chunks read ahead.")
@click.option("--out", "out_dpath", default=None, help="Output folder [default: heads/<store>-<hook>-<task>].")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def head(store, lrs, weight_decays, **kw):
    """Train a grid of linear heads (lr x weight decay) together on one hook of STORE; keep the best."""
    from .heads import train_heads

    cfg = HeadConfig(store=store, lrs=_floats(lrs, "--lr"), weight_decays=_floats(weight_decays, "--wd"), **kw)
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
