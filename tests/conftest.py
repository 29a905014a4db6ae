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
