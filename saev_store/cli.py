"""`saev-store`: record, inspect, verify and benchmark activation stores. A thin face over the API."""

from __future__ import annotations

import json
import sys

import click

from .datasets.masks import MaskConfig
from .errors import cli_errors
from .loaders import DEFAULT_BUFFER_MB, DEFAULT_N_READERS
from .patch_labels import RULES


_user_errors = cli_errors("finished chunks are kept; rerun the same command to resume.")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="saev-store")
def main():
    """Record vision-model activations into a Zarr v3 store, inspect, verify and benchmark it."""


def _floats3(value):
    if value is None:
        return None
    parts = [float(v) for v in value.split(",")]
    if len(parts) != 3:
        raise click.BadParameter("give three comma-separated numbers, e.g. 0.485,0.456,0.406")
    return tuple(parts)


_MASKS = MaskConfig()


def _mask_options(fn):
    """Where label masks come from and how patches are labelled (MaskConfig), for record and add-labels."""
    for opt in reversed([
        click.option("--masks", default=None, help="folder datasets: directory of PNG label maps (same relative path, .png); fashion-mnist: 'pixels'."),
        click.option("--mask-column", default=None, help="hf-disk: the column holding each image's label map."),
        click.option("--patch-labels", "rule", default=_MASKS.rule, show_default=True, type=click.Choice(RULES),
                     help="How a patch's pixel labels become its label (saev's rules)."),
        click.option("--mask-background", "background", default=_MASKS.background, show_default=True, type=int,
                     help="The background class prefer-fg passes over."),
        click.option("--mask-ignore", "ignore_value", default=None, type=int, help="Mask value meaning no label (e.g. 255)."),
        click.option("--mask-threshold", "threshold", default=_MASKS.threshold, show_default=True, type=int,
                     help="--masks pixels: a pixel above this value (0-255) is the item."),
        click.option("--mask-classes", "class_names_fpath", default=None, type=click.Path(dir_okay=False),
                     help="Text file naming the mask classes, one per line (default: the source's names, or 0..max)."),
    ]):
        fn = opt(fn)
    return fn


def _mask_config(kw: dict) -> MaskConfig:
    """Pop the mask options out of a command's keyword arguments."""
    return MaskConfig(**{f: kw.pop(f) for f in ("masks", "mask_column", "rule", "background", "ignore_value", "threshold", "class_names_fpath")})


@main.command()
@click.option("--out", required=True, help="Store to create or resume (NAME.zarr, or a Zarr store URL).")
@click.option("--model", default="efficientnet:lite0", show_default=True, help="BACKEND:NAME, e.g. timm:vit_base_patch16_224, open_clip:ViT-B-16, hf:DIR, torchvision:resnet50.")
@click.option("--weights", default=None, help="Local weights file or directory (never downloaded).")
@click.option("--hook", "hooks", multiple=True, help="Module path to record; repeat for several. See `saev-store hooks`.")
@click.option("--layer", "layers", multiple=True, type=int, help="Layer N: a ViT's residual stream after block N, a CNN's stage/block N; repeatable.")
@click.option("--dataset", default="fashion-mnist", show_default=True, help="Dataset kind: fashion-mnist, folder, hf-disk.")
@click.option("--data", default=None, help="Dataset root (default for fashion-mnist: /usr/share/datasets/fashion-mnist).")
@click.option("--split", default="train", show_default=True, help="Dataset split.")
@click.option("--image-column", default=None, help="hf-disk: image column (default image).")
@click.option("--label-column", default=None, help="hf-disk: label column (default label).")
@click.option("--batch-size", default=64, show_default=True, type=int)
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cuda, cuda:1.")
@click.option("--store-dtype", default="float32", show_default=True, type=click.Choice(["float32", "float16", "bfloat16"]), help="float16/bfloat16 halve the disk.")
@click.option("--tokens", default="all", show_default=True, type=click.Choice(["all", "patches", "cls"]), help="Which tokens to store.")
@click.option("--keep-registers", is_flag=True, help="Keep ViT register tokens (dropped by default).")
@click.option("--limit", default=None, type=int, help="Record only the first N images.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--num-workers", default=1, show_default=True, type=int, help="Image-decoding worker processes.")
@click.option("--skip-bad", is_flag=True, help="Record unreadable images as invalid instead of stopping.")
@click.option("--overwrite", is_flag=True, help="Delete an existing store at --out and start over.")
@click.option("--chunk-mib", default=32, show_default=True, type=int, help="Target chunk size (8-64 MiB).")
@click.option("--images-per-chunk", default=None, type=int, help="Images per chunk, overriding --chunk-mib.")
@click.option("--image-size", default=None, type=int, help="Override the model's input size (square).")
@click.option("--mean", default=None, help="Override normalization mean, e.g. 0.485,0.456,0.406.")
@click.option("--std", default=None, help="Override normalization std.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_mask_options
@_user_errors
def record(image_column, label_column, mean, std, hooks, layers, **kw):
    """Run a model over a dataset and store per-token activations (resumes an interrupted run).

    With --masks or --mask-column, each image's label mask becomes patch labels in the same pass."""
    from .record import RecordConfig, record as run_record

    opts = {k: v for k, v in {"image_column": image_column, "label_column": label_column}.items() if v is not None}
    masks = _mask_config(kw)
    cfg = RecordConfig(hooks=tuple(hooks), layers=tuple(layers), dataset_options=opts, mean=_floats3(mean), std=_floats3(std),
                       masks=masks, **kw)
    res = run_record(cfg)
    if res.get("already_complete"):
        click.echo(f"{cfg.out} is already complete; nothing to do (pass --overwrite to record it again).")
    elif res["rank"] == 0:
        mb = res["bytes_written"] / 2**20
        secs = max(res["seconds"], 1e-9)
        click.echo(
            f"recorded {res['images_written']} images ({mb:.1f} MiB, {res['images_written'] / secs:.1f} img/s, "
            f"{mb / secs:.1f} MiB/s) into {cfg.out}; complete: {res['complete']}"
        )


@main.command("add-labels")
@click.argument("store")
@_mask_options
@click.option("--data-root", default=None, help="Where the store's dataset lives now, if it moved.")
@click.option("--num-workers", default=1, show_default=True, type=int, help="Mask-reading worker processes.")
@click.option("--batch-size", default=64, show_default=True, type=int, help="Images per worker batch.")
@click.option("--overwrite", is_flag=True, help="Replace patch labels made with other settings.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_user_errors
def add_labels(store, **kw):
    """Add per-patch labels from label masks to STORE, without recording again (resumes an interrupted run)."""
    from .add_labels import AddLabelsConfig, add_labels as run_add_labels

    masks = _mask_config(kw)
    res = run_add_labels(AddLabelsConfig(store=store, masks=masks, **kw))
    for key, attrs in res["sets"].items():
        names = attrs["class_names"]
        click.echo(f"patch labels {key}: {len(names)} classes ({', '.join(names[:6])}{' ...' if len(names) > 6 else ''}), "
                   f"rule {attrs['rule']}, complete: {attrs['complete']}")
    if res["already_complete"]:
        click.echo(f"{store} already had these patch labels; nothing to do (pass --overwrite to make them again).")
    else:
        click.echo(f"labelled {res['images']} images in {res['chunks_written']} chunks ({res['seconds']:.1f} s) of {store}")


@main.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_user_errors
def info(store, as_json):
    """Hooks, shapes, dtype, size on disk, completion and metadata of a store."""
    from .store import open_store
    from .verify import format_info, info as store_info

    summary = store_info(open_store(store))
    click.echo(json.dumps(summary, indent=2) if as_json else format_info(summary))


@main.command()
@click.argument("store")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_user_errors
def verify(store, quiet):
    """Read every chunk, check checksums, shapes and completion; exit 1 naming every bad chunk."""
    from tqdm import tqdm

    from .store import open_store
    from .verify import verify as run_verify

    st = open_store(store)
    with tqdm(total=st.n_chunks, unit="chunk", desc="verify", disable=quiet, file=sys.stderr) as bar:
        problems = run_verify(st, progress=bar.update)
    if problems:
        for p in problems:
            click.echo(f"BAD {p}")
        click.echo(f"{store}: {len(problems)} problems. Rerun the record command (without --overwrite) to rewrite chunks not done; a corrupt done chunk needs --overwrite or a restored copy.", err=True)
        sys.exit(1)
    click.echo(f"{store}: OK ({st.n_chunks} chunks, {len(st.hooks)} hook{'s' if len(st.hooks) != 1 else ''}, complete)")


@main.command()
@click.option("--model", default="efficientnet:lite0", show_default=True, help="BACKEND:NAME.")
@click.option("--weights", default=None, help="Local weights file or directory.")
@click.option("--all", "show_all", is_flag=True, help="List every module, not only the numbered layers.")
@_user_errors
def hooks(model, weights, show_all):
    """List a model's hookable modules with their output shapes, and what --layer N means."""
    from .models import create_model

    m = create_model(model, weights=weights, device="cpu")
    layer_hooks = {m.layer_hook(i): i for i in range(m.n_layers())}
    points = m.hook_points()
    names = list(points) if show_all else list(layer_hooks)
    shapes = m.output_shapes(names)
    click.echo(f"{m.spec}: {m.n_layers()} layers; input {tuple(m.preprocess.image_size)}")
    for name in names:
        layer = f"--layer {layer_hooks[name]:<3}" if name in layer_hooks else " " * 11
        click.echo(f"{layer} --hook {name:<40} {points.get(name, ''):<28} {tuple(shapes.get(name, ()))}")
    if not show_all:
        click.echo("(--all lists every module)")


@main.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--hook", default=None, help="Hook to read (default: the store's first hook).")
@click.option("--warm", is_flag=True, help="Measure with the store in the page cache instead of evicting it.")
@click.option("--batch-size", default=4096, show_default=True, type=click.IntRange(min=1), help="Rows per batch.")
@click.option("--buffer-mb", default=DEFAULT_BUFFER_MB, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Shuffle buffer size in MiB.")
@click.option("--n-readers", default=DEFAULT_N_READERS, show_default=True, type=click.IntRange(min=1), help="Chunk reads in flight.")
@click.option("--tokens", default="patches", show_default=True, type=click.Choice(["patches", "cls", "all"]), help="Token selection.")
@click.option("--seconds", default=10.0, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Length of each measurement.")
@_user_errors
def bench(store, hook, warm, batch_size, buffer_mb, n_readers, tokens, seconds):
    """Measure loader throughput on STORE against a raw sequential read of the same chunk files.

    Cold by default: the store's pages are dropped from the page cache before and during both
    measurements, standing in for a store much larger than RAM.
    """
    from .bench import bench as run_bench
    from .bench import format_bench

    result = run_bench(
        store, hook, warm=warm, batch_size=batch_size, buffer_mb=buffer_mb, n_readers=n_readers, seconds=seconds, tokens=tokens
    )
    click.echo(format_bench(result))


if __name__ == "__main__":
    main()
