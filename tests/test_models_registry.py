"""The backend registry and the model-independent parts of VisionModel: spec parsing, errors that say the
fix, a custom backend, and token selection on a module whose outputs are known exactly."""

import numpy as np
import pytest
import torch

from saev_store.errors import UserError
from saev_store.layout import TokenLayout
from saev_store.models import PrefixTokens, PreprocessConfig, VisionModel, create_model, list_backends, register_backend
from saev_store.models import registry as registry_mod


def test_builtin_backends():
    assert list_backends()[:5] == ["efficientnet", "timm", "open_clip", "hf", "torchvision"]


@pytest.mark.parametrize("spec", ["vit_base", "timm:", ":vit", ""])
def test_malformed_spec(spec):
    with pytest.raises(UserError, match="BACKEND:NAME"):
        create_model(spec)


def test_unknown_backend_lists_backends():
    with pytest.raises(UserError, match="efficientnet, timm, open_clip, hf, torchvision"):
        create_model("keras:resnet50")


class _ToyViT(torch.nn.Module):
    """Tokens with known values: CLS = 100, registers = 200 + r, patch (i, j) = 10*i + j, in every feature."""

    def __init__(self, n_reg=2, patch=4):
        super().__init__()
        self.n_reg, self.patch = n_reg, patch
        self.block = torch.nn.Identity()
        self.after = torch.nn.Identity()

    def forward(self, x):
        b, _, h, w = x.shape
        gh, gw = h // self.patch, w // self.patch
        patches = torch.tensor([10.0 * i + j for i in range(gh) for j in range(gw)])
        vals = torch.cat([torch.tensor([100.0]), 200.0 + torch.arange(self.n_reg), patches])
        tokens = vals[None, :, None].expand(b, -1, 3).clone()
        return self.after(self.block(tokens))


@pytest.fixture()
def toy_backend():
    def build(name, *, weights, device="cpu", **kwargs):
        return VisionModel(
            spec=f"toy:{name}",
            module=_ToyViT(),
            preprocess=PreprocessConfig(image_size=(8, 12), resize=None, crop="none"),
            layer_paths=["block", "after"],
            prefix=PrefixTokens(has_cls=True, n_registers=2, patch_size=(4, 4)),
            device=device,
        )

    register_backend("toy", build)
    yield
    registry_mod._BACKENDS.pop("toy")


def test_custom_backend_token_selection(toy_backend):
    m = create_model("toy:vit")
    x = torch.zeros(2, 3, 8, 12)
    grid = [10.0 * i + j for i in range(2) for j in range(3)]  # row-major 2x3 grid
    cases = {
        (False, "all"): [100.0] + grid,
        (True, "all"): [100.0, 200.0, 201.0] + grid,
        (False, "patches"): grid,
        (True, "patches"): grid,
        (False, "cls"): [100.0],
    }
    for (keep, tokens), want in cases.items():
        got = m.capture(x, [m.layer_hook(0)], keep_registers=keep, tokens=tokens)["block"]
        assert got.shape == (2, len(want), 3)
        np.testing.assert_array_equal(got[1, :, 0].numpy(), np.array(want))
        layout = m.token_layout("block", keep_registers=keep, tokens=tokens)
        assert layout.n_tokens == len(want)
        # The layout must point at exactly the values it claims.
        if layout.cls is not None:
            assert got[0, layout.cls, 0] == 100.0
        assert [got[0, r, 0].item() for r in layout.registers] == ([200.0, 201.0] if keep and tokens == "all" else [])
        if layout.grid is not None:
            np.testing.assert_array_equal(got[0, layout.indices("patches"), 0].numpy(), np.array(grid))
    assert m.token_layout("block", keep_registers=True) == TokenLayout(n_tokens=9, cls=0, registers=(1, 2), grid=(2, 3), grid_start=3)


def test_duplicate_and_bad_backend_names(toy_backend):
    with pytest.raises(UserError, match="already registered"):
        register_backend("toy", lambda *a, **k: None)
    with pytest.raises(UserError, match="':'"):
        register_backend("a:b", lambda *a, **k: None)


def test_unknown_hook_and_bad_tokens(toy_backend):
    m = create_model("toy:vit")
    with pytest.raises(UserError, match="hook points are: block, after"):
        m.capture(torch.zeros(1, 3, 8, 12), ["nope"])
    with pytest.raises(UserError, match="did you mean 'block'"):
        m.token_layout("blocks")
    with pytest.raises(UserError, match="tokens='pixels' is unknown"):
        m.capture(torch.zeros(1, 3, 8, 12), ["block"], tokens="pixels")
    with pytest.raises(UserError, match="0..1"):
        m.layer_hook(2)
    with pytest.raises(UserError, match=r"\(B, 3, H, W\)"):
        m.capture(torch.zeros(3, 8, 12), ["block"])


def test_output_shapes_and_describe(toy_backend):
    m = create_model("toy:vit")
    assert m.output_shapes() == {"block": (1, 9, 3), "after": (1, 9, 3)}
    d = m.describe()
    import json

    json.dumps(d)
    assert d["weights"] == "random" and d["kind"] == "vit" and d["prefix_tokens"]["n_registers"] == 2
    with pytest.raises(UserError, match="no classification head"):
        m.classify(torch.zeros(1, 3, 8, 12))
