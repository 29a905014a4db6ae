"""The options of `saev-tools topk / render / report`, one dataclass per command (saev_store/options.py
makes the flags from the fields; `run_topk`, `render` and `build_report` take the same fields as keywords)."""

from __future__ import annotations

import dataclasses

from saev_store.errors import UserError
from saev_store.options import check_applies, check_choices, option

MINED_TOKENS = ("patches", "all")
"""Token selections an SAE can be mined on (its training tokens): heatmaps need the patch grid, so `cls` is not one."""


@dataclasses.dataclass(frozen=True)
class TopkConfig:
    """One pass over a store for every SAE of a run (`saev-tools topk`)."""

    store: str | None = None
    """Activation store (default: the store the SAEs were trained on). The Python API also takes an open Store."""
    out_dpath: str | None = option(None, flag="--out")
    """Output folder (default: RUN_OR_SAE/topk)."""
    hook: str | None = None
    """Hook to read (default: the SAEs' hook)."""
    tokens: str | None = option(None, choices=MINED_TOKENS)
    """Tokens to mine, for SAE folders that do not record their training tokens (default: each SAE's own)."""
    k: int = option(16, short="-k")
    """Exemplars kept per latent and ranking."""
    tau: float = 0.2
    """A token counts when the latent's value exceeds tau (the per-image, per-class and dataset counts)."""
    memory_mb: float = option(1024.0, when=("block_images", (None,)))
    """Budget for one block of activations (latents go in fixed-size chunks)."""
    block_images: int | None = None
    """Images per block, instead of --memory-mb."""
    device: str = "cpu"
    """torch device for the SAEs, e.g. cuda."""
    n_readers: int = option(4, aliases=("--readers",))
    """Store chunks read ahead in parallel."""
    patchsae: bool = True
    """Also compute PatchSAE's statistics (Lim et al. 2025) beside ours: an image's score is the latent's mean
    over all its stored tokens, CLS included (the SAE is applied to every token, as PatchSAE does); its
    frequency, mean activation, top-k images, their label entropy and the class counts over all tokens."""
    overwrite: bool = False
    """Replace an existing output folder."""
    quiet: bool = False
    """No progress bar."""

    def __post_init__(self):
        check_choices(self)
        check_applies(self)
        if self.k < 1:
            raise UserError(f"k={self.k}: ask for at least one exemplar per latent.")
        if self.tau < 0:
            raise UserError(f"tau={self.tau} must be >= 0.")
        if self.n_readers < 1:
            raise UserError(f"--n-readers {self.n_readers} must be at least 1.")


@dataclasses.dataclass(frozen=True)
class GridStyle:
    """How exemplar grids are drawn (`render` and `report` take one)."""

    n_cols: int = option(4, flag="--cols")
    """Tiles per grid row."""
    tile_px: int | None = None
    """Tile side in pixels [default: the model's input size, kept within 96-160]."""
    alpha: float = 0.6
    """Heatmap opacity at the latent's largest value."""

    def __post_init__(self):
        if self.n_cols < 1 or (self.tile_px is not None and not 16 <= self.tile_px <= 2048) or not 0 <= self.alpha <= 1:
            raise UserError(f"grids need --cols >= 1, --tile-px in 16..2048 and --alpha in [0, 1]; got {self.n_cols}, "
                            f"{self.tile_px}, {self.alpha}.")


@dataclasses.dataclass(frozen=True)
class _ShowConfig:
    """What the commands that draw exemplar tiles share."""

    style: GridStyle = option(default_factory=GridStyle, flatten=True)
    """The grids' look."""
    data_root: str | None = None
    """Where the store's dataset lives now, if it moved."""
    quiet: bool = False
    """No progress bar."""


@dataclasses.dataclass(frozen=True)
class RenderConfig(_ShowConfig):
    """Exemplar grids, scatter and histogram of one SAE (`saev-tools render`)."""

    sae: str | None = None
    """Which SAE of the folder (needed when it holds several)."""
    latents: tuple[int, ...] | None = None
    """Comma-separated latent indices (default: --n-latents spread over frequency)."""
    n_latents: int = option(16, when=("latents", (None,)))
    """How many latents when --latents is not given."""
    out_dpath: str | None = option(None, flag="--out")
    """Output folder (default: TOPK/<sae>/render)."""
    rankings: tuple[str, ...] | None = option(None, cli=False)
    """Which exemplar rankings get a grid (default: every ranking of the folder)."""


@dataclasses.dataclass(frozen=True)
class ReportConfig(_ShowConfig):
    """A static HTML report of a topk folder (`saev-tools report`)."""

    out_dpath: str | None = option(None, flag="--out")
    """Report folder (default: TOPK/report)."""
    saes: tuple[str, ...] = option((), flag="--sae", multiple=True)
    """Only these SAEs (repeatable; default all)."""
    latents: tuple[int, ...] | None = None
    """Comma-separated latents that get a page (default: --max-pages spread over frequency)."""
    max_pages: int = option(128, when=("latents", (None,)))
    """Latent pages per SAE when --latents is not given."""
