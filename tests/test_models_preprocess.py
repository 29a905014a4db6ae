"""PreprocessConfig: the transform equals torchvision's Resize + CenterCrop + ToTensor + Normalize (the
pipeline timm and open_clip use at evaluation), round-trips through a dict, and rejects bad configs."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from saev_store.errors import UserError
from saev_store.models import PreprocessConfig

T = pytest.importorskip("torchvision.transforms")
torch.set_num_threads(2)


def _img(h, w, seed=0, mode="RGB"):
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(a).convert(mode)


def _torchvision(pp: PreprocessConfig):
    interp = T.InterpolationMode(pp.interpolation)
    resize = [T.Resize(pp.resize, interpolation=interp), T.CenterCrop(pp.image_size)] if pp.crop == "center" else [T.Resize(pp.image_size, interpolation=interp)]
    return T.Compose([*resize, T.ToTensor(), T.Normalize(pp.mean, pp.std)])


@pytest.mark.parametrize(
    "pp",
    [
        PreprocessConfig(),
        PreprocessConfig(image_size=(224, 224), resize=235, interpolation="bilinear"),
        PreprocessConfig(image_size=(32, 48), resize=50, interpolation="lanczos", mean=(0.5,) * 3, std=(0.5,) * 3),
        PreprocessConfig(image_size=(28, 28), resize=None, crop="none", interpolation="nearest"),
    ],
    ids=["imagenet", "crop95", "nonsquare", "squash"],
)
@pytest.mark.parametrize("hw", [(300, 451), (451, 300), (256, 256), (20, 30)])
def test_transform_equals_torchvision(pp, hw):
    img = _img(*hw, seed=hw[0])
    got = pp.transform(img)
    want = _torchvision(pp)(img)
    assert got.dtype == torch.float32 and got.shape == (3, *pp.image_size)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-6)


def test_grayscale_and_rgba_become_rgb():
    pp = PreprocessConfig(image_size=(16, 16), resize=16)
    gray = _img(20, 20, mode="L")
    x = pp.transform(gray)
    assert x.shape == (3, 16, 16)
    # Oracle: a gray pixel v becomes (v/255 - mean_c) / std_c in every channel.
    v = np.asarray(gray.resize((16, 16), Image.Resampling.BICUBIC), dtype=np.float64)[None] / 255
    want = (v - np.array(pp.mean)[:, None, None]) / np.array(pp.std)[:, None, None]
    np.testing.assert_allclose(x.numpy(), want, atol=1e-5)
    assert pp.transform(_img(20, 20, mode="RGBA")).shape == (3, 16, 16)


def test_dict_round_trip_and_overrides():
    pp = PreprocessConfig(image_size=(224, 224), resize=256, interpolation="bilinear", mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    assert PreprocessConfig.from_dict(pp.to_dict()) == pp
    import json

    assert PreprocessConfig.from_dict(json.loads(json.dumps(pp.to_dict()))) == pp
    hf = dataclasses.replace(pp, crop_offset="floor", jpeg_draft_mpx=12)
    assert PreprocessConfig.from_dict(json.loads(json.dumps(hf.to_dict()))) == hf and hf.jpeg_draft_mpx == 12.0
    # A store written before crop_offset and jpeg_draft_mpx: torchvision's crop, every JPEG drafted to the resize.
    old = {k: v for k, v in pp.to_dict().items() if k not in ("crop_offset", "jpeg_draft_mpx")}
    assert PreprocessConfig.from_dict(old) == dataclasses.replace(pp, crop_offset="round", jpeg_draft_mpx=0.0)
    assert pp.jpeg_draft() is None and hf.jpeg_draft().min_side == 256 and hf.jpeg_draft().above_px == 12_000_000
    big = pp.with_overrides(image_size=448)
    assert big.image_size == (448, 448) and big.resize == 512 and big.mean == pp.mean
    assert pp.with_overrides(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)).mean == (0.5, 0.5, 0.5)
    flat = pp.with_overrides(crop="none")
    assert flat.crop == "none" and flat.resize is None
    assert flat.with_overrides(crop="center").resize == 224
    assert PreprocessConfig.from_crop_pct(224, 0.875).resize == 256
    assert pytest.approx(pp.crop_pct) == 224 / 256


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(image_size=(224, 224), resize=200), "resize >= max"),
        (dict(crop="none", resize=256), "resize=None"),
        (dict(crop="middle"), "crop"),
        (dict(interpolation="cubic"), "interpolation"),
        (dict(std=(0.1, 0.0, 0.1)), "positive"),
        (dict(mean=(0.1, 0.2)), "3 values"),
        (dict(crop_offset="ceil"), "crop_offset"),
        (dict(jpeg_draft_mpx=-1), "jpeg-draft-mpx"),
    ],
)
def test_bad_configs_are_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        PreprocessConfig(**kwargs)


SIZES_WH = [(303, 200), (339, 203), (200, 303), (801, 600), (640, 480), (71, 48), (257, 256), (256, 256), (225, 224)]


@pytest.mark.parametrize("crop_hw, resize", [((224, 224), 256), ((224, 224), 224), ((32, 48), 50)])
def test_input_geometry_is_each_librarys_resize_and_crop(crop_hw, resize):
    """input_geometry + nearest resampling (how a label mask follows an image) picks exactly the source
    pixels torchvision's Resize + CenterCrop picks ('round') and an HF image processor picks ('floor')."""
    import transformers

    from saev_store.models.preprocess import input_geometry

    hf = transformers.CLIPImageProcessorPil(size={"shortest_edge": resize}, crop_size={"height": crop_hw[0], "width": crop_hw[1]},
                                             resample=0, do_rescale=False, do_normalize=False)
    tv = T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.NEAREST), T.CenterCrop(crop_hw)])
    n_differ = 0
    for w, h in SIZES_WH:
        img = _img(h, w, seed=w * h)
        for offset, want in (("round", np.asarray(tv(img))), ("floor", hf(images=img)["pixel_values"][0].transpose(1, 2, 0))):
            pp = PreprocessConfig(image_size=crop_hw, resize=resize, crop_offset=offset)
            g = input_geometry(pp, w, h)
            assert g.box[2] - g.box[0] == crop_hw[1] and g.box[3] - g.box[1] == crop_hw[0]
            got = np.asarray(pp.resize_crop(img, "nearest"))
            np.testing.assert_array_equal(got, want, err_msg=f"{offset} {w}x{h}")
            # The box is where the crop sits: cutting it from the nearest-resized image gives the same pixels.
            np.testing.assert_array_equal(np.asarray(img.resize(g.resized_wh, Image.Resampling.NEAREST).crop(g.box)), want)
        n_differ += input_geometry(pp, w, h).box != input_geometry(dataclasses.replace(pp, crop_offset="round"), w, h).box
    assert n_differ > 0  # the two rules really differ on some of these sizes


def test_squash_geometry_keeps_the_whole_image():
    from saev_store.models.preprocess import input_geometry

    pp = PreprocessConfig(image_size=(28, 30), resize=None, crop="none")
    assert input_geometry(pp, 303, 200) == ((30, 28), (0, 0, 30, 28))
    mask = Image.fromarray((np.arange(200 * 303).reshape(200, 303) % 7).astype(np.uint8), "L")
    out = pp.resize_crop(mask, "nearest")
    assert out.mode == "L" and out.size == (30, 28) and set(np.unique(np.asarray(out))) <= set(range(7))
