"""`saev-store bench STORE`: the shuffled loader against a raw read of the same files (saev_store.bench)."""

from __future__ import annotations

import click

from .loaders import DEFAULT_BUFFER_MB, DEFAULT_N_READERS


@click.command("bench")
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--hook", default=None, help="Hook to read (default: the store's first hook).")
@click.option("--warm", is_flag=True, help="Measure with the store in the page cache instead of evicting it.")
@click.option("--batch-size", default=4096, show_default=True, type=click.IntRange(min=1), help="Rows per batch.")
@click.option("--buffer-mb", default=DEFAULT_BUFFER_MB, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Shuffle buffer size in MiB.")
@click.option("--n-readers", default=DEFAULT_N_READERS, show_default=True, type=click.IntRange(min=1), help="Chunk reads in flight.")
@click.option("--tokens", default="patches", show_default=True, type=click.Choice(["patches", "cls", "all"]), help="Token selection.")
@click.option("--seconds", default=10.0, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Length of each measurement.")
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
