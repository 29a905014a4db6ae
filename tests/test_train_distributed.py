"""`saev-train` data parallel through the CLI under both launchers the README shows (2 CPU processes,
gloo), end to end: the run equals one process trained on each step's combined batch (both ranks' rows);
killing the whole job and resuming it equals the uninterrupted run bitwise; and the run directory is
decided by process 0 alone, so a process that arrives late (after process 0 created the directory)
follows instead of refusing it, and a refusal is one message from every process."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import make_store

from saev_store.store import open_store
from trainers.config import TrainConfig
from trainers.export import fold_normalization
from trainers.run import held_out_mask
from trainers.train import train_pass

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
STALLED_CLI = os.path.join(os.path.dirname(__file__), "stalled_cli.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
# Three architectures (every cross-rank reduction: gradients, dead-latent counters, BatchTopK's threshold);
# 24 steps of 32 rows cross an epoch of the 36 training images; checkpoints every 5 steps.
N_STEPS, BATCH = 24, 32
SAE_ARGS = ["--hook", "h", "--width", "2x", "--arch", "relu,topk,batchtopk", "--k", "3", "--l1", "1", "--lr", "3e-3",
            "--batch-size", str(BATCH), "--n-patches", str(N_STEPS * BATCH), "--warmup-steps", "3", "--l1-warmup-steps", "4",
            "--ckpt-every", "5", "--held-out", "0.25", "--buffer-mb", "1", "--dead-after", "200", "--quiet"]


def cmd(launcher, store, out, *extra, script=("-m", "trainers.cli")):
    return [*launcher, *script, store, *SAE_ARGS, "--out", str(out), *extra]


def weights(run):
    names = json.loads((run / "run.json").read_text())["saes"]
    return {n: safetensors.torch.load_file(str(run / n / "sae_weights.safetensors")) for n in names}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(0)
    acts = (rng.normal(size=(48, 17, 16)) * 2 + 1).astype(np.float32)
    st = make_store(tmp_path_factory.mktemp("store") / "s.zarr", {"h": acts}, images_per_chunk=4,
                    labels=np.arange(48, dtype=np.int32) % 3)
    return st.path


@pytest.fixture(scope="module")
def uninterrupted(store, tmp_path_factory):
    """The run under `accelerate launch` (its CPU form)."""
    out = tmp_path_factory.mktemp("acc") / "run"
    r = subprocess.run(cmd(ACCELERATE, store, out), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("| name |") == 1 and r.stderr.count("training 3 SAEs") == 1  # process 0 reports
    return out


@pytest.mark.slow
def test_cli_data_parallel_equals_one_process_on_the_combined_batch(store, uninterrupted):
    from saev_store.loaders import ShuffledLoader

    run = json.loads((uninterrupted / "run.json").read_text())
    assert run["world_size"] == 2 and not (uninterrupted / "ckpt").exists()
    cfg = TrainConfig.from_dict(run["config"])
    st = open_store(store)
    normalizer = st.normalizer(cfg.hook, cfg.tokens)
    train_mask = st.valid() & ~held_out_mask(st.valid(), cfg.held_out_frac, cfg.seed)
    # Each rank's batches, as its loader yields them under the launcher; one process trains on both at once.
    ranks = [list(ShuffledLoader(st, cfg.hook, batch_size=BATCH // 2, tokens=cfg.tokens, normalize=False, seed=cfg.seed,
                                 n_rows=N_STEPS * BATCH, buffer_mb=cfg.buffer_mb, rank=r, world_size=2,
                                 image_mask=train_mask, drop_last=True)) for r in (0, 1)]
    combined = [torch.cat(pair) for pair in zip(*ranks)]
    assert len(combined) == N_STEPS
    got = weights(uninterrupted)
    torch.set_num_threads(1)
    for saes in cfg.passes():
        bank, n_done = train_pass(saes, cfg, combined, N_STEPS, normalizer)
        assert n_done == N_STEPS
        for c in saes:
            want = fold_normalization(bank.member_weights(c.name), normalizer)
            assert set(want) == set(got[c.name])
            for k, v in want.items():
                np.testing.assert_allclose(got[c.name][k].double().numpy(), v.double().numpy(), rtol=1e-4, atol=1e-5,
                                           err_msg=f"{c.name} {k}")


@pytest.mark.slow
def test_kill9_of_the_whole_job_then_resume_equals_uninterrupted(store, uninterrupted, tmp_path):
    out, mark = tmp_path / "killed", tmp_path / "stalled"
    # Process 0 holds before writing its third checkpoint (step 15), so the job is certainly mid-pass when
    # killed; process 1 enters run_training only after process 0 has written run.json, the interleaving in
    # which it used to find "already holds a training run" and stop.
    env = {**ENV, "STALL_RANK": "0", "STALL_AT": "trainers.train:save_checkpoint", "STALL_AFTER": "2",
           "STALL_MARK": str(mark), "LATE_RANK": "1", "LATE_AT": "trainers.run:run_training",
           "LATE_UNTIL": str(out / "run.json")}
    proc = subprocess.Popen(cmd(TORCHRUN, store, out, script=(STALLED_CLI, "trainers.cli")), env=env,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while not mark.exists():
            if proc.poll() is not None:
                pytest.fail("the job ended before its third checkpoint:\n" + proc.stdout.read()[-3000:])
            time.sleep(0.02)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both processes: the whole job
        proc.wait()
    ckpt = torch.load(out / "ckpt" / "pass0.pt", weights_only=False)
    assert ckpt["step"] == 10 and ckpt["world_size"] == 2 and len(ckpt["ranks"]) == 2

    r = subprocess.run(cmd(TORCHRUN, store, out), env=ENV, capture_output=True, text=True)
    refusal = f"error: {out} already holds a training run; pass --resume to continue it or choose another --out."
    assert r.returncode != 0 and r.stderr.count(refusal) == 2, r.stderr[-3000:]  # every process, the same line
    assert "Connection closed" not in r.stderr and "exitcode  : 2" in r.stderr  # (torchrun's own report follows)

    r = subprocess.run(cmd(TORCHRUN, store, out, "--resume"), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = weights(uninterrupted), weights(out)
    for name in a:
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), (name, k)
    assert not (out / "ckpt").exists()


def test_a_run_resumes_only_with_the_process_count_it_started_with(store, tmp_path):
    """Which chunks each rank reads depends on the count, so another count would not continue the same run."""
    from saev_store.errors import UserError
    from trainers.config import SAEConfig
    from trainers.run import _open_run_dir

    cfg = TrainConfig(saes=(SAEConfig("a", 16, 32),), out_dpath=str(tmp_path / "run"), store=store, hook="h")
    assert _open_run_dir(cfg, resume=False, world=2)["world_size"] == 2
    with pytest.raises(UserError, match="trained by 2 process.*this run has 1"):
        _open_run_dir(cfg, resume=True)
    assert _open_run_dir(cfg, resume=True, world=2)["passes_done"] == []
