"""Token layout of one recorded hook: which token index is what.

A ViT hook stores `[CLS] + registers + patches` (registers only when kept), a CNN hook stores its
H*W spatial positions row-major. The layout is written into the store's metadata so a reader knows
which rows are patches without knowing the model.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

import numpy as np

TokenSelection = Literal["all", "patches", "cls"]
"""Which tokens of a hook a reader (or the recorder) takes; named once, here."""
TOKEN_SELECTIONS: tuple[str, ...] = typing.get_args(TokenSelection)


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Which token index of a hook's output is what."""

    n_tokens: int
    """Tokens stored per image for this hook."""
    cls: int | None = None
    """Index of the CLS token, or None when the hook has none (CNNs) or it was not stored."""
    registers: tuple[int, ...] = ()
    """Indices of the register tokens that were kept (DINOv2 with registers); empty when dropped."""
    grid: tuple[int, int] | None = None
    """Patch grid (h, w): `h * w` patch tokens in row-major order, or None when no patch was stored."""
    grid_start: int = 0
    """Index of the first patch token; the patches are `grid_start .. grid_start + h*w - 1`."""

    def __post_init__(self):
        object.__setattr__(self, "registers", tuple(int(r) for r in self.registers))
        if self.grid is not None:
            object.__setattr__(self, "grid", (int(self.grid[0]), int(self.grid[1])))
        n_grid = 0 if self.grid is None else self.grid[0] * self.grid[1]
        n_expected = (self.cls is not None) + len(self.registers) + n_grid
        if n_expected != self.n_tokens:
            raise ValueError(
                f"TokenLayout: cls={self.cls}, {len(self.registers)} registers and grid={self.grid} make "
                f"{n_expected} tokens, but n_tokens={self.n_tokens}; fix the layout so they agree."
            )
        if self.grid is not None and not 0 <= self.grid_start <= self.n_tokens - n_grid:
            raise ValueError(f"TokenLayout: grid_start={self.grid_start} puts the grid outside {self.n_tokens} tokens.")

    @property
    def n_patches(self) -> int:
        return 0 if self.grid is None else self.grid[0] * self.grid[1]

    def indices(self, tokens: TokenSelection) -> np.ndarray:
        """Token indices for a selection (`all`, `patches`, `cls`), as an int64 array."""
        if tokens == "all":
            return np.arange(self.n_tokens, dtype=np.int64)
        if tokens == "patches":
            if self.grid is None:
                raise ValueError("this hook stored no patch tokens (layout has no grid); use tokens='all' or 'cls'.")
            return np.arange(self.grid_start, self.grid_start + self.n_patches, dtype=np.int64)
        if tokens == "cls":
            if self.cls is None:
                raise ValueError("this hook stored no CLS token; use tokens='patches' or 'all'.")
            return np.array([self.cls], dtype=np.int64)
        raise ValueError(f"unknown token selection {tokens!r}; choose one of {TOKEN_SELECTIONS}.")

    def selections(self) -> tuple[str, ...]:
        """The token selections this layout supports."""
        out = ["all"]
        if self.grid is not None:
            out.append("patches")
        if self.cls is not None:
            out.append("cls")
        return tuple(out)

    def to_dict(self) -> dict:
        return {
            "n_tokens": self.n_tokens,
            "cls": self.cls,
            "registers": list(self.registers),
            "grid": None if self.grid is None else list(self.grid),
            "grid_start": self.grid_start,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "TokenLayout":
        return cls(
            n_tokens=int(d["n_tokens"]),
            cls=d.get("cls"),
            registers=tuple(d.get("registers", ())),
            grid=None if d.get("grid") is None else tuple(d["grid"]),
            grid_start=int(d.get("grid_start", 0)),
        )

    @classmethod
    def cnn(cls, h: int, w: int) -> "TokenLayout":
        """A CNN feature map: H*W spatial positions, row-major, no CLS."""
        return cls(n_tokens=h * w, grid=(h, w), grid_start=0)
