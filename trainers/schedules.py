"""Learning-rate and sparsity-coefficient schedules as pure functions of the step (0-based)."""

from __future__ import annotations

import math


def lr_factor(step: int, n_steps: int, warmup_steps: int, schedule: str = "constant", min_frac: float = 0.0) -> float:
    """Multiplier of the peak learning rate at `step`: linear warmup from 1/warmup to 1, then constant,
    or cosine from 1 down to `min_frac` at the last step."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        n_decay = max(1, n_steps - warmup_steps - 1)
        progress = min(1.0, (step - warmup_steps) / n_decay)
        return min_frac + (1.0 - min_frac) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")


def sparsity_factor(step: int, warmup_steps: int) -> float:
    """Multiplier of the L1 coefficient at `step`: linear from 1/warmup to 1 over `warmup_steps`."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    return 1.0
