"""AdamW for a `HeadBank`: one learning rate and one weight decay per head.

The update is `torch.optim.AdamW`'s single-tensor step (decoupled decay p *= 1 - lr * wd, bias-corrected
moments, p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)) with lr and wd vectors broadcast along the
head axis. Weight decay applies to the weights only, not the bias (as a logistic regression's L2
penalty does), the usual AdamW parameter-group split.
"""

from __future__ import annotations

import math

import torch

from .bank import HeadBank


class BankAdamW:
    """AdamW over a HeadBank; `lrs` and `weight_decays` have one entry per head."""

    def __init__(self, bank: HeadBank, lrs, weight_decays, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.bank = bank
        dev = bank.weight.device
        self.lr_g = torch.as_tensor(list(lrs), dtype=torch.float32, device=dev)
        self.wd_g = torch.as_tensor(list(weight_decays), dtype=torch.float32, device=dev)
        if self.lr_g.shape != (bank.n_heads,) or self.wd_g.shape != (bank.n_heads,):
            raise ValueError(f"BankAdamW: need {bank.n_heads} learning rates and weight decays, got {len(lrs)} and {len(weight_decays)}.")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.n_steps = 0
        self.state = {name: (torch.zeros_like(p), torch.zeros_like(p)) for name, p in bank.named_parameters()}

    @torch.no_grad()
    def step(self) -> None:
        self.n_steps += 1
        b1, b2 = self.betas
        bc1 = 1 - b1**self.n_steps
        bc2_sqrt = math.sqrt(1 - b2**self.n_steps)
        # weight (d, G, C): heads on axis 1; bias (G, C): heads on axis 0.
        views = {"weight": (1, -1, 1), "bias": (-1, 1)}
        for name, p in self.bank.named_parameters():
            if p.grad is None:
                continue
            lr = self.lr_g.view(views[name])
            if name == "weight":
                p.mul_(1 - lr * self.wd_g.view(views[name]))
            m, v = self.state[name]
            m.lerp_(p.grad, 1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = (v.sqrt() / bc2_sqrt).add_(self.eps)
            p.sub_(m / denom * (lr / bc1))

    def zero_grad(self) -> None:
        for p in self.bank.parameters():
            p.grad = None
