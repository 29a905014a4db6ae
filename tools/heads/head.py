"""A trained task head as a plain `nn.Module` on one hook's activations, and its folder on disk.

    from tools.heads import load_head
    head = load_head("heads/fmnist-_blocks.15-classify")
    logits_bc = head(acts_btd)          # classify: (B, T, d) activations of the hook as stored -> (B, C)
    logits_bpc = seg(acts_btd)          # segment: (B, T, d) -> (B, h*w, C), one row per patch token
    logits_bchw = seg.logit_map(acts_btd)                     # (B, C, h, w)
    logits_bcHW = seg.upsample(acts_btd, (224, 224))          # bilinear to the model input, for pixel scores

The input is the hook's raw activations, with the store's token layout (`head.layout`): the head
normalizes them itself (the store's statistics, kept in the module's buffers), picks its tokens (the
CLS token, the mean of the patch tokens, or every patch token) and applies one `nn.Linear`. A (B, d)
input is taken as tokens already picked: a CLS token or a patch mean (classify), or patch rows
(segment), raw and not yet normalized. Interventions edit the (B, T, d) activations and call the head.

Folder: `head.safetensors` (weight (C, d), bias (C,), mean (d,), scale (1,)) and `head.json` (task, hook,
tokens, layout, class names, normalization, the grid with every member's metrics, the store's identity).
"""

from __future__ import annotations

import json
import os
import pathlib

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from saev_store.errors import UserError
from saev_store.layout import TokenLayout

HEAD_FORMAT = "saev-store.head/1"
JSON_FNAME = "head.json"
WEIGHTS_FNAME = "head.safetensors"


class Head(nn.Module):
    """Hook activations -> logits of one linear head (see the module docstring)."""

    def __init__(self, weight_cd: torch.Tensor, bias_c: torch.Tensor, mean_d: torch.Tensor, scale: float, *, task: str,
                 tokens: str, layout: TokenLayout, hook: str, class_names: list[str] | None = None):
        super().__init__()
        if task not in ("classify", "segment"):
            raise ValueError(f"Head: task {task!r} is unknown.")
        if tokens not in ("cls", "mean", "patches"):
            raise ValueError(f"Head: tokens {tokens!r} is unknown.")
        c, d = weight_cd.shape
        self.task, self.tokens, self.layout, self.hook = task, tokens, layout, hook
        self.class_names = list(class_names) if class_names is not None else [str(k) for k in range(c)]
        self.linear = nn.Linear(d, c)
        with torch.no_grad():
            self.linear.weight.copy_(weight_cd)
            self.linear.bias.copy_(bias_c)
        self.register_buffer("mean", torch.as_tensor(mean_d, dtype=torch.float32).reshape(d).clone())
        self.register_buffer("scale", torch.as_tensor(float(scale), dtype=torch.float32).reshape(1))

    @property
    def d(self) -> int:
        return self.linear.in_features

    @property
    def n_classes(self) -> int:
        return self.linear.out_features

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.mean.dtype) - self.mean) * self.scale

    def features(self, acts: torch.Tensor) -> torch.Tensor:
        """The normalized rows the linear layer reads: (B, d) for classify, (B, P, d) for segment."""
        if acts.ndim == 2:
            return self.normalize(acts)
        if acts.ndim != 3 or acts.shape[-1] != self.d:
            raise ValueError(f"{self.hook} head: expected activations (B, T, {self.d}) or (B, {self.d}), got {tuple(acts.shape)}.")
        t = acts.shape[1]
        if self.tokens == "cls":
            if t != self.layout.n_tokens:
                raise ValueError(f"{self.hook} head reads the CLS token of {self.layout.n_tokens} tokens, got {t}.")
            return self.normalize(acts[:, self.layout.cls])
        if t == self.layout.n_tokens:
            a = self.layout.grid_start
            patches = acts[:, a : a + self.layout.n_patches]
        elif t == self.layout.n_patches:
            patches = acts
        else:
            raise ValueError(f"{self.hook} head reads {self.layout.n_tokens} tokens ({self.layout.n_patches} patches), got {t}.")
        x = self.normalize(patches)
        return x.mean(dim=1) if self.tokens == "mean" else x

    def forward(self, acts: torch.Tensor) -> torch.Tensor:
        """Logits: (B, C) for classify, (B, h*w, C) for segment on (B, T, d); (B, C) on (B, d)."""
        return self.linear(self.features(acts))

    def logit_map(self, acts: torch.Tensor) -> torch.Tensor:
        """segment: (B, T, d) -> (B, C, h, w) logits on the patch grid."""
        if self.task != "segment":
            raise ValueError("logit_map is for segmentation heads.")
        h, w = self.layout.grid
        z = self.forward(acts)
        return z.transpose(1, 2).reshape(z.shape[0], self.n_classes, h, w)

    def upsample(self, acts: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
        """segment: (B, T, d) -> (B, C, H, W) logits bilinearly interpolated to the model input (saev's
        protocol for pixel scores; align_corners=False, so patch centres keep their values)."""
        return F.interpolate(self.logit_map(acts), size=tuple(size_hw), mode="bilinear", align_corners=False)


def write_head(dpath: str | os.PathLike, weight_cd, bias_c, mean_d, scale: float, info: dict) -> None:
    """Write `head.safetensors` and `head.json` into the folder `dpath` (the trainer builds the folder
    as `<name>.partial` and renames it when everything is in it)."""
    dpath = pathlib.Path(dpath)
    tensors = {"weight": weight_cd, "bias": bias_c, "mean": torch.as_tensor(mean_d, dtype=torch.float32),
               "scale": torch.tensor([float(scale)], dtype=torch.float32)}
    save_file({k: v.detach().cpu().float().contiguous() for k, v in tensors.items()}, str(dpath / WEIGHTS_FNAME))
    (dpath / JSON_FNAME).write_text(json.dumps({"format": HEAD_FORMAT, **info}, indent=2))


def read_head_info(dpath: str | os.PathLike) -> dict:
    fpath = pathlib.Path(dpath) / JSON_FNAME
    if not fpath.is_file():
        raise UserError(f"{dpath} is not a head folder (no {JSON_FNAME}); train one with `saev-tools head STORE --hook H`.")
    info = json.loads(fpath.read_text())
    if info.get("format") != HEAD_FORMAT:
        raise UserError(f"{fpath} has format {info.get('format')!r}; this saev-store reads {HEAD_FORMAT!r}.")
    return info


def load_head(dpath: str | os.PathLike, device: str | torch.device = "cpu") -> Head:
    """The head saved in `dpath` as a `Head` module (eval mode) on `device`."""
    info = read_head_info(dpath)
    t = load_file(str(pathlib.Path(dpath) / WEIGHTS_FNAME))
    head = Head(t["weight"], t["bias"], t["mean"], float(t["scale"][0]), task=info["task"], tokens=info["tokens"],
                layout=TokenLayout.from_dict(info["layout"]), hook=info["hook"], class_names=info["class_names"])
    return head.to(device).eval()
