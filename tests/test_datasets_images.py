"""decode_image: full size by default (what Image.open gives), JPEG draft only when asked, decompression-bomb guard."""

import io
import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
from PIL import Image

from saev_store.datasets import BadImageError, JpegDraft, create_dataset, decode_image
from saev_store.datasets.images import draft_scale


def _smooth_rgb(w, h):
    """A smooth gradient, so a reduced decode and a resized full decode agree closely."""
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    return np.stack([x, y, (x + y) / 2], -1).astype(np.uint8)


def _jpeg_bytes(arr, quality=90):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.mark.parametrize(
    "w,h,min_side,max_pixels,expected",
    [
        (2000, 1500, 300, None, 4),  # 1500/4 = 375 >= 300, 1500/8 = 187 < 300
        (2000, 1500, 1000, None, 1),  # halving would make 750 < 1000
        (2000, 1500, None, None, 1),
        (2000, 1500, None, 1_000_000, 2),  # 3 Mpx -> 0.75 Mpx
        (2000, 1500, 1400, 100_000, 8),  # the pixel limit wins over min_side
        (100_000, 100_000, None, 1_000, 8),  # never more than libjpeg's 1/8
    ],
)
def test_draft_scale(w, h, min_side, max_pixels, expected):
    assert draft_scale(w, h, min_side, max_pixels) == expected


def test_full_size_by_default_draft_only_when_asked():
    arr = _smooth_rgb(2000, 1500)
    data = _jpeg_bytes(arr)
    full = decode_image(data, "x")
    # Oracle: what PIL itself decodes, the image every library's transform starts from.
    assert np.array_equal(np.asarray(full), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    small = decode_image(data, "x", JpegDraft(min_side=300))
    assert small.size == (500, 375)  # decoded at 1/4 scale: both sides stay >= 300
    oracle = np.asarray(full.resize((500, 375), Image.BOX), dtype=np.float64)
    assert np.abs(np.asarray(small, dtype=np.float64) - oracle).mean() < 3.0
    # The threshold: a 3 Mpx JPEG is reduced above 2 Mpx, not above 4 Mpx.
    assert decode_image(data, "x", JpegDraft(min_side=300, above_px=2_000_000)).size == (500, 375)
    assert decode_image(data, "x", JpegDraft(min_side=300, above_px=4_000_000)).size == (2000, 1500)
    # A PNG has no reduced decode: a draft leaves it at full size.
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    assert decode_image(buf.getvalue(), "x", JpegDraft(min_side=300)).size == (2000, 1500)


def test_bomb_rules_by_default_and_with_a_draft(monkeypatch, tmp_path):
    arr = _smooth_rgb(1024, 768)  # 786432 px
    fpath = tmp_path / "big.jpg"
    fpath.write_bytes(_jpeg_bytes(arr))
    png = tmp_path / "big.png"
    Image.fromarray(arr).save(png)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    with pytest.raises(Image.DecompressionBombError):  # what plain PIL does with this file
        Image.open(fpath)
    # By default PIL's rule: over twice the limit is refused, naming the opt-in for JPEGs.
    with pytest.raises(BadImageError, match="--jpeg-draft-mpx"):
        decode_image(str(fpath), "big.jpg")
    with pytest.raises(BadImageError, match="Only JPEGs can be decoded at reduced size"):
        decode_image(str(png), "big.png")
    # With a draft a JPEG decodes at the first scale under the limit, or smaller if min_side allows.
    assert decode_image(str(fpath), "big.jpg", JpegDraft(min_side=10_000)).size == (256, 192)
    assert decode_image(fpath.read_bytes(), "big.jpg", JpegDraft(min_side=50)).size == (128, 96)
    with pytest.raises(BadImageError, match="Only JPEGs"):
        decode_image(str(png), "big.png", JpegDraft(min_side=50))
    # Between the limit and PIL's refusal limit (2x) every image decodes at full size with PIL's warning,
    # unless a draft lets a JPEG decode under the limit, silently.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500_000)
    with pytest.warns(Image.DecompressionBombWarning):
        assert decode_image(str(png), "big.png").size == (1024, 768)
    with pytest.warns(Image.DecompressionBombWarning):
        assert decode_image(str(fpath), "big.jpg").size == (1024, 768)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decode_image(str(fpath), "big.jpg", JpegDraft(min_side=10_000)).size == (512, 384)
    # A JPEG too big even at 1/8 scale is refused before decoding.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3_000)
    with pytest.raises(BadImageError, match="even at 1/8 scale"):
        decode_image(str(fpath), "big.jpg", JpegDraft(min_side=1))


_PEAK_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    from saev_store.datasets import JpegDraft, create_dataset
    src = create_dataset("folder", root=sys.argv[1])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    img = src.load(0, draft=JpegDraft(min_side=int(sys.argv[2])))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"size": img.size, "grew_kib": after - before}))
    """
)


def test_huge_jpeg_loads_without_full_size_decode(tmp_path):
    """With a draft, a 12000x12000 grayscale JPEG (144 Mpx) decodes at 1/8 for min_side 224, and at 1/2 (the
    first scale under PIL's 89 Mpx limit) for a min_side it cannot halve to."""
    root = tmp_path / "huge"
    root.mkdir()
    img = Image.new("L", (12000, 12000), 60)
    img.paste(200, (0, 0, 6000, 12000))
    img.save(root / "huge.jpg", quality=50)
    del img
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = {}
    for min_side in ("224", "100000"):
        out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(root), min_side],
                             capture_output=True, text=True, env=env, check=True)
        results[min_side] = json.loads(out.stdout)
    assert results["224"]["size"] == [1500, 1500]
    assert results["224"]["grew_kib"] < 64 * 1024  # a full decode would add >= 144 MB (+432 MB as RGB)
    # min_side too large to halve: only the pixel limit reduces it, to 1/2 (36 Mpx), never full size.
    assert results["100000"]["size"] == [6000, 6000]
    src = create_dataset("folder", root=str(root))
    px = np.asarray(src.load(0, draft=JpegDraft(min_side=224)))
    assert np.abs(px[750, 100].astype(int) - 200).max() <= 4
    assert np.abs(px[750, 1400].astype(int) - 60).max() <= 4
