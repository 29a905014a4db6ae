"""`saev-train` end to end on small stores: outputs, table, export reload, and kill -9 + --resume."""

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
from click.testing import CliRunner
from conftest import make_store

from trainers.cli import main
from trainers.sae_io import load_run

torch.set_num_threads(1)


def _store(tmp_path, rng, n=48, d=16):
    acts = (rng.normal(size=(n, 17, d)) * 2 + 1).astype(np.float32)
    return make_store(tmp_path / "s.zarr", {"h": acts}, images_per_chunk=4, labels=np.arange(n, dtype=np.int32) % 3), acts


def test_cli_trains_nine_and_writes_table(tmp_path, rng):
    st, acts = _store(tmp_path, rng)
    out = tmp_path / "run"
    res = CliRunner().invoke(main, [st.path, "--hook", "h", "--width", "2x,3x,4x", "--l1", "0.3,1,3", "--lr", "3e-3",
                                    "--batch-size", "64", "--n-patches", "1280", "--warmup-steps", "2",
                                    "--l1-warmup-steps", "4", "--held-out", "0.25", "--buffer-mb", "1", "--out", str(out),
                                    "--quiet", "--parallel", "6"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    run = json.loads((out / "run.json").read_text())
    assert len(run["saes"]) == 9 and run["passes_done"] == [0, 1]
    assert "| name |" in res.output and (out / "table.csv").read_text().count("\n") == 10
    saes = load_run(out)
    assert len(saes) == 9
    # The evaluation used the held-out images only: recompute one SAE's FVU from the raw store rows.
    from trainers.run import held_out_mask

    held = held_out_mask(np.ones(48, bool), 0.25, 0)
    x = torch.tensor(acts[held][:, 1:, :].reshape(-1, 16))
    for name, sae in saes.items():
        m = json.loads((out / name / "metrics.json").read_text())
        with torch.no_grad():
            x_hat = sae.decode(sae.encode(x)).double()
        xd = x.double()
        fvu = float(((xd - x_hat) ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum())
        assert m["fvu"] == pytest.approx(fvu, rel=1e-4)
        assert m["n_rows"] == x.shape[0] and 0 < m["l0"] <= sae.d_sae
        assert (out / name / "freq.png").stat().st_size > 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert {json.loads(line)["sae"] for line in lines} == set(run["saes"])


def test_cli_user_errors(tmp_path, rng):
    st, _ = _store(tmp_path, rng)
    r = CliRunner().invoke(main, [st.path, "--hook", "nope", "--out", str(tmp_path / "r")])
    assert r.exit_code == 2 and "hook 'nope'" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, [st.path, "--hook", "h", "--k", "4", "--arch", "relu", "--out", str(tmp_path / "r")])
    assert r.exit_code == 2 and "--k" in r.output
    r = CliRunner().invoke(main, [st.path, "--hook", "h", "--compile", "on", "--out", str(tmp_path / "r")])
    assert r.exit_code == 2 and "--compile on needs a CUDA device" in r.output and "Traceback" not in r.output


def _cmd(store, out, *extra):
    code = "import sys; from trainers.cli import main; sys.exit(main())"
    return [sys.executable, "-c", code, store, "--hook", "h", "--width", "4x", "--k", "3", "--arch",
            "topk", "--batch-size", "32", "--n-patches", "9600", "--warmup-steps", "5", "--ckpt-every", "3",
            "--held-out", "0.2", "--buffer-mb", "1", "--out", str(out), "--quiet", "--dead-after", "200", *extra]


@pytest.mark.slow
def test_kill9_then_resume_equals_uninterrupted(tmp_path, rng):
    st, _ = _store(tmp_path, rng)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    ref, out = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(_cmd(st.path, ref), env=env, check=True, capture_output=True)
    proc = subprocess.Popen(_cmd(st.path, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "ckpt" / "pass0-rank0.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    assert proc.poll() is None, "the run finished before it could be killed; give it more steps"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step_killed = torch.load(ckpt, weights_only=False)["step"]
    assert 0 < step_killed < 300
    r = subprocess.run(_cmd(st.path, out), env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "--resume" in r.stderr  # refuses to overwrite silently
    subprocess.run(_cmd(st.path, out, "--resume"), env=env, check=True, capture_output=True)
    name = json.loads((ref / "run.json").read_text())["saes"][0]
    a = safetensors.torch.load_file(str(ref / name / "sae_weights.safetensors"))
    b = safetensors.torch.load_file(str(out / name / "sae_weights.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not (out / "ckpt").exists()
