"""The benchmark's measuring functions, on a small store (no timing is asserted)."""

import math
import os

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_store

from saev_store import bench as B
from saev_store.cli import bench as bench_cmd


def test_perfect_distinct_matches_simulation():
    rng = np.random.default_rng(0)
    n, t, b = 50, 7, 40
    image_of_row = np.repeat(np.arange(n), t)
    sims = [np.unique(rng.choice(image_of_row, size=b, replace=False)).size for _ in range(4000)]
    assert B.perfect_distinct(n, t, b) == pytest.approx(np.mean(sims), abs=4 * np.std(sims) / math.sqrt(len(sims)))
    assert B.perfect_distinct(10, 3, 28) == 10.0  # 28 of 30 rows reach every image
    assert B.perfect_distinct(1000, 1, 64) == pytest.approx(64.0)


def test_simulated_buffer_mixing_matches_the_loader(tmp_path):
    # The dry simulation must agree with distinct images counted from the real loader's coordinates.
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 5, 4)).astype(np.float32)
    st = make_store(tmp_path / "s.zarr", {"h": x}, images_per_chunk=5)
    from saev_store.loaders import ShuffledLoader

    loader = ShuffledLoader(st, "h", batch_size=32, buffer_mb=0.004, with_coords=True, n_epochs=40, normalize=False)
    warm = loader.buffer_rows // 32
    got = [np.unique(c[:, 0].numpy()).size for i, (_, c) in enumerate(loader) if warm <= i < warm + 400]
    sim = B.simulate_distinct(200, 4, 5, 32, loader.buffer_rows, n_batches=400)
    assert sim == pytest.approx(np.mean(got), rel=0.03)


def test_raw_read_and_eviction_count_every_byte(tmp_path):
    rng = np.random.default_rng(2)
    st = make_store(tmp_path / "s.zarr", {"h": rng.standard_normal((12, 5, 4)).astype(np.float32)}, images_per_chunk=4)
    fpaths = B.chunk_files(st, "h")
    r = B.raw_read(fpaths, seconds=0.05, cold=True)
    size = 4 * 5 * 4 * 4 + 4  # one chunk file: 4 images x 5 tokens x 4 floats + crc
    assert all(os.path.getsize(f) == size for f in fpaths)
    assert r.n_bytes >= size and r.n_bytes % size == 0  # whole files only
    with B.Evictor(fpaths, interval_s=0.01) as ev:
        import time

        time.sleep(0.1)
    assert ev.n_sweeps >= 1


@pytest.mark.parametrize("warm", [False, True])
def test_bench_and_cli(tmp_path, warm):
    rng = np.random.default_rng(3)
    st = make_store(tmp_path / "s.zarr", {"h": rng.standard_normal((40, 5, 4)).astype(np.float32)}, images_per_chunk=4)
    r = B.bench(st, warm=warm, batch_size=16, buffer_mb=0.01, seconds=0.2)
    assert r.cold == (not warm) and r.hook == "h"
    assert r.loader.bytes_per_row == pytest.approx(5 * 4 * 4 / 4)  # whole images read, 4 patch rows used
    assert 1 <= r.loader.distinct_images <= 16 and r.perfect_distinct == pytest.approx(B.perfect_distinct(40, 4, 16))
    out = CliRunner().invoke(bench_cmd, [str(tmp_path / "s.zarr"), "--seconds", "0.1", "--batch-size", "16", "--buffer-mb", "0.01"] + (["--warm"] if warm else []))
    assert out.exit_code == 0, out.output
    assert "ratio" in out.output and "distinct images/batch" in out.output
