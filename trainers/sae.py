"""The math of a bank of SAEs that share one input.

SAEs of equal width are stacked into one `SAEGroup` (parameters with a leading member axis), so a
group's encoders are ONE matrix product `x @ W_enc[d_in, n * d_sae]` and its decoders one bmm.
Groups of different widths run one after the other. All tensors live in the normalized input space
(x' = (x - mean) * scale); `export.py` folds the normalization into the weights.

Per member the loss is the seeds' recipe: `||x - x_hat||^2` (summed over d, mean over the batch)
+ `l1 * sum |z|` for ReLU members (decoder rows are kept unit-norm, so the plain L1 is the
decoder-weighted one), + `aux_coef * scale * ||e - e_aux||^2` for TopK / BatchTopK members, where
`e = x - x_hat` and `e_aux` is its reconstruction from the `aux_k` largest dead latents.
Members share nothing but the input, so the gradient of the summed loss is each member's own.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import nn

from .config import SAEConfig

BATCHTOPK_THRESHOLD_DECAY = 0.99
"""EMA decay of the BatchTopK inference threshold (mean smallest kept activation per batch)."""


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
        archs = [c.arch for c in self.cfgs]
        self.arch_members = {a: [i for i, b in enumerate(archs) if b == a] for a in dict.fromkeys(archs)}
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

    def pre_acts(self, x_bd: torch.Tensor) -> torch.Tensor:
        """(x - b_dec) @ W_enc + b_enc for every member: (n, B, d_sae)."""
        n, s = self.n, self.d_sae
        if self.fuse_encoders:
            # One GEMM for all members: x @ W_enc - b_dec @ W_enc is (x - b_dec) @ W_enc, with the bias
            # term costing only an (n, d_in) x (d_in, d_sae) product.
            bias = self.b_enc - torch.einsum("nd,dns->ns", self.b_dec, self.W_enc)
            h = torch.addmm(bias.reshape(1, n * s), x_bd, self.W_enc.reshape(self.d_in, n * s))
            return h.view(-1, n, s).transpose(0, 1)
        xc = x_bd[None] - self.b_dec[:, None, :]
        return torch.baddbmm(self.b_enc[:, None, :], xc, self.W_enc.permute(1, 0, 2))

    def activate(self, pre: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents from pre-activations; returns (z (n, B, d_sae), kept_min (n,))."""
        kept_min = torch.full((self.n,), math.inf, device=pre.device)
        if len(self.arch_members) == 1:
            arch = next(iter(self.arch_members))
            z, km = self._activate_arch(arch, pre, self.k, train)
            return z, (km if km is not None else kept_min)
        z = torch.empty_like(pre)
        for arch, members in self.arch_members.items():
            idx = torch.tensor(members, device=pre.device)
            z_m, km = self._activate_arch(arch, pre.index_select(0, idx), self.k.index_select(0, idx), train)
            z = z.index_copy(0, idx, z_m)
            if km is not None:
                kept_min = kept_min.index_copy(0, idx, km)
        return z, kept_min

    def _activate_arch(self, arch: str, pre: torch.Tensor, k: torch.Tensor, train: bool):
        if arch == "relu":
            return torch.relu(pre), None
        if arch == "topk" or (arch == "batchtopk" and train):
            m, B, s = pre.shape
            if arch == "topk":
                flat, k_rows = pre, k
            else:  # BatchTopK: the k * B largest over the whole batch, per member
                flat, k_rows = pre.reshape(m, 1, B * s), k * B
            k_max = int(k_rows.max())
            vals, idx = flat.topk(k_max, dim=-1, sorted=True)
            keep = torch.arange(k_max, device=pre.device) < k_rows[:, None, None]
            vals = torch.relu(vals) * keep
            z = torch.zeros_like(flat).scatter(-1, idx, vals).view(m, B, s)
            if arch == "topk":
                return z, None
            kept = torch.where(keep & (vals > 0), vals.detach(), torch.full_like(vals, math.inf))
            return z, kept.amin(dim=(1, 2))
        # batchtopk at inference: a JumpReLU at the learned threshold (the form it is exported in)
        members = self.arch_members["batchtopk"]
        thr = self.threshold if len(self.arch_members) == 1 else self.threshold[members]
        h = torch.relu(pre)
        return h * (h > thr[:, None, None]), None

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(n, B, d_sae) -> (n, B, d_in)."""
        return torch.baddbmm(self.b_dec[:, None, :], z, self.W_dec)

    def aux_loss(self, x_bd: torch.Tensor, x_hat: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        """Auxiliary loss of TopK/BatchTopK members: the residual reconstructed from the aux_k largest
        dead latents (SAELens / Gao et al.), scaled by min(n_dead / aux_k, 1). (n,), 0 where none are dead."""
        zero = torch.zeros((), device=x_bd.device)
        members = [i for a in ("topk", "batchtopk") for i in self.arch_members.get(a, [])]
        if not members:
            return zero.expand(self.n)
        dead = self.tokens_since_fired >= self.dead_after[:, None]
        if not bool(dead[members].any()):  # one host sync per step; skips the aux top-k while nothing is dead
            return zero.expand(self.n)
        aux = [zero] * self.n
        for i in members:
            k_aux = int(self.aux_k[i])
            masked = pre[i].masked_fill(~dead[i], -math.inf)
            vals, idx = masked.topk(k_aux, dim=-1)
            z_aux = torch.zeros_like(pre[i]).scatter(-1, idx, torch.relu(vals))
            e_hat = z_aux @ self.W_dec[i].float()
            resid = (x_bd.float() - x_hat[i]).detach()
            scale = torch.clamp(dead[i].sum() / k_aux, max=1.0)
            aux[i] = self.aux_coef[i] * scale * (e_hat - resid).pow(2).sum(-1).mean()
        return torch.stack(aux)

    def forward(self, x_bd: torch.Tensor, train: bool = True) -> Output:
        pre = self.pre_acts(x_bd)
        z, kept_min = self.activate(pre, train)
        x_hat = self.decode(z)
        x_hat = x_hat.float()
        err = x_hat - x_bd.float()[None]
        mse = err.pow(2).sum(-1).mean(-1)
        # z >= 0, so the plain sum is the L1 norm (its backward needs no sign); summing in fp32 without
        # materializing an fp32 copy of z saves two passes over the largest tensor under bf16 autocast.
        l1 = z.sum(-1, dtype=torch.float32).mean(-1)
        with torch.no_grad():
            active = z > 0
            l0 = active.sum(-1).float().mean(-1)
        aux = self.aux_loss(x_bd, x_hat, pre.float()) if train else torch.zeros_like(mse)
        return Output(x_hat, z, mse, l1, l0, aux, active.any(dim=1), kept_min)

    @torch.no_grad()
    def after_step(self, fired: torch.Tensor, n_rows: int, kept_min: torch.Tensor) -> None:
        """Bookkeeping after an optimizer step: dead-latent counters and the BatchTopK threshold."""
        self.tokens_since_fired.add_(n_rows).masked_fill_(fired, 0)
        finite = torch.isfinite(kept_min)
        if bool(finite.any()):
            first = self.n_threshold_updates == 0
            ema = BATCHTOPK_THRESHOLD_DECAY * self.threshold + (1 - BATCHTOPK_THRESHOLD_DECAY) * kept_min
            new = torch.where(first, kept_min, ema)
            self.threshold.copy_(torch.where(finite, new, self.threshold))
            self.n_threshold_updates.add_(1)

    def member_weights(self, i: int) -> dict[str, torch.Tensor]:
        """Member i's weights in SAELens layout (normalized space), detached float32 CPU copies."""
        out = {
            "W_enc": self.W_enc[:, i, :].detach().float().cpu().contiguous(),
            "W_dec": self.W_dec[i].detach().float().cpu().contiguous(),
            "b_enc": self.b_enc[i].detach().float().cpu().contiguous(),
            "b_dec": self.b_dec[i].detach().float().cpu().contiguous(),
        }
        if self.cfgs[i].arch == "batchtopk":
            out["threshold"] = self.threshold[i].detach().float().cpu().expand(self.d_sae).contiguous()
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

    def forward(self, x_bd: torch.Tensor, train: bool = True) -> list[Output]:
        return [g(x_bd, train) for g in self.groups]

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
