"""Atomic checkpoints: written to `<file>.partial`, flushed to disk, then `os.replace`d into place.

A kill at any moment (kill -9 included) leaves either the previous checkpoint or the new one, never
a torn file. A checkpoint holds everything the next step depends on: weights and buffers, Adam's
moments and step count, the trainer step, the loader position and the RNG states.
"""

from __future__ import annotations

import os
import pathlib

import torch


def save_checkpoint(fpath: str | os.PathLike, state: dict) -> None:
    fpath = pathlib.Path(fpath)
    fpath.parent.mkdir(parents=True, exist_ok=True)
    tmp = fpath.with_name(fpath.name + ".partial")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, fpath)
    # fsync the directory so the rename itself survives a power cut, not only a killed process.
    dir_fd = os.open(fpath.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(fpath: str | os.PathLike) -> dict | None:
    """The checkpoint at `fpath`, or None when there is none (a stray `.partial` is ignored)."""
    fpath = pathlib.Path(fpath)
    if not fpath.is_file():
        return None
    return torch.load(fpath, map_location="cpu", weights_only=False)
