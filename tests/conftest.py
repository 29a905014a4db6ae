import os
import pathlib
import tarfile

import numpy as np
import pytest

# Two cores: keep torch from oversubscribing them when several processes run.
os.environ.setdefault("OMP_NUM_THREADS", "2")

from saev_store.layout import TokenLayout  # noqa: E402
from saev_store.store import HookSpec, create_store  # noqa: E402


def make_store(path, acts: dict, *, images_per_chunk=4, store_dtype="float32", labels=None, valid=None, layouts=None, finalize=True, metadata=None,
               image_ids=None):
    """A store filled from numpy arrays `acts[hook]` (n, T, d); layouts default to CLS + square grid."""
    n = next(iter(acts.values())).shape[0]
    hooks = {}
    for h, x in acts.items():
        t = x.shape[1]
        lay = (layouts or {}).get(h)
        if lay is None:
            g = int(round((t - 1) ** 0.5))
            lay = TokenLayout(n_tokens=t, cls=0, grid=(g, g), grid_start=1) if g * g == t - 1 else TokenLayout(n_tokens=t, grid=(1, t))
        hooks[h] = HookSpec(d=x.shape[2], layout=lay)
    st = create_store(path, n_images=n, hooks=hooks, images_per_chunk=images_per_chunk, store_dtype=store_dtype, metadata=metadata)
    for i in st.pending_chunks():
        a, b = st.chunk_bounds(i)
        st.write_block(
            i,
            {h: x[a:b] for h, x in acts.items()},
            labels=None if labels is None else labels[a:b],
            image_ids=[f"img{j}" for j in range(a, b)] if image_ids is None else image_ids[a:b],
            valid=None if valid is None else valid[a:b],
        )
    if finalize:
        st.finalize()
    return st


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# Odd-sized photos for the preprocessing oracles: RGB JPEGs and grayscale PNGs whose sizes exercise the
# resize's truncation, both crop-offset rules and (on main before issue 19) JPEG draft decoding.
ODD_JPEGS = ((480, 480), (640, 480), (512, 512), (801, 600))
ODD_GRAY_PNGS = ((303, 200), (339, 203))


@pytest.fixture(scope="session")
def odd_images(tmp_path_factory):
    """A flat folder of skimage's astronaut photo resized to ODD_JPEGS (RGB JPEG, quality 90) and
    ODD_GRAY_PNGS (grayscale PNG): (root, file paths in the folder dataset's order)."""
    from PIL import Image
    from skimage import data

    root = tmp_path_factory.mktemp("odd") / "images"
    root.mkdir()
    photo = Image.fromarray(data.astronaut())
    for w, h in ODD_JPEGS:
        photo.resize((w, h), Image.Resampling.LANCZOS).save(root / f"rgb_{w}x{h}.jpg", quality=90)
    for w, h in ODD_GRAY_PNGS:
        photo.resize((w, h), Image.Resampling.LANCZOS).convert("L").save(root / f"gray_{w}x{h}.png")
    return root, sorted(root.iterdir())


def record_fed(out, **cfg):
    """Record with the real recorder, in this process, and also return what it fed the model: the float
    (n, 3, H, W) input of every batch, in image order. Returns (store, fed)."""
    import torch

    from saev_store.models.base import VisionModel
    from saev_store.record import RecordConfig, record
    from saev_store.store import open_store

    calls = []
    capture = VisionModel.capture

    def spy(self, x, *args, **kwargs):
        calls.append(x.detach().float().cpu().clone())
        return capture(self, x, *args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(VisionModel, "capture", spy)
        record(RecordConfig(out=str(out), quiet=True, num_workers=0, **cfg))
    probe, batches = calls[0], calls[1:]
    assert probe.shape[0] == 1 and not probe.any(), "the recorder's first capture is its blank probe"
    return open_store(str(out)), torch.cat(batches)


def open_rgb(fpath):
    """What every library's loader hands its transform: the file opened by PIL, converted to RGB."""
    from PIL import Image

    with Image.open(fpath) as img:
        return img.convert("RGB")


V1_FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "v1_store.tar.gz"


@pytest.fixture
def v1_store(tmp_path):
    """A copy of the committed v1 store: 16 Fashion-MNIST training images through EfficientNet-Lite0
    `_blocks.3` at 16 px (2x2 grid, d = 40), float16, 4 images per chunk, recorded by the main branch
    before patch labels existed (`saev-store record --out v1.zarr --limit 16 --image-size 16 --layer 3
    --store-dtype float16 --images-per-chunk 4`)."""
    with tarfile.open(V1_FIXTURE) as tar:
        tar.extractall(tmp_path)
    return tmp_path / "v1.zarr"
