"""Write one trained SAE in the layout SAELens 6 (`SAE.load_from_disk`) accepts, plus our own state.

SAELens ignores normalization fields after loading, so the input normalization x' = (x - mu) * s is
folded into the weights (ARCHITECTURE.md, Training): W_enc and W_dec unchanged, b_enc / s, b_dec -> mu + b_dec / s, threshold / s,
(Gated) b_gate / s, b_mag / s, r_mag unchanged. The folded SAE maps RAW activations to the trained SAE's
latents divided by s and reconstructs raw activations. Architectures map relu -> "standard", topk -> "topk"
(with "k"), batchtopk -> "jumprelu" (its learned inference threshold, one value for every latent),
jumprelu -> "jumprelu" (its thresholds), gated -> "gated"; a Matryoshka SAE is its base architecture (the
nesting is a training objective). The weights file holds exactly W_enc, W_dec, b_dec and b_enc (+ threshold)
or, Gated, b_gate, b_mag, r_mag: SAELens rejects extras, so provenance and metrics go to `saev_extra.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil

import numpy as np
import safetensors.torch
import torch

from saev_store import __version__
from saev_store.stats import Normalizer

from .config import SAEConfig
from .sae_io import CFG_FNAME, EXTRA_FNAME, SAELENS_ARCH, SPARSITY_FNAME, WEIGHTS_FNAME


def fold_normalization(weights: dict[str, torch.Tensor], norm: Normalizer) -> dict[str, torch.Tensor]:
    """Weights trained on x' = (x - mu) * s -> weights that take raw x."""
    s = float(norm.scale)
    mu = torch.as_tensor(norm.mean, dtype=torch.float64)
    out = {
        "W_enc": weights["W_enc"].float().contiguous(),
        "W_dec": weights["W_dec"].float().contiguous(),
        "b_dec": (mu + weights["b_dec"].double() / s).float(),
    }
    for k in ("b_enc", "threshold", "b_gate", "b_mag"):  # pre-activation offsets scale with the latents
        if k in weights:
            out[k] = (weights[k].double() / s).float()
    if "r_mag" in weights:  # a per-latent gain on the shared directions: scale-free
        out["r_mag"] = weights["r_mag"].float().contiguous()
    return out


def saelens_cfg(cfg: SAEConfig, hook: str, model: str | None = None) -> dict:
    """cfg.json contents SAELens 6 loads through its v6 path."""
    out = {
        "architecture": SAELENS_ARCH[cfg.arch],
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": "6.0.0",
            "sae_lens_training_version": None,
            "hook_name": hook,
            "model_name": model,
            "saev_store_version": __version__,
        },
    }
    if cfg.arch == "topk":
        out["k"] = int(cfg.k)
    return out


def export_sae(
    sae_dpath: str | os.PathLike,
    cfg: SAEConfig,
    weights: dict[str, torch.Tensor],
    norm: Normalizer,
    *,
    hook: str,
    store: str | None,
    tokens: str,
    freq: np.ndarray | None = None,
    metrics: dict | None = None,
    train_cfg: dict | None = None,
    model: str | None = None,
) -> pathlib.Path:
    """Write the SAE folder atomically (built as `<name>.partial`, then renamed over any old one)."""
    dpath = pathlib.Path(sae_dpath)
    tmp = dpath.with_name(dpath.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / CFG_FNAME).write_text(json.dumps(saelens_cfg(cfg, hook, model), indent=2))
    safetensors.torch.save_file(fold_normalization(weights, norm), str(tmp / WEIGHTS_FNAME))
    if freq is not None:
        # SAELens' convention: log10 of the firing frequency, floored at 1e-10.
        log_f = torch.as_tensor(np.log10(np.asarray(freq, dtype=np.float64) + 1e-10), dtype=torch.float32)
        safetensors.torch.save_file({"sparsity": log_f}, str(tmp / SPARSITY_FNAME))
    extra = {
        "name": cfg.name,
        "store": store,
        "hook": hook,
        "tokens": tokens,
        "arch": cfg.arch,
        "sae": dataclasses.asdict(cfg),
        "normalizer": norm.to_dict(),
        "latent_scale": float(norm.scale),
        "metrics": metrics or {},
        "train": train_cfg or {},
        "saev_store_version": __version__,
    }
    (tmp / EXTRA_FNAME).write_text(json.dumps(extra, indent=2))
    if dpath.exists():
        shutil.rmtree(dpath)
    os.replace(tmp, dpath)
    return dpath
