"""Model specs (`BACKEND:NAME`) -> VisionModel, through one dict of builders.

A builder is `builder(name, *, weights, device, **kwargs) -> VisionModel`. Built-in backends import
their library only when used, so a missing optional dependency costs nothing until it is needed and
then says which extra to install.
"""

from __future__ import annotations

import importlib
from typing import Callable, Protocol

import torch

from saev_store.errors import UserError

from .base import VisionModel

DEFAULT_MODEL = "efficientnet:lite0"


class Builder(Protocol):
    def __call__(self, name: str, *, weights: str | None, device: str | torch.device, **kwargs) -> VisionModel: ...


def _lazy(module: str, extra: str, libraries: tuple[str, ...]) -> Builder:
    """A builder that imports `saev_store.models.<module>` on first use and calls its `build`."""

    def build(name: str, **kwargs) -> VisionModel:
        for lib in libraries:
            try:
                importlib.import_module(lib)
            except ImportError as err:
                raise UserError(
                    f"this backend needs the Python package {lib!r}, which is not installed ({err}); "
                    f"install it with `pip install 'saev-store[{extra}]'`."
                ) from err
        return importlib.import_module(f"saev_store.models.{module}").build(name, **kwargs)

    return build


_BACKENDS: dict[str, Builder] = {
    "efficientnet": _lazy("efficientnet_backend", "efficientnet", ("efficientnet_lite_pytorch",)),
    "timm": _lazy("timm_backend", "timm", ("timm",)),
    "open_clip": _lazy("open_clip_backend", "open_clip", ("open_clip",)),
    "hf": _lazy("hf_backend", "hf", ("transformers",)),
    "torchvision": _lazy("torchvision_backend", "torchvision", ("torchvision",)),
}


def register_backend(name: str, builder: Callable[..., VisionModel], *, replace: bool = False) -> None:
    """Add a backend: `create_model(f"{name}:MODEL", ...)` will call `builder("MODEL", weights=..., device=..., **kwargs)`."""
    if not name or ":" in name or name != name.strip():
        raise UserError(f"backend name {name!r} must be non-empty, without ':' or surrounding spaces.")
    if name in _BACKENDS and not replace:
        raise UserError(f"backend {name!r} is already registered; pass replace=True to override it.")
    if not callable(builder):
        raise UserError(f"backend {name!r}: the builder must be callable, got {type(builder).__name__}.")
    _BACKENDS[name] = builder


def list_backends() -> list[str]:
    """Registered backend names, in registration order."""
    return list(_BACKENDS)


def parse_spec(spec: str) -> tuple[str, str]:
    """'BACKEND:NAME' -> (backend, name). The name may itself contain ':' (e.g. a Windows path)."""
    backend, sep, name = str(spec).partition(":")
    if not sep or not backend or not name:
        raise UserError(
            f"model {spec!r} is not of the form BACKEND:NAME (e.g. {DEFAULT_MODEL}, timm:vit_base_patch16_224, "
            f"hf:/path/to/dir); backends: {', '.join(_BACKENDS)}."
        )
    if backend not in _BACKENDS:
        raise UserError(f"model backend {backend!r} (in {spec!r}) is unknown; use one of: {', '.join(_BACKENDS)}.")
    return backend, name


def create_model(
    spec: str = DEFAULT_MODEL, weights: str | None = None, device: str | torch.device = "cpu", **kwargs
) -> VisionModel:
    """Build a model from a spec and local weights; nothing is downloaded.

    weights: a local file (a directory for `hf:` models is the spec itself); None means the packaged
    weights for `efficientnet:lite0` and a seeded random init for timm / open_clip / torchvision.
    kwargs go to the backend's constructor (e.g. timm's `img_size=448`, `depth=2`).
    """
    backend, name = parse_spec(spec)
    return _BACKENDS[backend](name, weights=None if weights in (None, "") else str(weights), device=device, **kwargs)
