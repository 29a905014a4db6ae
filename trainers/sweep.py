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

The sparsity key an architecture uses is `l1` (relu, gated), `k` (topk, batchtopk) or `l0_coef`
(jumprelu); `arch` and `objective` select which keys apply (a field's `when`), and every combination of
them is expanded. A key whose field is marked `whole` (`prefixes`) takes one list as one value.

Flags given with `--sweep` apply to every entry; a key set by both a flag and the file is an error.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import tomllib
from typing import NamedTuple

from saev_store.errors import UserError
from saev_store.options import Spec, format_value, parse_one, specs

from .config import SPARSITY_FIELD, SAEConfig

MAX_BARE_EXPANSION = 256
"""A bare width up to this is an expansion factor; above it, an absolute number of latents."""
WIDTH = Spec(name="width", path=("width",), flag="--width", kind="list", type=str, choices=None, default=("4x", "8x", "16x"),
             help="Widths: 'Nx' (or a bare N <= 256) is N * d_in latents, larger numbers are absolute.",
             n_items=None, aliases=(), when=None, required=False, short=None)
"""The one sweep key that is not an SAEConfig field (it sets d_sae from the hook's d)."""
NAMED = ("width", "l1", "k", "l0_coef", "lr")
"""Keys an SAE's default name shows (`relu-4096-l1_2-lr_0.001`); another key with several values is appended."""


class Axis(NamedTuple):
    """One sweep key / SAE flag."""

    spec: Spec
    """The option (flag, type, choices, help) as derived from the SAEConfig field."""
    grid: tuple | None
    """What a sweep without the key trains; None for `arch` (relu, or topk when k is given)."""
    grid_doc: str
    """The default as --help shows it."""
    whole: bool = False
    """One list is one value (`prefixes`), not a list of values to expand."""


@functools.cache
def axes() -> dict[str, Axis]:
    """Sweep key -> Axis: `width`, then SAEConfig's option fields in their order."""
    fields = {f.name: f for f in dataclasses.fields(SAEConfig)}
    out = {"width": Axis(WIDTH, WIDTH.default, format_value(WIDTH.default))}
    for spec in specs(SAEConfig):
        meta = fields[spec.name].metadata
        if spec.name == "arch":
            out[spec.name] = Axis(spec, None, meta["grid_doc"])
            continue
        grid = tuple(meta.get("grid", (spec.default,)))
        doc = meta.get("grid_doc", format_value(grid) if not meta.get("whole") else format_value(spec.default) or "none")
        out[spec.name] = Axis(spec, grid, doc, bool(meta.get("whole")))
    return out


@functools.cache
def selectors() -> tuple[str, ...]:
    """The keys other keys depend on (`arch`, `objective`: the fields named by a `when`), in axis order."""
    named = {a.spec.when[0] for a in axes().values() if a.spec.when is not None}
    return tuple(k for k in axes() if k in named)


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


def sae_name(cfg: SAEConfig, varying: tuple[str, ...] = ()) -> str:
    """`<arch>-<d_sae>-<sparsity>-lr_<lr>`, the arch with its objective (`relu-4096-l1_2-lr_0.001`,
    `matryoshka-topk-1280-k32-lr_0.001`, `jumprelu-1280-l0_1-lr_0.001`), plus `-<key>_<value>` for each
    other key in `varying`."""
    key = SPARSITY_FIELD[cfg.arch]
    sparsity = f"k{cfg.k}" if key == "k" else f"{key[:2]}_{getattr(cfg, key):g}"
    extra = "".join(f"-{k}_{format_value(getattr(cfg, k))}" for k in varying if k not in NAMED and k not in selectors())
    return f"{cfg.label}-{cfg.d_sae}-{sparsity}-lr_{cfg.lr:g}{extra}"


def _as_list(v) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _values(spec: dict, key: str) -> list:
    """The values of one key in a spec (its grid when absent); `arch` defaults to relu, or topk when k is given."""
    ax = axes()[key]
    if key == "arch" and key not in spec:
        return ["topk" if "k" in spec else "relu"]
    if key not in spec:
        return list(ax.grid)
    if ax.whole:
        return [tuple(parse_one(ax.spec, v) for v in _as_list(spec[key]))]
    return [parse_one(ax.spec, v) for v in _as_list(spec[key])]


def _archs(spec: dict) -> list[str]:
    return _values(spec, "arch")


def unused_keys(spec: dict) -> list[str]:
    """Keys of `spec` that no SAE it trains uses (their `when` matches none of the spec's archs/objectives)."""
    ax = axes()
    return [k for k in spec if k in ax and ax[k].spec.when is not None
            and not set(_values(spec, ax[k].spec.when[0])) & set(ax[k].spec.when[1])]


def expand(spec: dict, d_in: int, seed: int = 0, start_index: int = 0, *, strict: bool = True) -> list[SAEConfig]:
    """All SAEs of one spec (keys from `sweep_keys()`, values scalars or lists). `strict`: a key no
    architecture of the spec uses is an error (from_toml checks top-level keys over all entries instead)."""
    unknown = set(spec) - set(sweep_keys())
    if unknown:
        raise UserError(f"unknown sweep keys {sorted(unknown)}; use {', '.join(sweep_keys())}.")
    ax = axes()
    if strict and unused_keys(spec):
        bad = unused_keys(spec)
        raise UserError(f"{', '.join(ax[k].spec.flag for k in bad)} ({', '.join(bad)}) only appl{'y' if len(bad) > 1 else 'ies'} to "
                        f"{' / '.join(sorted({f'{ax[k].spec.when[0]} {v}' for k in bad for v in ax[k].spec.when[1]}))} SAEs, "
                        f"and none of these is one (arch {', '.join(_archs(spec))}, objective "
                        f"{', '.join(_values(spec, 'objective'))}): they would do nothing. Leave them out"
                        + ("".join(f"; a {a} SAE's sparsity is {ax[SPARSITY_FIELD[a]].spec.flag}" for a in _archs(spec))
                           if set(bad) & set(SPARSITY_FIELD.values()) else "") + ".")
    out = []
    sel = selectors()
    for chosen in itertools.product(*(_values(spec, k) for k in sel)):
        where = dict(zip(sel, chosen))
        keys = [k for k, a in ax.items() if k not in sel and (a.spec.when is None or where[a.spec.when[0]] in a.spec.when[1])]
        values = {k: _values(spec, k) for k in keys}
        if "k" in keys and "k" not in spec:
            raise UserError(f"{where['arch']} SAEs need --k (active latents per token), e.g. --k 16,32,64.")
        varying = tuple(k for k in keys if len(values[k]) > 1)
        for combo in itertools.product(*(values[k] for k in keys)):
            kw = dict(zip(keys, combo))
            d_sae = parse_width(kw.pop("width"), d_in)
            cfg = SAEConfig(name=spec.get("name") or "_", d_in=d_in, d_sae=d_sae, seed=seed + start_index + len(out), **where, **kw)
            out.append(cfg if spec.get("name") else dataclasses.replace(cfg, name=sae_name(cfg, varying)))
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
