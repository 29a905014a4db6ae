"""Load exported SAEs and apply them to RAW activations.

An exported SAE folder holds the files SAELens 6 reads (`cfg.json`, `sae_weights.safetensors`,
`sparsity.safetensors`) plus `saev_extra.json` (our provenance: store, hook, token selection, the
input normalization that was folded into the weights, training config, final metrics). The weights
already include the normalization, so `encode` takes activations exactly as the store holds them:

    from trainers.sae_io import load_sae, load_run
    sae = load_sae("runs/demo/w1280-l1=5")
    z = sae.encode(x_nd)          # (n, d_sae) float32, SAELens semantics
    x_hat = sae.decode(z)         # (n, d_in) raw activations again

Latents are those of the SAE in its training space divided by the normalization scale `s` (see
ARCHITECTURE.md, Training); `sae.latent_scale` is that `s`, for anyone who wants the training-space values.
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import safetensors.torch
import torch
from torch import nn

from saev_store.errors import UserError
from saev_store.stats import Normalizer

CFG_FNAME = "cfg.json"
WEIGHTS_FNAME = "sae_weights.safetensors"
SPARSITY_FNAME = "sparsity.safetensors"
EXTRA_FNAME = "saev_extra.json"
RUN_FNAME = "run.json"
GATED_TENSORS = ("b_gate", "b_mag", "r_mag")
"""A gated SAE's tensors besides W_enc, W_dec, b_dec (SAELens 6 `GatedSAE`: no b_enc)."""
SAELENS_ARCH = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu", "gated": "gated"}
"""Our architecture -> the `architecture` SAELens 6 loads (BatchTopK is exported as its JumpReLU form)."""
SAELENS_ARCHS = tuple(dict.fromkeys(SAELENS_ARCH.values()))
SAELENS_SUPPORTED = {"normalize_activations": ("none",), "reshape_activations": ("none",),
                     "rescale_acts_by_decoder_norm": (False,)}
"""SAELens cfg fields that change what encode/decode compute, and the values `SAE` implements (the
SAELens defaults); a folder with another value is refused, naming the field. `apply_b_dec_to_input`
is followed either way."""


class SAE(nn.Module):
    """An exported SAE, applied to raw activations the way SAELens 6 applies it.

    `encode`: standard: relu((x - b_dec) @ W_enc + b_enc); topk: the k largest of that, relu'd;
    jumprelu: relu(...) kept where it exceeds `threshold`; gated: with h = (x - b_dec) @ W_enc,
    relu(h * exp(r_mag) + b_mag) where h + b_gate > 0. `decode`: z @ W_dec + b_dec. The input
    is centered on b_dec only when the cfg's `apply_b_dec_to_input` is true (SAELens' default and
    ours); settings outside `SAELENS_SUPPORTED` are refused.
    """

    def __init__(self, cfg: dict, weights: dict[str, torch.Tensor], extra: dict | None = None):
        super().__init__()
        arch = cfg.get("architecture")
        if arch not in SAELENS_ARCHS:
            raise UserError(f"SAE architecture {arch!r} is not one of {SAELENS_ARCHS}; this is not an SAE we exported.")
        for field, allowed in SAELENS_SUPPORTED.items():
            if cfg.get(field, allowed[0]) not in allowed:
                raise UserError(f"SAE cfg.json has {field}={cfg[field]!r}; this loader implements only "
                                f"{field}={allowed[0]!r}. Load the folder with sae_lens itself.")
        self.cfg = dict(cfg)
        self.extra = dict(extra or {})
        self.apply_b_dec_to_input = bool(cfg.get("apply_b_dec_to_input", True))
        """Whether `encode` subtracts b_dec from its input first (SAELens' cfg field of that name)."""
        self.architecture = arch
        self.d_in = int(cfg["d_in"])
        self.d_sae = int(cfg["d_sae"])
        self.k = int(cfg["k"]) if arch == "topk" else None
        self.W_enc = nn.Parameter(weights["W_enc"].float(), requires_grad=False)
        self.W_dec = nn.Parameter(weights["W_dec"].float(), requires_grad=False)
        self.b_dec = nn.Parameter(weights["b_dec"].float(), requires_grad=False)
        names = GATED_TENSORS if arch == "gated" else ("b_enc",) + (("threshold",) if arch == "jumprelu" else ())
        missing = [k for k in names if k not in weights]
        if missing:
            raise UserError(f"a {arch} SAE needs the tensors {', '.join(missing)} in its weights file; re-export it.")
        for k in ("b_enc", "threshold") + GATED_TENSORS:
            setattr(self, k, nn.Parameter(weights[k].float(), requires_grad=False) if k in names else None)
        if tuple(self.W_enc.shape) != (self.d_in, self.d_sae) or tuple(self.W_dec.shape) != (self.d_sae, self.d_in):
            raise UserError(
                f"SAE weights have W_enc {tuple(self.W_enc.shape)} and W_dec {tuple(self.W_dec.shape)} but cfg.json "
                f"says d_in={self.d_in}, d_sae={self.d_sae}; the folder is inconsistent, re-export it."
            )

    # Provenance, from saev_extra.json (None for a plain SAELens folder).
    @property
    def store(self) -> str | None:
        return self.extra.get("store")

    @property
    def hook(self) -> str:
        return self.extra.get("hook") or self.cfg.get("metadata", {}).get("hook_name", "")

    @property
    def tokens(self) -> str | None:
        """The token selection it was trained on (patches, cls, all); None when the folder does not say."""
        return self.extra.get("tokens")

    @property
    def name(self) -> str:
        return self.extra.get("name", "")

    @property
    def normalizer(self) -> Normalizer:
        """The training-time input normalization (already folded into the weights)."""
        if "normalizer" in self.extra:
            return Normalizer.from_dict(self.extra["normalizer"])
        return Normalizer.identity(self.d_in)

    @property
    def latent_scale(self) -> float:
        """s: training-space latents = `encode(x) * s`."""
        return float(self.normalizer.scale)

    @property
    def metrics(self) -> dict:
        return self.extra.get("metrics", {})

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        """(x - b_dec) @ W_enc, centered only when `apply_b_dec_to_input`."""
        x = x.to(self.W_enc.device, torch.float32)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """(x - b_dec) @ W_enc + b_enc (for Gated, + b_gate: the gate's pre-activation)."""
        return self._hidden(x) + (self.b_gate if self.architecture == "gated" else self.b_enc)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Raw activations (..., d_in) -> latents (..., d_sae) float32."""
        if not torch.is_tensor(x):
            x = torch.as_tensor(np.asarray(x))
        if x.shape[-1] != self.d_in:
            raise UserError(f"SAE expects inputs of width {self.d_in}, got {tuple(x.shape)}; check the hook.")
        if self.architecture == "gated":
            h = self._hidden(x)
            return torch.relu(torch.addcmul(self.b_mag, h, self.r_mag.exp())) * (h + self.b_gate > 0)
        h = torch.relu(self.pre_acts(x))
        if self.architecture == "topk":
            vals, idx = h.topk(self.k, dim=-1)
            return torch.zeros_like(h).scatter_(-1, idx, vals)
        if self.architecture == "jumprelu":
            return h * (h > self.threshold)
        return h

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (..., d_sae) -> reconstructed raw activations (..., d_in)."""
        return z.to(self.W_dec.device, torch.float32) @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def load_sae(sae_dpath: str | os.PathLike, device: str | torch.device = "cpu") -> SAE:
    """Load one exported SAE folder: ours, or a SAELens 6 standard/topk/jumprelu/gated folder with either
    `apply_b_dec_to_input` and the other settings at SAELens' defaults (`SAELENS_SUPPORTED`)."""
    dpath = pathlib.Path(sae_dpath)
    cfg_fpath, w_fpath = dpath / CFG_FNAME, dpath / WEIGHTS_FNAME
    if not cfg_fpath.is_file() or not w_fpath.is_file():
        raise UserError(f"{dpath} is not an SAE folder (needs {CFG_FNAME} and {WEIGHTS_FNAME}); pass runs/<run>/<sae>.")
    cfg = json.loads(cfg_fpath.read_text())
    weights = safetensors.torch.load_file(str(w_fpath))
    extra_fpath = dpath / EXTRA_FNAME
    extra = json.loads(extra_fpath.read_text()) if extra_fpath.is_file() else {}
    return SAE(cfg, weights, extra).to(device)


def load_sparsity(sae_dpath: str | os.PathLike) -> np.ndarray | None:
    """log10 firing frequency per latent on the held-out set (SAELens' `sparsity` tensor), or None."""
    fpath = pathlib.Path(sae_dpath) / SPARSITY_FNAME
    if not fpath.is_file():
        return None
    return safetensors.torch.load_file(str(fpath))["sparsity"].numpy()


def load_run(run_dpath: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, SAE]:
    """Every exported SAE of a training run, by name, in run.json's order."""
    dpath = pathlib.Path(run_dpath)
    run_fpath = dpath / RUN_FNAME
    if run_fpath.is_file():
        names = json.loads(run_fpath.read_text())["saes"]
    else:
        names = sorted(p.name for p in dpath.iterdir() if (p / CFG_FNAME).is_file()) if dpath.is_dir() else []
    names = [n for n in names if (dpath / n / WEIGHTS_FNAME).is_file()]
    if not names:
        raise UserError(f"{dpath} holds no exported SAE; train one with `saev-train` or check the path.")
    return {n: load_sae(dpath / n, device) for n in names}
