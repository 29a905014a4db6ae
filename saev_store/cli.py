"""`saev-store`: record, inspect, verify and benchmark activation stores. A thin face over the API.

Every option of `record` and `bench` is a field of `RecordConfig` / `BenchConfig` (saev_store/options.py
makes the flags from them).

    saev-store record --out demo.zarr
    accelerate launch --multi_gpu --num_processes 8 -m saev_store.cli record --out vit.zarr ...   # one process per GPU
    torchrun --nproc_per_node 2 -m saev_store.cli record --out vit.zarr ...                       # also on CPU (gloo)
"""

from __future__ import annotations

import json
import sys

import click

from .add_labels import AddLabelsConfig
from .bench import BenchConfig
from .errors import cli_class
from .options import build, given, options
from .record import RecordConfig

ON_INTERRUPT = "finished chunks are kept; rerun the same command to resume."


@click.group(cls=cli_class(click.Group, ON_INTERRUPT), context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="saev-store")
def main():
    """Record vision-model activations into a Zarr v3 store, inspect, verify and benchmark it."""


@main.command()
@options(RecordConfig)
def record(**params):
    """Run a model over a dataset and store per-token activations (resumes an interrupted run)."""
    from .record import record as run_record

    cfg = build(RecordConfig, params, explicit=given())
    res = run_record(cfg)
    if res["rank"] != 0:
        return
    if res.get("already_complete"):
        click.echo(f"{cfg.out} is already complete; nothing to do (pass --overwrite to record it again).")
    else:
        mb = res["bytes_written"] / 2**20
        secs = max(res["seconds"], 1e-9)
        click.echo(
            f"recorded {res['images_written']} images ({mb:.1f} MiB, {res['images_written'] / secs:.1f} img/s, "
            f"{mb / secs:.1f} MiB/s) into {cfg.out}; complete: {res['complete']}"
        )


@main.command("add-labels")
@options(AddLabelsConfig)
def add_labels(**params):
    """Add per-patch labels from label masks to STORE, without recording again (resumes an interrupted run)."""
    from .add_labels import add_labels as run_add_labels

    cfg = build(AddLabelsConfig, params, explicit=given())
    store = cfg.store
    res = run_add_labels(cfg)
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
def info(store, as_json):
    """Hooks, shapes, dtype, size on disk, completion and metadata of a store."""
    from .store import open_store
    from .verify import format_info, info as store_info

    summary = store_info(open_store(store))
    click.echo(json.dumps(summary, indent=2) if as_json else format_info(summary))


@main.command()
@click.argument("store")
@click.option("--quiet", is_flag=True, help="No progress bar.")
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
@options(RecordConfig, only=("model", "weights"))
@click.option("--all", "show_all", is_flag=True, help="List every module, not only the numbered layers.")
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
@options(BenchConfig)
def bench(store, **params):
    """Measure loader throughput on STORE against a raw sequential read of the same chunk files.

    Cold by default: the store's pages are dropped from the page cache before and during both
    measurements, standing in for a store much larger than RAM.
    """
    from .bench import bench as run_bench
    from .bench import format_bench

    click.echo(format_bench(run_bench(store, build(BenchConfig, params, explicit=given()))))


if __name__ == "__main__":  # `accelerate launch -m saev_store.cli record ...`, `torchrun -m saev_store.cli record ...`
    main()
