"""What `saev-train`'s options turn into: the TrainConfig and SAEs a command line asks for (the run
itself is replaced by a stub that records its config), sweep files against flags, and resume checks."""

import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_store

import trainers.run
from saev_store.errors import UserError
from saev_store.loaders import DEFAULT_BUFFER_MB, DEFAULT_N_READERS
from trainers.cli import main
from trainers.config import SAEConfig, TrainConfig


@pytest.fixture
def store(tmp_path, rng):
    return make_store(tmp_path / "s.zarr", {"h": rng.normal(size=(8, 5, 16)).astype(np.float32)}).path


@pytest.fixture
def configs(monkeypatch):
    """The TrainConfig each `saev-train` invocation would run, instead of running it."""
    seen = []

    def fake_run(cfg, resume=False):
        seen.append(cfg)
        import pathlib

        pathlib.Path(cfg.out_dpath).mkdir(parents=True, exist_ok=True)
        (pathlib.Path(cfg.out_dpath) / "table.md").write_text("")
        return []

    monkeypatch.setattr(trainers.run, "run_training", fake_run)
    return seen


def _invoke(store, tmp_path, *args):
    return CliRunner().invoke(main, [store, "--hook", "h", "--out", str(tmp_path / "run"), *args])


def _saes(cfg):
    return sorted((s.arch, s.d_sae, s.l1 if s.arch == "relu" else None, s.k, s.lr, s.aux_coef, s.dead_after)
                  for s in cfg.saes)


def test_sweep_keeps_aux_coef_and_dead_after(store, tmp_path, configs):
    sweep = tmp_path / "sweep.toml"
    sweep.write_text('arch = "topk"\nk = [4, 8]\nwidth = "2x"\n')
    r = _invoke(store, tmp_path, "--sweep", str(sweep), "--aux-coef", "0.5", "--dead-after", "77")
    assert r.exit_code == 0, r.output
    (cfg,) = configs
    assert [(s.aux_coef, s.dead_after) for s in cfg.saes] == [(0.5, 77), (0.5, 77)]


def test_sweep_file_defaults_are_the_flag_defaults(store, tmp_path, configs):
    sweep = tmp_path / "sweep.toml"
    sweep.write_text('arch = "relu"\n')
    assert _invoke(store, tmp_path, "--sweep", str(sweep)).exit_code == 0
    assert _invoke(store, tmp_path).exit_code == 0
    from_file, from_flags = configs
    assert _saes(from_file) == _saes(from_flags) and len(from_flags.saes) == 9


def test_trainer_loader_defaults_are_the_loaders(store, tmp_path, configs):
    assert _invoke(store, tmp_path).exit_code == 0
    (cfg,) = configs
    assert (cfg.buffer_mb, cfg.n_readers) == (DEFAULT_BUFFER_MB, DEFAULT_N_READERS)
    api = TrainConfig(saes=(SAEConfig("a", 4, 8),))
    assert (api.buffer_mb, api.n_readers) == (DEFAULT_BUFFER_MB, DEFAULT_N_READERS)


def test_resume_with_another_buffer_is_refused(store, tmp_path):
    """buffer_mb changes the shuffle order (shown on the loader), so a resume with another one is refused."""
    from saev_store.loaders import ShuffledLoader

    orders = []
    for mb in (0.002, 0.004):
        with ShuffledLoader(store, "h", batch_size=4, tokens="all", buffer_mb=mb, with_coords=True) as loader:
            orders.append(np.concatenate([c.numpy() for _, c in loader]))
    assert not np.array_equal(*orders)
    cfg = TrainConfig(saes=(SAEConfig("a", 16, 32),), out_dpath=str(tmp_path / "run"), store=store, hook="h", buffer_mb=0.002)
    trainers.run._open_run_dir(cfg, resume=False)
    with pytest.raises(UserError, match="buffer_mb"):
        trainers.run._open_run_dir(dataclasses.replace(cfg, buffer_mb=0.004), resume=True)
    trainers.run._open_run_dir(dataclasses.replace(cfg, n_readers=1, quiet=True), resume=True)  # these do not change results
    assert json.loads((tmp_path / "run" / "run.json").read_text())["config"]["buffer_mb"] == 0.002


def test_a_flag_and_the_sweep_file_setting_one_key_is_an_error(store, tmp_path, configs):
    sweep = tmp_path / "sweep.toml"
    sweep.write_text('arch = "topk"\nk = 4\n[[sae]]\naux_coef = 0.1\n')
    r = _invoke(store, tmp_path, "--sweep", str(sweep), "--aux-coef", "0.5")
    assert r.exit_code == 2 and "--aux-coef" in r.output and "aux_coef" in r.output and not configs


@pytest.mark.parametrize("args,named", [
    (("--arch", "topk", "--k", "4", "--l1", "1"), "--l1"),            # relu-only flag, no relu SAE
    (("--k", "4", "--arch", "relu"), "--k"),
    (("--aux-coef", "0.1"), "--aux-coef"),                             # default arch relu: no auxiliary loss
    (("--lr-min-frac", "0.1"), "--lr-min-frac"),                       # constant schedule
    (("--n-patches", "4096", "--n-epochs", "2"), "--n-epochs"),         # the budget is n_patches
    (("--n-patches", "4096", "--n-epochs", "1"), "--n-epochs"),         # even at its default value, when given
])
def test_a_flag_that_would_do_nothing_is_an_error(store, tmp_path, configs, args, named):
    r = _invoke(store, tmp_path, *args)
    assert r.exit_code == 2 and named in r.output and "Traceback" not in r.output and not configs, r.output


def test_sweep_entry_keys_must_apply(store, tmp_path, configs):
    sweep = tmp_path / "sweep.toml"
    sweep.write_text('[[sae]]\narch = "topk"\nk = 4\nl1 = 2\n')
    r = _invoke(store, tmp_path, "--sweep", str(sweep))
    assert r.exit_code == 2 and "l1" in r.output
    sweep.write_text('l1 = 2\n[[sae]]\narch = "topk"\nk = 4\n[[sae]]\narch = "relu"\n')  # used by the relu entry
    assert _invoke(store, tmp_path, "--sweep", str(sweep)).exit_code == 0
    sweep.write_text('aux_coef = 0.5\n[[sae]]\narch = "relu"\n')
    r = _invoke(store, tmp_path, "--sweep", str(sweep))
    assert r.exit_code == 2 and "aux_coef" in r.output


def test_sae_flags_are_a_product_and_name_what_varies(store, tmp_path, configs):
    assert _invoke(store, tmp_path, "--arch", "topk", "--k", "4,8", "--aux-coef", "0.1,0.2", "--width", "2x").exit_code == 0
    (cfg,) = configs
    assert sorted((s.k, s.aux_coef) for s in cfg.saes) == [(4, 0.1), (4, 0.2), (8, 0.1), (8, 0.2)]
    assert len({s.name for s in cfg.saes}) == 4 and all("aux_coef" in s.name for s in cfg.saes)


def test_unused_sae_fields_are_recorded_as_zero_and_refused_when_set():
    assert SAEConfig("t", 4, 8, "topk", k=2).l1 == 0.0 and SAEConfig("r", 4, 8).aux_coef == 0.0
    with pytest.raises(UserError, match="l1=3 is for relu"):
        SAEConfig("t", 4, 8, "topk", k=2, l1=3.0)
