"""open_clip image towers (`open_clip:NAME`, NAME as in `open_clip.list_models()`, e.g. ViT-B-16).

Weights: a local full-CLIP checkpoint file (open_clip_model.safetensors, or a .bin / .pt state
dict); open_clip's own `load_checkpoint` converts and resizes it. Only the image tower
(`model.visual`) is kept, so hook paths are relative to it. Preprocessing is the model's
`preprocess_cfg` (size, mean, std, interpolation, resize mode).

Layers: ViT towers: layer N = `transformer.resblocks.N` (tokens [CLS] + patches; a tower that runs its
transformer sequence-first has its (N, B, D) outputs transposed); ModifiedResNet towers (RN50...):
`layer1..layer4` -> 0..3; timm towers: the timm model's layers under `trunk.`.
"""

from __future__ import annotations

import torch

from saev_store.errors import UserError

from .base import PrefixTokens, VisionModel
from .preprocess import CLIP_MEAN, CLIP_STD, PreprocessConfig, interpolation_name
from .weights import check_weights_file, seeded_init, unknown_name


class OpenClipModel(VisionModel):
    def _seq_first(self, hook: str) -> bool:
        transformer = getattr(self.module, "transformer", None)
        return (
            transformer is not None
            and not getattr(transformer, "batch_first", True)
            and hook.startswith("transformer.")
        )


def _layers_and_prefix(visual: torch.nn.Module) -> tuple[list[str], PrefixTokens | None, bool]:
    """(layer paths, ViT prefix or None, channels_last) for the three kinds of open_clip image tower."""
    resblocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if resblocks is not None and hasattr(visual, "patch_size"):
        patch = visual.patch_size
        patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
        # open_clip ViTs always put one class token first (`class_embedding`) and have no registers.
        prefix = PrefixTokens(has_cls=hasattr(visual, "class_embedding"), n_registers=0, patch_size=patch)
        return [f"transformer.resblocks.{i}" for i in range(len(resblocks))], prefix, False
    trunk = getattr(visual, "trunk", None)
    if trunk is not None:  # open_clip's TimmModel wrapper
        from .timm_backend import _layer_paths, _prefix

        channels_last = getattr(trunk, "output_fmt", "NCHW") == "NHWC"
        return [f"trunk.{p}" for p in _layer_paths(trunk)], _prefix(trunk), channels_last
    layers = []
    while hasattr(visual, f"layer{len(layers) + 1}"):
        layers.append(f"layer{len(layers) + 1}")
    if layers:
        return layers, None, False
    raise UserError(f"open_clip image tower {type(visual).__name__} is not supported; use a ViT, ModifiedResNet or timm tower.")


def _preprocess(visual: torch.nn.Module) -> PreprocessConfig:
    cfg = dict(getattr(visual, "preprocess_cfg", None) or {})
    size = cfg.get("size", getattr(visual, "image_size", 224))
    size = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
    interp = interpolation_name(cfg.get("interpolation", "bicubic"))
    mean, std = tuple(cfg.get("mean", CLIP_MEAN)), tuple(cfg.get("std", CLIP_STD))
    if cfg.get("resize_mode", "shortest") == "squash":
        return PreprocessConfig(image_size=size, resize=None, crop="none", interpolation=interp, mean=mean, std=std)
    # 'shortest' is exactly Resize(shorter side) + CenterCrop; 'longest' (pad to fit) is approximated by it.
    return PreprocessConfig(image_size=size, resize=max(size), crop="center", interpolation=interp, mean=mean, std=std)


def build(name: str, *, weights: str | None, device="cpu", **kwargs) -> VisionModel:
    import open_clip

    names = open_clip.list_models()
    if name not in names:
        raise unknown_name("open_clip", name, names)
    spec = f"open_clip:{name}"
    with seeded_init():
        # pretrained_text/image=False: never fetch tower weights behind our back.
        model = open_clip.create_model(name, pretrained=None, pretrained_text=False, pretrained_image=False, **kwargs)
    if weights is None:
        fpath, shown = None, "random"
    else:
        fpath = check_weights_file(weights, spec)
        shown = str(fpath)
        try:
            open_clip.load_checkpoint(model, str(fpath), strict=True)
        except (RuntimeError, KeyError, ValueError, StopIteration) as err:
            raise UserError(
                f"weights file {str(fpath)!r} does not fit model {spec!r} ({type(err).__name__}: "
                f"{str(err).strip().splitlines()[-1][:300] if str(err).strip() else 'empty checkpoint'}); "
                "pass the full open_clip checkpoint saved for exactly this architecture."
            ) from err
    visual = model.visual
    layer_paths, prefix, channels_last = _layers_and_prefix(visual)
    return OpenClipModel(
        spec=spec,
        module=visual,
        preprocess=_preprocess(visual),
        layer_paths=layer_paths,
        prefix=prefix,
        weights=shown,
        weights_fpath=fpath,
        device=device,
        channels_last=channels_last,
        library={"open_clip": open_clip.__version__},
    )
