"""`saev-train STORE --hook H`: train several SAEs per pass over a store. A thin face over `run_training`."""

from __future__ import annotations

import dataclasses
import os

import click

from saev_store.errors import UserError, cli_errors

from .config import ARCHS, K_ARCHS, OBJECTIVES, SAEConfig

_SAE_DEFAULT = {f.name: f.default for f in dataclasses.fields(SAEConfig)}


_user_errors = cli_errors("the last checkpoint is kept; rerun the same command with --resume.")


def _list(value: str | None, kind=float, what: str = "value") -> list | None:
    if value is None:
        return None
    try:
        return [kind(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what} {value!r} must be a comma-separated list of numbers.") from None


def _init_distributed(device: str) -> str:
    """Under `accelerate launch` / torchrun, join the process group; returns this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    from accelerate import PartialState

    state = PartialState(cpu=not device.startswith("cuda"))
    return str(state.device) if device.startswith("cuda") else "cpu"


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("store")
@click.option("--hook", required=True, help="Hook of the store to train on (see `saev-store info STORE`).")
@click.option("--tokens", default="patches", show_default=True, type=click.Choice(["patches", "cls", "all"]))
@click.option("--width", default="4x,8x,16x", show_default=True,
              help="Comma list of widths: 'Nx' (or a bare N <= 256) is N * d_in latents, larger numbers are absolute.")
@click.option("--arch", default=None, type=click.Choice(ARCHS),
              help="Architecture [default: relu, or topk when --k is given].")
@click.option("--objective", default="vanilla", show_default=True, type=click.Choice(OBJECTIVES),
              help="matryoshka: also reconstruct from nested prefixes of the dictionary (relu/topk/batchtopk).")
@click.option("--l1", default="1,2,4", show_default=True, help="Comma list of L1 coefficients (relu; gated, on the gate).")
@click.option("--k", default=None, help="Comma list of active latents per token (topk/batchtopk).")
@click.option("--l0-coef", default=str(_SAE_DEFAULT["l0_coef"]), show_default=True,
              help="Comma list of L0 coefficients (jumprelu).")
@click.option("--bandwidth", default=_SAE_DEFAULT["bandwidth"], show_default=True, type=float,
              help="JumpReLU straight-through estimators' kernel width.")
@click.option("--init-threshold", default=_SAE_DEFAULT["init_threshold"], show_default=True, type=float,
              help="JumpReLU thresholds at step 0.")
@click.option("--prefixes", default=None, help="Matryoshka: fixed comma list of prefix lengths [default: saev's random draws].")
@click.option("--n-prefixes", default=_SAE_DEFAULT["n_prefixes"], show_default=True, type=int,
              help="Matryoshka: prefixes drawn per step when --prefixes is not given (the whole width included).")
@click.option("--lr", default="1e-3", show_default=True, help="Comma list of peak learning rates.")
@click.option("--sweep", "sweep_fpath", default=None, type=click.Path(dir_okay=False),
              help="TOML file listing the SAEs instead of --width/--l1/--k/--lr (see trainers/sweep.py).")
@click.option("--parallel", default=9, show_default=True, type=int, help="SAEs sharing one pass over the data.")
@click.option("--batch-size", default=4096, show_default=True, type=int, help="Rows per step (all ranks together).")
@click.option("--n-patches", default=None, type=int, help="Training budget in patches [default: --n-epochs epochs].")
@click.option("--n-epochs", default=1, show_default=True, type=int)
@click.option("--warmup-steps", default=100, show_default=True, type=int, help="Linear learning-rate warmup.")
@click.option("--schedule", default="constant", show_default=True, type=click.Choice(["constant", "cosine"]))
@click.option("--lr-min-frac", default=0.0, show_default=True, type=float, help="Cosine end value / peak.")
@click.option("--l1-warmup-steps", default=100, show_default=True, type=int, help="Linear L1-coefficient warmup.")
@click.option("--scale-lr-with-width/--no-scale-lr-with-width", default=False, show_default=True,
              help="lr / sqrt(d_sae / 2^14) per SAE.")
@click.option("--b-dec-init", default="mean", show_default=True, type=click.Choice(["mean", "median", "zeros"]),
              help="Decoder bias at the first batch's mean or geometric median.")
@click.option("--aux-coef", default=1 / 32, show_default=True, type=float, help="Dead-latent auxiliary loss weight (topk).")
@click.option("--dead-after", default=1_000_000, show_default=True, type=int, help="Tokens without firing before a latent is dead.")
@click.option("--normalize/--no-normalize", default=True, show_default=True, help="Use the store's statistics.")
@click.option("--fuse-encoders/--no-fuse-encoders", default=True, show_default=True,
              help="Equal-width encoders as one matrix product (else one bmm).")
@click.option("--held-out", default=0.1, show_default=True, type=float, help="Fraction of images held out for evaluation.")
@click.option("--max-eval-images", default=2000, show_default=True, type=int, help="Cap on held-out images evaluated.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--ckpt-every", default=500, show_default=True, type=int, help="Steps between checkpoints (0: end only).")
@click.option("--log-every", default=50, show_default=True, type=int)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1 ...")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "tf32", "bf16"]))
@click.option("--compile", "compile_", default="auto", show_default=True, type=click.Choice(["auto", "on", "off"]),
              help="Fuse the step's element-wise stages and Adam with torch.compile (auto: on CUDA with Triton).")
@click.option("--buffer-mb", default=512, show_default=True, type=int, help="Loader shuffle buffer.")
@click.option("--n-readers", default=2, show_default=True, type=int, help="Loader chunk readers in flight.")
@click.option("--out", "out_dpath", default=None, help="Run directory [default: runs/<store name>-<hook>].")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out (same settings).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_user_errors
def main(store, hook, tokens, width, arch, objective, l1, k, l0_coef, bandwidth, init_threshold, prefixes, n_prefixes,
         lr, sweep_fpath, parallel, batch_size, n_patches, n_epochs, warmup_steps,
         schedule, lr_min_frac, l1_warmup_steps, scale_lr_with_width, b_dec_init, aux_coef, dead_after, normalize,
         fuse_encoders, held_out, max_eval_images, seed, ckpt_every, log_every, device, precision, compile_, buffer_mb,
         n_readers, out_dpath, resume, quiet):
    """Train sparse autoencoders on one hook of STORE, several per pass over the data.

    The SAEs are the product of --width, the architecture's sparsity list (--l1 for relu and gated, --k for
    topk and batchtopk, --l0-coef for jumprelu) and --lr, or the entries of --sweep. The defaults train nine:
    three widths times three L1 coefficients.
    """
    import pathlib

    from saev_store.store import open_store

    from .config import TrainConfig
    from .run import run_training
    from .sweep import expand, from_toml

    device = _init_distributed(device)
    st = open_store(store)
    if hook not in st.hooks:
        raise UserError(f"hook {hook!r} is not in {store}; it has {', '.join(st.hooks)}. Pass one with --hook.")
    d_in = st.hook(hook).d
    if sweep_fpath is not None:
        saes = from_toml(sweep_fpath, d_in, seed)
    else:
        arch = arch or ("topk" if k is not None else "relu")
        if k is not None and arch not in K_ARCHS:
            raise UserError(f"--k is for topk/batchtopk SAEs; a {arch} SAE takes "
                            f"{'--l0-coef' if arch == 'jumprelu' else '--l1'}.")
        spec = {"width": width.split(","), "lr": _list(lr, float, "--lr"), "arch": arch, "objective": objective,
                "l1": _list(l1, float, "--l1"), "l0_coef": _list(l0_coef, float, "--l0-coef"), "aux_coef": aux_coef,
                "dead_after": dead_after, "bandwidth": bandwidth, "init_threshold": init_threshold}
        if k is not None:
            spec["k"] = _list(k, int, "--k")
        if prefixes is not None:
            spec["prefixes"] = _list(prefixes, int, "--prefixes")
        if objective == "matryoshka":
            spec["n_prefixes"] = n_prefixes
        saes = expand(spec, d_in, seed)
    if out_dpath is None:
        out_dpath = str(pathlib.Path("runs") / f"{pathlib.Path(store.rstrip('/')).stem}-{hook}")
    cfg = TrainConfig(
        saes=tuple(saes), out_dpath=out_dpath, store=store, hook=hook, tokens=tokens, normalize=normalize,
        batch_size=batch_size, n_patches=n_patches, n_epochs=n_epochs, warmup_steps=warmup_steps, schedule=schedule,
        lr_min_frac=lr_min_frac, l1_warmup_steps=l1_warmup_steps, scale_lr_with_width=scale_lr_with_width,
        b_dec_init=b_dec_init, seed=seed, parallel=parallel, fuse_encoders=fuse_encoders, ckpt_every=ckpt_every,
        log_every=log_every, held_out_frac=held_out, max_eval_images=max_eval_images, device=device,
        precision=precision, compile=compile_, buffer_mb=buffer_mb, n_readers=n_readers, quiet=quiet,
    )
    n_pass = len(cfg.passes())
    click.echo(f"training {len(saes)} SAEs on {store} [{hook}, {tokens}, d={d_in}] in {n_pass} pass(es) -> {out_dpath}",
               err=True)
    from .distributed import rank_world

    rows = run_training(cfg, resume=resume)
    if rank_world()[0] == 0:
        click.echo((pathlib.Path(out_dpath) / "table.md").read_text())
        click.echo(f"wrote {len(rows)} SAEs to {out_dpath} (table.csv, table.md, <sae>/metrics.json, <sae>/freq.png)", err=True)


if __name__ == "__main__":  # `accelerate launch -m trainers.cli STORE ...`
    main()
