"""Adam for a bank of stacked SAEs, with one learning rate per member.

`torch.optim.Adam` has one learning rate per parameter tensor, but a group stacks several SAEs into
each tensor. This is the same update as PyTorch's single-tensor Adam (bias-corrected moments,
`p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)`), with `lr` a per-member vector broadcast along the
member axis, and the decoder update projected onto the tangent of its unit-norm rows.
"""

from __future__ import annotations

import math

import torch

from .constraints import remove_parallel_
from .sae import SAEBank

MEMBER_AXIS = {"W_enc": 1, "b_enc": 0, "W_dec": 0, "b_dec": 0}
"""Which axis of each group parameter indexes the member SAE."""


def _lr_view(lr_n: torch.Tensor, p: torch.Tensor, axis: int) -> torch.Tensor:
    shape = [1] * p.ndim
    shape[axis] = -1
    return lr_n.view(shape)


class BankAdam:
    """Adam over every group of an `SAEBank`; state is plain tensors so checkpoints are exact."""

    def __init__(self, bank: SAEBank, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.bank = bank
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.n_steps = 0
        self.state = [
            {name: (torch.zeros_like(p), torch.zeros_like(p)) for name, p in g.named_parameters()} for g in bank.groups
        ]

    @torch.no_grad()
    def step(self, lrs: list[torch.Tensor]) -> None:
        """One update; `lrs[g]` is the (n,) learning-rate vector of group g (this step's values)."""
        self.n_steps += 1
        b1, b2 = self.betas
        bc1 = 1 - b1**self.n_steps
        bc2_sqrt = math.sqrt(1 - b2**self.n_steps)
        for g, state, lr_n in zip(self.bank.groups, self.state, lrs):
            for name, p in g.named_parameters():
                if p.grad is None:
                    continue
                m, v = state[name]
                grad = p.grad
                m.lerp_(grad, 1 - b1)
                v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                # One temporary, updated in place (the moments of wide banks are GBs on a GPU).
                update = v.sqrt().div_(bc2_sqrt).add_(self.eps)
                torch.div(m, update, out=update)
                update.mul_(_lr_view(lr_n.to(p) / bc1, p, MEMBER_AXIS[name]))
                if name == "W_dec":
                    remove_parallel_(update, p)
                p.sub_(update)

    def zero_grad(self) -> None:
        for p in self.bank.parameters():
            p.grad = None

    def state_dict(self) -> dict:
        return {
            "n_steps": self.n_steps,
            "state": [{k: (m.cpu(), v.cpu()) for k, (m, v) in s.items()} for s in self.state],
        }

    def load_state_dict(self, d: dict) -> None:
        self.n_steps = int(d["n_steps"])
        for s, saved in zip(self.state, d["state"]):
            for k, (m, v) in saved.items():
                s[k][0].copy_(m)
                s[k][1].copy_(v)
