"""What `saev-tools head` trains: one `HeadConfig` per run (a grid of linear heads on one hook)."""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Literal

from saev_store.errors import UserError
from saev_store.loaders import DEFAULT_BUFFER_MB, DEFAULT_N_READERS
from saev_store.options import option

TASKS: tuple[str, ...] = ("classify", "segment")
CLASSIFY_TOKENS: tuple[str, ...] = ("cls", "mean")
"""classify: the CLS token, or the mean of the patch tokens."""
DEFAULT_BATCH = {"classify": 512, "segment": 4096}
"""Rows per step by task: images (saev's CUB probe) or patches."""


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """A grid of AdamW-trained linear heads on one hook of a store, trained together; the best is kept."""

    store: str = option(argument=True)
    """The activation store (`NAME.zarr`)."""
    hook: str
    """Hook of the store whose activations the heads read."""
    task: Literal["classify", "segment"] = "classify"
    """`classify`: one label per image (the store's labels); `segment`: one label per patch (the store's patch labels)."""
    tokens: str | None = option(None, choices=CLASSIFY_TOKENS, when=("task", ("classify",)))
    """classify: `cls` (the CLS token) or `mean` (mean of the patch tokens); default cls when the hook has one,
    else mean. segment: always `patches`."""
    out_dpath: str | None = option(None, flag="--out")
    """Output folder; default heads/<store name>-<hook>-<task>."""
    lrs: tuple[float, ...] = option((3e-4, 1e-3, 3e-3, 1e-2), flag="--lr")
    """AdamW learning rates of the grid."""
    weight_decays: tuple[float, ...] = option((1e-3, 1e-2, 1e-1), flag="--wd")
    """AdamW (decoupled) weight decays of the grid, applied to the weights, not the bias."""
    n_epochs: int = 10
    """Passes over the training images; every head of the grid sees every batch."""
    batch_size: int | None = None
    """Rows per step: images (classify, default 512) or patches (segment, default 4096)."""
    held_out_frac: float = option(0.1, flag="--held-out")
    """Fraction of images (never patches) held out to pick the best head and report its metrics."""
    max_eval_images: int | None = None
    """Cap on held-out images evaluated (None: all)."""
    seed: int = 0
    """Seed of the held-out split, the data order and the (shared) initialization."""
    normalize: bool = True
    """Normalize activations with the store's statistics ((x - mean) * sqrt(d) / rms_norm) inside the head."""
    pixel_eval: bool = option(True, when=("task", ("segment",)))
    """segment: also score each pixel of the held-out images against their masks (logits upsampled bilinearly),
    where the store's masks can be read."""
    data_root: str | None = None
    """Where the store's dataset lives now, if it moved (for pixel evaluation)."""
    masks_root: str | None = None
    """Where a folder mask source lives now, if it moved (for pixel evaluation)."""
    device: str = "cpu"
    """Torch device for the heads."""
    buffer_mb: float = option(DEFAULT_BUFFER_MB, when=("task", ("segment",)))
    """segment: shuffle buffer of the loader, MiB."""
    n_readers: int = DEFAULT_N_READERS
    """Store chunks read ahead."""
    overwrite: bool = False
    """Replace an existing output folder."""
    quiet: bool = False
    """No progress bar."""

    def __post_init__(self):
        if self.task not in TASKS:
            raise UserError(f"--task {self.task!r} is unknown; choose one of {', '.join(TASKS)}.")
        if self.task == "segment" and self.tokens not in (None, "patches"):
            raise UserError(f"--task segment labels each patch token; drop --tokens {self.tokens} (it is always patches).")
        if self.task == "classify" and self.tokens not in (None, *CLASSIFY_TOKENS):
            raise UserError(f"--tokens {self.tokens!r}: a classification head reads {' or '.join(CLASSIFY_TOKENS)}.")
        object.__setattr__(self, "lrs", tuple(float(v) for v in self.lrs))
        object.__setattr__(self, "weight_decays", tuple(float(v) for v in self.weight_decays))
        if not self.lrs or not self.weight_decays:
            raise UserError("the grid needs at least one learning rate (--lr) and one weight decay (--wd).")
        if min(self.lrs) <= 0 or min(self.weight_decays) < 0:
            raise UserError(f"learning rates {self.lrs} must be > 0 and weight decays {self.weight_decays} >= 0.")
        if len(set(self.lrs)) != len(self.lrs) or len(set(self.weight_decays)) != len(self.weight_decays):
            raise UserError("--lr and --wd values must be distinct.")
        if self.n_epochs < 1:
            raise UserError(f"--n-epochs {self.n_epochs} must be at least 1.")
        if self.batch_size is not None and self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size} must be at least 1.")
        if not 0.0 < self.held_out_frac < 1.0:
            raise UserError(f"--held-out {self.held_out_frac} must be in (0, 1): the best head is chosen on held-out images.")
        if self.max_eval_images is not None and self.max_eval_images < 1:
            raise UserError(f"--max-eval-images {self.max_eval_images} must be at least 1.")
        if self.out_dpath is None:
            stem = pathlib.Path(self.store.rstrip("/")).stem
            object.__setattr__(self, "out_dpath", str(pathlib.Path("heads") / f"{stem}-{self.hook}-{self.task}"))
        if "://" not in self.store:
            object.__setattr__(self, "store", os.path.abspath(self.store))

    @property
    def rows_per_step(self) -> int:
        return self.batch_size or DEFAULT_BATCH[self.task]

    def grid(self) -> list[tuple[float, float]]:
        """The members, (lr, weight decay), learning rate major."""
        return [(lr, wd) for lr in self.lrs for wd in self.weight_decays]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lrs"], d["weight_decays"] = list(self.lrs), list(self.weight_decays)
        return d
