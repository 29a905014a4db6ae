"""The decoder-norm constraint: unit-norm decoder rows (SAELens `W_dec [d_sae, d_in]`).

Two halves, applied around every optimizer step:
* before: the gradient component parallel to each decoder row is removed (it could only change the
  row's length, which the renormalization undoes anyway, and it would pollute Adam's moments);
* after: rows are rescaled to unit length.
The trainer also projects Adam's final update the same way, because Adam's per-element scaling of a
tangent gradient is no longer tangent; so the applied step has no component along the rows and the
renormalization only removes the second-order growth (1 + |step|^2)^(1/2).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def remove_parallel_(g_nsd: torch.Tensor, w_nsd: torch.Tensor) -> torch.Tensor:
    """In place: g -= <g, w> w for each row (last dim) of unit-norm `w`; returns g."""
    coef = torch.linalg.vecdot(g_nsd, w_nsd, dim=-1).unsqueeze(-1)
    g_nsd.addcmul_(coef, w_nsd, value=-1.0)
    return g_nsd


@torch.no_grad()
def renormalize_rows_(w_nsd: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """In place: each row (last dim) scaled to unit L2 norm; returns w."""
    w_nsd.div_(w_nsd.norm(dim=-1, keepdim=True).clamp_min(eps))
    return w_nsd
