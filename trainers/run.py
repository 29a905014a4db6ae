"""A whole training run over a store: split, passes, evaluation, export, the L0/FVU table.

    from trainers.run import run_training
    rows = run_training(train_cfg, resume=False)   # list of per-SAE result dicts (the table)

Run directory layout (`cfg.out_dpath`):
    run.json                      what is trained (store, hook, tokens, SAE names, config) + passes done
    <sae name>/cfg.json ...       one exported SAE per folder (SAELens layout + saev_extra.json)
    <sae name>/metrics.json       held-out evaluation; <sae name>/freq.png its firing-frequency histogram
    metrics.jsonl                 training metrics every `log_every` steps
    table.csv, table.md           every SAE of the run: L0 against FVU
    ckpt/pass<j>.pt               checkpoint of the pass in progress, every rank's position in it (removed
                                  when the pass is exported)

Under a launcher, process 0 alone decides about the directory (create it, refuse it, resume it), writes
run.json, checkpoints, exports and the table, and hands every decision and error to the others
(`agree`), so every process stops with the same message. The directory must be one every process
sees (one machine, or a shared filesystem).
"""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
import shutil
from typing import Iterator

import numpy as np
import torch

from saev_store.errors import UserError
from saev_store.stats import Normalizer

from .config import TrainConfig
from .export import export_sae
from .metrics import HIST_EDGES, FVUAccumulator, SAEAccumulator
from .sae import SAEBank
from .sae_io import RUN_FNAME
from saev_store.distributed import agree, rank_world
from .train import MetricLogger, train_pass

TABLE_COLUMNS = ("name", "arch", "d_sae", "sparsity", "lr", "l0", "fvu", "mse", "n_dead", "n_almost_dead", "n_dense")
RESUME_IGNORED = ("quiet", "device", "n_readers")
"""Config fields that may change between an interrupted run and its resume (they do not change the
result; `buffer_mb` does, since the shuffle order depends on the buffer's size)."""


def held_out_mask(valid_n: np.ndarray, frac: float, seed: int) -> np.ndarray:
    """Bool (n_images,): a random `frac` of the valid images (at least one when frac > 0), by image."""
    idx = np.flatnonzero(valid_n)
    n_held = int(round(frac * idx.size))
    if frac > 0:
        n_held = max(1, min(n_held, idx.size - 1))
    rng = np.random.default_rng([seed, 0x5AE])
    held = np.zeros(valid_n.shape[0], dtype=bool)
    held[rng.permutation(idx)[:n_held]] = True
    return held


def _write_json_atomic(fpath: pathlib.Path, obj) -> None:
    tmp = fpath.with_name(fpath.name + ".partial")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, fpath)


def _open_run_dir(cfg: TrainConfig, resume: bool, world: int = 1) -> dict:
    """Create the run directory or check the one being resumed; returns run.json's contents.

    Process 0's decision (`run_training` calls it there only): the others would find the directory it
    has just created. The number of processes is part of the result (each rank reads its own chunks),
    so a run resumes only with the number it started with."""
    out = pathlib.Path(cfg.out_dpath)
    run_fpath = out / RUN_FNAME
    want = cfg.to_dict()
    if run_fpath.is_file():
        if not resume:
            raise UserError(f"{out} already holds a training run; pass --resume to continue it or choose another --out.")
        info = json.loads(run_fpath.read_text())
        have = info["config"]
        diff = sorted(k for k in set(want) | set(have) if k not in RESUME_IGNORED and want.get(k) != have.get(k))
        if diff:
            raise UserError(f"cannot resume {out}: the settings {', '.join(diff)} differ from the interrupted run; "
                            f"rerun with the same settings or choose another --out.")
        if info.get("world_size", 1) != world:
            raise UserError(f"cannot resume {out}: it was trained by {info.get('world_size', 1)} process(es), this run has "
                            f"{world}; resume it with the launcher and process count it started with.")
        return info
    if out.exists() and any(p.name != "metrics.jsonl" for p in out.iterdir()) and not resume:
        raise UserError(f"{out} exists and is not a training run; choose another --out or remove it.")
    out.mkdir(parents=True, exist_ok=True)
    info = {"store": cfg.store, "hook": cfg.hook, "tokens": cfg.tokens, "saes": [s.name for s in cfg.saes],
            "passes_done": [], "world_size": world, "config": want}
    _write_json_atomic(run_fpath, info)
    return info


def _eval_rows(store, cfg: TrainConfig, mask_n: np.ndarray) -> Iterator[torch.Tensor]:
    from saev_store.loaders import OrderedLoader

    with OrderedLoader(store, cfg.hook, tokens=cfg.tokens, normalize=False, image_mask=mask_n) as loader:
        for block in loader:
            acts = block.acts
            yield acts.reshape(-1, acts.shape[-1])


@torch.no_grad()
def evaluate(bank: SAEBank, rows: Iterator[torch.Tensor], normalizer: Normalizer, device, eval_batch: int = 2048) -> dict:
    """Held-out metrics of every SAE of the bank (inference form: BatchTopK as its JumpReLU): name -> EvalMetrics.

    The data's own statistics (the FVU denominator) are accumulated once for the whole bank; each
    SAE then costs its forward pass (member chunks, as in training) and three reductions, reduced
    on the device and copied to the host as (d_sae,) counts and scalars."""
    data = FVUAccumulator(bank.cfgs[0].d_in)
    accs = {c.name: SAEAccumulator(c.d_in, c.d_sae, data) for c in bank.cfgs}
    mean_t = torch.as_tensor(normalizer.mean, dtype=torch.float32, device=device)
    for x_raw in rows:
        for start in range(0, x_raw.shape[0], eval_batch):
            x = (x_raw[start : start + eval_batch].to(device).float() - mean_t) * float(normalizer.scale)
            data.add_rows(x)
            x64 = x.double()
            for g in bank.groups:
                for a, b in g.chunks(x.shape[0], x.device):
                    z, _ = g.activate(g.pre_acts(x, a, b), a, b, train=False, inplace=True)
                    sse = (g.decode(z, a, b).double() - x64).pow_(2).sum(dim=(1, 2)).tolist()
                    l1 = z.sum(dim=(1, 2), dtype=torch.float64).tolist()
                    n_fired = (z > 0).sum(dim=1, dtype=torch.int32).cpu()
                    for j in range(b - a):
                        accs[g.cfgs[a + j].name].add(sse[j], l1[j], n_fired[j])
    return {name: a.result() for name, a in accs.items()}


def plot_freq(freq: np.ndarray, title: str, fpath: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    pos = freq[freq > 0]
    ax.hist(np.log10(pos), bins=HIST_EDGES, color="tab:blue")
    ax.set_xlabel("log10 firing frequency (held-out patches)")
    ax.set_ylabel("latents")
    ax.set_title(f"{title}  ({int((freq == 0).sum())} never fire)", fontsize=9)
    fig.tight_layout()
    fig.savefig(fpath)
    plt.close(fig)


def write_table(out: pathlib.Path, rows: list[dict]) -> str:
    """table.csv and table.md; returns the markdown."""
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=TABLE_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in TABLE_COLUMNS})

    def fmt(k, v):
        if isinstance(v, float):
            return f"{v:.4f}" if k in ("fvu", "mse") else f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(fmt(k, r[k]) for k in TABLE_COLUMNS) + " |" for r in sorted(rows, key=lambda r: r["l0"])]
    md = "\n".join(lines) + "\n"
    (out / "table.md").write_text(md)
    return md


def _table_row(c, m: dict, cfg: TrainConfig) -> dict:
    return {"name": c.name, "arch": c.label, "d_sae": c.d_sae, "sparsity": c.sparsity,
            "lr": c.effective_lr(cfg.scale_lr_with_width), **{k: m[k] for k in TABLE_COLUMNS[5:]}}


def run_training(cfg: TrainConfig, resume: bool = False) -> list[dict]:
    """Train, evaluate and export every SAE of `cfg` on its store; returns the table rows."""
    from saev_store.loaders import ShuffledLoader
    from saev_store.store import open_store

    if cfg.store is None:
        raise UserError("no store given; pass the path of a store written by `saev-store record`.")
    rank, world = rank_world()
    store = open_store(cfg.store)
    if cfg.hook not in store.hooks:
        raise UserError(f"hook {cfg.hook!r} is not in {cfg.store}; it has {', '.join(store.hooks)}. Pass one with --hook.")
    d = store.hook(cfg.hook).d
    if d != cfg.d_in:
        raise UserError(f"hook {cfg.hook!r} has d={d} but the SAEs were configured for d_in={cfg.d_in}.")
    if cfg.batch_size % world:
        raise UserError(f"batch size {cfg.batch_size} does not split over {world} processes; make it a multiple.")
    normalizer = store.normalizer(cfg.hook, cfg.tokens) if cfg.normalize else Normalizer.identity(d)
    held = held_out_mask(store.valid(), cfg.held_out_frac, cfg.seed)
    train_mask = store.valid() & ~held
    if not train_mask.any():
        raise UserError(f"{cfg.store} has no valid training images; record more images or lower --held-out.")
    eval_mask = held.copy() if held.any() else train_mask.copy()
    if cfg.max_eval_images is not None:
        eval_mask[np.flatnonzero(eval_mask)[cfg.max_eval_images :]] = False

    out = pathlib.Path(cfg.out_dpath)
    info = agree(lambda: _open_run_dir(cfg, resume, world), rank0_only=True)
    logger = MetricLogger(out, enabled=rank == 0)
    bs = cfg.batch_size // world
    model = store.attrs.get("model")
    model_name = model.get("name") if isinstance(model, dict) else None
    rows: list[dict] = []
    try:
        for j, saes in enumerate(cfg.passes()):
            if j in info["passes_done"]:
                for c in saes:
                    m = json.loads((out / c.name / "metrics.json").read_text())
                    rows.append(_table_row(c, m, cfg))
                continue
            n_rows = None
            if cfg.n_patches is not None:
                n_steps = math.ceil(cfg.n_patches / cfg.batch_size)
                n_rows = n_steps * cfg.batch_size  # counted over the whole world
            loader = ShuffledLoader(store, cfg.hook, batch_size=bs, tokens=cfg.tokens, normalize=False, seed=cfg.seed,
                                    n_epochs=cfg.n_epochs, n_rows=n_rows, buffer_mb=cfg.buffer_mb, n_readers=cfg.n_readers,
                                    rank=rank, world_size=world, image_mask=train_mask, drop_last=True)
            with loader:
                if cfg.n_patches is None:
                    n_steps = loader.n_batches  # equal on every rank (the loader's contract)
                if n_steps < 1:
                    raise UserError(f"{cfg.store} has fewer training rows than one batch ({cfg.batch_size}); "
                                    "lower --batch-size or record more images.")
                desc = f"pass {j + 1}/{len(cfg.passes())}"
                bank, _ = train_pass(saes, cfg, loader, n_steps, normalizer, ckpt_fpath=out / "ckpt" / f"pass{j}.pt",
                                     logger=logger, pass_idx=j, desc=desc)
            rows += agree(lambda: _export_pass(bank, cfg, store, info, j, normalizer, eval_mask, held, model_name),
                          rank0_only=True)
    finally:
        logger.close()
    agree(lambda: write_table(out, rows), rank0_only=True)
    return rows


def _export_pass(bank: SAEBank, cfg: TrainConfig, store, info: dict, j: int, normalizer: Normalizer,
                 eval_mask: np.ndarray, held: np.ndarray, model_name: str | None) -> list[dict]:
    """Evaluate and export pass `j`'s SAEs, mark the pass done in run.json and drop its checkpoint
    (process 0's work); returns their table rows."""
    out = pathlib.Path(cfg.out_dpath)
    results = evaluate(bank, _eval_rows(store, cfg, eval_mask), normalizer, torch.device(cfg.device))
    rows = []
    for c in bank.cfgs:
        res = results[c.name]
        metrics = {**res.summary(), "eval_on": "held_out" if held.any() else "train", "n_eval_images": int(eval_mask.sum())}
        sae_dpath = export_sae(out / c.name, c, bank.member_weights(c.name), normalizer, hook=cfg.hook,
                               store=str(cfg.store), tokens=cfg.tokens, freq=res.freq, metrics=metrics,
                               train_cfg=cfg.to_dict(), model=model_name)
        (sae_dpath / "metrics.json").write_text(json.dumps(metrics, indent=2))
        plot_freq(res.freq, f"{c.name}: L0 {res.l0:.1f}, FVU {res.fvu:.3f}", sae_dpath / "freq.png")
        rows.append(_table_row(c, metrics, cfg))
    info["passes_done"].append(j)
    _write_json_atomic(out / RUN_FNAME, info)
    shutil.rmtree(out / "ckpt", ignore_errors=True)
    return rows
