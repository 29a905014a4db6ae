"""A bank of G linear heads over the same inputs, computed as one matrix product.

    bank = HeadBank(d=768, n_classes=150, n_heads=12, seed=0)
    logits_bgc = bank(x_bd)                          # (B, G, C)
    loss_g = bank.backward(x_bd, y_b)                # per-head mean cross-entropy; sets .grad

Every head starts from the same PyTorch-default `nn.Linear` initialization (drawn once from `seed`):
the heads differ only by their optimizer settings, so a head trained in a bank equals the same head
trained alone. The gradient is written by hand (softmax minus one-hot, then one matrix product for
the weights): the two products x @ W and x^T @ dZ are then all the work a step does besides the
update, which is what benchmarks/heads.py compares against.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class HeadBank(nn.Module):
    """G linear heads x -> x @ W[:, g] + b[g]; weight (d, G, C), bias (G, C)."""

    def __init__(self, d: int, n_classes: int, n_heads: int, seed: int = 0, device="cpu"):
        super().__init__()
        if d < 1 or n_classes < 2 or n_heads < 1:
            raise ValueError(f"HeadBank: d={d}, n_classes={n_classes} (>= 2), n_heads={n_heads} must be positive.")
        gen = torch.Generator().manual_seed(int(seed))
        # nn.Linear's default: kaiming_uniform_(a=sqrt(5)) on (C, d) is U(-1/sqrt(d), 1/sqrt(d)); the bias likewise.
        bound = 1.0 / math.sqrt(d)
        w_cd = torch.empty(n_classes, d).uniform_(-bound, bound, generator=gen)
        b_c = torch.empty(n_classes).uniform_(-bound, bound, generator=gen)
        self.weight = nn.Parameter(w_cd.t().unsqueeze(1).repeat(1, n_heads, 1).contiguous().to(device))
        self.bias = nn.Parameter(b_c.unsqueeze(0).repeat(n_heads, 1).contiguous().to(device))

    @property
    def n_heads(self) -> int:
        return self.weight.shape[1]

    @property
    def n_classes(self) -> int:
        return self.weight.shape[2]

    def forward(self, x_bd: torch.Tensor) -> torch.Tensor:
        """(B, d) -> logits (B, G, C): one (B, d) @ (d, G*C) product."""
        d, g, c = self.weight.shape
        return torch.addmm(self.bias.view(1, g * c), x_bd, self.weight.view(d, g * c)).view(-1, g, c)

    def member(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Head g as nn.Linear's (weight (C, d), bias (C,)), detached copies."""
        return self.weight[:, g].t().detach().clone(), self.bias[g].detach().clone()

    @torch.no_grad()
    def backward(self, x_bd: torch.Tensor, y_b: torch.Tensor) -> torch.Tensor:
        """Each head's mean cross-entropy over the batch, (G,) float32; sets weight.grad and bias.grad to
        its gradient (the sum over heads of their losses, so each head gets its own).

        dZ = (softmax(Z) - onehot(y)) / B, then dW = x^T dZ (the 1/B folded into the product) and
        db = sum dZ. The reported loss is -log softmax(Z)[y], floored at float32's smallest normal
        probability (a loss of at most 87.3); the gradient has no floor."""
        n = x_bd.shape[0]
        idx = y_b.view(n, 1, 1).expand(n, self.n_heads, 1)
        dz = torch.softmax(self.forward(x_bd), dim=-1)
        loss_g = -dz.gather(-1, idx).squeeze(-1).clamp_min_(torch.finfo(dz.dtype).tiny).log_().mean(dim=0)
        dz.scatter_add_(-1, idx, torch.full(idx.shape, -1.0, dtype=dz.dtype, device=dz.device))
        d, g, c = self.weight.shape
        grad = torch.empty(d, g * c, dtype=dz.dtype, device=dz.device)
        torch.addmm(grad, x_bd.t(), dz.view(n, g * c), beta=0, alpha=1.0 / n, out=grad)
        self.weight.grad = grad.view(d, g, c)
        self.bias.grad = dz.sum(dim=0).div_(n)
        return loss_g
