"""The training step's fused stages (trainers/fused.py): each eager stage against a brute-force
float64 formula, and the torch.compile'd stages against the eager ones, stage by stage and over
whole training steps. CUDA runs the inductor form (`benchmarks/train.py` checks it on the device
before timing); here the CPU compiles three stages with inductor and all four with "aot_eager"
(graph capture and functionalization of the in-place updates), see `fused.stages`."""

import numpy as np
import pytest
import torch

from trainers import fused
from trainers.config import SAEConfig, TrainConfig
from trainers.sae import SAEBank
from trainers.train import init_b_dec, peak_lrs, sparsity_coefs, train_step
from trainers.optim import BankAdam

torch.set_num_threads(2)


def _adam_inputs(gen, shape=(3, 40, 16)):
    p = torch.randn(shape, generator=gen)
    p /= p.norm(dim=-1, keepdim=True)
    g, m = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen) * 0.1
    v = torch.rand(shape, generator=gen) * 0.01
    step = 1 / (torch.rand(shape[0], 1, 1, generator=gen) * 100 + 50)  # lr c / (1 - b1^t), per member
    return [p, g, m, v], step, torch.tensor(1e-8)


def test_eager_stages_against_float64_formulas():
    gen = torch.Generator().manual_seed(0)
    pre = torch.randn(3, 50, 20, generator=gen)
    ref = pre.double().clamp_min(0)
    z, sums, counts = fused.relu_stats_(pre.clone(), torch.float64)
    np.testing.assert_array_equal(z.numpy(), ref.float().numpy())
    np.testing.assert_allclose(sums.numpy(), ref.sum(1).numpy(), rtol=1e-6)
    np.testing.assert_array_equal(counts.numpy(), (ref > 0).sum(1).numpy())

    dz = torch.randn(3, 50, 20, generator=gen)
    c = torch.tensor([0.5, 0.0, 2.0])
    want = torch.where(z > 0, dz + c[:, None, None], torch.zeros(()))
    np.testing.assert_array_equal(fused.mask_grad_(dz.clone(), z, c).numpy(), want.numpy())

    (p, g, m, v), step, eps_c = _adam_inputs(gen)
    P, G, M, V, S = (t.double() for t in (p, g, m, v, step))
    M2 = 0.9 * M + 0.1 * G
    V2 = 0.999 * V + 0.001 * G * G
    fused.adam_(p, g, m, v, step, eps_c, 0.9, 0.999)
    np.testing.assert_allclose(p.numpy(), (P - S * M2 / (V2.sqrt() + 1e-8)).numpy(), rtol=1e-5, atol=1e-7)

    (p, g, m, v), step, eps_c = _adam_inputs(gen)
    P, G, M, V, S = (t.double() for t in (p, g, m, v, step))
    Gt = G - (G * P).sum(-1, keepdim=True) * P
    M2, V2 = 0.9 * M + 0.1 * Gt, 0.999 * V + 0.001 * Gt * Gt
    U = S * M2 / (V2.sqrt() + 1e-8)
    U = U - (U * P).sum(-1, keepdim=True) * P
    W = P - U
    fused.adam_decoder_(p, g, m, v, step, eps_c, 0.9, 0.999)
    np.testing.assert_allclose(p.numpy(), (W / W.norm(dim=-1, keepdim=True)).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m.numpy(), M2.numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_inductor_stages_equal_eager():
    """relu_stats_, mask_grad_ and adam_ through inductor's CPU code generator (each ~10 s to compile)."""
    gen = torch.Generator().manual_seed(1)
    comp = fused.stages(True)
    pre = torch.randn(2, 64, 48, generator=gen)
    for got, want in zip(comp.relu_stats_(pre.clone(), torch.float32), fused.relu_stats_(pre.clone(), torch.float32)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    z = pre.clamp_min(0)
    dz = torch.randn(2, 64, 48, generator=gen)
    c = torch.tensor([0.3, 0.0])
    torch.testing.assert_close(comp.mask_grad_(dz.clone(), z, c), fused.mask_grad_(dz.clone(), z, c))
    (p, g, m, v), step, eps_c = _adam_inputs(gen)
    got = [t.clone() for t in (p, g, m, v)]
    comp.adam_(*got, step, eps_c, 0.9, 0.999)
    fused.adam_(p, g, m, v, step, eps_c, 0.9, 0.999)
    for a, b in zip(got, (p, g, m, v)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # lr 0 where the gradient and both moments are 0 (a latent that never fired): p stays, as in torch.optim.Adam.
    p0 = p.clone()
    g.zero_(), m.zero_(), v.zero_()
    comp.adam_(p, g, m, v, torch.zeros_like(step), eps_c, 0.9, 0.999)
    torch.testing.assert_close(p, p0, rtol=0, atol=0)


@pytest.mark.slow
def test_compiled_training_steps_equal_eager():
    """Eight steps of a mixed bank (ReLU, TopK, BatchTopK, JumpReLU, Gated, Matryoshka; two widths) with
    compiled stages (whole tensors, "aot_eager") against the eager stages (cache-sized pieces) from the same start."""
    d_in, B = 8, 32
    saes = [SAEConfig("r", d_in, 24, "relu", l1=0.5, seed=1), SAEConfig("r2", d_in, 24, "relu", l1=2.0, seed=2),
            SAEConfig("t", d_in, 40, "topk", k=3, seed=3, dead_after=32), SAEConfig("b", d_in, 40, "batchtopk", k=2, seed=4),
            SAEConfig("j", d_in, 24, "jumprelu", l0_coef=0.5, seed=5), SAEConfig("g", d_in, 40, "gated", l1=0.5, seed=6),
            SAEConfig("m", d_in, 40, "batchtopk", k=2, seed=7, objective="matryoshka")]
    cfg = TrainConfig(saes=tuple(saes), batch_size=B, warmup_steps=2, l1_warmup_steps=2, quiet=True)
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randn(B, d_in, generator=gen) * 2 for _ in range(8)]
    banks = []
    for st in (fused.EAGER, fused.stages(True, backend="aot_eager")):
        bank = SAEBank(saes)
        opt = BankAdam(bank, stages=st)
        peak, coefs = peak_lrs(bank, cfg, "cpu"), sparsity_coefs(bank, "cpu")
        init_b_dec(bank, batches[0], "mean")
        losses = [train_step(bank, opt, x, i, 8, cfg, peak, coefs).loss for i, x in enumerate(batches)]
        banks.append((bank, torch.stack(losses)))
    (eager, l_e), (comp, l_c) = banks
    torch.testing.assert_close(l_c, l_e, rtol=1e-5, atol=1e-6)
    for (name, a), (_, b) in zip(eager.named_parameters(), comp.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)
    for g in comp.groups:
        torch.testing.assert_close(g.W_dec.norm(dim=-1), torch.ones(g.n, g.d_sae))


@pytest.mark.slow
def test_compiled_pass_with_many_widths_equals_eager():
    """A pass with five widths compiles Adam for 15 shapes (W_enc, b_enc, b_dec of each group): more
    than dynamo's default limit of 8, which with fullgraph=True used to stop the run."""
    saes = [SAEConfig(f"r{w}", 4, w, "relu", l1=0.5, seed=w) for w in (8, 12, 16, 20, 24)]
    cfg = TrainConfig(saes=tuple(saes), batch_size=16, warmup_steps=1, l1_warmup_steps=1, quiet=True)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(5))
    banks = []
    for st in (fused.EAGER, fused.stages(True, backend="aot_eager")):
        bank = SAEBank(saes)
        opt = BankAdam(bank, stages=st)
        init_b_dec(bank, x, "mean")
        for i in range(2):
            train_step(bank, opt, x, i, 2, cfg, peak_lrs(bank, cfg, "cpu"), sparsity_coefs(bank, "cpu"))
        banks.append(bank)
    for (name, a), (_, b) in zip(banks[0].named_parameters(), banks[1].named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)


def test_compile_setting(monkeypatch):
    """--compile auto compiles on CUDA with Triton, runs eagerly (with a warning) without it; "on" is
    refused where it cannot work, naming the fix."""
    import trainers.train as train_mod
    from saev_store.errors import UserError

    base = dict(saes=(SAEConfig("a", 4, 8, "relu"),), quiet=True)
    assert not train_mod.compiled(TrainConfig(**base))  # a CPU: eager
    with pytest.raises(UserError, match="needs a CUDA device"):
        TrainConfig(**base, compile="on")
    monkeypatch.setattr(train_mod, "has_triton", lambda: True)
    assert train_mod.compiled(TrainConfig(**base, device="cuda"))
    assert not train_mod.compiled(TrainConfig(**base, device="cuda", compile="off"))
    monkeypatch.setattr(train_mod, "has_triton", lambda: False)
    with pytest.warns(UserWarning, match="Triton"):
        assert not train_mod.compiled(TrainConfig(**base, device="cuda"))
    with pytest.raises(UserError, match="needs Triton"):
        train_mod.compiled(TrainConfig(**base, device="cuda", compile="on"))
