"""Multi-process recording (torchrun, CPU, gloo barriers) against a one-process recording, bitwise."""

import os
import signal
import subprocess
import sys
import time

import pytest

from saev_store.store import open_store
from saev_store.verify import verify

ARGS = ["--limit", "48", "--batch-size", "2", "--images-per-chunk", "2", "--layer", "10", "--image-size", "64", "--num-workers", "0", "--quiet"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(out, nproc=2, port=29511):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
            "-m", "saev_store.cli", "record", "--out", out, *ARGS]


def assert_same_store(a_path, b_path):
    a, b = open_store(a_path), open_store(b_path)
    assert a.complete and b.complete and verify(b) == []
    h = a.hooks[0]
    assert a.read(h, 0, a.n_images).tobytes() == b.read(h, 0, b.n_images).tobytes()
    assert a.labels().tolist() == b.labels().tolist() and a.image_ids() == b.image_ids()
    assert (a.moments(h, "patches").mean == b.moments(h, "patches").mean).all()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("single") / "one.zarr")
    subprocess.run([sys.executable, "-m", "saev_store.cli", "record", "--out", out, *ARGS], check=True, env=ENV)
    return out


@pytest.mark.slow
def test_two_processes_equal_one_bitwise(single, tmp_path):
    out = str(tmp_path / "two.zarr")
    subprocess.run(torchrun(out), check=True, env=ENV)
    assert_same_store(single, out)


@pytest.mark.slow
def test_killing_one_process_then_rerunning_completes_the_store(single, tmp_path):
    out = str(tmp_path / "killed.zarr")
    proc = subprocess.Popen(torchrun(out, port=29512), env=ENV, start_new_session=True)
    done_dpath = os.path.join(out, "done", "c")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(done_dpath) and len(os.listdir(done_dpath)) >= 2:
            break
        time.sleep(0.01)
    # SIGKILL one worker (a child of torchrun); torchrun then tears the other one down.
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert children, "torchrun started no workers"
    os.kill(int(children[0]), signal.SIGKILL)
    proc.wait(timeout=120)
    assert not open_store(out).complete
    subprocess.run(torchrun(out, port=29513), check=True, env=ENV)
    assert_same_store(single, out)
