"""open_clip backend: a tiny registered ViT config; each captured resblock equals a manual loop over the
resblocks, also for a sequence-first (LND) transformer; local checkpoints load through open_clip."""

import json

import numpy as np
import pytest
import torch

from saev_store.errors import UserError
from saev_store.models import create_model

open_clip = pytest.importorskip("open_clip")
torch.set_num_threads(2)

TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}
NAME = "saev-tiny-ViT-test"


@pytest.fixture(scope="module")
def tiny_name(tmp_path_factory):
    fpath = tmp_path_factory.mktemp("oc_cfg") / f"{NAME}.json"
    fpath.write_text(json.dumps(TINY))
    open_clip.add_model_config(fpath)
    return NAME


def _x(b=2, seed=0):
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _manual(visual, x, layer):
    """Embeddings by hand (conv patches, class token first, positions, ln_pre), then the resblocks."""
    with torch.no_grad():
        p = visual.conv1(x).flatten(2).transpose(1, 2)
        cls = visual.class_embedding.reshape(1, 1, -1).expand(x.shape[0], 1, -1)
        h = visual.ln_pre(torch.cat([cls, p], dim=1) + visual.positional_embedding)
        for block in visual.transformer.resblocks[: layer + 1]:
            h = block(h)
    return h


def test_resblocks_equal_manual_loop(tiny_name):
    vm = create_model(f"open_clip:{tiny_name}")
    assert vm.n_layers() == 3 and vm.layer_hook(2) == "transformer.resblocks.2"
    x = _x()
    for layer in range(3):
        got = vm.capture(x, [vm.layer_hook(layer)])[vm.layer_hook(layer)]
        np.testing.assert_allclose(got.numpy(), _manual(vm.module, x, layer).numpy(), rtol=1e-5, atol=1e-5)
    lay = vm.token_layout("transformer.resblocks.0")
    assert (lay.n_tokens, lay.cls, lay.grid, lay.grid_start) == (17, 0, (4, 4), 1)
    pp = vm.preprocess
    assert pp.image_size == (32, 32) and pp.resize == 32 and pp.crop == "center"
    assert pp.mean == tuple(open_clip.OPENAI_DATASET_MEAN) and pp.interpolation == "bicubic"
    assert vm.describe()["weights"] == "random"


def test_sequence_first_transformer(tiny_name):
    vm = create_model(f"open_clip:{tiny_name}")
    x = _x(3, 1)
    want = {i: _manual(vm.module, x, i) for i in range(3)}
    # Run the same weights sequence-first (LND), as older open_clip towers did.
    vm.module.transformer.batch_first = False
    for block in vm.module.transformer.resblocks:
        block.attn.batch_first = False
    raw = {}
    handle = vm.module.transformer.resblocks[1].register_forward_hook(lambda m, i, o: raw.setdefault("o", o))
    got = vm.capture(x, ["transformer.resblocks.1", "transformer.resblocks.1.mlp"])
    handle.remove()
    assert raw["o"].shape == (17, 3, 32)  # really (N, B, D) inside
    np.testing.assert_allclose(got["transformer.resblocks.1"].numpy(), want[1].numpy(), rtol=1e-5, atol=1e-5)
    assert got["transformer.resblocks.1.mlp"].shape == (3, 17, 32)


def test_local_checkpoint(tmp_path, tiny_name):
    vm = create_model(f"open_clip:{tiny_name}")
    with open_clip_rng():
        full = open_clip.create_model(tiny_name, pretrained=None)
    sd = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in full.state_dict().items()}
    fpath = tmp_path / "open_clip_model.bin"
    torch.save(sd, fpath)
    loaded = create_model(f"open_clip:{tiny_name}", weights=str(fpath))
    full.load_state_dict(sd)
    x = _x(1, 2)
    got = loaded.capture(x, ["transformer.resblocks.2"])["transformer.resblocks.2"]
    np.testing.assert_allclose(got.numpy(), _manual(full.visual.eval(), x, 2).numpy(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, vm.capture(x, ["transformer.resblocks.2"])["transformer.resblocks.2"])
    assert loaded.describe()["weights"] == str(fpath.resolve())


class open_clip_rng:
    def __enter__(self):
        self.state = torch.get_rng_state()
        torch.manual_seed(5)

    def __exit__(self, *exc):
        torch.set_rng_state(self.state)


def test_modified_resnet_tower():
    # RN50 at full width is ~100M parameters with its text tower: wrap a thin ModifiedResNet the same way
    # the builder wraps model.visual, and check its stage outputs against a manual forward.
    from open_clip.modified_resnet import ModifiedResNet

    from saev_store.models.open_clip_backend import OpenClipModel, _layers_and_prefix, _preprocess

    torch.manual_seed(0)
    tower = ModifiedResNet(layers=(1, 1, 1, 1), output_dim=8, heads=2, image_size=64, width=8)
    layers, prefix, channels_last = _layers_and_prefix(tower)
    assert layers == ["layer1", "layer2", "layer3", "layer4"] and prefix is None and not channels_last
    vm = OpenClipModel(spec="open_clip:thin-RN", module=tower, preprocess=_preprocess(tower), layer_paths=layers)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    got = vm.capture(x, ["layer2"])["layer2"]
    t = tower
    with torch.no_grad():
        h = t.act1(t.bn1(t.conv1(x)))
        h = t.act2(t.bn2(t.conv2(h)))
        h = t.avgpool(t.act3(t.bn3(t.conv3(h))))
        h = t.layer2(t.layer1(h))
    np.testing.assert_allclose(got.numpy(), h.flatten(2).transpose(1, 2).numpy(), rtol=1e-5, atol=1e-5)
    assert vm.preprocess.image_size == (64, 64)  # a bare tower: its own image_size
    assert vm.token_layout("layer2").grid == tuple(h.shape[2:])


def test_unknown_name_and_wrong_checkpoint(tmp_path, tiny_name):
    with pytest.raises(UserError, match="ViT-B-16"):
        create_model("open_clip:ViT-B-17")
    fpath = tmp_path / "bad.pt"
    torch.save({"visual.conv1.weight": torch.zeros(1)}, fpath)
    with pytest.raises(UserError, match="does not fit"):
        create_model(f"open_clip:{tiny_name}", weights=str(fpath))


def test_recorder_feeds_open_clips_own_transform_and_forward(odd_images, tmp_path, tiny_name):
    """Odd-sized JPEGs and grayscale PNGs: the recorder's input is open_clip's own preprocess_val of the
    file (JPEGs decoded at full size), and the store holds the resblock outputs of it."""
    from conftest import open_rgb, record_fed

    root, fpaths = odd_images
    st, fed = record_fed(tmp_path / "s.zarr", model=f"open_clip:{tiny_name}", dataset="folder", data=str(root), layers=(2,))
    with open_clip_rng():
        _, _, preprocess_val = open_clip.create_model_and_transforms(tiny_name, pretrained=None)
    want = torch.stack([preprocess_val(open_rgb(p)) for p in fpaths])
    assert fed.shape == want.shape == (len(fpaths), 3, 32, 32)
    np.testing.assert_allclose(fed.numpy(), want.numpy(), rtol=0, atol=1e-6)
    visual = create_model(f"open_clip:{tiny_name}").module  # the same seeded weights the recorder built
    np.testing.assert_allclose(st.read("transformer.resblocks.2", 0, len(fpaths)), _manual(visual, want, 2).numpy(), rtol=1e-5, atol=1e-5)
