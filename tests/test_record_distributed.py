"""Multi-process recording through the CLI under both launchers the README shows (2 CPU processes, gloo)
against a one-process recording, bitwise: a torchrun recording, and a store whose torchrun recording lost a
killed process, completed by `accelerate launch`."""

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

from saev_store.cli import main
from saev_store.store import open_store
from saev_store.verify import verify

ARGS = ["--limit", "48", "--batch-size", "2", "--images-per-chunk", "2", "--layer", "10", "--image-size", "64", "--num-workers", "0", "--quiet"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
STALLED_CLI = os.path.join(os.path.dirname(__file__), "stalled_cli.py")
LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    # accelerate's CPU form (`--cpu --num_processes 2` starts one process): --multi_gpu starts 2 through torchrun.
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"],
}


def launch(out, launcher="torchrun", script=("-m", "saev_store.cli")):
    return [*LAUNCHERS[launcher], *script, "record", "--out", out, *ARGS]


def assert_same_store(a_path, b_path):
    a, b = open_store(a_path), open_store(b_path)
    assert a.complete and b.complete and verify(b) == []
    h = a.hooks[0]
    assert a.read(h, 0, a.n_images).tobytes() == b.read(h, 0, b.n_images).tobytes()
    assert a.labels().tolist() == b.labels().tolist() and a.image_ids() == b.image_ids()
    assert (a.moments(h, "patches").mean == b.moments(h, "patches").mean).all()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """Recorded in this process, with the launched processes' one thread (the thread count changes the
    model's float results)."""
    out = str(tmp_path_factory.mktemp("single") / "one.zarr")
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = CliRunner().invoke(main, ["record", "--out", out, *ARGS])
    finally:
        torch.set_num_threads(n_threads)
    assert res.exit_code == 0, res.output
    return out


@pytest.mark.slow
def test_two_processes_equal_one_bitwise(single, tmp_path):
    out = str(tmp_path / "two.zarr")
    r = subprocess.run(launch(out, "torchrun"), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("recorded ") == 1  # process 0 reports for the run
    assert_same_store(single, out)


@pytest.mark.slow
def test_killing_one_process_then_rerunning_completes_the_store(single, tmp_path):
    """Process 1 is held before its third chunk write (tests/stalled_cli.py), so the store cannot complete
    before the kill lands, however loaded the machine."""
    out, mark = str(tmp_path / "killed.zarr"), tmp_path / "stalled"
    env = {**ENV, "STALL_RANK": "1", "STALL_AT": "saev_store.store:Store.write_block", "STALL_AFTER": "2", "STALL_MARK": str(mark)}
    proc = subprocess.Popen(launch(out, script=(STALLED_CLI, "saev_store.cli")), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not mark.exists():
            assert proc.poll() is None, "the launch ended before process 1 reached its third chunk"
            time.sleep(0.02)
        os.kill(int(mark.read_text()), signal.SIGKILL)  # the held worker; the launcher then stops the other
        proc.wait(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    st = open_store(out)
    assert not st.complete and 2 <= st.done().sum() < st.n_chunks
    r = subprocess.run(launch(out, "accelerate"), env=ENV, capture_output=True, text=True)  # the other launcher resumes it
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_store(single, out)
