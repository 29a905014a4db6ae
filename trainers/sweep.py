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
"""

from __future__ import annotations

import itertools
import tomllib

from saev_store.errors import UserError

from .config import SAEConfig

SWEEP_KEYS = ("arch", "width", "l1", "k", "lr", "aux_coef", "aux_k", "dead_after", "name")
GRID_DEFAULTS = {"width": ("4x", "8x", "16x"), "l1": (1.0, 2.0, 4.0), "lr": (1e-3,)}
"""The values a spec without the key expands to, for flags and sweep files alike."""
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


def sae_name(arch: str, d_sae: int, l1: float, k: int, lr: float) -> str:
    sparsity = f"l1_{l1:g}" if arch == "relu" else f"k{k}"
    return f"{arch}-{d_sae}-{sparsity}-lr_{lr:g}"


def _as_list(v) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def expand(spec: dict, d_in: int, seed: int = 0, start_index: int = 0) -> list[SAEConfig]:
    """All SAEs of one spec (keys as SWEEP_KEYS, values scalars or lists)."""
    unknown = set(spec) - set(SWEEP_KEYS)
    if unknown:
        raise UserError(f"unknown sweep keys {sorted(unknown)}; use {', '.join(SWEEP_KEYS)}.")
    arch_l = _as_list(spec.get("arch", "topk" if spec.get("k") else "relu"))
    out = []
    for arch in arch_l:
        sparsity = _as_list(spec.get("l1", GRID_DEFAULTS["l1"])) if arch == "relu" else _as_list(spec.get("k", 0))
        if arch != "relu" and sparsity == [0]:
            raise UserError(f"{arch} SAEs need --k (active latents per token), e.g. --k 16,32,64.")
        grid = (_as_list(spec.get("width", GRID_DEFAULTS["width"])), sparsity, _as_list(spec.get("lr", GRID_DEFAULTS["lr"])))
        for width, s, lr in itertools.product(*grid):
            d_sae = parse_width(width, d_in)
            l1, k = (float(s), 0) if arch == "relu" else (0.0, int(s))
            name = spec.get("name") or sae_name(arch, d_sae, l1, k, float(lr))
            extra = {key: spec[key] for key in ("aux_coef", "aux_k", "dead_after") if key in spec}
            out.append(SAEConfig(name=name, d_in=d_in, d_sae=d_sae, arch=arch, l1=l1, k=k, lr=float(lr),
                                 seed=seed + start_index + len(out), **extra))
    return out


def from_toml(fpath: str, d_in: int, seed: int = 0, base: dict | None = None) -> list[SAEConfig]:
    """The SAEs of a sweep file. `base`: keys given outside the file (the command line's flags), which
    apply to every entry; the file may not set them too (one of the two would be ignored)."""
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
    base = dict(base or {})
    both = sorted(set(base) & (set(doc).union(*(e for e in entries or []))))
    if both:
        raise UserError(f"{', '.join('--' + k.replace('_', '-') for k in both)} and sweep file {fpath} both set "
                        f"{', '.join(both)}; set each in one place.")
    doc.update(base)
    specs = [{**doc, **e} for e in entries] if entries else [doc]
    out: list[SAEConfig] = []
    for spec in specs:
        out += expand(spec, d_in, seed, start_index=len(out))
    return out
