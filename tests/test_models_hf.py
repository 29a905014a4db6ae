"""HF transformers backend: tiny ViT, CLIP vision, DINOv2 (with and without registers) and ResNet models,
saved with save_pretrained and loaded with `hf:DIR`; every layer equals `output_hidden_states[N + 1]`."""

import numpy as np
import pytest
import torch

from saev_store.errors import UserError
from saev_store.models import create_model

transformers = pytest.importorskip("transformers")
torch.set_num_threads(2)

VIT_KW = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)


def _x(b, hw, seed=0):
    return torch.randn(b, 3, hw, hw, generator=torch.Generator().manual_seed(seed))


def _save(tmp_path, name, model):
    dpath = tmp_path / name
    torch.manual_seed(0)
    model.eval().save_pretrained(dpath)
    return dpath


def _check_layers(vm, ref_model, x, **capture_kw):
    with torch.no_grad():
        hidden = ref_model(pixel_values=x, output_hidden_states=True).hidden_states
    for layer in range(vm.n_layers()):
        hook = vm.layer_hook(layer)
        got = vm.capture(x, [hook], **capture_kw)[hook]
        ref = hidden[layer + 1]
        if ref.ndim == 4:
            ref = ref.flatten(2).transpose(1, 2)
        np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-5, atol=1e-5, err_msg=hook)


def test_vit(tmp_path):
    torch.manual_seed(0)
    ref = transformers.ViTModel(transformers.ViTConfig(image_size=32, patch_size=8, **VIT_KW)).eval()
    vm = create_model(f"hf:{_save(tmp_path, 'vit', ref)}")
    # transformers 4 names them encoder.layer.N, transformers 5 layers.N: either way one ModuleList's children.
    hooks = vm.layer_hooks()
    assert len(hooks) == 3 and all(h.rsplit(".", 1) == [hooks[0].rsplit(".", 1)[0], str(i)] for i, h in enumerate(hooks))
    assert vm.hook_points()[hooks[0]] == "ViTLayer"
    _check_layers(vm, ref, _x(2, 32))
    lay = vm.token_layout(hooks[1])
    assert (lay.n_tokens, lay.cls, lay.grid, lay.grid_start) == (17, 0, (4, 4), 1)
    assert vm.preprocess.image_size == (32, 32) and vm.preprocess.mean == (0.5, 0.5, 0.5)
    with pytest.raises(UserError, match="no classification head"):
        vm.classify(_x(1, 32))


def test_clip_vision_from_full_clip_dir(tmp_path):
    torch.manual_seed(0)
    vcfg = dict(image_size=32, patch_size=8, **VIT_KW)
    tcfg = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99)
    full = transformers.CLIPModel(transformers.CLIPConfig(vision_config=vcfg, text_config=tcfg, projection_dim=16)).eval()
    dpath = _save(tmp_path, "clip", full)
    vm = create_model(f"hf:{dpath}")
    assert vm.hook_points()[vm.layer_hook(0)] == "CLIPEncoderLayer"
    ref = transformers.CLIPVisionModel.from_pretrained(dpath).eval()
    _check_layers(vm, ref, _x(2, 32, 1))
    # The full model's vision tower is the oracle too (the weights really came from the directory).
    with torch.no_grad():
        hs = full.vision_model(pixel_values=_x(2, 32, 1), output_hidden_states=True).hidden_states
    got = vm.capture(_x(2, 32, 1), [vm.layer_hook(2)])[vm.layer_hook(2)]
    np.testing.assert_allclose(got.numpy(), hs[3].numpy(), rtol=1e-5, atol=1e-5)
    assert vm.describe()["prefix_tokens"]["cls"] is True


def test_dinov2(tmp_path):
    torch.manual_seed(0)
    ref = transformers.Dinov2Model(transformers.Dinov2Config(image_size=28, patch_size=14, **VIT_KW)).eval()
    vm = create_model(f"hf:{_save(tmp_path, 'dino', ref)}")
    _check_layers(vm, ref, _x(2, 28, 2))
    assert vm.prefix.n_registers == 0


@pytest.mark.skipif(not hasattr(transformers, "Dinov2WithRegistersModel"), reason="transformers without Dinov2WithRegisters")
def test_dinov2_with_registers(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.Dinov2WithRegistersConfig(image_size=28, patch_size=14, num_register_tokens=4, **VIT_KW)
    ref = transformers.Dinov2WithRegistersModel(cfg).eval()
    vm = create_model(f"hf:{_save(tmp_path, 'dinoreg', ref)}")
    x = _x(2, 28, 3)
    _check_layers(vm, ref, x, keep_registers=True)
    with torch.no_grad():
        hidden = ref(pixel_values=x, output_hidden_states=True).hidden_states
    hook0 = vm.layer_hook(0)
    dropped = vm.capture(x, [hook0])[hook0]
    want = torch.cat([hidden[1][:, :1], hidden[1][:, 5:]], dim=1)
    np.testing.assert_allclose(dropped.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    vm.preprocess = vm.preprocess.with_overrides(image_size=28)
    assert vm.token_layout(hook0, keep_registers=True).registers == (1, 2, 3, 4)
    assert vm.token_layout(hook0).n_tokens == 1 + 4


def test_resnet(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], layer_type="basic")
    ref = transformers.ResNetModel(cfg).eval()
    vm = create_model(f"hf:{_save(tmp_path, 'resnet', ref)}")
    assert vm.n_layers() == 4 and vm.prefix is None and vm.hook_points()[vm.layer_hook(0)] == "ResNetStage"
    _check_layers(vm, ref, _x(2, 64, 4))
    assert vm.token_layout(vm.layer_hook(3)).grid == (7, 7)  # 224 / 32


def test_preprocessor_config_is_read_and_matches_hf(tmp_path):
    from PIL import Image

    torch.manual_seed(0)
    ref = transformers.ViTModel(transformers.ViTConfig(image_size=32, patch_size=8, **VIT_KW)).eval()
    dpath = _save(tmp_path, "vitpp", ref)
    proc = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, resample=3)
    proc.save_pretrained(dpath)
    vm = create_model(f"hf:{dpath}")
    pp = vm.preprocess
    assert (pp.image_size, pp.resize, pp.crop, pp.interpolation) == ((32, 32), 32, "center", "bicubic")
    np.testing.assert_allclose(pp.mean, proc.image_mean) and np.testing.assert_allclose(pp.std, proc.image_std)
    pil_proc = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, resample=3)
    one_level = (1 / 255) / min(proc.image_std)
    # 71x48 resizes to 47x32: the crop starts at floor(15 / 2) = 7 in HF, round(7.5) = 8 in torchvision.
    for h, w in [(50, 70), (48, 71), (203, 339), (200, 303)]:
        img = Image.fromarray(np.random.default_rng(w).integers(0, 256, (h, w, 3), dtype=np.uint8))
        got = pp.transform(img)
        # HF's PIL backend resizes with PIL as we do: the same tensor.
        np.testing.assert_allclose(got.numpy(), pil_proc(images=img, return_tensors="pt")["pixel_values"][0].numpy(), rtol=0, atol=1e-5)
        # Its default torchvision backend resizes with torch's uint8 kernels and may round a resampled
        # pixel the other way: at most one 8-bit level per pixel, and rarely.
        want = proc(images=img, return_tensors="pt")["pixel_values"][0]
        assert got.shape == want.shape
        assert (got - want).abs().max() <= one_level * 1.01
        assert (got - want).abs().mean() < one_level / 20
    assert pp.crop_offset == "floor"


def test_describe_hashes_weight_files(tmp_path):
    import hashlib

    torch.manual_seed(0)
    ref = transformers.ViTModel(transformers.ViTConfig(image_size=32, patch_size=8, **VIT_KW)).eval()
    dpath = _save(tmp_path, "vit", ref)
    vm = create_model(f"hf:{dpath}")
    h = hashlib.sha256()
    for f in sorted(p for p in dpath.iterdir() if p.suffix == ".safetensors"):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    d = vm.describe()
    assert d["weights"] == str(dpath.resolve()) and d["weights_sha256"] == h.hexdigest()


def test_not_a_model_dir(tmp_path):
    with pytest.raises(UserError, match="not a local directory with a config.json"):
        create_model(f"hf:{tmp_path}")
    with pytest.raises(UserError, match="not a local directory"):
        create_model("hf:google/vit-base-patch16-224")


IMAGENET = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
# Tiny random models with the processors their real checkpoints ship (google/vit-base-patch16-224,
# openai/clip-vit-base-patch32, facebook/dinov2-base, microsoft/resnet-50), at their real sizes.
PROCESSED = {
    "vit": (lambda: transformers.ViTModel(transformers.ViTConfig(image_size=224, patch_size=32, **VIT_KW)),
            "ViTImageProcessor", dict(size={"height": 224, "width": 224}, resample=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)),
    "clip": (lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(image_size=224, patch_size=32, **VIT_KW)),
             "CLIPImageProcessor", dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3)),
    "dinov2": (lambda: transformers.Dinov2Model(transformers.Dinov2Config(image_size=224, patch_size=32, **VIT_KW)),
               "BitImageProcessor", dict(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=3, **IMAGENET)),
    "resnet": (lambda: transformers.ResNetModel(transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], layer_type="basic")),
               "ConvNextImageProcessor", dict(size={"shortest_edge": 224}, crop_pct=0.875, resample=3, **IMAGENET)),
}


@pytest.mark.parametrize("kind", list(PROCESSED))
def test_recorder_feeds_the_image_processors_own_input_and_forward(kind, odd_images, tmp_path):
    """Odd-sized JPEGs and grayscale PNGs through hf:DIR with its preprocessor_config.json: the recorder's
    input is the HF processor's (its centre crop starts at floor((size - crop) / 2)), exactly the PIL
    backend's and within one grey level of the default torchvision backend's; the store holds the
    model's own hidden_states of it."""
    from conftest import open_rgb, record_fed

    root, fpaths = odd_images
    make, proc_name, proc_kw = PROCESSED[kind]
    torch.manual_seed(0)
    ref = make().eval()
    dpath = _save(tmp_path, kind, ref)
    getattr(transformers, proc_name)(**proc_kw).save_pretrained(dpath)
    st, fed = record_fed(tmp_path / "s.zarr", model=f"hf:{dpath}", dataset="folder", data=str(root), layers=(1,))
    images = [open_rgb(p) for p in fpaths]
    pil = getattr(transformers, f"{proc_name}Pil")(**proc_kw)(images=images, return_tensors="pt")["pixel_values"]
    default = transformers.AutoImageProcessor.from_pretrained(dpath)(images=images, return_tensors="pt")["pixel_values"]
    assert fed.shape == pil.shape == default.shape == (len(fpaths), 3, 224, 224)
    np.testing.assert_allclose(fed.numpy(), pil.numpy(), rtol=0, atol=1e-5)
    one_level = (1 / 255) / min(proc_kw.get("image_std", transformers.CLIPImageProcessor().image_std))
    assert (fed - default).abs().max() <= one_level * 1.01
    with torch.no_grad():
        want = ref(pixel_values=pil, output_hidden_states=True).hidden_states[2]
    if want.ndim == 4:
        want = want.flatten(2).transpose(1, 2)
    hook = st.hooks[0]
    np.testing.assert_allclose(st.read(hook, 0, len(fpaths)), want.numpy(), rtol=1e-4, atol=1e-4)
    assert st.attrs["preprocessing"]["crop_offset"] == "floor"
