"""Held-out evaluation metrics, accumulated batch by batch in float64.

FVU = sum ||x - x_hat||^2 / sum ||x - mean||^2 over the held-out rows, `mean` being their own mean
row; the denominator is merged across batches with Chan et al.'s parallel variance update, so it
does not suffer the cancellation of sum ||x||^2 - n ||mean||^2.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

ALMOST_DEAD_BELOW = 1e-5
"""A latent firing on fewer than this fraction of held-out rows (but at least once) is almost dead."""
DENSE_ABOVE = 0.1
"""A latent firing on more than this fraction of held-out rows is dense."""
HIST_EDGES = np.arange(-8.0, 0.5, 0.5)
"""log10 firing-frequency histogram bins (never-firing latents are counted separately)."""


class EvalMetrics(NamedTuple):
    """One SAE on the held-out rows."""

    fvu: float
    """Fraction of variance unexplained."""
    mse: float
    """Mean squared error per element, in the normalized space (mean ||x'||^2 = d)."""
    l0: float
    """Mean active latents per row."""
    l1: float
    """Mean sum of latent activations per row (normalized space)."""
    n_rows: int
    """Rows evaluated."""
    n_dead: int
    """Latents that never fired."""
    n_almost_dead: int
    """Latents firing on 0 < freq < ALMOST_DEAD_BELOW of the rows."""
    n_dense: int
    """Latents firing on more than DENSE_ABOVE of the rows."""
    freq: np.ndarray
    """(d_sae,) firing frequency per latent."""

    def summary(self) -> dict:
        """JSON-able scalars plus the firing-frequency histogram."""
        log_f = np.log10(self.freq[self.freq > 0])
        counts, _ = np.histogram(log_f, bins=HIST_EDGES)
        return {
            "fvu": self.fvu,
            "mse": self.mse,
            "l0": self.l0,
            "l1": self.l1,
            "n_rows": self.n_rows,
            "d_sae": int(self.freq.shape[0]),
            "n_dead": self.n_dead,
            "n_almost_dead": self.n_almost_dead,
            "n_dense": self.n_dense,
            "almost_dead_below": ALMOST_DEAD_BELOW,
            "dense_above": DENSE_ABOVE,
            "freq_hist": {"log10_edges": HIST_EDGES.tolist(), "counts": counts.tolist(), "n_never": self.n_dead},
        }


class FVUAccumulator:
    """Streams (x, x_hat) row batches; float64 sums. The data half (`add_rows`: count, mean, and the
    sum of squared deviations) does not depend on the SAE, so a bank evaluates it once for all."""

    def __init__(self, d: int):
        self.n = 0
        self.mean = np.zeros(d, dtype=np.float64)
        self.m2 = 0.0
        self.sse = 0.0

    def update(self, x_nd, x_hat_nd) -> None:
        x = _f64(x_nd)
        err = x - _f64(x_hat_nd)
        self.sse += float(np.einsum("nd,nd->", err, err))
        self.add_rows(x)

    def add_rows(self, x_nd) -> None:
        """Merge a batch into the data statistics (Chan et al.)."""
        x = _f64(x_nd)
        n_b = x.shape[0]
        if n_b == 0:
            return
        mean_b = x.mean(axis=0)
        c = x - mean_b
        m2_b = float(np.einsum("nd,nd->", c, c))
        delta = mean_b - self.mean
        n = self.n + n_b
        self.m2 += m2_b + float(delta @ delta) * self.n * n_b / n
        self.mean += delta * n_b / n
        self.n = n

    @property
    def fvu(self) -> float:
        return self.fvu_of(self.sse)

    @property
    def mse(self) -> float:
        return self.mse_of(self.sse)

    def fvu_of(self, sse: float) -> float:
        """FVU of a model whose summed squared error over these rows is `sse`."""
        return sse / self.m2 if self.m2 > 0 else float("nan")

    def mse_of(self, sse: float) -> float:
        """Mean squared error per element for the summed squared error `sse` over these rows."""
        return sse / (self.n * self.mean.shape[0]) if self.n else float("nan")


class SAEAccumulator:
    """Everything `EvalMetrics` holds, for one SAE, streamed.

    Alone (`update`), it tracks its own data statistics. In a bank, pass the one shared `data`
    accumulator (fed once per batch by the caller with `add_rows`) and feed each SAE's per-batch
    sums with `add`; the data statistics are then computed once, not once per SAE."""

    def __init__(self, d_in: int, d_sae: int, data: FVUAccumulator | None = None):
        self.own_data = data is None
        self.data = FVUAccumulator(d_in) if data is None else data
        """The rows' statistics (count, mean, squared deviations): FVU's denominator."""
        self.sse = 0.0
        self.n_fired = np.zeros(d_sae, dtype=np.int64)
        self.sum_l0 = 0
        self.sum_l1 = 0.0

    def update(self, x_nd: torch.Tensor, x_hat_nd: torch.Tensor, z_ns: torch.Tensor) -> None:
        if self.own_data:
            self.data.add_rows(x_nd)
        err = _f64(x_nd) - _f64(x_hat_nd)
        z = torch.as_tensor(z_ns)
        self.add(float(np.einsum("nd,nd->", err, err)), float(z.double().abs().sum()),
                 (z > 0).sum(dim=0, dtype=torch.int32))

    def add(self, sse: float, l1: float, n_fired_s) -> None:
        """One batch's sums: squared error (float64), sum |z|, and rows each latent fired on."""
        self.sse += sse
        self.sum_l1 += l1
        n_fired = np.asarray(torch.as_tensor(n_fired_s).cpu(), dtype=np.int64)
        self.n_fired += n_fired
        self.sum_l0 += int(n_fired.sum())

    def result(self) -> EvalMetrics:
        n = max(self.data.n, 1)
        freq = self.n_fired / n
        return EvalMetrics(
            fvu=self.data.fvu_of(self.sse),
            mse=self.data.mse_of(self.sse),
            l0=self.sum_l0 / n,
            l1=self.sum_l1 / n,
            n_rows=self.data.n,
            n_dead=int((self.n_fired == 0).sum()),
            n_almost_dead=int(((freq > 0) & (freq < ALMOST_DEAD_BELOW)).sum()),
            n_dense=int((freq > DENSE_ABOVE).sum()),
            freq=freq,
        )


def _f64(x) -> np.ndarray:
    if torch.is_tensor(x):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)
