"""A bank of SAEs trained together equals the same SAEs trained one at a time by an independent,
plain implementation (one nn.Parameter set per SAE, torch.optim.Adam), on the same batches."""

import math

import numpy as np
import pytest
import torch

from trainers.config import SAEConfig, TrainConfig
from trainers.optim import BankAdam
from trainers.sae import SAEBank
from trainers.schedules import lr_factor, sparsity_factor
from trainers.train import init_b_dec, peak_lrs, train_step

torch.set_num_threads(2)


class RefSAE:
    """The textbook single SAE, written independently of trainers.sae."""

    def __init__(self, w: dict, cfg: SAEConfig, threshold: float = 0.0):
        self.p = {k: torch.nn.Parameter(v.clone().double()) for k, v in w.items() if k != "threshold"}
        self.cfg = cfg
        self.since = torch.zeros(cfg.d_sae, dtype=torch.int64)
        self.threshold, self.n_thr = threshold, 0
        self.opt = None

    def latents(self, x):
        p, c = self.p, self.cfg
        pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
        h = torch.relu(pre)
        if c.arch == "relu":
            return pre, h, None
        if c.arch == "topk":
            vals, idx = h.topk(c.k, dim=-1)
            return pre, torch.zeros_like(h).scatter(-1, idx, vals), None
        flat = h.reshape(-1)
        vals, idx = flat.topk(c.k * x.shape[0])
        z = torch.zeros_like(flat).scatter(0, idx, vals).view_as(h)
        return pre, z, float(vals[vals > 0].min().detach())

    def step(self, x, lr, l1):
        p, c = self.p, self.cfg
        if self.opt is None:
            self.opt = torch.optim.Adam(p.values(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
        for gr in self.opt.param_groups:
            gr["lr"] = lr
        pre, z, kept_min = self.latents(x)
        x_hat = z @ p["W_dec"] + p["b_dec"]
        loss = (x - x_hat).pow(2).sum(-1).mean()
        if c.arch == "relu":
            loss = loss + l1 * z.abs().sum(-1).mean()
        else:
            dead = self.since >= c.dead_after
            if dead.any():
                k_aux = min(c.n_aux, c.d_sae)
                n_dead = int(dead.sum())
                k_eff = min(k_aux, n_dead)
                vals, idx = pre.masked_fill(~dead, -math.inf).topk(k_eff, dim=-1)
                z_aux = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
                resid = (x - x_hat).detach()
                loss = loss + c.aux_coef * min(n_dead / k_aux, 1.0) * (z_aux @ p["W_dec"] - resid).pow(2).sum(-1).mean()
        self.opt.zero_grad()
        loss.backward()
        w = p["W_dec"].detach()
        g = p["W_dec"].grad
        g -= (g * w).sum(-1, keepdim=True) * w
        w_old = w.clone()
        self.opt.step()
        with torch.no_grad():
            delta = p["W_dec"] - w_old
            delta -= (delta * w_old).sum(-1, keepdim=True) * w_old
            p["W_dec"].copy_(w_old + delta)
            p["W_dec"] /= p["W_dec"].norm(dim=-1, keepdim=True)
        fired = (z > 0).any(0)
        self.since += x.shape[0]
        self.since[fired] = 0
        if kept_min is not None:
            self.threshold = kept_min if self.n_thr == 0 else 0.99 * self.threshold + 0.01 * kept_min
            self.n_thr += 1


def _saes(d_in):
    out = []
    for wi, w in enumerate((16, 32, 48)):
        out.append(SAEConfig(f"r{w}", d_in, w, "relu", l1=0.5 * (wi + 1), lr=3e-3, seed=wi))
        out.append(SAEConfig(f"t{w}", d_in, w, "topk", l1=0, k=3 + wi, lr=2e-3, seed=10 + wi, dead_after=64, aux_k=5))
        out.append(SAEConfig(f"b{w}", d_in, w, "batchtopk", l1=0, k=2 + wi, lr=1e-3, seed=20 + wi, dead_after=64))
    return out


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("chunk_bytes", [8 << 20, 1], ids=["whole-group", "member-chunks"])
def test_bank_equals_one_at_a_time(fuse, chunk_bytes, monkeypatch):
    """Whole groups at once (as on a GPU) and one member at a time, with Adam in one-row slices (as on
    a CPU with wide SAEs)."""
    import trainers.optim as optim_mod
    import trainers.sae as sae_mod

    monkeypatch.setattr(sae_mod, "CPU_CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(optim_mod, "CPU_SLICE_BYTES", chunk_bytes)
    d_in, B, n_steps = 8, 32, 12
    saes = _saes(d_in)
    cfg = TrainConfig(saes=tuple(saes), batch_size=B, warmup_steps=3, l1_warmup_steps=4, schedule="cosine",
                      fuse_encoders=fuse, quiet=True)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(B, d_in, generator=gen) * torch.linspace(0.5, 2, d_in) + 0.3 for _ in range(n_steps)]

    bank = SAEBank(saes, fuse)
    refs = {c.name: RefSAE(bank.member_weights(c.name), c) for c in saes}
    opt = BankAdam(bank)
    peak = peak_lrs(bank, cfg, "cpu")
    init_b_dec(bank, batches[0], "mean")
    for r in refs.values():
        with torch.no_grad():
            r.p["b_dec"].copy_(batches[0].double().mean(0))
    for step, x in enumerate(batches):
        train_step(bank, opt, x, step, n_steps, cfg, peak)
        for c in saes:
            refs[c.name].step(x.double(), c.lr * lr_factor(step, n_steps, 3, "cosine"), c.l1 * sparsity_factor(step, 4))
    # Several topk latents went dead during the run, so the auxiliary loss was exercised.
    assert any(int((r.since >= 64).sum()) > 0 for n, r in refs.items() if n.startswith("t"))
    for c in saes:
        got = bank.member_weights(c.name)
        for k, v in refs[c.name].p.items():
            np.testing.assert_allclose(got[k].double().numpy(), v.detach().numpy(), rtol=2e-4, atol=2e-5, err_msg=f"{c.name}.{k}")
        if c.arch == "batchtopk":
            gi, i = bank.index[c.name]
            assert bank.groups[gi].threshold[i].item() == pytest.approx(refs[c.name].threshold, rel=1e-4)


def test_decoder_unit_norm_and_update_tangent(monkeypatch):
    """After every step the decoder rows have unit norm; the step applied before renormalizing has no
    component along the rows it started from (checked in float64 by brute force)."""
    import trainers.fused as fused_mod

    d_in, B = 6, 16
    saes = [SAEConfig("a", d_in, 12, "relu", l1=1.0, lr=1e-2, seed=1), SAEConfig("b", d_in, 20, "topk", k=3, lr=1e-2, seed=2)]
    cfg = TrainConfig(saes=tuple(saes), batch_size=B, warmup_steps=0, l1_warmup_steps=0, quiet=True)
    bank = SAEBank(saes)
    opt = BankAdam(bank)
    peak = peak_lrs(bank, cfg, "cpu")
    seen = []
    real = fused_mod.renormalize_rows_

    def spy(w):
        seen.append(w.detach().double().clone())
        return real(w)

    monkeypatch.setattr(fused_mod, "renormalize_rows_", spy)
    gen = torch.Generator().manual_seed(3)
    for step in range(5):
        before = [g.W_dec.detach().double().clone() for g in bank.groups]
        seen.clear()
        train_step(bank, opt, torch.randn(B, d_in, generator=gen) * 3, step, 5, cfg, peak)
        for w0, w_pre, g in zip(before, seen, bank.groups):
            delta = w_pre - w0
            assert delta.abs().max() > 1e-6  # the decoder did move
            np.testing.assert_allclose((delta * w0).sum(-1).numpy(), 0.0, atol=1e-6)
            np.testing.assert_allclose(g.W_dec.detach().double().norm(dim=-1).numpy(), 1.0, atol=1e-6)


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("chunk_bytes", [8 << 20, 1], ids=["whole-group", "member-chunks"])
def test_hand_gradients_equal_autograd(fuse, chunk_bytes, monkeypatch):
    """The training step's hand-written gradient (`train_grads`) against autograd through the plain
    forward pass, in float64, with a non-zero decoder bias and every latent dead (auxiliary loss on)."""
    import trainers.sae as sae_mod

    monkeypatch.setattr(sae_mod, "CPU_CHUNK_BYTES", chunk_bytes)
    d_in, B = 6, 40
    saes = [SAEConfig("r", d_in, 24, "relu", l1=0.7, seed=1), SAEConfig("t", d_in, 24, "topk", k=3, seed=2, aux_k=4),
            SAEConfig("b", d_in, 24, "batchtopk", k=2, seed=3), SAEConfig("r2", d_in, 24, "relu", l1=0.0, seed=4)]
    bank = SAEBank(saes, fuse).double()
    g = bank.groups[0]
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        g.b_dec.copy_(torch.randn(g.b_dec.shape, generator=gen, dtype=torch.float64))
        g.b_enc.copy_(torch.randn(g.b_enc.shape, generator=gen, dtype=torch.float64) * 0.1)
    g.tokens_since_fired.fill_(10**7)
    x = torch.randn(B, d_in, generator=gen, dtype=torch.float64)
    l1 = torch.tensor([0.7, 0.0, 0.0, 0.0], dtype=torch.float64)
    got = g.train_grads(x, l1, torch.float64)
    hand = {k: p.grad.clone() for k, p in g.named_parameters()}
    for p in g.parameters():
        p.grad = None
    out = g(x, train=True)
    loss = out.mse + l1 * out.l1 + out.aux
    loss.sum().backward()
    assert float(out.aux[1].detach()) > 0 and float(out.aux[2].detach()) > 0
    torch.testing.assert_close(got.stats.loss, loss.detach(), rtol=1e-12, atol=1e-12)
    for k, p in g.named_parameters():
        torch.testing.assert_close(hand[k], p.grad, rtol=1e-10, atol=1e-10, msg=k)
