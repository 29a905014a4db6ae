"""The math the JumpReLU, Gated and Matryoshka members add to a bank, one member at a time.

Each term comes twice: a differentiable form (`SAEGroup.forward`, autograd) and its gradient by hand
(`SAEGroup.train_grads`), which adds into the buffers the training step already holds. All tensors are in
the normalized input space; `pre` is a member's encoder output (x - b_dec) @ W_enc + b_enc (B, d_sae).

* JumpReLU (Rajamanoharan et al. 2024, as SAELens 6 trains it): z = pre * H(pre - theta) with a learned
  threshold theta >= 0 per latent, loss mse + l0_coef * mean_rows sum_latents H(pre - theta). H has no
  gradient; its straight-through estimators give the threshold one: d z / d theta = -(theta / eps) K and
  d H / d theta = -(1 / eps) K with the rectangle K = 1{|(pre - theta) / eps| < 1/2}, eps the bandwidth;
  the pre-activations get the plain gradient of z (H(pre - theta)) and none from the L0 term (SAELens'
  default, `jumprelu_ste_to_input=False`).
* Gated (Rajamanoharan et al. 2024a): the gate pi = pre (b_enc is the gate bias b_gate), the magnitude
  m = (pre - b_gate) * exp(r_mag) + b_mag (the same encoder directions rescaled, so no second matrix
  product), z = H(pi) * relu(m); loss mse + l1 * mean_rows sum relu(pi) (decoder rows are unit-norm, so this
  is the decoder-weighted L1) + mean_rows ||relu(pi) @ W_dec + b_dec - x||^2 through a FROZEN copy of the
  decoder (the paper's choice: the auxiliary loss trains the gate, not the dictionary; SAELens 6 lets its
  gradient reach the decoder).
* Matryoshka (Bussmann et al. 2025; saev's `objective:matryoshka`): the loss adds, for every inner prefix
  length L, the reconstruction from latents 0..L-1 alone: mean_rows ||z[:, :L] @ W_dec[:L] + b_dec - x||^2
  (the whole width is the member's ordinary mse). Prefix lengths are fixed by option or drawn every step
  as saev draws them (`sample_prefixes`).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

PARETO_POWER = 0.5
"""saev's `sample_prefixes` weights: prefix length l has weight (l-1)^-0.5 - l^-0.5 (so length 1 never comes)."""
PREFIX_STREAM = 0x3A7
"""Third word of the prefix sampler's seed (member seed, step, this): its own random stream."""


# --- Matryoshka -------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=32)
def _pareto_weights(d_sae: int) -> np.ndarray:
    """saev's probabilities of the prefix lengths 1..d_sae-1 (min length 1, power 0.5), float64."""
    lengths = np.arange(1, d_sae, dtype=np.float64)
    cdf = 1.0 - lengths**-PARETO_POWER
    pdf = np.concatenate([cdf[:1], np.diff(cdf)])
    return pdf / pdf.sum()


def sample_prefixes(d_sae: int, n_prefixes: int, seed: int, step: int) -> tuple[int, ...]:
    """saev's random prefix lengths for one step: `n_prefixes - 1` distinct lengths drawn without replacement
    with `_pareto_weights`, sorted, then `d_sae`. A function of (seed, step) alone, so every rank, a resumed
    run and a member trained alone draw the same ones without carrying generator state."""
    if n_prefixes <= 1:
        return (d_sae,)
    rng = np.random.default_rng([seed, step, PREFIX_STREAM])
    idx = rng.choice(d_sae - 1, size=n_prefixes - 1, replace=False, p=_pareto_weights(d_sae))
    return tuple(int(v) + 1 for v in np.sort(idx)) + (d_sae,)


def prefix_mses(z_bs: torch.Tensor, w_dec_sd: torch.Tensor, b_dec_d: torch.Tensor, x_bd: torch.Tensor,
                prefixes: tuple[int, ...]) -> torch.Tensor:
    """Differentiable: each prefix's reconstruction loss mean_rows ||z[:, :L] @ W_dec[:L] + b_dec - x||^2 (P,)."""
    return torch.stack([(z_bs[:, :L] @ w_dec_sd[:L] + b_dec_d - x_bd).pow(2).sum(-1).mean() for L in prefixes])


def nested_grads_(z_bs: torch.Tensor, w_dec_sd: torch.Tensor, b_dec_d: torch.Tensor, x_bd: torch.Tensor,
                  inner: tuple[int, ...], dz_bs: torch.Tensor, gw_sd: torch.Tensor, gb_d: torch.Tensor) -> torch.Tensor:
    """The inner prefixes' losses (summed, returned) and their gradients, ADDED to d loss / d z (dz, before the
    activation's mask), d W_dec (gw) and d b_dec (gb).

    With e_p = x_hat_p - x, the latents of the block between prefix lengths L_{q-1} and L_q enter every
    prefix p >= q, so their rows get (2 / B) E_q with E_q = sum_{p >= q} e_p: one suffix sum over the inner
    prefixes, then per block z_q^T E_q and E_q W_q^T, accumulated in place by the matrix products
    themselves. Cost: matrix products over the first `inner[-1]` latents only (saev's Pareto draws make
    that a few percent of the width on most steps) and three passes over a (B, d) tensor per prefix. `z`,
    `w_dec` in the compute dtype, x, b_dec and the losses in the weights' dtype."""
    B, wd, cd = x_bd.shape[0], x_bd.dtype, z_bs.dtype
    bounds = (0,) + tuple(inner)
    err = (b_dec_d.to(wd) - x_bd)
    errs, total = [], x_bd.new_zeros(())
    for lo, hi in zip(bounds, bounds[1:]):
        part = z_bs[:, lo:hi] @ w_dec_sd[lo:hi]
        err = err + part if cd == wd else err + part.to(wd)  # a new tensor: every prefix's error is kept
        total = total + torch.linalg.vecdot(err, err).mean()
        errs.append(err)
    suffix = errs[-1]
    for q in reversed(range(len(inner))):
        lo, hi = bounds[q], bounds[q + 1]
        if q < len(inner) - 1:
            suffix = errs[q].add_(suffix)
        s_cd = suffix if cd == wd else suffix.to(cd)
        if gw_sd.dtype == cd:
            gw_sd[lo:hi].addmm_(z_bs[:, lo:hi].T, s_cd, alpha=2.0 / B)
        else:
            gw_sd[lo:hi].add_(z_bs[:, lo:hi].T @ s_cd, alpha=2.0 / B)
        dz_bs[:, lo:hi].addmm_(s_cd, w_dec_sd[lo:hi].T, alpha=2.0 / B)
    gb_d.add_(suffix.sum(0), alpha=2.0 / B)
    return total


# --- JumpReLU ---------------------------------------------------------------------------------------------

def _rectangle(pre: torch.Tensor, theta: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """SAELens' kernel K((pre - theta) / eps) = 1 on (-1/2, 1/2), as a bool mask."""
    u = (pre - theta) / eps
    return (u > -0.5) & (u < 0.5)


class JumpReLU(torch.autograd.Function):
    """z = pre * H(pre - theta); backward: d pre = H * g, d theta = -(theta / eps) sum_rows K * g.
    `theta` and `eps` broadcast against `pre` (..., B, d_sae) with a size-1 row axis (-2)."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta, eps)
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, g):
        pre, theta, eps = ctx.saved_tensors
        d_theta = (-(theta / eps) * _rectangle(pre, theta, eps) * g).sum(-2, keepdim=True)
        return g * (pre > theta), d_theta, None


class Step(torch.autograd.Function):
    """H(pre - theta); backward: none to pre (SAELens' default), d theta = -(1 / eps) sum_rows K * g."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta, eps)
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, theta, eps = ctx.saved_tensors
        return None, (-(1.0 / eps) * _rectangle(pre, theta, eps) * g).sum(-2, keepdim=True), None


def threshold_grad(pre_bs: torch.Tensor, dz_bs: torch.Tensor, theta_s: torch.Tensor, eps: float,
                   c: torch.Tensor) -> torch.Tensor:
    """d loss / d theta (d_sae,) in theta's dtype: -(1 / eps) sum_rows K * (theta * dz + c), where dz is
    d loss / d z (before the mask) and c = l0_coef / B the L0 term's gradient per row; computed as
    -(1 / eps) (theta * sum_rows K dz + c * sum_rows K), K = 1{|pre - theta| < eps / 2}: six passes over the
    latents (SAELens' |(pre - theta) / eps| < 1/2 is the same set but for rounding at the edges)."""
    wd = theta_s.dtype
    k = (pre_bs - theta_s.to(pre_bs.dtype)).abs_() < eps / 2
    k_dz = torch.where(k, dz_bs, 0.0).sum(0, dtype=wd)
    return (k_dz * theta_s).add_(k.sum(0, dtype=wd) * c).mul_(-1.0 / eps)


# --- Gated ------------------------------------------------------------------------------------------------

def gated_latents(pre: torch.Tensor, b_gate: torch.Tensor, r_mag: torch.Tensor, b_mag: torch.Tensor) -> torch.Tensor:
    """z = H(pre) * relu((pre - b_gate) * exp(r_mag) + b_mag); the parameters broadcast along the rows.
    Differentiable in the magnitude path only (the gate H has no gradient, as in the paper)."""
    dt = pre.dtype
    mag = torch.addcmul(b_mag.to(dt), pre - b_gate.to(dt), r_mag.exp().to(dt))
    return torch.relu(mag) * (pre > 0)


def gated_penalties(pre_bs: torch.Tensor, w_dec_sd: torch.Tensor, b_dec_d: torch.Tensor,
                    x_bd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable (sparsity = mean_rows sum relu(pre), aux = mean_rows ||relu(pre) @ W_dec + b_dec - x||^2
    through the detached decoder)."""
    gate = torch.relu(pre_bs)
    x_gate = gate @ w_dec_sd.detach() + b_dec_d.detach()
    return gate.sum(-1).mean(), (x_gate - x_bd).pow(2).sum(-1).mean()


def gated_grads_(pre_bs: torch.Tensor, dpre_bs: torch.Tensor, x_bd: torch.Tensor, w_dec_cd: torch.Tensor, b_dec_d: torch.Tensor, b_gate_s: torch.Tensor, r_mag_s: torch.Tensor,
                 c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A gated member's backward from u = dz * 1{z > 0} (in `dpre`, masked already) to the encoder's output.

    The magnitude path gives d r_mag = exp(r) sum_rows u (pre - b_gate), d b_mag = sum_rows u and the encoder
    output u * exp(r); the gate path gives it (2 (x_gate - x) / B @ W_dec^T + c) * 1{pre > 0}, c = l1 / B.
    `dpre` is overwritten with their sum (what the encoder GEMMs take). The encoder GEMM's bias row is then
    sum_rows dpre, but b_gate only sees the gate path: the caller subtracts exp(r) * d b_mag from it.
    Returns (sparsity, aux, d r_mag, d b_mag, exp(r) * d b_mag) in the weights' dtype."""
    B, wd = x_bd.shape[0], x_bd.dtype
    pre = pre_bs.to(wd)
    u = dpre_bs.to(wd)  # dpre itself when it is in the weights' dtype: overwritten last, after its sums
    er = r_mag_s.exp()
    d_bmag = u.sum(0)
    d_rmag = (torch.linalg.vecdot(u, pre, dim=0) - b_gate_s * d_bmag).mul_(er)  # sum_rows u (pre - b_gate)
    gate = pre.clamp_min(0)
    sparsity = gate.sum(-1).mean()
    err = (gate.to(w_dec_cd.dtype) @ w_dec_cd).to(wd).add_(b_dec_d).sub_(x_bd)  # frozen decoder: no W_dec grad
    aux = err.pow(2).sum(-1).mean()
    d_gate = (err.mul_(2.0 / B).to(w_dec_cd.dtype) @ w_dec_cd.T).to(wd).add_(c).mul_(pre > 0)
    dpre_bs.copy_(u.mul_(er).add_(d_gate))
    return sparsity, aux, d_rmag, d_bmag, er * d_bmag
