"""torchvision backend: ResNet stages equal a manual forward; captured tensors survive later in-place ops;
the forward stops early; local weights load; unknown names get suggestions."""

import numpy as np
import pytest
import torch

from saev_store.errors import UserError
from saev_store.models import create_model

tv = pytest.importorskip("torchvision")
torch.set_num_threads(2)


@pytest.fixture(scope="module")
def r18():
    return create_model("torchvision:resnet18")


def _x(b=2, hw=64, seed=0):
    return torch.randn(b, 3, hw, hw, generator=torch.Generator().manual_seed(seed))


def _manual(m, x, stage):
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    for i, layer in enumerate([m.layer1, m.layer2, m.layer3, m.layer4]):
        x = layer(x)
        if i == stage:
            return x


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_stage_equals_manual_forward(r18, stage):
    x = _x(seed=stage)
    hook = r18.layer_hook(stage)
    assert hook == f"layer{stage + 1}"
    got = r18.capture(x, [hook])[hook]
    with torch.no_grad():
        ref = _manual(r18.module, x, stage).double().numpy()
    b, c, h, w = ref.shape
    np.testing.assert_allclose(got.numpy(), ref.reshape(b, c, h * w).transpose(0, 2, 1), rtol=1e-5, atol=1e-5)
    # token_layout describes the preprocess size (224): stride 4 * 2**stage.
    side = 224 // (4 * 2**stage)
    layout = r18.token_layout(hook)
    assert (layout.n_tokens, layout.grid, layout.cls) == (side * side, (side, side), None)


def test_capture_survives_inplace_residual(r18):
    # BasicBlock does `out = bn2(out); out += identity; relu_(out)`: bn2's output is overwritten in place
    # after the hook fires. The captured tokens must be bn2's output, not bn2 + identity.
    x = _x(1, 64, 3)
    m = r18.module
    out = r18.capture(x, ["layer1.0.bn2", "layer2"])
    with torch.no_grad():
        h = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        blk = m.layer1[0]
        bn2 = blk.bn2(blk.conv2(blk.relu(blk.bn1(blk.conv1(h)))))
    np.testing.assert_allclose(out["layer1.0.bn2"].numpy(), bn2.flatten(2).transpose(1, 2).numpy(), rtol=1e-5, atol=1e-5)


def test_forward_stops_after_last_hook(r18):
    calls = []
    handle = r18.module.fc.register_forward_hook(lambda *a: calls.append("fc"))
    try:
        r18.capture(_x(1, 64), ["layer3"])
        assert calls == []
        r18.classify(_x(1, 64))
        assert calls == ["fc"]
    finally:
        handle.remove()


def test_output_shapes_match_manual(r18):
    shapes = r18.output_shapes()
    assert shapes["layer4"] == (1, 512, 7, 7) and shapes["fc"] == (1, 1000) and shapes["conv1"] == (1, 64, 112, 112)
    assert list(shapes)[:3] == ["conv1", "bn1", "relu"]
    assert r18.output_shapes(["layer2"]) == {"layer2": (1, 128, 28, 28)}
    assert set(r18.hook_points()) >= set(shapes) and r18.hook_points()["layer1.0.conv1"] == "Conv2d"


def test_local_weights_load_and_change_output(tmp_path, r18):
    sd = {k: v.clone() for k, v in r18.module.state_dict().items()}
    sd["conv1.weight"] = torch.randn_like(sd["conv1.weight"], generator=torch.Generator().manual_seed(1))
    fpath = tmp_path / "resnet18.pth"
    torch.save(sd, fpath)
    loaded = create_model("torchvision:resnet18", weights=str(fpath))
    ref_module = tv.models.resnet18()
    ref_module.load_state_dict(sd)
    ref_module.eval()
    x = _x(1, 64, 2)
    got = loaded.capture(x, ["layer1"])["layer1"]
    with torch.no_grad():
        ref = _manual(ref_module, x, 0)
    np.testing.assert_allclose(got.numpy(), ref.flatten(2).transpose(1, 2).numpy(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, r18.capture(x, ["layer1"])["layer1"])
    with torch.no_grad():
        np.testing.assert_allclose(loaded.classify(x).numpy(), ref_module(x).numpy(), rtol=1e-5, atol=1e-5)


def test_preprocess_from_weights_metadata(r18):
    t = tv.models.ResNet18_Weights.DEFAULT.transforms()
    pp = r18.preprocess
    assert pp.image_size == (t.crop_size[0],) * 2 and pp.resize == t.resize_size[0]
    assert pp.mean == tuple(t.mean) and pp.interpolation == "bilinear"


def test_vit_tokens_and_layers():
    m = create_model("torchvision:vit_b_16", image_size=32)
    assert m.n_layers() == 12 and m.layer_hook(0) == "encoder.layers.encoder_layer_0"
    x = _x(1, 32, 4)
    got = m.capture(x, [m.layer_hook(1)], tokens="all")[m.layer_hook(1)]
    # Oracle: torchvision's own pieces: _process_input, prepend class token, add pos embedding, 2 layers.
    vt = m.module
    with torch.no_grad():
        h = vt._process_input(x)
        h = torch.cat([vt.class_token.expand(1, -1, -1), h], dim=1) + vt.encoder.pos_embedding
        h = vt.encoder.layers[1](vt.encoder.layers[0](h))
    np.testing.assert_allclose(got.numpy(), h.numpy(), rtol=1e-4, atol=1e-5)
    layout = m.token_layout(m.layer_hook(1))
    assert (layout.cls, layout.grid, layout.grid_start) == (0, (2, 2), 1)


def test_unknown_name_suggests():
    with pytest.raises(UserError, match="resnet18"):
        create_model("torchvision:resnet19")


def test_recorder_feeds_the_weights_own_transform_and_forward(odd_images, tmp_path, r18):
    """Odd-sized JPEGs and grayscale PNGs: the recorder's input is the DEFAULT weights' transforms() of the
    file (JPEGs decoded at full size), and the store holds the stage outputs of it."""
    from conftest import open_rgb, record_fed

    root, fpaths = odd_images
    st, fed = record_fed(tmp_path / "s.zarr", model="torchvision:resnet18", dataset="folder", data=str(root), layers=(3,))
    tf = tv.models.ResNet18_Weights.DEFAULT.transforms()
    want = torch.stack([tf(open_rgb(p)) for p in fpaths])
    assert fed.shape == want.shape == (len(fpaths), 3, 224, 224)
    np.testing.assert_allclose(fed.numpy(), want.numpy(), rtol=0, atol=1e-6)
    with torch.no_grad():
        ref = _manual(r18.module, want, 3)  # r18 has the recorder's seeded weights
    np.testing.assert_allclose(st.read("layer4", 0, len(fpaths)), ref.flatten(2).transpose(1, 2).numpy(), rtol=1e-4, atol=1e-4)
