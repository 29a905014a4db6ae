"""The math of a bank of SAEs that share one input.

SAEs of equal width are stacked into one `SAEGroup` (parameters with a leading member axis; the
encoder stored fused as W_enc[d_in, n, d_sae], so any run of members is ONE matrix product
`x @ W_enc[:, a:b]` on a view of the parameter, never a per-step concatenation). Groups of different
widths run one after the other. All tensors live in the normalized input space
(x' = (x - mean) * scale); `export.py` folds the normalization into the weights.

Per member the loss is the seeds' recipe: `||x - x_hat||^2` (summed over d, mean over the batch)
+ `l1 * sum |z|` for ReLU members (decoder rows are kept unit-norm, so the plain L1 is the
decoder-weighted one), + `aux_coef * scale * ||e - e_aux||^2` for TopK / BatchTopK members, where
`e = x - x_hat` and `e_aux` is its reconstruction from the `aux_k` largest dead latents. JumpReLU
members add `l0_coef * L0` (learned thresholds, straight-through estimators), Gated members `l1 *`
the gate's L1 and the gate's reconstruction loss, Matryoshka members the inner prefixes'
reconstruction losses: archs.py. Members share nothing but the input, so the gradient of the summed
loss is each member's own.

Two implementations of that loss: `SAEGroup.forward` (plain autograd; evaluation and tests) and
`SAEGroup.train_grads` (the training step: the same loss differentiated by hand, so the latents are
touched by a handful of passes and every gradient GEMM writes straight into the parameter's gradient
buffer). On a CPU both process a group a few members at a time (`CPU_CHUNK_BYTES`) so that those
passes run from cache; on a GPU a whole group at once.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.distributed as dist
from torch import nn

from . import archs as A
from .config import K_ARCHS, SAEConfig
from saev_store.distributed import rank_world
from .fused import EAGER, Stages, latent_stats

GEMM_ALIGN = 8
"""The encoder gradient's [x, 1] operand is padded with zero columns to a multiple of this many:
cuBLAS gives a 16-bit operand whose leading dimension is not a multiple of 8 elements (16 bytes)
to an old, slow kernel. Measured on an H100 (bf16, nine 24,576-wide SAEs, d=768, batch 4096): that
GEMM at d + 1 = 769 took 10.4 ms (134 TFLOP/s, `cutlass_75_tensorop_bf16_s1688gemm`), a third of
the step; the pad costs 7 / 776 of it."""
BATCHTOPK_THRESHOLD_DECAY = 0.99
"""EMA decay of the BatchTopK inference threshold (mean smallest kept activation per batch)."""
CPU_CHUNK_BYTES = 8 << 20
"""On a CPU, members of a group are processed a few at a time so that one chunk's fp32 latents fit in
about this much memory (the last-level cache of a small server is tens of MiB): one member of width
5120 at batch 1024 is 21 MB, nine are 190 MB, and every element-wise pass over latents that do not
fit in cache costs a trip to memory. A chunk is at least one member."""


class Output(NamedTuple):
    """One group's forward pass on a batch of B rows (all in the normalized space)."""

    x_hat: torch.Tensor
    """Reconstructions (n, B, d_in)."""
    latents: torch.Tensor
    """Latent activations (n, B, d_sae), >= 0."""
    mse: torch.Tensor
    """Per member: mean over rows of ||x - x_hat||^2 (n,)."""
    l1: torch.Tensor
    """Per member: mean over rows of sum |z| (n,)."""
    l0: torch.Tensor
    """Per member: mean active latents per row (n,), detached."""
    aux: torch.Tensor
    """Per member: the weighted auxiliary dead-latent loss (n,); 0 for ReLU members."""
    fired: torch.Tensor
    """(n, d_sae) bool: latent fired on at least one row of the batch."""
    kept_min: torch.Tensor
    """(n,) smallest activation BatchTopK kept in this batch (inf for other members)."""
    sparsity: torch.Tensor
    """Per member: the penalized sparsity measure (n,), before its coefficient: sum z (ReLU), the gate's
    sum relu(pi) (Gated), the straight-through L0 (JumpReLU), 0 (TopK, BatchTopK); mean over rows."""
    nested: torch.Tensor
    """Per member: the inner prefixes' summed reconstruction losses (n,) (Matryoshka; 0 for the others)."""


class StepStats(NamedTuple):
    """Per-member training statistics of one step (n,), on the device (no host sync)."""

    loss: torch.Tensor
    """mse + nested + sparsity coefficient * sparsity + aux."""
    mse: torch.Tensor
    """Mean over rows of ||x - x_hat||^2."""
    l1: torch.Tensor
    """Mean over rows of sum z."""
    l0: torch.Tensor
    """Mean active latents per row."""
    aux: torch.Tensor
    """Weighted auxiliary dead-latent loss of TopK/BatchTopK (0 while none is dead), Gated's gate reconstruction
    loss, else 0."""
    sparsity: torch.Tensor
    """The penalized sparsity measure before its coefficient (`Output.sparsity`)."""
    nested: torch.Tensor
    """Matryoshka: the inner prefixes' summed reconstruction losses (0 for the others)."""


class StepOut(NamedTuple):
    """One group's training step (`SAEGroup.train_grads`): per member, on the device."""

    stats: StepStats
    """What the trainer logs."""
    fired: torch.Tensor
    """(n, d_sae) bool: latent fired on at least one row."""
    kept_min: torch.Tensor
    """(n,) smallest activation BatchTopK kept (inf for other members)."""


def _global_kth(vals_m1k: torch.Tensor, k_m: torch.Tensor) -> torch.Tensor:
    """Per member, the k_m-th largest value over every rank's candidates (m,), from each rank's own
    sorted top values (m, 1, K): any of the global k_m largest is among its rank's K largest, so
    gathering those is exact (ties at the threshold are all kept)."""
    parts = [torch.empty_like(vals_m1k) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, vals_m1k.contiguous())
    merged = torch.cat(parts, dim=-1).squeeze(1)  # (m, world * K)
    top = merged.topk(int(k_m.max()), dim=-1, sorted=True).values
    return top.gather(1, (k_m - 1)[:, None]).squeeze(1)


def kaiming_uniform(shape_out_in: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform (ReLU gain) for a weight of shape (fan_out, fan_in): U(-sqrt(6/fan_in), sqrt(6/fan_in))."""
    bound = math.sqrt(6.0 / shape_out_in[1])
    return torch.rand(shape_out_in, generator=gen, dtype=torch.float64).mul_(2 * bound).sub_(bound).float()


class SAEGroup(nn.Module):
    """n SAEs of one width, stacked. Parameters:

    W_enc (d_in, n, d_sae)  -- viewed as (d_in, n * d_sae) for the fused encoder product
    b_enc (n, d_sae)
    W_dec (n, d_sae, d_in)  -- unit-norm rows
    b_dec (n, d_in)
    jump_threshold (n, d_sae) -- JumpReLU thresholds (only in a group with a JumpReLU member)
    r_mag, b_mag (n, d_sae)   -- Gated magnitude path (only in a group with a Gated member; b_enc is b_gate)
    Members of other architectures in such a group get zero gradients there, which leave Adam's update 0.
    """

    def __init__(self, cfgs: Sequence[SAEConfig], fuse_encoders: bool = True):
        super().__init__()
        self.cfgs = tuple(cfgs)
        n = len(self.cfgs)
        self.n, self.d_in, self.d_sae = n, self.cfgs[0].d_in, self.cfgs[0].d_sae
        if any(c.d_sae != self.d_sae or c.d_in != self.d_in for c in self.cfgs):
            raise ValueError("an SAEGroup stacks SAEs of one shape only")
        self.fuse_encoders = fuse_encoders
        self.W_enc = nn.Parameter(torch.empty(self.d_in, n, self.d_sae))
        self.b_enc = nn.Parameter(torch.zeros(n, self.d_sae))
        self.W_dec = nn.Parameter(torch.empty(n, self.d_sae, self.d_in))
        self.b_dec = nn.Parameter(torch.zeros(n, self.d_in))
        self.register_buffer("k", torch.tensor([c.k for c in self.cfgs], dtype=torch.int64))
        self.register_buffer("aux_k", torch.tensor([min(c.n_aux, self.d_sae) for c in self.cfgs], dtype=torch.int64))
        self.register_buffer("aux_coef", torch.tensor([c.aux_coef for c in self.cfgs], dtype=torch.float32))
        self.register_buffer("dead_after", torch.tensor([c.dead_after for c in self.cfgs], dtype=torch.int64))
        self.register_buffer("threshold", torch.zeros(n))
        """BatchTopK inference threshold (EMA of the smallest kept activation); 0 until the first step."""
        self.register_buffer("n_threshold_updates", torch.zeros((), dtype=torch.int64))
        self.register_buffer("tokens_since_fired", torch.zeros(n, self.d_sae, dtype=torch.int64))
        self.archs = [c.arch for c in self.cfgs]
        self.k_host = [c.k for c in self.cfgs]
        """k per member on the host (shapes of the top-k calls, without a device sync)."""
        self.aux_k_host = [min(c.n_aux, self.d_sae) for c in self.cfgs]
        self.register_parameter("jump_threshold", nn.Parameter(torch.zeros(n, self.d_sae)) if "jumprelu" in self.archs else None)
        self.register_parameter("r_mag", nn.Parameter(torch.zeros(n, self.d_sae)) if "gated" in self.archs else None)
        self.register_parameter("b_mag", nn.Parameter(torch.zeros(n, self.d_sae)) if "gated" in self.archs else None)
        self.register_buffer("l1_on_z", torch.tensor([float(c.arch == "relu") for c in self.cfgs]))
        """1 where the sparsity coefficient is an L1 on the latents themselves (ReLU), else 0."""
        self._g_enc = self._g_dec = self._g_bdec = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Kaiming-uniform encoder and decoder (decoder rows then unit-norm), zero biases; each member from
        its own seed, so a member's init does not depend on which group it is in."""
        for i, c in enumerate(self.cfgs):
            gen = torch.Generator().manual_seed(c.seed)
            self.W_enc[:, i, :] = kaiming_uniform((self.d_sae, self.d_in), gen).T.to(self.W_enc.device)
            w_dec = kaiming_uniform((self.d_in, self.d_sae), gen).T
            self.W_dec[i] = (w_dec / w_dec.norm(dim=-1, keepdim=True)).to(self.W_dec.device)
        self.b_enc.zero_()
        self.b_dec.zero_()
        if self.jump_threshold is not None:
            self.jump_threshold.copy_(torch.tensor([[c.init_threshold] for c in self.cfgs]).expand(self.n, self.d_sae))
        for p in (self.r_mag, self.b_mag):
            if p is not None:
                p.zero_()

    def extra_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The JumpReLU / Gated parameters this group holds (name, parameter)."""
        return [(k, p) for k in ("jump_threshold", "r_mag", "b_mag") if (p := getattr(self, k)) is not None]

    def prefixes(self, i: int, step: int) -> tuple[int, ...]:
        """Member i's Matryoshka prefix lengths at `step` (the whole width last): its fixed ones, or saev's draw."""
        c = self.cfgs[i]
        if c.prefixes:
            return c.prefixes + (self.d_sae,)
        return A.sample_prefixes(self.d_sae, c.n_prefixes, c.seed, step)

    def chunks(self, n_rows: int, device: torch.device, whole: bool = False) -> list[tuple[int, int]]:
        """Member ranges [a, b) processed together. On a GPU (or when `whole`) the whole group (big
        GEMMs keep it busy); on a CPU as many members as keep one chunk's latents (n_rows x d_sae fp32
        each) within `CPU_CHUNK_BYTES`, so the element-wise passes over the latents run from cache
        instead of streaming the whole group's (n, B, d_sae) tensor through memory once per pass."""
        if device.type != "cpu" or whole:
            return [(0, self.n)]
        m = max(1, CPU_CHUNK_BYTES // max(1, n_rows * self.d_sae * 4))
        return [(a, min(a + m, self.n)) for a in range(0, self.n, m)]

    def pre_acts(self, x_bd: torch.Tensor, a: int = 0, b: int | None = None) -> torch.Tensor:
        """(x - b_dec) @ W_enc + b_enc for members [a, b): (m, B, d_sae), in x's dtype.

        Fused: ONE GEMM x @ W_enc[:, a:b] (a strided view of the stored parameter, no copy), since
        (x - b_dec) @ W = x @ W - b_dec @ W and the bias term is only an (m, d_in) x (d_in, d_sae)
        product; the result is laid out (B, m, d_sae) and returned as a (m, B, d_sae) view."""
        b = self.n if b is None else b
        m, s, dt = b - a, self.d_sae, x_bd.dtype
        w = self.W_enc[:, a:b, :].to(dt)
        if self.fuse_encoders:
            bias = self.b_enc[a:b] - torch.einsum("md,dms->ms", self.b_dec[a:b], self.W_enc[:, a:b, :])
            h = torch.addmm(bias.to(dt).reshape(1, m * s), x_bd, w.reshape(self.d_in, m * s))
            return h.view(-1, m, s).transpose(0, 1)
        xc = x_bd[None] - self.b_dec[a:b, None, :].to(dt)
        return torch.baddbmm(self.b_enc[a:b, None, :].to(dt), xc, w.permute(1, 0, 2))

    def activate(self, pre: torch.Tensor, a: int, b: int, train: bool, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents of members [a, b) from their pre-activations (m, B, d_sae); returns (z, kept_min (m,)).
        `inplace`: ReLU members may overwrite `pre` (the training step does not need it again)."""
        archs = self.archs[a:b]
        if len(set(archs)) == 1:
            z, km = self._activate_arch(archs[0], pre, a, b, train, inplace)
            return z, (km if km is not None else torch.full((b - a,), math.inf, dtype=self.W_dec.dtype, device=pre.device))
        z = torch.empty_like(pre)
        kept_min = torch.full((b - a,), math.inf, dtype=self.W_dec.dtype, device=pre.device)
        for j in range(b - a):  # a chunk mixing architectures: member by member
            z_j, km = self._activate_arch(archs[j], pre[j : j + 1], a + j, a + j + 1, train, False)
            z[j] = z_j[0]
            if km is not None:
                kept_min[j] = km[0]
        return z, kept_min

    def _activate_arch(self, arch: str, pre: torch.Tensor, a: int, b: int, train: bool, inplace: bool):
        if arch == "relu":
            return (pre.clamp_min_(0) if inplace else torch.relu(pre)), None
        if arch == "topk" or (arch == "batchtopk" and train):
            m, B, s = pre.shape
            k = self.k[a:b]
            world = rank_world()[1]
            if arch == "topk":
                flat, k_rows = pre, k
            else:  # BatchTopK: the k * B largest over the whole batch (all ranks' rows), per member
                flat, k_rows = pre.reshape(m, 1, B * s), k * B * world
            k_max = min(max(self.k_host[a:b]) * (1 if arch == "topk" else B * world), flat.shape[-1])
            vals, idx = flat.topk(k_max, dim=-1, sorted=True)
            if arch == "batchtopk" and world > 1:
                keep = vals >= _global_kth(vals, k_rows)[:, None, None]
            else:
                keep = torch.arange(k_max, device=pre.device) < k_rows[:, None, None]
            vals = torch.relu(vals) * keep
            z = torch.zeros((m,) + flat.shape[1:], dtype=pre.dtype, device=pre.device).scatter(-1, idx, vals).view(m, B, s)
            if arch == "topk":
                return z, None
            kept = torch.where(keep & (vals > 0), vals.detach(), torch.full_like(vals, math.inf))
            return z, kept.amin(dim=(1, 2)).to(self.W_dec.dtype)
        if arch == "jumprelu":
            if not torch.is_grad_enabled():  # the training step differentiates by hand (archs.threshold_grad)
                return pre * (pre > self.jump_threshold[a:b, None, :].to(pre.dtype)), None
            return A.JumpReLU.apply(pre, *self._jump_params(a, b, pre.dtype)), None
        if arch == "gated":
            return A.gated_latents(pre, self.b_enc[a:b, None, :], self.r_mag[a:b, None, :], self.b_mag[a:b, None, :]), None
        # batchtopk at inference: a JumpReLU at the learned threshold (the form it is exported in)
        h = torch.relu(pre)
        return h * (h > self.threshold[a:b, None, None].to(h.dtype)), None

    def _jump_params(self, a: int, b: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(thresholds (m, 1, d_sae), bandwidths (m, 1, 1)) of members [a, b), broadcasting against (m, B, d_sae),
        for the autograd form (the bandwidths are host floats: a small copy, never in the training step)."""
        eps = torch.tensor([c.bandwidth for c in self.cfgs[a:b]], dtype=dtype, device=self.W_dec.device)
        return self.jump_threshold[a:b, None, :].to(dtype), eps[:, None, None]

    def decode(self, z: torch.Tensor, a: int = 0, b: int | None = None, w_dec: torch.Tensor | None = None) -> torch.Tensor:
        """Members [a, b): (m, B, d_sae) -> (m, B, d_in), in z's dtype. `w_dec`: W_dec[a:b] already
        cast to z's dtype, when the caller has it."""
        b = self.n if b is None else b
        dt = z.dtype
        w_dec = self.W_dec[a:b].to(dt) if w_dec is None else w_dec
        return torch.baddbmm(self.b_dec[a:b, None, :].to(dt), z, w_dec)

    def forward(self, x_bd: torch.Tensor, train: bool = True, step: int = 0) -> Output:
        """All members, differentiable (autograd); tests use it. Training uses the hand-written
        `train_grads`, which computes the same loss and its gradient with fewer passes. `step` picks the
        Matryoshka prefixes drawn at that training step. The training loss of member i is
        `mse + nested + coef_i * sparsity + aux` (coef_i: `SAEConfig.sparsity_coef` after the warmup)."""
        outs, wd = [], self.W_dec.dtype  # losses in the weights' dtype (fp32; fp64 in tests)
        for a, b in self.chunks(x_bd.shape[0], x_bd.device):
            pre = self.pre_acts(x_bd, a, b)
            z, kept_min = self.activate(pre, a, b, train)
            x_hat = self.decode(z, a, b).to(wd)
            err = x_hat - x_bd.to(wd)[None]
            mse = err.pow(2).sum(-1).mean(-1)
            l1 = z.sum(-1, dtype=wd).mean(-1)
            with torch.no_grad():
                l0 = (z > 0).sum(dim=(1, 2), dtype=torch.int32).to(wd) / z.shape[1]
                fired = z.amax(1) > 0
            zero = torch.zeros_like(mse)
            aux, sparsity, nested = zero, zero, zero
            if train:
                sparsity, nested, gate_aux = self._penalties(x_bd, pre, z, l1, a, b, step)
                aux = self.aux_loss(x_bd, x_hat, pre, a, b) + gate_aux
            outs.append(Output(x_hat, z, mse, l1, l0, aux, fired, kept_min, sparsity, nested))
        if len(outs) == 1:
            return outs[0]
        return Output(*(torch.cat(t) for t in zip(*outs)))

    def _penalties(self, x_bd, pre, z, l1, a: int, b: int, step: int) -> tuple[torch.Tensor, ...]:
        """Autograd form of (sparsity, nested, Gated's auxiliary loss), each (m,), for members [a, b) (`Output`)."""
        wd = self.W_dec.dtype
        x = x_bd.to(wd)
        zero = l1.new_zeros(())
        sparsity, nested, gate_aux = [], [], [zero] * (b - a)
        for i in range(a, b):
            j, arch = i - a, self.archs[i]
            if arch == "relu":
                sparsity.append(l1[j])
            elif arch == "jumprelu":
                theta, eps = self._jump_params(i, i + 1, pre.dtype)
                sparsity.append(A.Step.apply(pre[j : j + 1], theta, eps).sum(-1).mean().to(wd))
            elif arch == "gated":
                sp, gate_aux[j] = A.gated_penalties(pre[j].to(wd), self.W_dec[i], self.b_dec[i], x)
                sparsity.append(sp)
            else:
                sparsity.append(zero)
            if self.cfgs[i].objective == "matryoshka":
                inner = self.prefixes(i, step)[:-1]
                nested.append(A.prefix_mses(z[j].to(wd), self.W_dec[i], self.b_dec[i], x, inner).sum() if inner
                              else l1.new_zeros(()))
            else:
                nested.append(zero)
        return torch.stack(sparsity), torch.stack(nested), torch.stack(gate_aux)

    def aux_loss(self, x_bd: torch.Tensor, x_hat: torch.Tensor, pre: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """Dead-latent auxiliary loss of TopK/BatchTopK members [a, b) (autograd form, for `forward`): (m,)."""
        zero = torch.zeros((), dtype=self.W_dec.dtype, device=x_bd.device)
        aux = [zero] * (b - a)
        for i in self._aux_members(a, b):
            j = i - a
            z_aux, scale = self._aux_latents(pre[j], i)
            e_hat = z_aux @ self.W_dec[i]
            resid = (x_bd.to(x_hat.dtype) - x_hat[j]).detach()
            aux[j] = self.aux_coef[i] * scale * (e_hat - resid).pow(2).sum(-1).mean()
        return torch.stack(aux)

    def _aux_members(self, a: int, b: int) -> list[int]:
        """TopK/BatchTopK members of [a, b) with a dead latent (one host sync; none while nothing is dead)."""
        members = [i for i in range(a, b) if self.archs[i] in K_ARCHS]
        if not members:
            return []
        dead_any = (self.tokens_since_fired[a:b] >= self.dead_after[a:b, None]).any(-1).tolist()
        return [i for i in members if dead_any[i - a]]

    def _aux_latents(self, pre_bs: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_aux (B, d_sae): the aux_k largest dead pre-activations, relu'd; scale min(n_dead / aux_k, 1))."""
        dead = self.tokens_since_fired[i] >= self.dead_after[i]
        k_aux = int(self.aux_k_host[i])
        vals, idx = pre_bs.to(self.W_dec.dtype).masked_fill(~dead, -math.inf).topk(k_aux, dim=-1)
        z_aux = torch.zeros(pre_bs.shape, dtype=vals.dtype, device=pre_bs.device).scatter(-1, idx, torch.relu(vals))
        return z_aux, torch.clamp(dead.sum() / k_aux, max=1.0)

    def _d_pad(self) -> int:
        """Rows of the encoder gradient GEMM: d_in + 1 rounded up to `GEMM_ALIGN`."""
        return -(-(self.d_in + 1) // GEMM_ALIGN) * GEMM_ALIGN

    def _grad_buffers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Persistent gradient storage, reused every step: G_enc (d_pad, n * d_sae) holds the
        encoder weight gradient in its first d_in rows and the encoder bias gradient in row d_in
        (the rest is alignment padding, `GEMM_ALIGN`), so ONE GEMM [x, 1, 0...]^T @ dpre gives both;
        W_dec and b_dec have their own."""
        dev = self.W_enc.device
        if self._g_enc is None or self._g_enc.device != dev or self._g_enc.dtype != self.W_enc.dtype:
            self._g_enc = torch.zeros(self._d_pad(), self.n * self.d_sae, dtype=self.W_enc.dtype, device=dev)
            self._g_dec = torch.zeros_like(self.W_dec, memory_format=torch.contiguous_format)
            self._g_bdec = torch.zeros_like(self.b_dec)
        return self._g_enc, self._g_dec, self._g_bdec

    @torch.no_grad()
    def train_grads(self, x_bd: torch.Tensor, coefs: torch.Tensor, compute_dtype: torch.dtype | None = None,
                    stages: Stages = EAGER, step: int = 0) -> StepOut:
        """Loss of every member on the batch and its gradient, written to the parameters' `.grad`.

        The same loss as `forward(train=True, step=step)` (summed over members), differentiated by hand so
        that each chunk of members costs its five GEMMs plus a few element-wise stages over the latents
        (`stages`, eager or compiled, see fused.py): ReLU in place with the per-latent sums and
        firing counts that L1, L0 and the dead-latent counters need; the L1 term and the ReLU/TopK
        mask folded into the latent gradient in place (`z > 0` is exactly where the latent had a
        gradient); the encoder bias gradient a row of the encoder weight GEMM; every gradient GEMM
        writing straight into its final buffer. JumpReLU, Gated and Matryoshka members add their own
        terms member by member (archs.py; eager: not through the compiled stages). `coefs` (n,) is this
        step's sparsity coefficient per member (`SAEConfig.sparsity_coef` after the warmup)."""
        B, d, s = x_bd.shape[0], self.d_in, self.d_sae
        wd = self.W_dec.dtype  # the weights' (master) dtype: losses and gradients
        cd = compute_dtype or wd  # GEMMs and latents (bf16 on a GPU when asked)
        g_enc, g_dec, g_bdec = self._grad_buffers()
        g_extra = {k: torch.zeros_like(p) for k, p in self.extra_parameters()}
        x = x_bd.to(wd)
        x_cd = x.to(cd)
        d_pad = self._d_pad()
        x1_t = torch.zeros(B, d_pad, dtype=cd, device=x.device)  # [x, 1, 0...], (d_pad, B) after .T
        x1_t[:, :d] = x_cd
        x1_t[:, d] = 1
        x1_t = x1_t.T
        c_z = coefs * self.l1_on_z / B  # the L1-on-z term of the latent gradient (ReLU members)
        parts = []
        for a, b in self.chunks(B, x.device, whole=stages.compiled):
            m = b - a
            pre = self.pre_acts(x_cd, a, b)
            aux_members = self._aux_members(a, b)
            w_dec = self.W_dec[a:b].to(cd)  # cast once (bf16): the decoder and the latent gradient use it
            if all(arch == "relu" for arch in self.archs[a:b]):
                z, z_sums, z_counts = stages.relu_stats_(pre, wd)
                kept_min = torch.full((m,), math.inf, dtype=wd, device=x.device)
            else:
                z, kept_min = self.activate(pre, a, b, train=True)
                z_sums, z_counts = latent_stats(z, wd)
            x_hat = self.decode(z, a, b, w_dec).to(wd)
            err = x_hat.sub_(x)  # (m, B, d): x_hat - x
            mse = err.pow(2).sum(-1).mean(-1)
            l1 = z_sums.sum(-1) / B
            l0 = z_counts.sum(-1).to(wd) / B
            fired = z_counts > 0  # (m, d_sae)
            aux = torch.zeros(m, dtype=wd, device=x.device)
            nested = torch.zeros(m, dtype=wd, device=x.device)
            sparsity = torch.where(self.l1_on_z[a:b] > 0, l1, 0.0)
            g = err.mul_(2.0 / B)  # d loss / d x_hat
            g_cd = g.to(cd)
            # Decoder: dW_dec = z^T g, db_dec = sum_B g (plus the encoder's b_dec term below).
            gw = g_dec[a:b]
            if cd == wd:
                torch.bmm(z.transpose(1, 2), g_cd, out=gw)
            else:
                gw.copy_(torch.bmm(z.transpose(1, 2), g_cd))
            gb = g.sum(1)
            # Latent gradient g W_dec^T, laid out like the encoder output so the encoder's weight
            # gradient is one GEMM without a transpose copy; then + l1 / B and the mask, in place.
            if self.fuse_encoders:
                buf = torch.empty(B, m, s, dtype=cd, device=x.device)
                dz = buf.transpose(0, 1)
            else:
                buf = dz = torch.empty(m, B, s, dtype=cd, device=x.device)
            torch.bmm(g_cd, w_dec.transpose(1, 2), out=dz)
            for i in range(a, b):  # terms on d loss / d z, before the mask
                j = i - a
                if self.cfgs[i].objective == "matryoshka" and (inner := self.prefixes(i, step)[:-1]):
                    nested[j] = A.nested_grads_(z[j], w_dec[j], self.b_dec[i], x, inner, dz[j], gw[j], gb[j])
                if self.archs[i] == "jumprelu":
                    sparsity[j] = l0[j]
                    g_extra["jump_threshold"][i] = A.threshold_grad(pre[j], dz[j], self.jump_threshold[i],
                                                                    self.cfgs[i].bandwidth, coefs[i] / B)
            stages.mask_grad_(dz, z, c_z[a:b])  # dpre
            gated = [i for i in range(a, b) if self.archs[i] == "gated"]
            gate_fix = {}
            for i in gated:
                j = i - a
                sparsity[j], aux[j], g_extra["r_mag"][i], g_extra["b_mag"][i], gate_fix[i] = A.gated_grads_(
                    pre[j], dz[j], x, w_dec[j], self.b_dec[i], self.b_enc[i], self.r_mag[i], coefs[i] / B)
            for i in aux_members:
                j = i - a
                aux[j] = self._aux_grads(pre[j], g[j], i, dz[j], gw[j], B)
            # Encoder: [x, 1, 0...]^T dpre gives x^T dpre and db_enc = sum_B dpre in one GEMM.
            ge = g_enc[:, a * s : b * s]
            if self.fuse_encoders:
                if cd == wd:
                    torch.mm(x1_t, buf.view(B, m * s), out=ge)
                else:
                    ge.copy_(x1_t @ buf.view(B, m * s))
            else:
                ge_v = ge.view(d_pad, m, s).permute(1, 0, 2)
                if cd == wd:
                    torch.bmm(x1_t.expand(m, d_pad, B), dz, out=ge_v)
                else:
                    ge_v.copy_(torch.bmm(x1_t.expand(m, d_pad, B), dz))
            db_enc = g_enc[d, a * s : b * s].view(m, s)
            w_enc = self.W_enc[:, a:b, :]
            # (x - b_dec) is the encoder's input: dW_enc = x^T dpre - b_dec (x) db_enc, and
            # db_dec gets -W_enc db_enc.
            g_enc[:d, a * s : b * s].view(d, m, s).sub_(self.b_dec[a:b].T[:, :, None] * db_enc[None])
            gb.sub_(torch.einsum("dms,ms->md", w_enc, db_enc))
            for i, fix in gate_fix.items():  # b_gate gets the gate path only (archs.gated_grads_)
                db_enc[i - a].sub_(fix)
            g_bdec[a:b] = gb
            parts.append((mse, l1, l0, aux, fired, kept_min, sparsity, nested))
        self.W_enc.grad = g_enc[:d].view(d, self.n, s)
        self.b_enc.grad = g_enc[d].view(self.n, s)
        self.W_dec.grad = g_dec
        self.b_dec.grad = g_bdec
        for k, p in self.extra_parameters():
            p.grad = g_extra[k]
        mse, l1, l0, aux, fired, kept_min, sparsity, nested = (torch.cat(t) if len(parts) > 1 else t[0] for t in zip(*parts))
        loss = mse + nested + coefs * sparsity + aux
        return StepOut(StepStats(loss, mse, l1, l0, aux, sparsity, nested), fired, kept_min)

    def _aux_grads(self, pre_bs: torch.Tensor, g_bd: torch.Tensor, i: int, dpre_bs: torch.Tensor,
                   gw_sd: torch.Tensor, n_rows: int) -> torch.Tensor:
        """Member i's auxiliary loss; adds its gradient to dpre (B, d_sae) and dW_dec (d_sae, d_in).
        `g_bd` is d mse / d x_hat = 2 (x_hat - x) / B, so the residual x - x_hat is -g B / 2."""
        z_aux, scale = self._aux_latents(pre_bs, i)
        w = self.W_dec[i]
        r = (z_aux @ w).add_(g_bd, alpha=n_rows / 2)  # e_aux - (x - x_hat)
        coef = self.aux_coef[i] * scale
        aux = coef * r.pow(2).sum(-1).mean()
        ga = r.mul_(2.0 / n_rows * coef)
        gw_sd.add_((z_aux.T @ ga).to(gw_sd.dtype))
        dz_aux = (ga @ w.T).mul_(z_aux > 0)
        dpre_bs.add_(dz_aux.to(dpre_bs.dtype))
        return aux

    @torch.no_grad()
    def after_step(self, fired: torch.Tensor, n_rows: int, kept_min: torch.Tensor) -> None:
        """Bookkeeping after an optimizer step: dead-latent counters, the BatchTopK threshold, and JumpReLU
        thresholds projected back to >= 0 (SAELens: below 0 the gate would pass negative pre-activations;
        projected, not clamped in the graph, so a threshold at 0 keeps its gradient)."""
        self.tokens_since_fired.add_(n_rows).masked_fill_(fired, 0)
        if self.jump_threshold is not None:
            self.jump_threshold.clamp_(min=0.0)
        finite = torch.isfinite(kept_min)
        if bool(finite.any()):
            first = self.n_threshold_updates == 0
            ema = BATCHTOPK_THRESHOLD_DECAY * self.threshold + (1 - BATCHTOPK_THRESHOLD_DECAY) * kept_min
            new = torch.where(first, kept_min, ema)
            self.threshold.copy_(torch.where(finite, new, self.threshold))
            self.n_threshold_updates.add_(1)

    def member_weights(self, i: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Member i's weights in SAELens layout (normalized space), detached CPU copies in `dtype`: W_enc, W_dec,
        b_dec, then b_enc (+ threshold for BatchTopK, one value per latent, and JumpReLU), or for Gated
        b_gate, b_mag, r_mag."""
        def cpu(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to("cpu", dtype).contiguous()

        out = {"W_enc": cpu(self.W_enc[:, i, :]), "W_dec": cpu(self.W_dec[i]), "b_dec": cpu(self.b_dec[i])}
        arch = self.archs[i]
        if arch == "gated":
            out.update(b_gate=cpu(self.b_enc[i]), b_mag=cpu(self.b_mag[i]), r_mag=cpu(self.r_mag[i]))
        else:
            out["b_enc"] = cpu(self.b_enc[i])
        if arch == "batchtopk":
            out["threshold"] = cpu(self.threshold[i].expand(self.d_sae))
        elif arch == "jumprelu":
            out["threshold"] = cpu(self.jump_threshold[i])
        return out


class SAEBank(nn.Module):
    """All SAEs of one pass: one `SAEGroup` per distinct width, in order of first appearance."""

    def __init__(self, cfgs: Sequence[SAEConfig], fuse_encoders: bool = True):
        super().__init__()
        widths = list(dict.fromkeys(c.d_sae for c in cfgs))
        self.groups = nn.ModuleList(SAEGroup([c for c in cfgs if c.d_sae == w], fuse_encoders) for w in widths)
        self.cfgs = tuple(c for g in self.groups for c in g.cfgs)
        """Member configs in bank order (group by group)."""
        self.index = {c.name: (gi, i) for gi, g in enumerate(self.groups) for i, c in enumerate(g.cfgs)}
        """name -> (group index, member index)."""

    def forward(self, x_bd: torch.Tensor, train: bool = True, step: int = 0) -> list[Output]:
        return [g(x_bd, train, step) for g in self.groups]

    @torch.no_grad()
    def init_b_dec(self, b_dec_d: torch.Tensor) -> None:
        for g in self.groups:
            g.b_dec.copy_(b_dec_d.to(g.b_dec)[None].expand_as(g.b_dec))

    def member_weights(self, name: str) -> dict[str, torch.Tensor]:
        gi, i = self.index[name]
        return self.groups[gi].member_weights(i)


def geometric_median(x_nd: torch.Tensor, n_iter: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm in float64: the point minimizing the sum of Euclidean distances to the rows."""
    x = x_nd.double()
    y = x.mean(dim=0)
    for _ in range(n_iter):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-12)
        y_new = (w[:, None] * x).sum(dim=0) / w.sum()
        if (y_new - y).norm() <= tol * max(1.0, float(y.norm())):
            y = y_new
            break
        y = y_new
    return y.float()
