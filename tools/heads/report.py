"""What a head's folder shows besides its weights: the confusion-matrix PNG and the per-class table."""

from __future__ import annotations

import csv
import pathlib

import numpy as np

MAX_TICK_LABELS = 40
"""Class names on the confusion matrix's axes up to this many classes (more would not be legible)."""


def plot_confusion(conf_cc: np.ndarray, class_names: list[str], title: str, fpath: pathlib.Path) -> None:
    """Row-normalized confusion matrix (each true class sums to 1) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conf = np.asarray(conf_cc, dtype=np.float64)
    rows = conf.sum(axis=1, keepdims=True)
    frac = np.divide(conf, rows, out=np.zeros_like(conf), where=rows > 0)
    n = conf.shape[0]
    side = min(12.0, 3.0 + 0.35 * n)
    fig, ax = plt.subplots(figsize=(side + 1.2, side), dpi=100)
    im = ax.imshow(frac, vmin=0, vmax=1, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if n <= MAX_TICK_LABELS:
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), class_names, fontsize=7)
        if n <= 16:
            for i in range(n):
                for j in range(n):
                    if conf[i, j]:
                        ax.text(j, i, f"{frac[i, j]:.2f}", ha="center", va="center", fontsize=6,
                                color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(fpath)
    plt.close(fig)


def per_class_rows(class_names: list[str], levels: dict[str, dict]) -> list[dict]:
    """One row per class: its support, accuracy and IoU at each evaluation level ("image", "patch", "pixel")."""
    rows = []
    for k, name in enumerate(class_names):
        row = {"class": k, "name": name}
        for level, m in levels.items():
            row[f"{level}_support"] = m["support"][k]
            row[f"{level}_accuracy"] = m["per_class_accuracy"][k]
            row[f"{level}_iou"] = m["iou"][k]
        rows.append(row)
    return rows


def write_per_class(dpath: pathlib.Path, rows: list[dict]) -> str:
    """per_class.csv and per_class.md; returns the markdown. Empty cells: the class never occurs."""
    cols = list(rows[0])
    with open(dpath / "per_class.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)

    def cell(v):
        if v is None:
            return ""
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in rows]
    md = "\n".join(lines) + "\n"
    (dpath / "per_class.md").write_text(md)
    return md
