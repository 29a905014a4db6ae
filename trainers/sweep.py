"""Turn `saev-train`'s SAE flags or a sweep file into the list of SAEs to train.

The keys are `width` and SAEConfig's documented fields (`arch`, `l1`, `k`, `lr`, `aux_coef`, `aux_k`,
`dead_after`, and any field added there): each is a flag taking a comma list (`--l1 1,2,4`) and a sweep
key taking a value or a list, with one default grid (`axes()`), and the SAEs are the product of the
lists. A key applies to the architectures its field names (`when`): given where no SAE uses it, it is an
error, not silence. A sweep file (TOML) uses the same keys; top-level keys are defaults, a list at the top
level or inside a `[[sae]]` entry is expanded as a product, and an entry may set `name` when it makes
one SAE:

    width = ["4x", "8x", 16384]     # "Nx": expansion factor of d_in; a bare number <= 256 too; else absolute
    lr = 4e-4
    [[sae]]
    arch = "relu"
    l1 = [1.0, 3.0]
    [[sae]]
    arch = "topk"
    k = [16, 32]

Flags given with `--sweep` apply to every entry; a key set by both a flag and the file is an error.
"""

from __future__ import annotations

import functools
import itertools
import tomllib
from typing import Any, NamedTuple

from saev_store.errors import UserError
from saev_store.options import Spec, format_value, parse_one, specs

from .config import SAEConfig

MAX_BARE_EXPANSION = 256
"""A bare width up to this is an expansion factor; above it, an absolute number of latents."""
WIDTH = Spec(name="width", path=("width",), flag="--width", kind="list", type=str, choices=None, default=("4x", "8x", "16x"),
             help="Widths: 'Nx' (or a bare N <= 256) is N * d_in latents, larger numbers are absolute.",
             n_items=None, aliases=(), when=None, required=False, short=None)
"""The one sweep key that is not an SAEConfig field (it sets d_sae from the hook's d)."""
NAMED = ("width", "l1", "k", "lr")
"""Keys an SAE's default name shows (`relu-4096-l1_2-lr_0.001`); another key with several values is appended."""


class Axis(NamedTuple):
    """One sweep key / SAE flag."""

    spec: Spec
    """The option (flag, type, choices, help) as derived from the SAEConfig field."""
    grid: tuple | None
    """What a sweep without the key trains; None for `arch` (relu, or topk when k is given)."""
    grid_doc: str
    """The default as --help shows it."""

    @property
    def archs(self) -> tuple[str, ...] | None:
        """The architectures that use this key (None: all)."""
        return None if self.spec.when is None else tuple(self.spec.when[1])


@functools.cache
def axes() -> dict[str, Axis]:
    """Sweep key -> Axis: `width`, then SAEConfig's option fields in their order."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(SAEConfig)}
    out = {"width": Axis(WIDTH, WIDTH.default, format_value(WIDTH.default))}
    for spec in specs(SAEConfig):
        meta = fields[spec.name].metadata
        if spec.name == "arch":
            out[spec.name] = Axis(spec, None, meta["grid_doc"])
            continue
        grid = tuple(meta.get("grid", (spec.default,)))
        out[spec.name] = Axis(spec, grid, meta.get("grid_doc", format_value(grid)))
    return out


def sweep_keys() -> tuple[str, ...]:
    """Every key a sweep spec (flags or file) may hold."""
    return (*axes(), "name")


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


def sae_name(arch: str, d_sae: int, values: dict[str, Any], varying: tuple[str, ...] = ()) -> str:
    """`relu-4096-l1_2-lr_0.001` / `topk-4096-k32-lr_0.001`, plus `-<key>_<value>` for each other key in `varying`."""
    sparsity = f"l1_{values['l1']:g}" if arch == "relu" else f"k{values['k']}"
    extra = "".join(f"-{key}_{format_value(values[key])}" for key in varying if key not in NAMED)
    return f"{arch}-{d_sae}-{sparsity}-lr_{values['lr']:g}{extra}"


def _as_list(v) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _archs(spec: dict) -> list[str]:
    return [parse_one(axes()["arch"].spec, a) for a in _as_list(spec.get("arch", "topk" if "k" in spec else "relu"))]


def unused_keys(spec: dict) -> list[str]:
    """Keys of `spec` that no architecture it trains uses (they would do nothing)."""
    archs = _archs(spec)
    ax = axes()
    return [k for k in spec if k in ax and ax[k].archs is not None and not set(archs) & set(ax[k].archs)]


def expand(spec: dict, d_in: int, seed: int = 0, start_index: int = 0, *, strict: bool = True) -> list[SAEConfig]:
    """All SAEs of one spec (keys from `sweep_keys()`, values scalars or lists). `strict`: a key no
    architecture of the spec uses is an error (from_toml checks top-level keys over all entries instead)."""
    unknown = set(spec) - set(sweep_keys())
    if unknown:
        raise UserError(f"unknown sweep keys {sorted(unknown)}; use {', '.join(sweep_keys())}.")
    if strict and unused_keys(spec):
        bad = unused_keys(spec)
        ax = axes()
        raise UserError(f"{', '.join(ax[k].spec.flag for k in bad)} ({', '.join(bad)}) only appl{'y' if len(bad) > 1 else 'ies'} to "
                        f"{' / '.join(sorted({a for k in bad for a in ax[k].archs}))} SAEs, and none of these is one "
                        f"(arch {', '.join(_archs(spec))}): they would do nothing. Leave them out.")
    out = []
    ax = axes()
    for arch in _archs(spec):
        keys = [k for k, a in ax.items() if k != "arch" and (a.archs is None or arch in a.archs)]
        values = {k: [parse_one(ax[k].spec, v) for v in _as_list(spec[k])] if k in spec else list(ax[k].grid) for k in keys}
        if "k" in keys and "k" not in spec:
            raise UserError(f"{arch} SAEs need --k (active latents per token), e.g. --k 16,32,64.")
        varying = tuple(k for k in keys if len(values[k]) > 1)
        for combo in itertools.product(*(values[k] for k in keys)):
            kw = dict(zip(keys, combo))
            d_sae = parse_width(kw.pop("width"), d_in)
            named = {"l1": kw.get("l1", 0.0), "k": kw.get("k", 0), "lr": kw["lr"], **kw}
            name = spec.get("name") or sae_name(arch, d_sae, named, varying)
            out.append(SAEConfig(name=name, d_in=d_in, d_sae=d_sae, arch=arch, seed=seed + start_index + len(out), **kw))
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
    specs_ = [{**doc, **e} for e in entries] if entries else [doc]
    for e, spec in zip(entries or [], specs_):
        own = [k for k in unused_keys(spec) if k in e]
        if own:
            raise UserError(f"sweep file {fpath}: an entry with arch {', '.join(_archs(spec))} sets {', '.join(own)}, "
                            "which it does not use; remove it.")
    shared = [k for k in doc if all(k in unused_keys(spec) for spec in specs_)]
    if shared:
        where = " / ".join(f"--{k.replace('_', '-')}" if k in base else k for k in shared)
        raise UserError(f"{where} (in {fpath} or on the command line) is used by no SAE of the sweep; remove it.")
    out: list[SAEConfig] = []
    for spec in specs_:
        out += expand(spec, d_in, seed, start_index=len(out), strict=False)
    return out
