"""Hugging Face transformers vision models from a local directory (`hf:/path/to/dir`).

The directory is what `save_pretrained` writes (config.json + weights, optionally
preprocessor_config.json); nothing is fetched from the Hub. Supported: ViTModel, CLIPVisionModel (a
full CLIP directory loads its vision tower), SiglipVisionModel, Dinov2Model,
Dinov2WithRegistersModel, ResNetModel, and other AutoModel vision encoders whose blocks live in
`encoder.layer(s)` / `encoder.stages`.

Layers: the children of the model's block list: ViTs `encoder.layer.N` (transformers 5 names it
`layers.N`; CLIP/SigLIP `vision_model.encoder.layers.N`), which equals `output_hidden_states=True`'s
hidden_states[N + 1]; ResNet `encoder.stages.N` (also hidden_states[N + 1]).
Tokens: [CLS] + registers (Dinov2WithRegisters) + patches; SigLIP has no CLS.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import pathlib

import torch

from saev_store.errors import UserError

from .base import PrefixTokens, VisionModel
from .preprocess import CLIP_MEAN, CLIP_STD, HALF, IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig, interpolation_name
from .weights import seeded_init, weight_files

_LAYER_LISTS = ("layer", "layers", "stages", "blocks")


class HfModel(VisionModel):
    def _forward(self, x_bchw: torch.Tensor):
        kwargs = {}
        config_size = getattr(self.module.config, "image_size", None)
        config_hw = (config_size, config_size) if isinstance(config_size, int) else tuple(config_size or ())
        if config_hw and tuple(x_bchw.shape[2:]) != config_hw and self._takes_interpolate:
            kwargs["interpolate_pos_encoding"] = True
        return self.module(pixel_values=x_bchw, **kwargs)

    @property
    def _takes_interpolate(self) -> bool:
        return "interpolate_pos_encoding" in inspect.signature(self.module.forward).parameters


def _layer_paths(module: torch.nn.Module) -> list[str]:
    """The children of the shallowest ModuleList named layer/layers/stages/blocks, preferring one under
    an encoder (transformers 4 puts ViT blocks in `encoder.layer`, transformers 5 in `layers`)."""
    candidates = [
        (name.count("."), name, m)
        for name, m in module.named_modules()
        if isinstance(m, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in _LAYER_LISTS and "encoder" in name
    ]
    if not candidates:
        candidates = [
            (name.count("."), name, m)
            for name, m in module.named_modules()
            if isinstance(m, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in _LAYER_LISTS
        ]
    if not candidates:
        raise UserError(f"{type(module).__name__}: found no encoder layer list (encoder.layer/layers/stages); this model is not supported.")
    _, name, layers = min(candidates, key=lambda c: (c[0], c[1]))
    return [f"{name}.{i}" for i in range(len(layers))]


def _prefix(module: torch.nn.Module, config) -> PrefixTokens | None:
    patch = getattr(config, "patch_size", None)
    if patch is None:
        return None
    embeddings = next((m for name, m in module.named_modules() if name.rsplit(".", 1)[-1] == "embeddings"), None)
    has_cls = embeddings is not None and (hasattr(embeddings, "cls_token") or hasattr(embeddings, "class_embedding"))
    registers = getattr(embeddings, "register_tokens", None)
    n_registers = int(registers.shape[1]) if registers is not None else 0
    patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    return PrefixTokens(has_cls=has_cls, n_registers=n_registers, patch_size=patch)


def _defaults(config) -> PreprocessConfig:
    """What the model type's image processor does by default, for a directory without preprocessor_config.json."""
    mt = config.model_type
    size = getattr(config, "image_size", 224)
    size = size if isinstance(size, int) else max(size)
    if mt in ("vit", "siglip", "siglip_vision_model"):
        return PreprocessConfig(image_size=(size, size), resize=None, crop="none", interpolation="bilinear", mean=HALF, std=HALF)
    if mt in ("clip", "clip_vision_model"):
        return PreprocessConfig(image_size=(size, size), resize=size, crop="center", interpolation="bicubic", mean=CLIP_MEAN, std=CLIP_STD)
    if mt.startswith("dinov2"):
        return PreprocessConfig(image_size=(224, 224), resize=256, crop="center", interpolation="bicubic")
    return PreprocessConfig.from_crop_pct(224, 0.875, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD)


def preprocess_from_dir(dpath: pathlib.Path, config) -> PreprocessConfig:
    """PreprocessConfig from the directory's preprocessor_config.json, else the model type's defaults.

    HF image processors (both their PIL and torchvision backends) start a centre crop at
    (size - crop) // 2, not at torchvision's round((size - crop) / 2): crop_offset='floor'."""
    return dataclasses.replace(_processor_config(dpath, config), crop_offset="floor")


def _processor_config(dpath: pathlib.Path, config) -> PreprocessConfig:
    fpath = dpath / "preprocessor_config.json"
    if not fpath.is_file():
        return _defaults(config)
    d = json.loads(fpath.read_text())
    size = d.get("size", 224)
    if isinstance(size, int):
        size = {"shortest_edge": size}
    crop = d.get("crop_size")
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    interp = interpolation_name(d.get("resample", 2))
    mean, std = d.get("image_mean", IMAGENET_MEAN), d.get("image_std", IMAGENET_STD)
    if d.get("do_normalize", True) is False:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    short = size.get("shortest_edge")
    if "crop_pct" in d and short is not None:
        # ConvNextImageProcessor (HF ResNet): below 384 it resizes to short / crop_pct and crops `short`.
        if short < 384:
            return PreprocessConfig(
                image_size=(short, short), resize=int(short / d["crop_pct"]), crop="center", interpolation=interp, mean=mean, std=std
            )
        return PreprocessConfig(image_size=(short, short), resize=None, crop="none", interpolation=interp, mean=mean, std=std)
    if d.get("do_center_crop", crop is not None) and crop:
        hw = (int(crop["height"]), int(crop["width"]))
        resize = short if short is not None else max(int(size.get("height", hw[0])), int(size.get("width", hw[1])))
        return PreprocessConfig(image_size=hw, resize=max(resize, max(hw)), crop="center", interpolation=interp, mean=mean, std=std)
    if short is not None:
        # Resize-only to a shorter side gives variable sizes, which cannot be batched: crop its center square.
        return PreprocessConfig(image_size=(short, short), resize=short, crop="center", interpolation=interp, mean=mean, std=std)
    hw = (int(size["height"]), int(size["width"]))
    return PreprocessConfig(image_size=hw, resize=None, crop="none", interpolation=interp, mean=mean, std=std)


def build(name: str, *, weights: str | None, device="cpu", **kwargs) -> VisionModel:
    import transformers

    dpath = pathlib.Path(name).expanduser()
    spec = f"hf:{name}"
    if not (dpath.is_dir() and (dpath / "config.json").is_file()):
        raise UserError(
            f"hf model {name!r} is not a local directory with a config.json; hf: models load only from disk: "
            "save one with `model.save_pretrained(DIR)` (or `huggingface-cli download REPO --local-dir DIR` "
            "on a machine with network) and pass hf:DIR."
        )
    dpath = dpath.resolve()
    if weights is not None and pathlib.Path(weights).expanduser().resolve() != dpath:
        raise UserError(f"hf: models read their weights from the directory in the spec ({dpath}); drop --weights {weights}.")
    if not weight_files(dpath):
        raise UserError(f"hf model directory {str(dpath)!r} holds no weight files (*.safetensors, *.bin); save the model there with save_pretrained.")
    config = transformers.AutoConfig.from_pretrained(dpath, local_files_only=True)
    if config.model_type == "clip":
        cls = transformers.CLIPVisionModel
    elif config.model_type == "siglip":
        cls = transformers.SiglipVisionModel
    else:
        cls = transformers.AutoModel
    try:
        with seeded_init():  # parts missing from the checkpoint (e.g. an unused pooler) are reproducible
            module = cls.from_pretrained(dpath, local_files_only=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(f"could not load hf model from {str(dpath)!r} ({type(err).__name__}: {str(err).strip().splitlines()[0][:300]}).") from err
    prefix = _prefix(module, module.config)
    return HfModel(
        spec=spec,
        module=module,
        preprocess=preprocess_from_dir(dpath, module.config),
        layer_paths=_layer_paths(module),
        prefix=prefix,
        weights=str(dpath),
        weights_fpath=dpath,
        device=device,
        library={"transformers": transformers.__version__},
    )
