"""Adam at learning rate 0 (the last step of `--schedule cosine` with `lr_min_frac` 0) takes a zero step
on parameters whose gradient has always been 0 (the weights of a latent that never fired), as
`torch.optim.Adam` does, in the eager and the compiled stages; and a whole cosine run with a latent held
dead exports finite weights and a finite FVU."""

import csv

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import make_store

from trainers import fused
from trainers.config import SAEConfig, TrainConfig
from trainers.optim import BankAdam
from trainers.sae import SAEBank, SAEGroup

torch.set_num_threads(1)

LRS = ([1e-2, 3e-2], [1e-2, 3e-2], [5e-3, 1e-2], [0.0, 0.0])
"""Per step, the two members' learning rates: a schedule ending at 0."""


def _grads(gen, bank):
    """Random gradients, with latent 0 of every member never firing (its encoder column, encoder bias and
    decoder row get exactly 0) and b_dec's first coordinate never moved."""
    g = bank.groups[0]
    out = {name: torch.randn(p.shape, generator=gen) for name, p in g.named_parameters()}
    out["W_enc"][:, :, 0] = 0
    out["b_enc"][:, 0] = 0
    out["W_dec"][:, 0, :] = 0
    out["b_dec"][:, 0] = 0
    return out


def _run(stages):
    torch.manual_seed(0)
    bank = SAEBank([SAEConfig("a", 5, 7, seed=1), SAEConfig("b", 5, 7, seed=2)])
    g = bank.groups[0]
    opt = BankAdam(bank, stages=stages)
    # torch.optim.Adam on copies of each member's slice, one parameter group per member (its own lr).
    ref = {name: [p.detach()[(slice(None),) * ax + (i,)].clone().requires_grad_() for i in range(2)]
           for name, p in g.named_parameters() for ax in [{"W_enc": 1}.get(name, 0)]}
    torch_opt = torch.optim.Adam([{"params": [ref[n][i] for n in ("W_enc", "b_enc", "b_dec")], "lr": LRS[0][i]}
                                  for i in range(2)], betas=(0.9, 0.999), eps=1e-8)
    gen = torch.Generator().manual_seed(3)
    before_last = None
    for lrs in LRS:
        grads = _grads(gen, bank)
        for name, p in g.named_parameters():
            p.grad = grads[name].clone()
        for i in range(2):
            for n in ("W_enc", "b_enc", "b_dec"):
                ref[n][i].grad = grads[n][(slice(None),) * (1 if n == "W_enc" else 0) + (i,)].clone()
            torch_opt.param_groups[i]["lr"] = lrs[i]
        before_last = g.W_dec.detach().clone()
        opt.step([torch.tensor(lrs)])
        torch_opt.step()
    return g, ref, before_last


@pytest.mark.parametrize("compiled", [False, True])
def test_adam_takes_a_zero_step_at_lr_zero(compiled):
    stages = fused.stages(True, backend="aot_eager") if compiled else fused.EAGER
    g, ref, w_dec_before = _run(stages)
    for name, p in g.named_parameters():
        assert torch.isfinite(p).all(), name
    for name, ax in (("W_enc", 1), ("b_enc", 0), ("b_dec", 0)):
        for i in range(2):
            got = g.state_dict()[name].select(ax, i)
            torch.testing.assert_close(got, ref[name][i].detach(), rtol=1e-5, atol=1e-6, msg=f"{name}[{i}]")
    # The decoder at lr 0: unchanged (up to the renormalization's rounding of unit rows).
    torch.testing.assert_close(g.W_dec.detach(), w_dec_before, rtol=0, atol=1e-6)


def test_cosine_run_with_a_dead_latent_exports_finite_weights(tmp_path, rng, monkeypatch):
    from trainers.run import run_training

    acts = rng.normal(size=(40, 5, 6)).astype(np.float32)
    st = make_store(tmp_path / "s.zarr", {"h": acts}, images_per_chunk=8)
    reset = SAEGroup.reset_parameters

    def reset_with_dead_latent(self):
        reset(self)
        with torch.no_grad():
            self.b_enc[:, 0] = -1e4  # latent 0 never fires: its weights never get a gradient

    monkeypatch.setattr(SAEGroup, "reset_parameters", reset_with_dead_latent)
    cfg = TrainConfig(saes=(SAEConfig("relu", 6, 12, l1=0.5, lr=1e-2),), out_dpath=str(tmp_path / "run"), store=st.path,
                      hook="h", batch_size=16, n_patches=320, warmup_steps=2, l1_warmup_steps=2, schedule="cosine",
                      held_out_frac=0.25, buffer_mb=1, quiet=True)
    run_training(cfg)
    w = safetensors.torch.load_file(str(tmp_path / "run" / "relu" / "sae_weights.safetensors"))
    assert float(w["b_enc"][0]) < -1e3  # the latent stayed dead, so the test tests what it says
    for k, v in w.items():
        assert torch.isfinite(v).all(), k
    (row,) = csv.DictReader(open(tmp_path / "run" / "table.csv"))
    assert np.isfinite(float(row["fvu"])) and float(row["l0"]) > 0
