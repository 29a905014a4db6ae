"""VisionModel: one interface over every backend for recording per-token activations.

The recorder asks a model three things: which modules can be hooked, what token layout a hook yields,
and the tokens themselves for a batch of images. Every backend gives the same answers in the same
shape: a hook's output becomes `(B, T, D)` float32 tokens, where a ViT hook gives `[CLS] + registers
(only if kept) + patches` in row-major grid order and a CNN feature map `(B, C, H, W)` gives its `H*W`
positions row-major with `D = C`.

The layout of a hook is derived from its output shape (one function, `_analyze`), both when predicting
it from a probe forward (`token_layout`) and when converting real outputs (`capture`), so the two cannot
disagree. A 4-D output is read per hook, not per model: channels-last models (Swin) hold NCHW convs and
NCHW models (ConvNeXt) hold NHWC norms and MLPs, so the reading whose spatial dims fit the input's
aspect ratio wins (see `_map_format`).
"""

from __future__ import annotations

import dataclasses
import difflib
import pathlib
from typing import Callable

import torch

from saev_store.errors import UserError
from saev_store.layout import TOKEN_SELECTIONS, TokenLayout

from .preprocess import PreprocessConfig
from .weights import sha256_dir, sha256_file


class _StopForward(Exception):
    """Raised from the last requested hook to end the forward pass early (the rest is wasted compute)."""


@dataclasses.dataclass(frozen=True)
class PrefixTokens:
    """The tokens a ViT puts before its patch tokens, in this order: CLS (if any), then the rest."""

    has_cls: bool
    """Whether token 0 is a class token."""
    n_registers: int
    """Further prefix tokens after CLS: DINOv2 registers, DeiT's distillation token. Dropped by default."""
    patch_size: tuple[int, int]
    """Patch (height, width) in pixels: the grid is input_size // patch_size."""

    @property
    def n_prefix(self) -> int:
        return int(self.has_cls) + self.n_registers

    def to_dict(self) -> dict:
        return {"cls": self.has_cls, "n_registers": self.n_registers, "patch_size": list(self.patch_size)}


def _first_tensor(out) -> torch.Tensor | None:
    """A module's output as one tensor: itself, or the first tensor of a tuple/list/ModelOutput."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):  # HF ModelOutput is an OrderedDict
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for item in out:
            if isinstance(item, torch.Tensor):
                return item
    return None


# How a raw output is laid out; `_to_bnd` turns each into (B, N, D).
_TO_BND: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "nd": lambda t: t[:, None, :],
    "nld": lambda t: t,
    "lnd": lambda t: t.transpose(0, 1),
    "nchw": lambda t: t.flatten(2).transpose(1, 2),
    "nhwc": lambda t: t.flatten(1, 2),
}


# Modules whose 4-D output is (B, C, H, W) whatever the model around them does (torch's own layers).
_NCHW_MODULES = (
    torch.nn.modules.conv._ConvNd,
    torch.nn.modules.batchnorm._BatchNorm,
    torch.nn.modules.pooling._MaxPoolNd,
    torch.nn.modules.pooling._AvgPoolNd,
    torch.nn.modules.pooling._AdaptiveAvgPoolNd,
    torch.nn.modules.pooling._AdaptiveMaxPoolNd,
    torch.nn.GroupNorm,
    torch.nn.modules.instancenorm._InstanceNorm,
)


def _fits(hw: tuple[int, int], in_hw: tuple[int, int]) -> bool:
    """Whether a (h, w) map can come from an (H, W) input through one stride on both axes: some s has
    |h - H/s| < 1 and |w - W/s| < 1 (each axis may round its own way)."""
    (h, w), (big_h, big_w) = hw, in_hw
    return h >= 1 and w >= 1 and (h - 1) * big_w < (w + 1) * big_h and (w - 1) * big_h < (h + 1) * big_w


def _map_format(shape: tuple[int, ...], in_hw: tuple[int, int], *, nchw_module: bool, channels_last: bool) -> str | None:
    """'nchw' or 'nhwc' for a CNN's 4-D output, or None when neither reading is a map of the input.

    The reading whose (h, w) fits the input's aspect ratio wins; when both fit, the closer fit wins
    (a 56x56 map beats 55x56 from a 224x224 input); a tie (C equal to H and W) goes to what the module
    is: torch's convs, norms and pools output NCHW, anything else the model's declared layout."""
    big_h, big_w = in_hw
    readings = {"nchw": tuple(shape[2:4]), "nhwc": tuple(shape[1:3])}
    misfit = {fmt: abs(h * big_w - w * big_h) for fmt, (h, w) in readings.items() if _fits((h, w), in_hw)}
    if not misfit:
        return None
    best = min(misfit.values())
    tied = [fmt for fmt, m in misfit.items() if m == best]
    if len(tied) == 1:
        return tied[0]
    return "nchw" if nchw_module or not channels_last else "nhwc"


def select_tokens(full: TokenLayout, *, keep_registers: bool, tokens: str) -> tuple[list[int], TokenLayout]:
    """Which token indices of a hook's full output to keep, and the layout of what is kept.

    `all` keeps CLS + registers (if `keep_registers`) + patches; `patches` only the grid; `cls` only CLS.
    """
    if tokens not in TOKEN_SELECTIONS:
        raise UserError(f"tokens={tokens!r} is unknown; use one of {list(TOKEN_SELECTIONS)}.")
    cls_idx = [] if full.cls is None else [full.cls]
    reg_idx = list(full.registers) if keep_registers else []
    grid_idx = list(range(full.grid_start, full.grid_start + full.n_patches))
    if tokens == "patches":
        if full.grid is None:
            raise UserError("this hook has no patch tokens (it is a pooled vector); record it with tokens='all' or 'cls'.")
        return grid_idx, TokenLayout(n_tokens=len(grid_idx), grid=full.grid)
    if tokens == "cls":
        if full.cls is None:
            raise UserError("this hook has no CLS token (a CNN map or a ViT without one); use tokens='patches' or 'all'.")
        return cls_idx, TokenLayout(n_tokens=1, cls=0)
    idx = cls_idx + reg_idx + grid_idx
    n_head = len(cls_idx) + len(reg_idx)
    layout = TokenLayout(
        n_tokens=len(idx),
        cls=0 if cls_idx else None,
        registers=tuple(range(len(cls_idx), n_head)),
        grid=full.grid,
        grid_start=n_head if full.grid is not None else 0,
    )
    return idx, layout


class VisionModel:
    """A vision model in eval mode, with named hook points and a fixed token convention.

    Backends build it through `create_model`; subclasses override `_forward` (how the module is called),
    `_seq_first` (hooks whose output is (N, B, D)) and `classify` where they need to.
    """

    def __init__(
        self,
        *,
        spec: str,
        module: torch.nn.Module,
        preprocess: PreprocessConfig,
        layer_paths: list[str],
        prefix: PrefixTokens | None = None,
        weights: str = "random",
        weights_fpath: pathlib.Path | None = None,
        device: str | torch.device = "cpu",
        channels_last: bool = False,
        library: dict[str, str] | None = None,
    ):
        self.spec = spec
        self.backend, _, self.name = spec.partition(":")
        self.device = torch.device(device)
        self.module = module.to(self.device).eval().requires_grad_(False)
        self.preprocess = preprocess
        self.prefix = prefix
        self.channels_last = channels_last
        self._layer_paths = list(layer_paths)
        self._weights = weights
        self._weights_fpath = weights_fpath
        self._weights_sha256: str | None = None
        self._library = dict(library or {})
        self._shape_cache: dict[tuple[int, int], dict[str, tuple[int, ...]]] = {}
        self._index_cache: dict[tuple, torch.Tensor] = {}
        self._modules: dict[str, torch.nn.Module] | None = None
        modules = dict(module.named_modules())
        missing = [p for p in self._layer_paths if p not in modules]
        if missing:
            raise RuntimeError(f"{spec}: layer paths {missing} are not modules of the model (a backend bug).")

    # ---- what can be hooked -------------------------------------------------------------------------

    def hook_points(self) -> dict[str, str]:
        """Every hookable module path (as in `named_modules`) -> its class name."""
        return {name: type(m).__name__ for name, m in self._modules_by_path().items()}

    def _modules_by_path(self) -> dict[str, torch.nn.Module]:
        # Walking a large model's module tree on every batch costs ~1 ms; the tree does not change.
        if self._modules is None:
            self._modules = {name: m for name, m in self.module.named_modules() if name}
        return self._modules

    def n_layers(self) -> int:
        """How many `--layer` indices there are: ViT blocks, or CNN stages/blocks."""
        return len(self._layer_paths)

    def layer_hook(self, layer: int) -> str:
        """The hook path for `--layer N`: the residual stream after ViT block N (0-based), or the output of
        CNN stage/block N. Negative N counts from the end (-1 is the last)."""
        n = self.n_layers()
        if not isinstance(layer, int) or not -n <= layer < n:
            raise UserError(
                f"--layer {layer} is out of range for {self.spec}, which has {n} layers: use 0..{n - 1} "
                f"(or -{n}..-1 from the end); layer 0 is {self._layer_paths[0]!r}, layer {n - 1} is {self._layer_paths[-1]!r}."
            )
        return self._layer_paths[layer]

    def layer_hooks(self) -> list[str]:
        """The hook path of every layer, in order."""
        return list(self._layer_paths)

    def check_hooks(self, hooks: list[str]) -> None:
        """UserError naming the first unknown hook, with close matches, or the first valid ones."""
        if isinstance(hooks, str):
            hooks = [hooks]
        if not hooks:
            raise UserError(f"no hooks given for {self.spec}; pass --layer N or --hook MODULE_PATH.")
        modules = self._modules_by_path()
        for hook in hooks:
            if hook in modules:
                continue
            points = self.hook_points()
            close = difflib.get_close_matches(hook, list(points), n=5, cutoff=0.6)
            layers = f"its numbered layers (--layer 0..{len(self._layer_paths) - 1}) are {', '.join(self._layer_paths)}"
            if len(points) <= 40:
                hint = f"hook points are: {', '.join(points)}."
            else:
                hint = f"{layers}; list all {len(points)} hook points with `saev-store hooks --model {self.spec} --all`."
            if close:
                hint = f"did you mean {', '.join(repr(c) for c in close)}? {hint}"
            raise UserError(f"hook {hook!r} is not a module of {self.spec}; {hint}")

    # ---- token layout ---------------------------------------------------------------------------------

    def _seq_first(self, hook: str) -> bool:
        """Whether this hook's 3-D output is (N, B, D) rather than (B, N, D)."""
        return False

    def _grid(self, in_hw: tuple[int, int]) -> tuple[int, int]:
        ph, pw = self.prefix.patch_size
        return in_hw[0] // ph, in_hw[1] // pw

    def _analyze(self, hook: str, shape: tuple[int, ...], in_hw: tuple[int, int]) -> tuple[str, TokenLayout]:
        """From a hook's raw output shape: its format (a key of _TO_BND) and its full token layout."""
        shape = tuple(int(s) for s in shape)
        grid = self._grid(in_hw) if self.prefix is not None else None
        if len(shape) == 2:
            # A pooled vector (e.g. a classifier's input): one token, marked as the CLS/summary token.
            return "nd", TokenLayout(n_tokens=1, cls=0)
        if len(shape) == 4:
            if grid is None:
                module = self._modules_by_path().get(hook)
                fmt = _map_format(shape, in_hw, nchw_module=isinstance(module, _NCHW_MODULES), channels_last=self.channels_last)
            elif shape[2:] == grid:
                fmt = "nchw"
            elif shape[1:3] == grid:
                fmt = "nhwc"
            else:
                fmt = None
            if fmt is not None:
                h, w = shape[2:] if fmt == "nchw" else shape[1:3]
                return fmt, TokenLayout.cnn(h, w)
        if len(shape) == 3 and grid is not None:
            fmt = "lnd" if self._seq_first(hook) else "nld"
            n = shape[0] if fmt == "lnd" else shape[1]
            n_grid = grid[0] * grid[1]
            p = self.prefix
            if n == p.n_prefix + n_grid:
                return fmt, TokenLayout(
                    n_tokens=n,
                    cls=0 if p.has_cls else None,
                    registers=tuple(range(int(p.has_cls), p.n_prefix)),
                    grid=grid,
                    grid_start=p.n_prefix,
                )
            if n == n_grid:  # e.g. the patch embedding, before prefix tokens are added
                return fmt, TokenLayout(n_tokens=n, grid=grid)
        kind = f"a ViT with a {grid[0]}x{grid[1]} patch grid" if grid is not None else "a CNN"
        raise UserError(
            f"hook {hook!r} of {self.spec} outputs shape {shape} (batch first), which is not a token map of {kind}; "
            f"hook a block output instead, e.g. --layer N ({self._layer_paths[0]!r} ...)."
        )

    def token_layout(self, hook: str, *, keep_registers: bool = False, tokens: str = "all") -> TokenLayout:
        """The layout of what `capture` returns for this hook at the preprocess image size."""
        self.check_hooks([hook])
        shapes = self._probe_shapes()
        if hook not in shapes:
            raise UserError(f"hook {hook!r} of {self.spec} does not run in a forward pass; pick another hook.")
        _, full = self._analyze(hook, shapes[hook], self.preprocess.image_size)
        return select_tokens(full, keep_registers=keep_registers, tokens=tokens)[1]

    # ---- running the model ----------------------------------------------------------------------------

    def _forward(self, x_bchw: torch.Tensor):
        return self.module(x_bchw)

    def _input(self, x_bchw: torch.Tensor) -> torch.Tensor:
        if x_bchw.ndim != 4 or x_bchw.shape[1] != 3:
            raise UserError(f"{self.spec} takes images as (B, 3, H, W); got shape {tuple(x_bchw.shape)}.")
        param = next(self.module.parameters(), None)
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        return x_bchw.to(self.device, dtype=dtype, non_blocking=True)

    def _select_index(self, key: tuple, idx: list[int], device: torch.device) -> torch.Tensor:
        if key not in self._index_cache:
            self._index_cache[key] = torch.tensor(idx, dtype=torch.long, device=device)
        return self._index_cache[key]

    def capture(
        self, x_bchw: torch.Tensor, hooks: list[str], *, keep_registers: bool = False, tokens: str = "all"
    ) -> dict[str, torch.Tensor]:
        """Run the model on a batch and return hook -> (B, T, D) float32 tokens (on the model's device).

        The forward pass stops as soon as the last requested hook has fired. Each hook keeps the first
        output of its module; tokens are copied at once, so later in-place ops cannot change them.
        """
        if isinstance(hooks, str):
            hooks = [hooks]
        hooks = list(dict.fromkeys(hooks))
        self.check_hooks(hooks)
        if tokens not in TOKEN_SELECTIONS:
            raise UserError(f"tokens={tokens!r} is unknown; use one of {list(TOKEN_SELECTIONS)}.")
        x_bchw = self._input(x_bchw)
        in_hw = (int(x_bchw.shape[2]), int(x_bchw.shape[3]))
        modules = self._modules_by_path()
        outs: dict[str, torch.Tensor] = {}
        remaining = set(hooks)

        def make_hook(hook: str):
            def on_forward(_module, _inputs, output):
                if hook in outs:
                    return
                raw = _first_tensor(output)
                if raw is None:
                    raise UserError(f"hook {hook!r} of {self.spec} returns no tensor; pick another hook.")
                fmt, full = self._analyze(hook, tuple(raw.shape), in_hw)
                idx, _ = select_tokens(full, keep_registers=keep_registers, tokens=tokens)
                bnd = _TO_BND[fmt](raw)
                if idx != list(range(bnd.shape[1])):
                    key = (hook, fmt, tuple(raw.shape[1:]), keep_registers, tokens, str(bnd.device))
                    bnd = bnd.index_select(1, self._select_index(key, idx, bnd.device))
                bnd = bnd.float()
                if bnd.untyped_storage().data_ptr() == raw.untyped_storage().data_ptr():
                    bnd = bnd.clone()  # still a view of the model's tensor: in-place ops later would change it
                outs[hook] = bnd.contiguous()
                remaining.discard(hook)
                if not remaining:
                    raise _StopForward

            return on_forward

        handles = [modules[h].register_forward_hook(make_hook(h)) for h in hooks]
        try:
            with torch.no_grad():
                self._forward(x_bchw)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if remaining:
            raise UserError(f"hooks {sorted(remaining)} of {self.spec} did not run in the forward pass; pick other hooks.")
        return {h: outs[h] for h in hooks}

    def _probe_shapes(self) -> dict[str, tuple[int, ...]]:
        """Raw output shape (batch 1) of every module that runs, from one forward of a zero image."""
        size = tuple(self.preprocess.image_size)
        if size in self._shape_cache:
            return self._shape_cache[size]
        shapes: dict[str, tuple[int, ...]] = {}
        handles = []

        def make_hook(name: str):
            def on_forward(_module, _inputs, output):
                t = _first_tensor(output)
                if t is not None and name not in shapes:
                    shapes[name] = tuple(int(s) for s in t.shape)

            return on_forward

        for name, m in self._modules_by_path().items():
            handles.append(m.register_forward_hook(make_hook(name)))
        x = torch.zeros(1, 3, *size)
        try:
            with torch.no_grad():
                self._forward(self._input(x))
        finally:
            for handle in handles:
                handle.remove()
        order = {name: i for i, name in enumerate(self.hook_points())}
        self._shape_cache[size] = dict(sorted(shapes.items(), key=lambda kv: order[kv[0]]))
        return self._shape_cache[size]

    def output_shapes(self, hooks: list[str] | None = None) -> dict[str, tuple]:
        """Module path -> raw output shape (batch 1) from one forward of a zero image at the preprocess
        size, in module order. Modules that do not run in a forward pass are left out."""
        shapes = self._probe_shapes()
        if hooks is None:
            return dict(shapes)
        self.check_hooks(hooks)
        return {h: shapes[h] for h in hooks if h in shapes}

    def classify(self, x_bchw: torch.Tensor) -> torch.Tensor:
        """Class logits (B, n_classes). Only for models with a classification head."""
        raise UserError(
            f"{self.spec} has no classification head; classify() works for efficientnet, timm and torchvision classifiers."
        )

    # ---- provenance -----------------------------------------------------------------------------------

    @property
    def weights(self) -> str:
        """The weights' absolute path, or 'random' / 'packaged'."""
        return self._weights

    def weights_sha256(self) -> str | None:
        """sha256 of the weights file (for a directory, of its weight files); None for random weights."""
        if self._weights_sha256 is None and self._weights_fpath is not None:
            fpath = pathlib.Path(self._weights_fpath)
            self._weights_sha256 = sha256_dir(fpath) if fpath.is_dir() else sha256_file(fpath)
        return self._weights_sha256

    def describe(self) -> dict:
        """JSON-able provenance, recorded in the store's metadata."""
        return {
            "backend": self.backend,
            "name": self.name,
            "spec": self.spec,
            "weights": self._weights,
            "weights_sha256": self.weights_sha256(),
            "n_layers": self.n_layers(),
            "kind": "vit" if self.prefix is not None else "cnn",
            "prefix_tokens": None if self.prefix is None else self.prefix.to_dict(),
            "preprocess": self.preprocess.to_dict(),
            "library": dict(self._library),
        }

    def __repr__(self) -> str:
        return f"VisionModel({self.spec!r}, weights={self._weights!r}, n_layers={self.n_layers()}, device={self.device})"
