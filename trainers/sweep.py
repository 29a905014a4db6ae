"""Turn flag lists or a sweep file into the list of SAEs to train.

A sweep file (TOML) uses the flag names. Top-level keys are defaults; a list at the top level, or
inside a `[[sae]]` entry, is expanded as a product (like the flags are):

    width = ["4x", "8x", 16384]     # "Nx": expansion factor of d_in; a bare number <= 256 too; else absolute
    lr = 4e-4
    [[sae]]
    arch = "relu"
    l1 = [1.0, 3.0]
    [[sae]]
    arch = "topk"
    k = [16, 32]
    [[sae]]
    arch = "batchtopk"
    objective = "matryoshka"        # nested prefixes; `prefixes = [128, 512]` fixes them, else saev's draws
    k = 32
    [[sae]]
    arch = "jumprelu"
    l0_coef = [0.5, 1.0]            # JumpReLU's sparsity; bandwidth, init_threshold as options
    [[sae]]
    arch = "gated"
    l1 = [1.0, 2.0]                 # Gated's sparsity (on the gate)

The sparsity key that is expanded depends on the architecture: `l1` (relu, gated), `k` (topk,
batchtopk), `l0_coef` (jumprelu); `arch` and `objective` are expanded too (every combination).
"""

from __future__ import annotations

import dataclasses
import itertools
import tomllib

from saev_store.errors import UserError

from .config import ARCHS, K_ARCHS, L1_ARCHS, SAEConfig

SWEEP_KEYS = ("arch", "objective", "width", "l1", "k", "l0_coef", "lr", "aux_coef", "aux_k", "dead_after",
              "bandwidth", "init_threshold", "prefixes", "n_prefixes", "name")
PASSED_KEYS = ("aux_coef", "aux_k", "dead_after", "bandwidth", "init_threshold", "prefixes", "n_prefixes")
"""Sweep keys handed to every SAE of a spec as they are (not expanded: `prefixes` is one list)."""
MATRYOSHKA_KEYS = ("prefixes", "n_prefixes")
SPARSITY_KEY = {**{a: "l1" for a in L1_ARCHS}, **{a: "k" for a in K_ARCHS}, "jumprelu": "l0_coef"}
"""Which sweep key (and flag) lists an architecture's sparsity settings."""
SPARSITY_DEFAULT = {f.name: f.default for f in dataclasses.fields(SAEConfig) if f.name in SPARSITY_KEY.values()}
MAX_BARE_EXPANSION = 256
"""A bare width up to this is an expansion factor; above it, an absolute number of latents."""


def parse_width(w, d_in: int) -> int:
    """'8x' or 8 -> 8 * d_in; 24576 -> 24576."""
    s = str(w).strip().lower()
    try:
        if s.endswith("x"):
            f = float(s[:-1])
            return int(round(f * d_in))
        v = float(s)
    except ValueError:
        raise UserError(f"width {w!r} is neither an expansion factor like '8x' nor a number of latents.") from None
    if v <= 0:
        raise UserError(f"width {w!r} must be positive.")
    return int(round(v * d_in)) if v <= MAX_BARE_EXPANSION else int(round(v))


def sae_name(cfg: SAEConfig) -> str:
    """`<arch>-<d_sae>-<sparsity>-lr_<lr>`, the arch with its objective: `matryoshka-topk-1280-k32-lr_0.001`,
    `jumprelu-1280-l0_1-lr_0.001`, `gated-1280-l1_2-lr_0.001`."""
    key = SPARSITY_KEY[cfg.arch]
    sparsity = f"k{cfg.k}" if key == "k" else f"{key[:2]}_{getattr(cfg, key):g}"
    return f"{cfg.label}-{cfg.d_sae}-{sparsity}-lr_{cfg.lr:g}"


def _as_list(v) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def expand(spec: dict, d_in: int, seed: int = 0, start_index: int = 0) -> list[SAEConfig]:
    """All SAEs of one spec (keys as SWEEP_KEYS, values scalars or lists)."""
    unknown = set(spec) - set(SWEEP_KEYS)
    if unknown:
        raise UserError(f"unknown sweep keys {sorted(unknown)}; use {', '.join(SWEEP_KEYS)}.")
    arch_l = _as_list(spec.get("arch", "topk" if spec.get("k") else "relu"))
    passed = {key: spec[key] for key in PASSED_KEYS if key in spec}
    objectives = _as_list(spec.get("objective", "vanilla"))
    if "matryoshka" not in objectives and ("prefixes" in spec or "n_prefixes" in spec):
        raise UserError("prefixes / n_prefixes are for the matryoshka objective; add objective = \"matryoshka\" "
                        "(--objective matryoshka) or drop them.")
    out = []
    for arch, objective in itertools.product(arch_l, objectives):
        if arch not in ARCHS:
            raise UserError(f"architecture {arch!r} is unknown; choose one of {', '.join(ARCHS)}.")
        key = SPARSITY_KEY[arch]
        sparsity = _as_list(spec.get(key, SPARSITY_DEFAULT[key]))
        if arch in K_ARCHS and sparsity == [0]:
            raise UserError(f"{arch} SAEs need --k (active latents per token), e.g. --k 16,32,64.")
        for width, s, lr in itertools.product(_as_list(spec.get("width", "8x")), sparsity, _as_list(spec.get("lr", 4e-4))):
            setting = {key: int(s) if key == "k" else float(s)}
            if key != "l1":
                setting["l1"] = 0.0  # the L1 coefficient means nothing to this architecture
            cfg = SAEConfig(name=spec.get("name") or "_", d_in=d_in, d_sae=parse_width(width, d_in), arch=arch,
                            objective=objective, lr=float(lr), seed=seed + start_index + len(out), **setting,
                            **{k: v for k, v in passed.items() if objective == "matryoshka" or k not in MATRYOSHKA_KEYS})
            out.append(cfg if spec.get("name") else dataclasses.replace(cfg, name=sae_name(cfg)))
    return out


def from_toml(fpath: str, d_in: int, seed: int = 0) -> list[SAEConfig]:
    try:
        with open(fpath, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"sweep file {fpath} does not exist.") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"sweep file {fpath} is not valid TOML: {e}") from None
    entries = doc.pop("sae", None)
    if entries is not None and not isinstance(entries, list):
        raise UserError(f"sweep file {fpath}: `sae` must be an array of tables ([[sae]]).")
    specs = [{**doc, **e} for e in entries] if entries else [doc]
    out: list[SAEConfig] = []
    for spec in specs:
        out += expand(spec, d_in, seed, start_index=len(out))
    return out
