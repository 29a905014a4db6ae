"""Adam for a bank of stacked SAEs, with one learning rate per member.

`torch.optim.Adam` has one learning rate per parameter tensor, but a group stacks several SAEs into
each tensor. This is the same update as PyTorch's single-tensor Adam (bias-corrected moments,
`p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)`), with `lr` a per-member vector broadcast along the
member axis; the decoder's rows are kept unit-norm by the update itself (`fused.adam_decoder_`:
gradient and update projected onto the rows' tangent, rows renormalized after the step).
"""

from __future__ import annotations

import math

import torch

from .fused import EAGER, Stages
from .sae import SAEBank

MEMBER_AXIS = {"W_enc": 1, "b_enc": 0, "W_dec": 0, "b_dec": 0, "jump_threshold": 0, "r_mag": 0, "b_mag": 0}
"""Which axis of each group parameter indexes the member SAE."""


ROW_AXIS = {"W_enc": 0, "b_enc": 1, "W_dec": 1, "b_dec": 1, "jump_threshold": 1, "r_mag": 1, "b_mag": 1}
"""An axis of each group parameter that is neither the member axis nor the decoder's row (last) axis:
the CPU update runs in slices along it."""
CPU_SLICE_BYTES = 1 << 20
"""On a CPU the update walks each parameter in slices of about this size, so the passes over a
slice (parameter, gradient, two moments, a temporary: 5 MiB) run from cache; a whole stacked W_enc of a
nine-SAE bank is 35 MB per tensor and would stream from memory on every pass."""


def _row_chunks(p: torch.Tensor, axis: int, whole: bool) -> list[tuple[slice, ...]]:
    """Index tuples cutting `p` along `axis` into CPU_SLICE_BYTES pieces (one piece off the CPU or
    when `whole`)."""
    n = p.shape[axis]
    if p.device.type != "cpu" or whole:
        return [(slice(None),)]
    per_row = max(1, p.numel() // max(n, 1) * p.element_size())
    step = max(1, CPU_SLICE_BYTES // per_row)
    return [(slice(None),) * axis + (slice(a, min(a + step, n)),) for a in range(0, n, step)]


def _lr_view(lr_n: torch.Tensor, p: torch.Tensor, axis: int) -> torch.Tensor:
    shape = [1] * p.ndim
    shape[axis] = -1
    return lr_n.view(shape)


class BankAdam:
    """Adam over every group of an `SAEBank`; state is plain tensors so checkpoints are exact."""

    def __init__(self, bank: SAEBank, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 stages: Stages = EAGER):
        self.bank = bank
        self.stages = stages
        """Element-wise update functions, eager or compiled (`fused.stages`)."""
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.n_steps = 0
        self.state = [
            {name: (torch.zeros_like(p), torch.zeros_like(p)) for name, p in g.named_parameters()} for g in bank.groups
        ]

    @torch.no_grad()
    def step(self, lrs: list[torch.Tensor]) -> None:
        """One update; `lrs[g]` is the (n,) learning-rate vector of group g (this step's values).

        Every parameter goes through `fused.adam_` (the decoder through `fused.adam_decoder_`, which
        also keeps its rows unit-norm), on a CPU slice by slice. `sqrt(v) / c + eps` with
        c = sqrt(1 - beta2^t) is rewritten (sqrt(v) + eps c) / c so c folds into the step size
        lr c / (1 - beta1^t), which is 0, not a division by 0, at lr 0."""
        self.n_steps += 1
        b1, b2 = self.betas
        bc1 = 1 - b1**self.n_steps
        bc2_sqrt = math.sqrt(1 - b2**self.n_steps)
        for g, state, lr_n in zip(self.bank.groups, self.state, lrs):
            step_n = lr_n.float() * (bc2_sqrt / bc1)
            # A tensor, not a float: it changes every step, and a compiled stage would recompile for each value.
            eps_c = step_n.new_full((), self.eps * bc2_sqrt)
            for name, p in g.named_parameters():
                if p.grad is None:
                    continue
                m_all, v_all = state[name]
                step = _lr_view(step_n.to(p), p, MEMBER_AXIS[name])
                update = self.stages.adam_decoder_ if name == "W_dec" else self.stages.adam_
                for sl in _row_chunks(p, ROW_AXIS[name], self.stages.compiled):
                    update(p.data[sl], p.grad[sl], m_all[sl], v_all[sl], step, eps_c.to(p), b1, b2)

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
