"""`saev-train STORE --hook H`: train several SAEs per pass over a store. A thin face over `run_training`.

The run options are TrainConfig's fields and the SAE flags are the sweep keys (trainers/sweep.py), both
made into click options by saev_store/options.py.

    saev-train demo/fmnist.zarr --hook _blocks.10 --out demo/run
    accelerate launch --multi_gpu --num_processes 4 -m trainers.cli STORE --hook H ...   # data parallel
    torchrun --nproc_per_node 2 -m trainers.cli STORE --hook H ...                        # also on CPU (gloo)
"""

from __future__ import annotations

import dataclasses
import os

import click

from saev_store.errors import UserError, cli_class
from saev_store.options import build, click_param, given, options

from .config import TrainConfig
from .sweep import axes

ON_INTERRUPT = "the last checkpoint is kept; rerun the same command with --resume."


def _init_distributed(device: str) -> str:
    """Under `accelerate launch` / torchrun, join the process group; returns this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    from accelerate import PartialState

    state = PartialState(cpu=not device.startswith("cuda"))
    return str(state.device) if device.startswith("cuda") else "cpu"


def _sae_options(fn):
    """One comma-list flag per sweep key: the SAEs are the product of the lists (or the --sweep file's)."""
    for key, axis in reversed(list(axes().items())):
        text = f"{axis.spec.help} A comma list" + (f" of {', '.join(axis.spec.choices)}." if axis.spec.choices else ".")
        spec = axis.spec._replace(kind="list", n_items=None)
        for deco in reversed(click_param(spec, default=None, help=text, doc_default=axis.grid_doc)):
            fn = deco(fn)
    return fn


@click.command(cls=cli_class(click.Command, ON_INTERRUPT), context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@_sae_options
@options(TrainConfig)
@click.option("--sweep", "sweep_fpath", default=None, type=click.Path(dir_okay=False),
              help="TOML file listing the SAEs instead of the product of the SAE flags (see trainers/sweep.py).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out (same settings).")
def main(sweep_fpath, resume, **params):
    """Train sparse autoencoders on one hook of STORE, several per pass over the data.

    The SAEs are the product of --width, --arch, --objective, the sparsity flag of each architecture (--l1 for
    relu and gated, --k for topk and batchtopk, --l0-coef for jumprelu), --lr and the other SAE flags, or the
    entries of --sweep. The defaults train nine: three widths times three L1 coefficients.
    """
    import pathlib

    from saev_store.store import open_store

    from saev_store.distributed import rank_world
    from .run import run_training
    from .sweep import expand, from_toml

    explicit = given()
    sae_spec = {key: list(params.pop(key)) for key in list(axes()) if params[key] is not None}
    for key in axes():
        params.pop(key, None)
    params["device"] = _init_distributed(params["device"])
    store, hook = params["store"], params["hook"]
    st = open_store(store)
    if hook not in st.hooks:
        raise UserError(f"hook {hook!r} is not in {store}; it has {', '.join(st.hooks)}. Pass one with --hook.")
    d_in = st.hook(hook).d
    if sweep_fpath is not None:
        saes = from_toml(sweep_fpath, d_in, params["seed"], base=sae_spec)
    else:
        saes = expand(sae_spec, d_in, params["seed"])
    cfg = build(TrainConfig, params, explicit=explicit, saes=tuple(saes))
    rank, world = rank_world()
    if rank == 0:
        on = f" on {world} processes" if world > 1 else ""
        click.echo(f"training {len(saes)} SAEs on {store} [{hook}, {cfg.tokens}, d={d_in}] in {len(cfg.passes())} pass(es)"
                   f"{on} -> {cfg.out_dpath}", err=True)
    rows = run_training(cfg, resume=resume)
    if rank == 0:
        click.echo((pathlib.Path(cfg.out_dpath) / "table.md").read_text())
        click.echo(f"wrote {len(rows)} SAEs to {cfg.out_dpath} (table.csv, table.md, <sae>/metrics.json, <sae>/freq.png)", err=True)


if __name__ == "__main__":  # `accelerate launch -m trainers.cli STORE ...`
    main()
