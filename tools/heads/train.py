"""`saev-tools head`: a grid of linear heads trained together on stored activations; the best is kept.

    saev-tools head demo/fmnist.zarr --hook _blocks.15 --task classify         # image labels, CLS or patch mean
    saev-tools head demo/fmnist.zarr --hook _blocks.10 --task segment          # patch labels (saev-store add-labels)
    run = train_heads(HeadConfig(store="demo/fmnist.zarr", hook="_blocks.10", task="segment"))

Every head of the learning-rate x weight-decay grid sees every batch of every epoch (`HeadBank`: one
matrix product for all of them; `BankAdamW`: one update), so the grid costs one pass over the data
per epoch. Images (never patches) are split into training and held-out ones; the head with the best
held-out score (classify: top-1 accuracy; segment: patch mIoU; ties to the earlier grid member) is
kept. A segmentation head is also scored per pixel of the held-out images (saev's protocol: logits
upsampled bilinearly to the model input, against the masks put through the image's resize and crop)
when the store's masks can be read.

Folder (`cfg.out_dpath`, written as `<name>.partial` and renamed when complete):
    head.safetensors, head.json   the kept head (tools.heads.load_head) and everything about the run
    confusion.png                 its confusion matrix (pixel level for segment when available)
    per_class.md, per_class.csv   its per-class support, accuracy and IoU at each level
    train_log.jsonl               per epoch, each member's mean training loss
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from saev_store import __version__
from saev_store.errors import UserError
from saev_store.patch_labels import IGNORE, mask_to_input
from saev_store.store import Store, open_store

from .bank import HeadBank
from .config import HeadConfig
from .data import ClassifyRows, SegmentRows, split_images
from .head import write_head
from .metrics import confusions, scores
from .optim import BankAdamW
from .report import per_class_rows, plot_confusion, write_per_class

PIXEL_BLOCK_BYTES = 64 << 20
"""Upsampled logits of this many bytes at a time during pixel evaluation (C x H x W floats per image)."""


class HeadRun(NamedTuple):
    """What `train_heads` did."""

    out_dpath: str
    """The head folder."""
    best: int
    """Index of the kept member in the grid (learning rate major)."""
    metrics: dict
    """The kept head's held-out scores by level ("image", or "patch" and "pixel")."""
    members: list[dict]
    """Every member: lr, weight_decay, final training loss, held-out scores."""
    info: dict
    """Everything written to head.json."""


def store_identity(st: Store) -> dict:
    """Enough to tell which store (and recording) a head was trained on."""
    a = st.attrs
    model, dataset = a.get("model") or {}, a.get("dataset") or {}
    return {
        "path": st.path, "created": a.get("created"), "format_version": a.get("format_version"), "n_images": st.n_images,
        "model": model.get("spec"), "weights_sha256": model.get("weights_sha256"),
        "dataset": {k: dataset.get(k) for k in ("kind", "root", "split", "fingerprint")},
    }


def _task(st: Store, cfg: HeadConfig):
    """(tokens, rows, class names, labeled-image mask, patch-label info or None) of cfg's task."""
    info = st.hook(cfg.hook)
    if cfg.task == "classify":
        tokens = cfg.tokens or ("cls" if info.layout.cls is not None else "mean")
        if tokens == "cls" and info.layout.cls is None:
            raise UserError(f"hook {cfg.hook!r} stores no CLS token; use --tokens mean (the mean of its patch tokens).")
        if tokens == "mean" and info.layout.grid is None:
            raise UserError(f"hook {cfg.hook!r} stores no patch tokens to average; use --tokens cls.")
        labels = st.labels()
        labeled = labels >= 0
        if not labeled.any():
            raise UserError(f"{st.path} has no image labels; a classification head needs a labelled dataset.")
        names = st.class_names or [str(k) for k in range(int(labels.max()) + 1)]
        return tokens, names, labeled, None
    key = st.patch_label_key(cfg.hook)
    attrs = st.patch_label_sets()[key]
    if not attrs.get("complete"):
        raise UserError(f"the patch labels {key} of {st.path} are not complete; rerun the add-labels (or record) command to finish them.")
    labeled = (st.patch_labels(key) != IGNORE).any(axis=1)
    return "patches", list(attrs["class_names"]), labeled, {"key": key, **attrs}


def train_heads(cfg: HeadConfig) -> HeadRun:
    """Train cfg's grid of heads on its store and hook; write the best to cfg.out_dpath."""
    out = pathlib.Path(cfg.out_dpath)
    if out.exists() and not cfg.overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it or choose another --out.")
    st = open_store(cfg.store)
    hook_info = st.hook(cfg.hook)
    tokens, class_names, labeled, patch_info = _task(st, cfg)
    n_classes = len(class_names)
    if n_classes < 2:
        raise UserError(f"the labels of {st.path} name {n_classes} class; a head needs at least two.")
    train_mask, eval_mask = split_images(st, labeled, cfg.held_out_frac, cfg.seed, cfg.max_eval_images)
    if cfg.task == "classify":
        rows = ClassifyRows(st, cfg.hook, tokens, cfg.normalize, train_mask, eval_mask, cfg.n_readers)
    else:
        rows = SegmentRows(st, cfg.hook, patch_info["key"], cfg.normalize, train_mask, eval_mask, cfg.buffer_mb, cfg.n_readers)
    device = torch.device(cfg.device)
    grid = cfg.grid()
    bank = HeadBank(hook_info.d, n_classes, len(grid), seed=cfg.seed, device=device)
    opt = BankAdamW(bank, [lr for lr, _ in grid], [wd for _, wd in grid])
    t0 = time.perf_counter()
    log = fit(bank, opt, rows, cfg, device)
    train_s = time.perf_counter() - t0

    level = "image" if cfg.task == "classify" else "patch"
    conf_gcc = evaluate(bank, rows, n_classes, device)
    members = []
    for g, (lr, wd) in enumerate(grid):
        members.append({"index": g, "lr": lr, "weight_decay": wd, "train_loss": log[-1]["loss"][g],
                        "metrics": {level: scores(conf_gcc[g].numpy())}})
    select = "accuracy" if cfg.task == "classify" else "miou"
    values = [m["metrics"][level][select] for m in members]
    best = int(np.argmax([-np.inf if v is None else v for v in values]))
    weight_cd, bias_c = bank.member(best)
    metrics = dict(members[best]["metrics"])
    conf_primary = conf_gcc[best].numpy()
    pixel_note = None
    if cfg.task == "segment":
        if cfg.pixel_eval:
            conf_px, pixel_note = pixel_confusion(st, patch_info, rows, weight_cd.to(device), bias_c.to(device), cfg, device)
            if conf_px is not None:
                metrics["pixel"] = scores(conf_px)
                conf_primary = conf_px
        else:
            pixel_note = "pixel evaluation turned off (--no-pixel-eval)"

    norm = rows.normalizer
    info = {
        "task": cfg.task, "hook": cfg.hook, "tokens": tokens, "layout": hook_info.layout.to_dict(), "d": hook_info.d,
        "n_classes": n_classes, "class_names": class_names, "ignore_index": IGNORE,
        "patch_labels": None if patch_info is None else {k: patch_info[k] for k in ("key", "rule", "background", "source", "image_size")},
        "normalization": {
            "applied": cfg.normalize, "tokens": "cls" if tokens == "cls" else "patches", "scale": float(norm.scale),
            "mean_norm": float(np.linalg.norm(norm.mean)),
            "formula": "x' = (x - mean) * scale, inside the head; mean (d,) and scale are in head.safetensors",
        },
        "grid": {
            "lr": list(cfg.lrs), "weight_decay": list(cfg.weight_decays), "n_epochs": cfg.n_epochs, "batch_size": cfg.rows_per_step,
            "optimizer": "AdamW, betas (0.9, 0.999), eps 1e-8, decoupled weight decay on the weights only, constant lr",
            "init": f"nn.Linear default (uniform +-1/sqrt(d)), the same for every member, seed {cfg.seed}",
            "selection": f"held-out {'top-1 accuracy' if select == 'accuracy' else 'patch mIoU'}, ties to the earlier member",
        },
        "members": members, "best": best, "metrics": metrics, "pixel_eval_note": pixel_note,
        "split": {"held_out_frac": cfg.held_out_frac, "seed": cfg.seed, "n_train_images": int(train_mask.sum()),
                  "n_eval_images": int(eval_mask.sum()), "n_train_rows": rows.n_train_rows},
        "train_seconds": train_s, "store": store_identity(st), "software_version": __version__, "config": cfg.to_dict(),
    }
    _write_folder(out, weight_cd, bias_c, norm, info, log, conf_primary, class_names, metrics)
    return HeadRun(str(out), best, metrics, members, info)


def fit(bank: HeadBank, opt: BankAdamW, rows, cfg: HeadConfig, device) -> list[dict]:
    """cfg.n_epochs passes over the training rows, every batch to every head; returns the per-epoch log."""
    bar = None
    if not cfg.quiet:
        from tqdm import tqdm

        bar = tqdm(total=cfg.n_epochs * rows.n_train_rows, unit="row", unit_scale=True, desc=f"heads x{bank.n_heads}",
                   dynamic_ncols=True, file=sys.stderr)
    log = []
    try:
        for epoch in range(cfg.n_epochs):
            loss_sum = torch.zeros(bank.n_heads, dtype=torch.float64, device=device)
            n_rows = 0
            for x, y in rows.batches(epoch, cfg.rows_per_step, cfg.seed):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                loss_g = bank.backward(x, y)
                opt.step()
                loss_sum += loss_g.double() * x.shape[0]
                n_rows += x.shape[0]
                if bar is not None:
                    bar.update(x.shape[0])
            log.append({"epoch": epoch, "rows": n_rows, "loss": (loss_sum / max(n_rows, 1)).tolist()})
            if bar is not None:
                bar.set_postfix_str(f"epoch {epoch + 1}, best loss {min(log[-1]['loss']):.4f}", refresh=False)
    finally:
        if bar is not None:
            bar.close()
    return log


@torch.no_grad()
def evaluate(bank: HeadBank, rows, n_classes: int, device) -> torch.Tensor:
    """(G, C, C) held-out confusion counts of every head (image rows or patch rows; ignore left out)."""
    conf = torch.zeros(bank.n_heads, n_classes, n_classes, dtype=torch.int64)
    for x, y, _ in rows.eval_rows():
        pred = bank(x.to(device)).argmax(dim=-1)
        conf += confusions(pred.cpu(), y, n_classes)
    return conf


@torch.no_grad()
def pixel_confusion(st: Store, patch_info: dict, rows: SegmentRows, weight_cd, bias_c, cfg: HeadConfig, device):
    """((C, C) pixel confusion of one head on the held-out images, None) or (None, why it could not be done).

    Logits on the patch grid are upsampled bilinearly to the model input (align_corners=False) and
    compared with each image's mask put through the image's resize and crop. Pixels whose class is
    beyond the head's classes (a class that never won a patch, when the masks were not named with
    --mask-classes) cannot be predicted and are counted in the note, not scored."""
    from saev_store.add_labels import open_recorded_dataset
    from saev_store.datasets.masks import mask_source_from_description
    from saev_store.models.preprocess import PreprocessConfig

    try:
        src = open_recorded_dataset(st.attrs, cfg.data_root)
        masks = mask_source_from_description(patch_info["source"], src, masks_root=cfg.masks_root)
        pre = PreprocessConfig.from_dict(st.attrs["preprocessing"])
    except UserError as err:
        return None, f"pixel evaluation skipped: {err}"
    n_classes = weight_cd.shape[0]
    h, w = patch_info["grid"]
    size_hw = tuple(pre.image_size)
    per_image = n_classes * size_hw[0] * size_hw[1] * 4
    step = max(1, PIXEL_BLOCK_BYTES // per_image)
    conf = torch.zeros(n_classes, n_classes, dtype=torch.int64)
    n_beyond = 0
    for x, _, images in rows.eval_rows():
        z = torch.addmm(bias_c, x.to(device), weight_cd.t())  # (n*P, C)
        z = z.view(len(images), h, w, n_classes).permute(0, 3, 1, 2)
        for a in range(0, len(images), step):
            pred = F.interpolate(z[a : a + step], size=size_hw, mode="bilinear", align_corners=False).argmax(dim=1).cpu()
            try:
                target = torch.from_numpy(np.stack([mask_to_input(masks.load(int(i)), pre) for i in images[a : a + step]]))
            except UserError as err:
                return None, f"pixel evaluation skipped: {err}"
            beyond = target >= n_classes
            n_beyond += int(beyond.sum())
            target[beyond] = IGNORE
            conf += confusions(pred.reshape(-1, 1), target.reshape(-1), n_classes)[0]
    note = f"{n_beyond} pixels of classes >= {n_classes} (never a patch label) were not scored" if n_beyond else None
    return conf.numpy(), note


def _write_folder(out: pathlib.Path, weight_cd, bias_c, norm, info: dict, log: list[dict], conf_cc, class_names, metrics) -> None:
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_head(tmp, weight_cd, bias_c, norm.mean, norm.scale, info)
    with open(tmp / "train_log.jsonl", "w") as f:
        for row in log:
            f.write(json.dumps(row) + "\n")
    level = "pixel" if "pixel" in metrics else next(iter(metrics))
    m = metrics[level]
    title = f"{info['hook']} {info['task']} ({level} level): top-1 {100 * (m['accuracy'] or 0):.1f}%"
    if info["task"] == "segment":
        title += f", mIoU {100 * (m['miou'] or 0):.1f}"
    plot_confusion(conf_cc, class_names, title, tmp / "confusion.png")
    write_per_class(tmp, per_class_rows(class_names, metrics))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
