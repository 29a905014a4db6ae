"""Per-hook activation statistics and the input normalization built from them.

Statistics are summed per chunk while writing (so any number of writers, interrupted or not, can
contribute) and reduced when the store completes. The normalization subtracts the mean row and
scales so the root-mean-square norm of a centered row is sqrt(d): SAE hyperparameters then transfer
between layers and models whose activation scales differ by orders of magnitude.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import numpy as np


class BlockStats(NamedTuple):
    """Sums over the selected rows of one chunk's valid images, in float64."""

    sum_d: np.ndarray
    """Sum of rows, (d,)."""
    sumsq: float
    """Sum of squared row norms."""
    sumnorm: float
    """Sum of row norms."""
    count: int
    """Rows summed."""


class TokenSums(NamedTuple):
    """Sums over the images of a block, kept per token so any token selection is a cheap subset."""

    sum_td: np.ndarray
    """Per-token sum of rows, (T, d) float64."""
    sumsq_t: np.ndarray
    """Per-token sum of squared row norms, (T,) float64."""
    sumnorm_t: np.ndarray
    """Per-token sum of row norms, (T,) float64."""
    n_images: int

    def select(self, token_idx: np.ndarray) -> BlockStats:
        return BlockStats(
            self.sum_td[token_idx].sum(axis=0),
            float(self.sumsq_t[token_idx].sum()),
            float(self.sumnorm_t[token_idx].sum()),
            int(self.n_images * len(token_idx)),
        )


def token_sums(x_ntd: np.ndarray) -> TokenSums | None:
    """Per-token float64 sums of a (n, T, d) float32 block; None when it holds NaN or inf.

    Row norms come from a float32 dot product (relative error ~1e-7, summed in float64): it is 5x
    cheaper than casting the block to float64, and the writer must keep up with the disk. A
    non-finite value makes its row's squared norm non-finite, so the check costs nothing extra.
    """
    sq_nt = np.einsum("ntd,ntd->nt", x_ntd, x_ntd).astype(np.float64)
    if not np.all(np.isfinite(sq_nt)):
        if not np.all(np.isfinite(x_ntd)):
            return None
        sq_nt = np.einsum("ntd,ntd->nt", x_ntd, x_ntd, dtype=np.float64)  # finite but |x| > 1e19
    sum_td = x_ntd.sum(axis=0, dtype=np.float64)
    return TokenSums(sum_td, sq_nt.sum(axis=0), np.sqrt(sq_nt).sum(axis=0), int(x_ntd.shape[0]))


class Moments(NamedTuple):
    """Reduced statistics of one hook and token selection."""

    mean: np.ndarray
    """Mean row, (d,) float64."""
    rms_norm: float
    """sqrt(mean ||x - mean||^2)."""
    mean_norm: float
    """mean ||x||."""
    n_rows: int


def reduce_blocks(sum_cd: np.ndarray, sumsq_c: np.ndarray, sumnorm_c: np.ndarray, count_c: np.ndarray) -> Moments:
    """Combine per-chunk sums into the store-wide moments."""
    n = int(np.sum(count_c))
    if n == 0:
        d = sum_cd.shape[-1]
        return Moments(np.zeros(d), 0.0, 0.0, 0)
    mean = np.sum(sum_cd, axis=0) / n
    # E||x - mu||^2 = E||x||^2 - ||mu||^2; float64 keeps this exact enough for activations (|x| << 1e8).
    var = max(float(np.sum(sumsq_c)) / n - float(mean @ mean), 0.0)
    return Moments(mean, math.sqrt(var), float(np.sum(sumnorm_c)) / n, n)


@dataclasses.dataclass(frozen=True)
class Normalizer:
    """x' = (x - mean) * scale. Identity when mean is 0 and scale is 1."""

    mean: np.ndarray
    """(d,) float64 mean row subtracted first."""
    scale: float
    """Multiplier applied after centering: sqrt(d) / rms_norm."""

    @classmethod
    def identity(cls, d: int) -> "Normalizer":
        return cls(np.zeros(d, dtype=np.float64), 1.0)

    @classmethod
    def from_moments(cls, m: Moments) -> "Normalizer":
        d = m.mean.shape[0]
        scale = math.sqrt(d) / m.rms_norm if m.rms_norm > 0 else 1.0
        return cls(np.asarray(m.mean, dtype=np.float64), scale)

    @property
    def d(self) -> int:
        return int(self.mean.shape[0])

    def apply(self, x):
        """Normalize numpy or torch rows (..., d); returns float32 of the same kind."""
        if isinstance(x, np.ndarray):
            return ((x.astype(np.float64) - self.mean) * self.scale).astype(np.float32)
        import torch

        mean = torch.as_tensor(self.mean, dtype=torch.float32, device=x.device)
        return (x.float() - mean) * float(self.scale)

    def invert(self, x):
        """Undo `apply`: rows in the normalized space -> raw activations."""
        if isinstance(x, np.ndarray):
            return (x.astype(np.float64) / self.scale + self.mean).astype(np.float32)
        import torch

        mean = torch.as_tensor(self.mean, dtype=torch.float32, device=x.device)
        return x.float() / float(self.scale) + mean

    def to_dict(self) -> dict:
        return {"mean": [float(v) for v in self.mean], "scale": float(self.scale)}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalizer":
        return cls(np.asarray(d["mean"], dtype=np.float64), float(d["scale"]))
