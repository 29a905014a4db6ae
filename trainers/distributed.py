"""Where this process stands in a data-parallel run (torchrun / accelerate launch), or (0, 1) alone,
and how its processes agree on what to do with the run directory (saev_store/distributed.py)."""

from __future__ import annotations

from saev_store.distributed import agree, rank_world

__all__ = ["agree", "rank_world"]
