"""Where this process stands in a data-parallel run (torchrun / accelerate launch), or (0, 1) alone."""

from __future__ import annotations

import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialized process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
