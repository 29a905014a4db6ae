"""The training loop of one pass: every batch is given to every SAE of a bank.

`train_pass` takes ANY iterable of raw (B, d) float tensors (a `ShuffledLoader`, or an in-memory
list in tests) plus the `Normalizer` to apply on the device, and trains the bank for `n_steps`.
When the iterable has `state_dict()`/`load_state_dict()`, checkpoints record its position and a
resumed pass continues with exactly the batches an uninterrupted one would have seen.

One step (`train_step`): every group's loss and hand-written gradient, gradients averaged over ranks
(distributed runs), Adam with per-member learning rates under the decoder-norm constraint (the
decoder gradient's and update's components along each row removed, rows renormalized), then the
dead-latent counters, BatchTopK thresholds and the JumpReLU thresholds' projection onto >= 0.
"""

from __future__ import annotations

import json
import pathlib
import time
import warnings
from typing import Iterable

import torch
import torch.distributed as dist
import tqdm

from saev_store.errors import UserError
from saev_store.stats import Normalizer

from .checkpoint import load_checkpoint, save_checkpoint
from . import fused
from .config import SAEConfig, TrainConfig
from saev_store.distributed import rank_world
from .optim import BankAdam
from .sae import SAEBank, StepOut, StepStats, geometric_median
from .schedules import lr_factor, sparsity_factor


def set_precision(cfg: TrainConfig) -> None:
    """TF32 matmuls only when asked; fp32 stays exact (PyTorch's default may differ by version)."""
    if cfg.device.startswith("cuda"):
        allow = cfg.precision in ("tf32", "bf16")
        torch.backends.cuda.matmul.allow_tf32 = allow
        torch.backends.cudnn.allow_tf32 = allow


def compiled(cfg: TrainConfig) -> bool:
    """Whether this run's element-wise stages go through torch.compile (`TrainConfig.compile`): on a
    CUDA device with Triton (inductor's GPU code generator). Without Triton, auto runs them eagerly
    with a warning and "on" is refused; off CUDA the config already refused "on"."""
    if cfg.compile == "off" or not cfg.device.startswith("cuda"):
        return False
    if has_triton():
        return True
    if cfg.compile == "on":
        raise UserError("--compile on needs Triton for this GPU (`pip install triton`, or a PyTorch build that "
                        "ships it); use --compile off.")
    warnings.warn("Triton is not available for this GPU: the training step's element-wise stages run eagerly "
                  "(1.8x slower per step on an H100, benchmarks/README.md); `pip install triton` to fuse them.",
                  stacklevel=2)
    return False


def has_triton() -> bool:
    """Whether torch.compile can generate GPU kernels here (Triton installed and supporting this device)."""
    from torch.utils._triton import has_triton as _has_triton

    return bool(_has_triton())


def make_optimizer(bank: SAEBank, cfg: TrainConfig) -> BankAdam:
    """Adam over the bank with this run's betas, epsilon and (eager or compiled) element-wise stages."""
    return BankAdam(bank, cfg.adam_betas, cfg.adam_eps, fused.stages(compiled(cfg)))


def peak_lrs(bank: SAEBank, cfg: TrainConfig, device) -> list[torch.Tensor]:
    return [
        torch.tensor([c.effective_lr(cfg.scale_lr_with_width) for c in g.cfgs], dtype=torch.float32, device=device)
        for g in bank.groups
    ]


@torch.no_grad()
def init_b_dec(bank: SAEBank, x_bd: torch.Tensor, how: str) -> None:
    """Decoder bias at the first batch's mean or geometric median (averaged over ranks)."""
    if how == "zeros":
        return
    center = x_bd.float().mean(dim=0) if how == "mean" else geometric_median(x_bd.float())
    _, world = rank_world()
    if world > 1:
        dist.all_reduce(center)
        center /= world
    bank.init_b_dec(center)


def sparsity_coefs(bank: SAEBank, device) -> list[torch.Tensor]:
    """Per group, each member's peak sparsity coefficient (`SAEConfig.sparsity_coef`: L1 of ReLU and Gated,
    L0 of JumpReLU, 0 for TopK/BatchTopK)."""
    return [torch.tensor([c.sparsity_coef for c in g.cfgs], dtype=torch.float32, device=device) for g in bank.groups]


def compute_dtype(cfg: TrainConfig) -> torch.dtype:
    """dtype of the training step's matrix products and latents (weights, Adam and losses stay fp32)."""
    return torch.bfloat16 if cfg.precision == "bf16" else torch.float32


def train_step(bank: SAEBank, opt: BankAdam, x_bd: torch.Tensor, step: int, n_steps: int, cfg: TrainConfig,
               peak: list[torch.Tensor], coefs: list[torch.Tensor] | None = None) -> StepStats:
    """One optimizer step of every SAE on the normalized batch `x_bd` (this rank's share).

    `peak` (from `peak_lrs`) and `coefs` (from `sparsity_coefs`, built here when None) are per-group member
    vectors made once per pass, so a step allocates no small tensors from Python lists."""
    _, world = rank_world()
    sparsity_f = sparsity_factor(step, cfg.l1_warmup_steps)
    lr_f = lr_factor(step, n_steps, cfg.warmup_steps, cfg.schedule, cfg.lr_min_frac)
    if coefs is None:
        coefs = sparsity_coefs(bank, x_bd.device)
    cd = compute_dtype(cfg)
    opt.zero_grad()
    outs: list[StepOut] = [g.train_grads(x_bd, c * sparsity_f, cd, opt.stages, step) for g, c in zip(bank.groups, coefs)]
    if world > 1:
        grads = [p.grad for p in bank.parameters() if p.grad is not None]
        flat = torch.cat([gr.reshape(-1) for gr in grads])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for gr in grads:
            gr.copy_(flat[offset : offset + gr.numel()].view_as(gr))
            offset += gr.numel()
    opt.step([p * lr_f for p in peak])  # keeps decoder rows unit-norm (fused.adam_decoder_)
    with torch.no_grad():
        for g, o in zip(bank.groups, outs):
            fired, kept_min = o.fired, o.kept_min
            if world > 1:
                fired_f = fired.float()
                dist.all_reduce(fired_f, op=dist.ReduceOp.MAX)
                fired = fired_f > 0
                dist.all_reduce(kept_min, op=dist.ReduceOp.MIN)
            g.after_step(fired, x_bd.shape[0] * world, kept_min)
    if len(outs) == 1:
        return outs[0].stats
    return StepStats(*(torch.cat(t) for t in zip(*(o.stats for o in outs))))


class MetricLogger:
    """metrics.jsonl lines (one per SAE per log step), TensorBoard scalars when it is installed."""

    def __init__(self, out_dpath: str | pathlib.Path | None, enabled: bool = True):
        self.fpath = pathlib.Path(out_dpath) / "metrics.jsonl" if out_dpath is not None and enabled else None
        self.tb = None
        if self.fpath is not None:
            self.fpath.parent.mkdir(parents=True, exist_ok=True)
            try:  # optional: only when tensorboard is installed
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.fpath.parent / "tb"))
            except Exception:
                self.tb = None

    def log(self, rows: list[dict]) -> None:
        if self.fpath is None:
            return
        with open(self.fpath, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        if self.tb is not None:
            for r in rows:
                for k in (*StepStats._fields, "dead_frac", "lr"):
                    self.tb.add_scalar(f"{r['sae']}/{k}", r[k], r["step"])
            self.tb.add_scalar("patches_per_s", rows[0]["patches_per_s"], rows[0]["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _rank_state(batches) -> dict:
    """What differs between the ranks of a data-parallel run: the loader's position and the RNG states."""
    state = {"rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    if hasattr(batches, "state_dict"):
        state["loader"] = batches.state_dict()
    return state


def _save(ckpt_fpath, bank, opt, step, batches) -> None:
    """One checkpoint for the whole run, written by rank 0: the bank and Adam (equal on every rank, the
    gradients being averaged) and every rank's `_rank_state`. One file, replaced atomically, so killing
    the whole job at any moment leaves every rank's state at the same step."""
    rank, world = rank_world()
    mine = _rank_state(batches)
    ranks = [mine]
    if world > 1:
        ranks = [None] * world if rank == 0 else None
        dist.gather_object(mine, ranks, dst=0)
    if rank == 0:
        save_checkpoint(ckpt_fpath, {
            "step": step,
            "names": [c.name for c in bank.cfgs],
            "world_size": world,
            "bank": {k: v.detach().cpu() for k, v in bank.state_dict().items()},
            "opt": opt.state_dict(),
            "ranks": ranks,
        })


def train_pass(
    saes: tuple[SAEConfig, ...],
    cfg: TrainConfig,
    batches: Iterable[torch.Tensor],
    n_steps: int,
    normalizer: Normalizer | None = None,
    *,
    ckpt_fpath: str | pathlib.Path | None = None,
    logger: MetricLogger | None = None,
    pass_idx: int = 0,
    desc: str = "train",
) -> tuple[SAEBank, int]:
    """Train the SAEs `saes` for `n_steps` steps on `batches` (raw rows, normalized here by `normalizer`).

    With `ckpt_fpath`, a checkpoint there is resumed from (bank, Adam, step, each rank's loader position
    and RNG) and a new one written by rank 0 every `cfg.ckpt_every` steps and at the end. Returns (bank, steps done), the bank
    on `cfg.device`; fewer steps than asked only when `batches` runs out first.
    """
    rank, world = rank_world()
    device = torch.device(cfg.device)
    set_precision(cfg)
    bank = SAEBank(saes, cfg.fuse_encoders).to(device)
    opt = make_optimizer(bank, cfg)
    peak = peak_lrs(bank, cfg, device)
    coefs = sparsity_coefs(bank, device)
    step = 0
    ckpt = load_checkpoint(ckpt_fpath) if ckpt_fpath is not None else None
    if ckpt is not None:
        if ckpt["names"] != [c.name for c in bank.cfgs]:
            raise RuntimeError(f"checkpoint {ckpt_fpath} holds SAEs {ckpt['names']}, not this pass's; remove it.")
        if ckpt["world_size"] != world:
            raise UserError(f"checkpoint {ckpt_fpath} was written by {ckpt['world_size']} process(es), this run has "
                            f"{world}; resume with the process count the run started with.")
        mine = ckpt["ranks"][rank]
        bank.load_state_dict(ckpt["bank"])
        opt.load_state_dict(ckpt["opt"])
        step = int(ckpt["step"])
        torch.set_rng_state(mine["rng"])
        if mine.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(mine["cuda_rng"])
        if "loader" in mine and hasattr(batches, "load_state_dict"):
            batches.load_state_dict(mine["loader"])
    mean_t = scale = None
    if normalizer is not None:
        mean_t = torch.as_tensor(normalizer.mean, dtype=torch.float32, device=device)
        scale = float(normalizer.scale)

    bar = tqdm.tqdm(total=n_steps, initial=step, desc=desc, unit="step", disable=cfg.quiet or rank != 0, dynamic_ncols=True)
    if opt.stages.compiled and not bar.disable:
        bar.write("compiling the step's fused stages (torch.compile; tens of seconds, once per pass)")
    acc = None
    n_acc, rows_since, t_last = 0, 0, time.perf_counter()
    it = iter(batches)
    try:
        while step < n_steps:
            try:
                x = next(it)
            except StopIteration:
                break
            x = x.to(device, non_blocking=True).float()
            if mean_t is not None:
                x = (x - mean_t) * scale
            if step == 0:
                init_b_dec(bank, x, cfg.b_dec_init)
            stats = train_step(bank, opt, x, step, n_steps, cfg, peak, coefs)
            step += 1
            rows_since += x.shape[0] * world
            acc = [a + s for a, s in zip(acc, stats)] if acc is not None else list(stats)
            n_acc += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == n_steps:
                acc_cpu = [(a / n_acc).cpu() for a in acc]
                dt = time.perf_counter() - t_last
                pps = rows_since / max(dt, 1e-9)
                dead = torch.cat([(g.tokens_since_fired >= g.dead_after[:, None]).float().mean(-1) for g in bank.groups]).cpu()
                lr_f = lr_factor(step - 1, n_steps, cfg.warmup_steps, cfg.schedule, cfg.lr_min_frac)
                rows = [
                    {
                        "pass": pass_idx, "step": step, "sae": c.name,
                        **{k: float(v[i]) for k, v in zip(StepStats._fields, acc_cpu)}, "dead_frac": float(dead[i]),
                        "lr": c.effective_lr(cfg.scale_lr_with_width) * lr_f, "patches_per_s": pps,
                    }
                    for i, c in enumerate(bank.cfgs)
                ]
                if logger is not None and rank == 0:
                    logger.log(rows)
                avg = StepStats(*acc_cpu)
                bar.set_postfix(mse=f"{float(avg.mse.mean()) / cfg.d_in:.3g}", L0=f"{float(avg.l0.mean()):.3g}",
                                dead=f"{float(dead.mean()):.2f}", pps=f"{pps:,.0f}")
                acc, n_acc, rows_since, t_last = None, 0, 0, time.perf_counter()
            if ckpt_fpath is not None and ((cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == n_steps):
                _save(ckpt_fpath, bank, opt, step, batches)
    finally:
        bar.close()
    return bank, step
