"""`saev-tools`: thin command-line faces over tools.topk.run_topk, tools.render.render and tools.report.build_report."""

from __future__ import annotations

import click

from saev_store.errors import UserError, cli_errors


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
@click.option("--tokens", default=None, type=click.Choice(["patches", "all"]),
              help="Tokens to mine, for SAE folders that do not record their training tokens (default: each SAE's own).")
@click.option("-k", "--k", "k", default=16, show_default=True, help="Exemplars kept per latent and ranking.")
@click.option("--tau", default=0.2, show_default=True, help="A patch counts when the latent's value exceeds tau.")
@click.option("--memory-mb", default=1024.0, show_default=True, help="Budget for one block of activations (latents go in fixed-size chunks).")
@click.option("--block-images", default=None, type=int, help="Images per block (overrides --memory-mb).")
@click.option("--device", default="cpu", show_default=True, help="torch device for the SAEs, e.g. cuda.")
@click.option("--readers", "n_readers", default=4, show_default=True, help="Store chunks read ahead in parallel.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def topk(run_or_sae, store_path, out_dpath, hook, tokens, k, tau, memory_mb, block_images, device, n_readers, overwrite, quiet):
    """One pass over the store for every SAE of RUN_OR_SAE: exemplars, frequencies, counts, entropy."""
    from .topk import run_topk

    res = run_topk(
        run_or_sae, store_path, out_dpath, hook=hook, tokens=tokens, k=k, tau=tau, memory_mb=memory_mb, block_images=block_images,
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


if __name__ == "__main__":
    main()
