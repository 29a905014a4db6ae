"""Processes of one launch (`torchrun`, `accelerate launch`) that agree on every outcome.

Under a launcher every process runs the same command. A decision about a shared folder (create the
store or the run directory, refuse it, resume it) is taken by process 0 alone and handed to the
others: if each process looked for itself, one would find the folder another had just created and
stop, and the rest would die at their next collective with gloo's "Connection closed by peer". Work
that every process does for itself (recording its own chunks) ends in the same agreement, so an
error in one process (an unreadable image) stops every process with that one message.

    from saev_store.distributed import agree, rank_world
    info = agree(lambda: open_run_dir(cfg), rank0_only=True)   # process 0 decides; all return it or raise its error
    agree(lambda: record_my_chunks(...))                       # every process works; all raise the first error

Alone (no process group), `agree(fn)` is `fn()`.
"""

from __future__ import annotations

from typing import Callable, TypeVar

from .errors import UserError

T = TypeVar("T")


class PeerError(UserError):
    """Another process of the launch failed: reported in one line here, since the failing process
    prints the error itself (its traceback, for a bug)."""


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialized process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def agree(fn: Callable[[], T], *, rank0_only: bool = False) -> T:
    """Run `fn` on every process (or on process 0 only), then agree on the outcome in one collective.

    Every process returns process 0's value when `rank0_only`, else its own. If `fn` failed anywhere,
    every process raises the failure of the lowest failing rank: the same UserError message (exit 2
    from the CLI), or, for another exception, the exception itself where it happened and a `PeerError`
    naming it elsewhere. The gathered outcome is also a barrier: no process leaves before `fn` has
    finished everywhere. Ctrl-C and kills are not caught (the launcher stops the others)."""
    rank, world = rank_world()
    if world == 1:
        return fn()
    import torch.distributed as dist

    value, mine, err = None, ("ok", None), None
    if rank == 0 or not rank0_only:
        try:
            value = fn()
        except UserError as e:
            err, mine = e, ("user", str(e))
        except Exception as e:  # a bug or an I/O failure: the others must not wait for this process forever
            err, mine = e, ("error", f"{type(e).__name__}: {e}")
    outcomes: list = [None] * world
    dist.all_gather_object(outcomes, (mine, value if rank0_only and rank == 0 else None))
    if mine[0] == "error":
        raise err  # this process's own bug keeps its traceback
    for r, ((kind, msg), _) in enumerate(outcomes):
        if kind == "ok":
            continue
        if r == rank:
            raise err
        if kind == "user":
            raise UserError(msg)
        raise PeerError(f"process {r} of {world} failed ({msg}); its traceback is above.")
    return outcomes[0][1] if rank0_only else value
