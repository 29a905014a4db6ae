"""The training step's element-wise stages, written once in plain PyTorch and compiled on CUDA.

On a GPU the step's matrix products run near the tensor cores' rate; what is left is memory
traffic, and every eager element-wise op is one more pass over a big tensor: the (n, B, d_sae)
latents (1.8 GB in bf16 for nine 24,576-wide SAEs at batch 4096, ~0.6 ms per pass on an H100) or
Adam's fp32 parameters, gradients and moments (4 x 1.36 GB for the same bank). `torch.compile`
fuses each stage below into one or two kernels:

* `relu_stats_`: ReLU in place, per-latent activation sums and firing counts (L1, L0 and the
  dead-latent bookkeeping follow from those (n, d_sae) tables): one read and one write of the
  latents, against six passes and a bool temporary eagerly.
* `mask_grad_`: the latent gradient's L1 term and the ReLU/TopK mask (dpre = dz + l1 / B where
  z > 0, else 0): one pass, against a broadcast bias copy and a three-operand pass eagerly.
* `adam_` / `adam_decoder_`: Adam with per-member step sizes, the decoder's version also
  removing the gradient's and the update's components along each row and renormalizing the
  rows: one read of parameter, gradient and both moments and one write of three, against ~16
  tensor passes (plus ~5 for the decoder constraint) eagerly.

On a CPU they run eagerly on cache-sized pieces (`sae.CPU_CHUNK_BYTES`, `optim.CPU_SLICE_BYTES`),
where each pass is cheap. `tests/test_fused.py` checks the compiled forms against the eager ones.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .constraints import remove_parallel_, renormalize_rows_


def relu_stats_(pre_mbs: torch.Tensor, acc_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ReLU in place on pre-activations (m, B, d_sae). Returns (z (the same storage), per-latent sum
    of z over rows (m, d_sae) in `acc_dtype`, per-latent count of rows with z > 0 (m, d_sae) int32).
    Both tables reduce over the row axis only, so a compiled kernel makes them in one read."""
    z = pre_mbs.clamp_min_(0)
    sums, counts = latent_stats(z, acc_dtype)
    return z, sums, counts


def latent_stats(z_mbs: torch.Tensor, acc_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-latent sum of z over rows (m, d_sae), per-latent count of rows with z > 0 (m, d_sae) int32)."""
    return z_mbs.sum(1, dtype=acc_dtype), (z_mbs > 0).sum(1, dtype=torch.int32)


def mask_grad_(dz_mbs: torch.Tensor, z_mbs: torch.Tensor, c_m: torch.Tensor) -> torch.Tensor:
    """In place: dz <- dz + c (per member) where z > 0, else 0 (d loss / d pre-activations of a
    ReLU/TopK latent with L1 coefficient c / B folded in as c). Returns dz."""
    dz_mbs.add_(c_m[:, None, None].to(dz_mbs.dtype))
    # ReLU's own backward kernel, in place: eagerly on a CPU it is ~5x faster than masked_fill_ with
    # a bool mask on this transposed layout.
    return torch.ops.aten.threshold_backward.grad_input(dz_mbs, z_mbs, 0, grad_input=dz_mbs)


def adam_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: torch.Tensor,
          eps_c: torch.Tensor, b1: float, b2: float) -> None:
    """One Adam update in place: p -= lr / (1 - b1^t) * m / (sqrt(v) / c + eps), written as
    p -= step * m / (sqrt(v) + eps c) with c = sqrt(1 - b2^t), step = lr c / (1 - b1^t) broadcast
    along the member axis and eps_c = eps c a 0-d tensor (see `optim.BankAdam.step`). At lr 0 the
    step is exactly 0, also where m and v are 0 (a latent that never fired), as in `torch.optim.Adam`."""
    p.addcmul_(_ratio_(g, m, v, eps_c, b1, b2), step, value=-1.0)


def adam_decoder_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: torch.Tensor,
                  eps_c: torch.Tensor, b1: float, b2: float) -> None:
    """`adam_` for decoder rows (last axis) under the unit-norm constraint (constraints.py): the
    gradient's component along each row is removed before the moments see it (in place in `g`),
    the update's after Adam's per-element scaling, and the rows are renormalized after the step."""
    remove_parallel_(g, p)
    update = _ratio_(g, m, v, eps_c, b1, b2).mul_(step)
    p.sub_(remove_parallel_(update, p))
    renormalize_rows_(p)


def _ratio_(g, m, v, eps_c: torch.Tensor, b1: float, b2: float) -> torch.Tensor:
    """Adam's moments updated in place with `g`; returns m / (sqrt(v) + eps c) in a new tensor.

    The learning rate multiplies this ratio afterwards instead of dividing its denominator: the
    denominator's inverse 1 / lr is infinite at lr 0 and 0 * inf is NaN where v is 0."""
    m.lerp_(g, 1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = torch.sqrt(v).add_(eps_c)
    return torch.div(m, denom, out=denom)


class Stages(NamedTuple):
    """The four stages, eager or compiled (`stages(compile=...)`)."""

    relu_stats_: Callable
    mask_grad_: Callable
    adam_: Callable
    adam_decoder_: Callable
    compiled: bool
    """Compiled stages take whole tensors: cutting them into cache-sized pieces (as the eager CPU path
    does) would compile once per piece shape."""


EAGER = Stages(relu_stats_, mask_grad_, adam_, adam_decoder_, compiled=False)
RECOMPILE_LIMIT = 256
"""Shapes each compiled stage may be compiled for, raised from dynamo's default of 8 (`stages` sets
it). With static shapes a stage compiles once per shape it meets: Adam three per width of a pass
(W_enc, b_enc and b_dec of each group), the latent stages one per chunk shape, and the count adds up
over the passes of a run. With fullgraph=True, reaching dynamo's 8 is an error, which a pass with four
widths did (12 shapes)."""


def stages(compile: bool, backend: str = "inductor") -> Stages:
    """The eager stages, or the same functions through `torch.compile` (whole graphs, static shapes:
    shapes are fixed within a pass, so each compiles once per shape; the first step pays tens of
    seconds). `backend`: torch.compile's; tests also use "aot_eager" (graph capture and
    functionalization without code generation: PyTorch 2.14's C++ code generator fails on
    `adam_decoder_`, so a CPU cannot run the inductor form of every stage)."""
    if not compile:
        return EAGER
    import torch._dynamo.config

    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, RECOMPILE_LIMIT)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)
    return Stages(*(torch.compile(f, fullgraph=True, dynamic=False, backend=backend) for f in EAGER[:4]), compiled=True)
