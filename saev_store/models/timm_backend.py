"""timm models (`timm:NAME`, NAME as in `timm.list_models()`, optionally with a pretrained tag).

Weights load through timm's own pretrained path with the file as the source
(`pretrained_cfg_overlay=dict(file=...)`), so its checkpoint filters convert original-format weights
(e.g. Meta's DINOv2 .pth) exactly as `pretrained=True` would; nothing is downloaded.

Layers:
* ViTs (VisionTransformer, DINOv2, Eva, DeiT, BEiT...): layer N = `blocks.N`, the residual stream after
  block N. Tokens: [CLS] + registers (`reg_token`, DINOv2 `_reg4_`; DeiT's distillation token counts
  as one) + patches; registers are dropped unless kept.
* CNNs: layer N = the N-th top-level stage: ResNet `layer1..layer4` -> 0..3; else `stages.N`
  (ConvNeXt, RegNet...), `layers.N` (Swin), `blocks.N` (EfficientNet/MobileNet stages).
"""

from __future__ import annotations

import torch

from saev_store.errors import UserError

from .base import PrefixTokens, VisionModel
from .preprocess import PreprocessConfig, interpolation_name
from .weights import check_weights_file, seeded_init, unknown_name


class TimmModel(VisionModel):
    def classify(self, x_bchw: torch.Tensor) -> torch.Tensor:
        if getattr(self.module, "num_classes", 0) <= 0:
            return super().classify(x_bchw)
        with torch.no_grad():
            return self.module(self._input(x_bchw)).float()


def _is_vit(module: torch.nn.Module) -> bool:
    return hasattr(module, "blocks") and hasattr(module, "patch_embed") and hasattr(module, "num_prefix_tokens")


def _layer_paths(module: torch.nn.Module) -> list[str]:
    if _is_vit(module):
        return [f"blocks.{i}" for i in range(len(module.blocks))]
    resnet_layers = []
    while hasattr(module, f"layer{len(resnet_layers) + 1}"):
        resnet_layers.append(f"layer{len(resnet_layers) + 1}")
    if resnet_layers:
        return resnet_layers
    for attr in ("stages", "layers", "blocks"):
        seq = getattr(module, attr, None)
        if isinstance(seq, (torch.nn.Sequential, torch.nn.ModuleList)) and len(seq) > 0:
            return [f"{attr}.{i}" for i in range(len(seq))]
    feature_info = getattr(module, "feature_info", None)
    if feature_info:
        names = dict(module.named_modules())
        paths = [f["module"] for f in feature_info if f.get("module") in names]
        if paths:
            return paths
    return [name for name, _ in module.named_children()]


def _prefix(module: torch.nn.Module) -> PrefixTokens | None:
    if not _is_vit(module):
        return None
    has_cls = getattr(module, "cls_token", None) is not None
    n_prefix = int(module.num_prefix_tokens)
    patch = module.patch_embed.patch_size
    patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    return PrefixTokens(has_cls=has_cls, n_registers=n_prefix - int(has_cls), patch_size=patch)


def preprocess_from_timm(module: torch.nn.Module) -> PreprocessConfig:
    """PreprocessConfig from timm's resolved data config (input size, crop_pct, crop_mode, mean, std).

    A fixed-size ViT built with a custom img_size takes that size, not its pretrained config's.
    """
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=module)
    size = tuple(int(s) for s in cfg["input_size"][1:])
    patch_embed = getattr(module, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    if img_size is not None and not getattr(module, "dynamic_img_size", False):
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(int(s) for s in img_size)
    interp = interpolation_name(cfg.get("interpolation", "bicubic"))
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    if cfg.get("crop_mode") == "squash" and crop_pct >= 1.0:
        return PreprocessConfig(image_size=size, resize=None, crop="none", interpolation=interp, mean=cfg["mean"], std=cfg["std"])
    # 'squash' with crop_pct < 1 and 'border' are approximated by resize-shorter-side + center crop.
    return PreprocessConfig.from_crop_pct(size, crop_pct, interpolation=interp, mean=cfg["mean"], std=cfg["std"])


def build(name: str, *, weights: str | None, device="cpu", **kwargs) -> VisionModel:
    import timm
    from timm.models import is_model, split_model_name_tag

    arch, _tag = split_model_name_tag(name)
    if not is_model(arch):
        raise unknown_name("timm", name, timm.list_models())
    spec = f"timm:{name}"
    if weights is None:
        with seeded_init():
            module = timm.create_model(name, pretrained=False, **kwargs)
        fpath, shown = None, "random"
    else:
        fpath = check_weights_file(weights, spec)
        shown = str(fpath)
        overlay = dict(file=str(fpath), source="file", custom_load=fpath.suffix == ".npz")
        try:
            with seeded_init():  # parts the checkpoint does not cover (a new head) are still reproducible
                module = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        except (RuntimeError, KeyError, ValueError) as err:
            raise UserError(
                f"weights file {str(fpath)!r} does not fit model {spec!r} ({type(err).__name__}: "
                f"{str(err).strip().splitlines()[-1][:300]}); pass the checkpoint saved for exactly this architecture."
            ) from err

    return TimmModel(
        spec=spec,
        module=module,
        preprocess=preprocess_from_timm(module),
        layer_paths=_layer_paths(module),
        prefix=_prefix(module),
        weights=shown,
        weights_fpath=fpath,
        device=device,
        channels_last=getattr(module, "output_fmt", "NCHW") == "NHWC",
        library={"timm": timm.__version__},
    )
