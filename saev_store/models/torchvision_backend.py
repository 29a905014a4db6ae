"""torchvision classification models (`torchvision:NAME`, NAME as in `torchvision.models.list_models()`).

Weights: a local state_dict file (e.g. the `resnet50-*.pth` torchvision itself would fetch).
Preprocessing: the transforms of the model's DEFAULT weights entry (resize, crop, mean, std,
interpolation), read from torchvision's metadata without downloading; override if your checkpoint
was trained differently (e.g. ResNet-50 V1 weights use resize 256, V2 weights resize 232).

Layers: ResNet/ResNeXt/Wide-ResNet `layer1..layer4` -> 0..3; ViT `encoder.layers.encoder_layer_N`
(tokens [CLS] + patches); other CNNs the children of `features` (VGG, EfficientNet, MobileNet,
ConvNeXt: `features.0` is the stem).
"""

from __future__ import annotations

import torch

from .base import PrefixTokens, VisionModel
from .preprocess import PreprocessConfig, interpolation_name
from .weights import check_weights_file, load_into, read_state_dict, seeded_init, unknown_name


class TorchvisionModel(VisionModel):
    def classify(self, x_bchw: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.module(self._input(x_bchw)).float()


def _layer_paths(module: torch.nn.Module) -> list[str]:
    resnet_layers = []
    while hasattr(module, f"layer{len(resnet_layers) + 1}"):
        resnet_layers.append(f"layer{len(resnet_layers) + 1}")
    if resnet_layers:
        return resnet_layers
    encoder_layers = getattr(getattr(module, "encoder", None), "layers", None)
    if encoder_layers is not None:
        return [f"encoder.layers.{name}" for name, _ in encoder_layers.named_children()]
    features = getattr(module, "features", None)
    if isinstance(features, torch.nn.Sequential):
        return [f"features.{name}" for name, _ in features.named_children()]
    return [name for name, _ in module.named_children()]


def _preprocess(name: str, module: torch.nn.Module) -> PreprocessConfig:
    """The DEFAULT weights' eval transform; a ViT built with another image_size keeps the crop ratio."""
    pp = _preprocess_from_weights_meta(name, module)
    fixed = getattr(module, "image_size", None)  # torchvision ViTs only accept this input size
    if isinstance(fixed, int) and pp.image_size != (fixed, fixed):
        pp = pp.with_overrides(image_size=fixed)
    return pp


def _preprocess_from_weights_meta(name: str, module: torch.nn.Module) -> PreprocessConfig:
    from torchvision import models

    try:
        t = models.get_model_weights(name).DEFAULT.transforms()
        size, resize = int(t.crop_size[0]), int(t.resize_size[0])
        return PreprocessConfig(
            image_size=(size, size),
            resize=max(resize, size),
            crop="center",
            interpolation=interpolation_name(t.interpolation),
            mean=tuple(t.mean),
            std=tuple(t.std),
        )
    except (ValueError, AttributeError, KeyError, TypeError):
        size = int(getattr(module, "image_size", 224))
        return PreprocessConfig.from_crop_pct(size, 0.875, interpolation="bilinear")


def build(name: str, *, weights: str | None, device="cpu", **kwargs) -> VisionModel:
    import torchvision
    from torchvision import models

    names = models.list_models(module=models)
    if name not in names:
        raise unknown_name("torchvision", name, names)
    spec = f"torchvision:{name}"
    with seeded_init():
        module = models.get_model(name, weights=None, **kwargs)
    if weights is None:
        fpath, shown = None, "random"
    else:
        fpath = check_weights_file(weights, spec)
        shown = str(fpath)
        load_into(module, read_state_dict(fpath), fpath, spec)

    prefix = None
    if hasattr(module, "class_token") and hasattr(module, "patch_size"):
        prefix = PrefixTokens(has_cls=True, n_registers=0, patch_size=(module.patch_size, module.patch_size))
    return TorchvisionModel(
        spec=spec,
        module=module,
        preprocess=_preprocess(name, module),
        layer_paths=_layer_paths(module),
        prefix=prefix,
        weights=shown,
        weights_fpath=fpath,
        device=device,
        channels_last=name.startswith("swin"),  # torchvision's Swin stages are (B, H, W, C)
        library={"torchvision": torchvision.__version__},
    )
