"""Confusion matrices and what is read off them: top-1, per-class accuracy, IoU, mIoU.

    conf_gcc = confusions(pred_ng, target_n, n_classes)    # (G, C, C) int64: rows true class, columns prediction
    m = scores(conf_gcc[g])                                 # accuracy, per-class accuracy, IoU, mIoU, support

Targets equal to IGNORE (-1) are left out. Per class: accuracy = TP / (TP + FN) (recall; NaN for a
class with no target), IoU = TP / (TP + FP + FN) (NaN when the class is neither a target nor a
prediction); the means skip the NaNs (the usual mmsegmentation convention). Counts are int64, the
ratios float64.
"""

from __future__ import annotations

import numpy as np
import torch

from saev_store.patch_labels import IGNORE


def confusions(pred_ng: torch.Tensor, target_n: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(G, C, C) int64 counts of (target, prediction) for G heads' predictions (n, G) of the same targets (n,)."""
    keep = target_n != IGNORE
    pred_ng, target_n = pred_ng[keep], target_n[keep].to(torch.int64)
    n_heads = pred_ng.shape[1]
    head = torch.arange(n_heads, device=pred_ng.device).view(1, -1)
    flat = (head * n_classes + target_n.view(-1, 1)) * n_classes + pred_ng.to(torch.int64)
    return torch.bincount(flat.reshape(-1), minlength=n_heads * n_classes * n_classes).view(n_heads, n_classes, n_classes)


def scores(conf_cc) -> dict:
    """Everything read off one (C, C) confusion matrix; JSON-able (NaN -> None)."""
    conf = np.asarray(conf_cc, dtype=np.int64)
    tp = np.diag(conf).astype(np.float64)
    support = conf.sum(axis=1)
    predicted = conf.sum(axis=0)
    union = support + predicted - np.diag(conf)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc_c = np.where(support > 0, tp / support, np.nan)
        iou_c = np.where(union > 0, tp / union, np.nan)
    total = int(conf.sum())
    return {
        "accuracy": float(tp.sum() / total) if total else None,
        "mean_class_accuracy": _nanmean(acc_c),
        "miou": _nanmean(iou_c),
        "per_class_accuracy": _listed(acc_c),
        "iou": _listed(iou_c),
        "support": support.tolist(),
        "n": total,
    }


def _nanmean(x: np.ndarray) -> float | None:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else None


def _listed(x: np.ndarray) -> list:
    return [None if np.isnan(v) else float(v) for v in x]
