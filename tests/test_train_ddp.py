"""Data parallel: two gloo processes, each on half of every batch, take the same steps as one process
on the whole batches (gradients, dead-latent counters and the b_dec init are reduced across ranks;
BatchTopK selects the k * B largest over both ranks' rows, so it equals the one-process step too; JumpReLU
thresholds, Gated magnitudes and Matryoshka prefix draws, functions of (seed, step), agree on both ranks)."""


import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainers.config import SAEConfig, TrainConfig
from trainers.optim import BankAdam
from trainers.sae import SAEBank
from trainers.train import init_b_dec, peak_lrs, train_step

N_STEPS, B, D = 4, 32, 8


def _setup():
    saes = (SAEConfig("r", D, 16, "relu", l1=1.0, lr=5e-3, seed=1),
            SAEConfig("t", D, 16, "topk", k=2, lr=5e-3, seed=2, dead_after=40),
            SAEConfig("b", D, 16, "batchtopk", k=3, lr=5e-3, seed=4),
            SAEConfig("w", D, 24, "relu", l1=0.5, lr=2e-3, seed=3),
            SAEConfig("j", D, 16, "jumprelu", l0_coef=0.5, lr=5e-3, seed=5, bandwidth=0.2),
            SAEConfig("g", D, 24, "gated", l1=0.5, lr=5e-3, seed=6),
            SAEConfig("m", D, 24, "batchtopk", k=2, lr=5e-3, seed=7, objective="matryoshka"))
    cfg = TrainConfig(saes=saes, batch_size=B, warmup_steps=1, l1_warmup_steps=2, quiet=True)
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(B, D, generator=g) * 2 + 1 for _ in range(N_STEPS)]
    return saes, cfg, data


def _train(rows_of):
    saes, cfg, data = _setup()
    torch.set_num_threads(1)
    bank = SAEBank(saes)
    opt = BankAdam(bank)
    peak = peak_lrs(bank, cfg, "cpu")
    init_b_dec(bank, rows_of(data[0]), "mean")
    for step, x in enumerate(data):
        train_step(bank, opt, rows_of(x), step, N_STEPS, cfg, peak)
    return bank


def _worker(rank, world, init_fpath, out_fpath):
    dist.init_process_group("gloo", init_method=f"file://{init_fpath}", rank=rank, world_size=world)
    try:
        half = B // world
        bank = _train(lambda x: x[rank * half : (rank + 1) * half])
        if rank == 0:
            torch.save(bank.state_dict(), out_fpath)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tmp_path):
    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "pg"), str(out)), nprocs=2, join=True)
    ddp = torch.load(out)
    single = _train(lambda x: x).state_dict()
    for k, v in single.items():
        np.testing.assert_allclose(ddp[k].double().numpy(), v.double().numpy(), rtol=1e-5, atol=1e-6, err_msg=k)
    assert int((single["groups.0.tokens_since_fired"] > 0).sum()) > 0  # the counters were exercised
