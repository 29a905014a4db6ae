"""`saev-train` end to end on small stores: outputs, table, export reload, and kill -9 + --resume."""

import csv
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
    _assert_held_out_metrics(out, saes, acts)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert {json.loads(line)["sae"] for line in lines} == set(run["saes"])


def _assert_held_out_metrics(out, saes, acts, held_out=0.25):
    """The evaluation used the held-out images only: every SAE's FVU recomputed from the raw store rows
    through its export, L0 in range, a histogram written."""
    from trainers.run import held_out_mask

    held = held_out_mask(np.ones(acts.shape[0], bool), held_out, 0)
    x = torch.tensor(acts[held][:, 1:, :].reshape(-1, acts.shape[-1]))
    for name, sae in saes.items():
        m = json.loads((out / name / "metrics.json").read_text())
        with torch.no_grad():
            x_hat = sae.decode(sae.encode(x)).double()
        xd = x.double()
        fvu = float(((xd - x_hat) ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum())
        assert m["fvu"] == pytest.approx(fvu, rel=1e-4), name
        assert m["n_rows"] == x.shape[0] and 0 < m["l0"] <= sae.d_sae
        assert (out / name / "freq.png").stat().st_size > 0


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
    ckpt = out / "ckpt" / "pass0.pt"
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


SWEEP_ALL = """
width = ["2x"]
lr = 3e-3
[[sae]]
arch = "relu"
l1 = 1.0
[[sae]]
arch = ["topk", "batchtopk"]
k = 4
[[sae]]
arch = "jumprelu"
l0_coef = 0.5
bandwidth = 0.1
[[sae]]
arch = "gated"
l1 = 1.0
[[sae]]
arch = ["relu", "topk", "batchtopk"]
objective = "matryoshka"
l1 = 1.0
k = 4
prefixes = [8]
"""


@pytest.mark.slow
def test_cli_sweep_of_every_architecture_then_tools(tmp_path, rng):
    """One saev-train pass over a sweep file holding one SAE of each architecture (the Matryoshka objective on
    its three bases): names and the table say the architecture, the held-out FVU of each is recomputed from
    the raw store rows through its export, metrics.jsonl logs the new loss terms, and `saev-tools topk`
    on the run writes, for every SAE, the brute-force statistics of `sae.encode`; render and report run."""
    from tools.cli import main as tools_main
    from tools.topk import load_topk
    from tools_helpers import assert_matches_oracle, oracle_stats

    st, acts = _store(tmp_path, rng)
    sweep = tmp_path / "all.toml"
    sweep.write_text(SWEEP_ALL)
    out = tmp_path / "run"
    res = CliRunner().invoke(main, [st.path, "--hook", "h", "--sweep", str(sweep), "--batch-size", "64", "--n-patches", "1280",
                                    "--warmup-steps", "2", "--l1-warmup-steps", "4", "--held-out", "0.25", "--buffer-mb", "1",
                                    "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    run = json.loads((out / "run.json").read_text())
    assert run["passes_done"] == [0] and len(run["saes"]) == 8
    table = {r["name"]: r for r in csv.DictReader((out / "table.csv").open())}
    want = {"relu-32-l1_1-lr_0.003": "relu", "topk-32-k4-lr_0.003": "topk", "batchtopk-32-k4-lr_0.003": "batchtopk",
            "jumprelu-32-l0_0.5-lr_0.003": "jumprelu", "gated-32-l1_1-lr_0.003": "gated",
            "matryoshka-relu-32-l1_1-lr_0.003": "matryoshka-relu", "matryoshka-topk-32-k4-lr_0.003": "matryoshka-topk",
            "matryoshka-batchtopk-32-k4-lr_0.003": "matryoshka-batchtopk"}
    assert {n: r["arch"] for n, r in table.items()} == want
    assert table["jumprelu-32-l0_0.5-lr_0.003"]["sparsity"] == "l0_coef=0.5"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = {r["sae"]: r for r in rows}
    assert all(last[n]["nested"] > 0 for n in want if n.startswith("matryoshka"))
    assert all(last[n]["nested"] == 0 for n in want if not n.startswith("matryoshka"))
    assert last["gated-32-l1_1-lr_0.003"]["aux"] > 0 and last["jumprelu-32-l0_0.5-lr_0.003"]["sparsity"] > 0
    saes = load_run(out)
    _assert_held_out_metrics(out, saes, acts)

    r = CliRunner().invoke(tools_main, ["topk", str(out), "-k", "3", "--quiet"])
    assert r.exit_code == 0, r.output
    patches = torch.tensor(acts[:, 1:, :])
    labels = np.arange(48, dtype=np.int32) % 3
    for name, sae in saes.items():
        with torch.no_grad():
            z = sae.encode(patches.reshape(-1, 16)).reshape(48, 16, -1).double().numpy()
        data = load_topk(out / "topk", name)
        assert_matches_oracle(data.stats, oracle_stats(z, np.arange(48), labels, k=3, tau=0.2, n_classes=3), entropy_rtol=1e-6)
    r = CliRunner().invoke(tools_main, ["render", str(out / "topk"), "--sae", "gated-32-l1_1-lr_0.003", "--latents", "0",
                                        "--quiet"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(tools_main, ["report", str(out / "topk"), "--max-pages", "2", "--quiet"])
    assert r.exit_code == 0, r.output


def test_cli_flags_of_new_architectures(tmp_path, rng):
    """--arch jumprelu/gated with their sparsity lists and options, --objective matryoshka with --prefixes or
    --n-prefixes, reach the SAE configs; bad combinations are one clear error."""
    st, _ = _store(tmp_path, rng)
    base = [st.path, "--hook", "h", "--width", "2x", "--lr", "3e-3", "--batch-size", "64", "--n-patches", "64",
            "--held-out", "0.25", "--buffer-mb", "1", "--quiet"]
    runs = {
        "j": (["--arch", "jumprelu", "--l0-coef", "0.5,2", "--bandwidth", "0.1", "--init-threshold", "0.02"],
              [{"arch": "jumprelu", "l0_coef": 0.5, "bandwidth": 0.1, "init_threshold": 0.02},
               {"arch": "jumprelu", "l0_coef": 2.0}]),
        "g": (["--arch", "gated", "--l1", "3"], [{"arch": "gated", "l1": 3.0}]),
        "m": (["--arch", "batchtopk", "--k", "4", "--objective", "matryoshka", "--prefixes", "4,12"],
              [{"arch": "batchtopk", "objective": "matryoshka", "k": 4, "prefixes": [4, 12]}]),
        "n": (["--l1", "2", "--objective", "matryoshka", "--n-prefixes", "5"],
              [{"arch": "relu", "objective": "matryoshka", "prefixes": [], "n_prefixes": 5}]),
    }
    for name, (flags, want) in runs.items():
        res = CliRunner().invoke(main, base + flags + ["--out", str(tmp_path / name)])
        assert res.exit_code == 0, res.output + repr(res.exception)
        got = json.loads((tmp_path / name / "run.json").read_text())["config"]["saes"]
        assert len(got) == len(want) and all(g[k] == v for g, w in zip(got, want) for k, v in w.items())
    for flags, msg in ((["--arch", "jumprelu", "--k", "4"], "--l0-coef"), (["--prefixes", "8"], "matryoshka"),
                       (["--arch", "gated", "--objective", "matryoshka"], "matryoshka objective trains")):
        r = CliRunner().invoke(main, base + flags + ["--out", str(tmp_path / "bad")])
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, r.output
