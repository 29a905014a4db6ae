"""timm backend: ViT blocks equal timm's own forward_intermediates; DINOv2 registers are dropped or kept;
ResNet stages equal a manual stem+stages forward; preprocessing comes from timm's data config; local
weights load through timm's pretrained path."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from saev_store.errors import UserError
from saev_store.models import create_model

timm = pytest.importorskip("timm")
torch.set_num_threads(2)

TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=2, num_classes=10)


def _x(b, h, w, seed=0):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def vit():
    return create_model("timm:vit_tiny_patch16_224", **TINY_VIT)


@pytest.mark.parametrize("layer", [0, 2])
def test_vit_layer_equals_forward_intermediates(vit, layer):
    x = _x(2, 32, 32, layer)
    hook = vit.layer_hook(layer)
    assert hook == f"blocks.{layer}"
    got = vit.capture(x, [hook])[hook]
    with torch.no_grad():
        (spatial, prefix), = vit.module.forward_intermediates(
            x, indices=[layer], norm=False, output_fmt="NLC", return_prefix_tokens=True, intermediates_only=True
        )
    ref = torch.cat([prefix, spatial], dim=1)
    assert got.shape == (2, 1 + 16, 48)
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)
    layout = vit.token_layout(hook)
    assert (layout.n_tokens, layout.cls, layout.grid, layout.grid_start) == (17, 0, (4, 4), 1)


def test_vit_token_selections(vit):
    x = _x(3, 32, 32, 5)
    hook = "blocks.1"
    full = vit.capture(x, [hook])[hook]
    patches = vit.capture(x, [hook], tokens="patches")[hook]
    cls = vit.capture(x, [hook], tokens="cls")[hook]
    np.testing.assert_array_equal(patches.numpy(), full[:, 1:].numpy())
    np.testing.assert_array_equal(cls.numpy(), full[:, :1].numpy())
    assert vit.token_layout(hook, tokens="patches").grid == (4, 4)
    assert vit.token_layout(hook, tokens="cls").n_tokens == 1


def test_vit_patch_grid_is_row_major(vit):
    # Oracle: patch_embed's conv map (B, D, 4, 4) flattened row-major must be the captured proj tokens.
    x = _x(1, 32, 32, 9)
    got = vit.capture(x, ["patch_embed.proj"])["patch_embed.proj"]
    with torch.no_grad():
        conv = torch.nn.functional.conv2d(x, vit.module.patch_embed.proj.weight, vit.module.patch_embed.proj.bias, stride=8)
    ref = np.stack([conv[0, :, r, c].numpy() for r in range(4) for c in range(4)])
    np.testing.assert_allclose(got[0].numpy(), ref, rtol=1e-5, atol=1e-5)
    assert vit.token_layout("patch_embed.proj").grid == (4, 4)


def test_vit_stops_forward_early(vit):
    ran = []
    handle = vit.module.blocks[2].register_forward_hook(lambda *a: ran.append(1))
    try:
        vit.capture(_x(1, 32, 32), ["blocks.0"])
        assert ran == []
        vit.capture(_x(1, 32, 32), ["blocks.2", "blocks.0"])
        assert ran == [1]
    finally:
        handle.remove()


def test_vit_classify_and_describe(vit):
    x = _x(2, 32, 32)
    with torch.no_grad():
        ref = vit.module(x)
    np.testing.assert_allclose(vit.classify(x).numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)
    d = vit.describe()
    assert d["weights"] == "random" and d["weights_sha256"] is None and d["n_layers"] == 3 and d["kind"] == "vit"
    assert vit.preprocess.image_size == (32, 32)


@pytest.fixture(scope="module")
def dino_reg():
    return create_model("timm:vit_small_patch14_reg4_dinov2", img_size=28, depth=2, embed_dim=32, num_heads=2)


def test_dinov2_registers_dropped_by_default_kept_with_flag(dino_reg):
    m = dino_reg.module
    assert m.num_reg_tokens == 4 and m.num_prefix_tokens == 5
    x = _x(2, 28, 28, 3)
    with torch.no_grad():
        (spatial, prefix), = m.forward_intermediates(
            x, indices=[1], norm=False, output_fmt="NLC", return_prefix_tokens=True, intermediates_only=True
        )
    hook = dino_reg.layer_hook(1)
    dropped = dino_reg.capture(x, [hook])[hook]
    kept = dino_reg.capture(x, [hook], keep_registers=True)[hook]
    np.testing.assert_allclose(dropped.numpy(), torch.cat([prefix[:, :1], spatial], 1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kept.numpy(), torch.cat([prefix, spatial], 1).numpy(), rtol=1e-5, atol=1e-6)
    lay = dino_reg.token_layout(hook)
    assert (lay.n_tokens, lay.cls, lay.registers, lay.grid, lay.grid_start) == (5, 0, (), (2, 2), 1)
    lay = dino_reg.token_layout(hook, keep_registers=True)
    assert (lay.n_tokens, lay.cls, lay.registers, lay.grid, lay.grid_start) == (9, 0, (1, 2, 3, 4), (2, 2), 5)
    # CLS at 0 is the class token the model prepended: after block 0 it is not any patch token.
    assert not torch.allclose(kept[:, 0], kept[:, 5])
    assert dino_reg.describe()["prefix_tokens"] == {"cls": True, "n_registers": 4, "patch_size": [14, 14]}


def _manual_resnet(m, x, stage):
    x = m.maxpool(m.act1(m.bn1(m.conv1(x))))
    for i, layer in enumerate([m.layer1, m.layer2, m.layer3, m.layer4]):
        for block in layer:
            x = block(x)
        if i == stage:
            return x


def test_resnet_stage_equals_manual_forward():
    model = create_model("timm:resnet18", num_classes=7)
    assert [model.layer_hook(i) for i in range(4)] == ["layer1", "layer2", "layer3", "layer4"]
    x = _x(2, 64, 64, 1)
    for stage in (0, 3):
        got = model.capture(x, [model.layer_hook(stage)])[model.layer_hook(stage)]
        with torch.no_grad():
            ref = _manual_resnet(model.module, x, stage)
        b, c, h, w = ref.shape
        ref_np = ref.numpy().reshape(b, c, h * w).transpose(0, 2, 1)
        np.testing.assert_allclose(got.numpy(), ref_np, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match=r"0\.\.3"):
        model.layer_hook(4)


def test_preprocess_from_timm_data_config():
    model = create_model("timm:resnet18")
    cfg = timm.data.resolve_data_config({}, model=model.module)
    pp = model.preprocess
    assert pp.image_size == tuple(cfg["input_size"][1:])
    assert pp.resize == math.floor(cfg["input_size"][1] / cfg["crop_pct"])
    assert pp.interpolation == cfg["interpolation"] and pp.crop == "center"
    assert pp.mean == tuple(cfg["mean"]) and pp.std == tuple(cfg["std"])
    # Oracle: timm's own eval transform gives the same tensor.
    tf = timm.data.create_transform(**cfg, is_training=False)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (300, 411, 3), dtype=np.uint8))
    np.testing.assert_allclose(pp.transform(img).numpy(), tf(img).numpy(), rtol=0, atol=1e-6)


def test_local_weights_change_output(tmp_path, vit):
    sd = {k: v.clone() for k, v in vit.module.state_dict().items()}
    sd["blocks.0.mlp.fc2.bias"] += 1.0
    import safetensors.torch

    fpath = tmp_path / "tiny.safetensors"
    safetensors.torch.save_file(sd, str(fpath))
    loaded = create_model("timm:vit_tiny_patch16_224", weights=str(fpath), **TINY_VIT)
    x = _x(1, 32, 32)
    a = vit.capture(x, ["blocks.0"])["blocks.0"]
    b = loaded.capture(x, ["blocks.0"])["blocks.0"]
    np.testing.assert_allclose((b - a).numpy(), np.ones_like(a.numpy()), rtol=0, atol=1e-5)  # fc2.bias feeds the residual
    assert loaded.describe()["weights"] == str(fpath.resolve())


def test_random_init_is_seeded_and_does_not_touch_global_rng():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = create_model("timm:vit_tiny_patch16_224", **TINY_VIT)
    after = torch.rand(1)
    assert torch.equal(before, after)
    b = create_model("timm:vit_tiny_patch16_224", **TINY_VIT)
    assert all(torch.equal(p, q) for p, q in zip(a.module.state_dict().values(), b.module.state_dict().values()))


def test_errors():
    with pytest.raises(UserError, match="vit_base_patch16_224"):
        create_model("timm:vit_base_patch16_22")
    with pytest.raises(UserError, match="does not exist"):
        create_model("timm:resnet18", weights="/nonexistent/resnet18.safetensors")


def test_wrong_weights_user_error(tmp_path):
    fpath = tmp_path / "w.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, fpath)
    with pytest.raises(UserError, match="does not fit"):
        create_model("timm:resnet18", weights=str(fpath))


def test_non_token_hook_is_user_error(vit):
    # The attention's qkv projection is token-shaped (fine); the head's logits are a pooled vector (one token).
    out = vit.capture(_x(1, 32, 32), ["head"])["head"]
    assert out.shape == (1, 1, 10)
    assert vit.token_layout("head").cls == 0


def test_recorder_feeds_timms_own_transform_and_forward(odd_images, tmp_path):
    """Odd-sized JPEGs and grayscale PNGs: the recorder's input is timm's eval transform of the file (JPEGs
    decoded at full size, torchvision's crop rule), and the store holds forward_intermediates of it."""
    from conftest import open_rgb, record_fed

    root, fpaths = odd_images
    st, fed = record_fed(tmp_path / "s.zarr", model="timm:test_vit", dataset="folder", data=str(root), layers=(1,))
    module = create_model("timm:test_vit").module  # the same seeded weights the recorder built
    tf = timm.data.create_transform(**timm.data.resolve_data_config({}, model=module), is_training=False)
    want = torch.stack([tf(open_rgb(p)) for p in fpaths])
    assert fed.shape == want.shape == (len(fpaths), 3, 160, 160)
    np.testing.assert_allclose(fed.numpy(), want.numpy(), rtol=0, atol=1e-6)
    with torch.no_grad():
        (spatial, prefix), = module.forward_intermediates(
            want, indices=[1], norm=False, output_fmt="NLC", return_prefix_tokens=True, intermediates_only=True
        )
    np.testing.assert_allclose(st.read("blocks.1", 0, len(fpaths)), torch.cat([prefix, spatial], 1).numpy(), rtol=1e-5, atol=1e-5)


def test_channels_last_model_reads_nchw_modules_per_hook():
    """timm Swin is channels-last (its stages give (B, H, W, C)) but its patch_embed.proj is a Conv2d
    giving (B, C, H, W): each hook is read by its own shape, not by the model's layout."""
    swin = create_model("timm:swin_tiny_patch4_window7_224", embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    assert swin.channels_last
    x = _x(2, 224, 224, 3)
    got = swin.capture(x, ["patch_embed.proj", "patch_embed.norm", "layers.0"])
    m = swin.module
    with torch.no_grad():
        conv = torch.nn.functional.conv2d(x, m.patch_embed.proj.weight, m.patch_embed.proj.bias, stride=4)  # (B, 32, 56, 56)
        (stage0,) = m.forward_intermediates(x, indices=[0], intermediates_only=True)  # timm returns NCHW
    assert got["patch_embed.proj"].shape == (2, 56 * 56, 32)
    np.testing.assert_allclose(got["patch_embed.proj"].numpy(), conv.flatten(2).transpose(1, 2).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["layers.0"].numpy(), stage0.flatten(2).transpose(1, 2).numpy(), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        norm = m.patch_embed.norm(conv.permute(0, 2, 3, 1))  # timm's PatchEmbed: NHWC into its LayerNorm
    np.testing.assert_allclose(got["patch_embed.norm"].numpy(), norm.flatten(1, 2).numpy(), rtol=1e-5, atol=1e-5)
    for hook in ("patch_embed.proj", "patch_embed.norm", "layers.0"):
        lay = swin.token_layout(hook)
        assert (lay.grid, lay.n_tokens) == ((56, 56), 56 * 56), hook


def test_nchw_model_reads_nhwc_modules_per_hook():
    """The reverse: timm ConvNeXt is NCHW, but each block permutes to (B, H, W, C) for its LayerNorm and MLP."""
    cnx = create_model("timm:test_convnext")
    assert not cnx.channels_last
    x = _x(1, 160, 160, 4)
    raw = {}
    block = cnx.module.stages[0].blocks[0]
    handles = [block.norm.register_forward_hook(lambda m, i, o: raw.setdefault("norm", o)),
               block.conv_dw.register_forward_hook(lambda m, i, o: raw.setdefault("conv_dw", o))]
    try:
        got = cnx.capture(x, ["stages.0.blocks.0.norm", "stages.0.blocks.0.conv_dw"])
    finally:
        for h in handles:
            h.remove()
    c = raw["conv_dw"].shape[1]
    assert raw["norm"].shape[-1] == c  # really (B, H, W, C) inside
    np.testing.assert_allclose(got["stages.0.blocks.0.norm"].numpy(), raw["norm"].flatten(1, 2).numpy(), rtol=1e-6)
    np.testing.assert_allclose(got["stages.0.blocks.0.conv_dw"].numpy(), raw["conv_dw"].flatten(2).transpose(1, 2).numpy(), rtol=1e-6)
    assert cnx.token_layout("stages.0.blocks.0.norm").grid == tuple(raw["conv_dw"].shape[2:])
