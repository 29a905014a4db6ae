"""Metrics, dictionary recovery, export/reload and checkpoint resume of the trainer, on in-memory data."""

import json

import numpy as np
import pytest
import safetensors.torch
import torch

from saev_store.stats import Normalizer
from trainers.config import SAEConfig, TrainConfig
from trainers.export import export_sae
from trainers.metrics import FVUAccumulator, SAEAccumulator
from trainers.sae_io import load_run, load_sparsity
from trainers.sweep import expand, from_toml, parse_width
from trainers.train import train_pass

torch.set_num_threads(1)


def test_fvu_oracles(rng):
    x = rng.normal(size=(300, 7)) * 3 + 5
    mean = x.mean(axis=0)
    acc_mean, acc_perfect, acc_noisy = FVUAccumulator(7), FVUAccumulator(7), FVUAccumulator(7)
    noisy = x + rng.normal(size=x.shape)
    for a in range(0, 300, 64):  # streamed in uneven batches
        acc_mean.update(x[a : a + 64], np.broadcast_to(mean, x[a : a + 64].shape))
        acc_perfect.update(x[a : a + 64], x[a : a + 64])
        acc_noisy.update(torch.tensor(x[a : a + 64]), torch.tensor(noisy[a : a + 64]))
    assert acc_mean.fvu == pytest.approx(1.0, abs=1e-12)
    assert acc_perfect.fvu == 0.0
    brute = ((x - noisy) ** 2).sum() / ((x - mean) ** 2).sum()
    assert acc_noisy.fvu == pytest.approx(brute, rel=1e-10)
    assert acc_noisy.mse == pytest.approx(((x - noisy) ** 2).mean(), rel=1e-10)


def test_sae_accumulator_counts(rng):
    z = np.zeros((1000, 5))
    z[:, 0] = 1.0  # dense
    z[:3, 1] = 2.0  # fires on 0.3%
    z[:500, 2] = 0.5
    acc = SAEAccumulator(2, 5)
    x = torch.tensor(rng.normal(size=(1000, 2)))
    acc.update(x, x, torch.tensor(z))
    r = acc.result()
    assert r.n_dead == 2 and r.n_dense == 2 and r.fvu == 0.0
    assert r.l0 == pytest.approx((1000 + 3 + 500) / 1000)
    np.testing.assert_allclose(r.freq, [1.0, 0.003, 0.5, 0, 0])
    assert sum(r.summary()["freq_hist"]["counts"]) == 3


def _dictionary_batches(n_steps, B, d, n_atoms, seed):
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, d, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)

    def gen():
        for _ in range(n_steps):
            mask = torch.rand(B, n_atoms, generator=g) < 3 / n_atoms
            yield (mask * (0.5 + torch.rand(B, n_atoms, generator=g))) @ atoms

    return atoms, gen()


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_recovers_known_sparse_dictionary(arch):
    d, n_atoms, n_steps = 16, 24, 1000
    atoms, batches = _dictionary_batches(n_steps, 256, d, n_atoms, seed=0)
    saes = (SAEConfig("a", d, 48, arch, k=3, lr=1e-2, seed=1),)
    cfg = TrainConfig(saes=saes, batch_size=256, warmup_steps=20, quiet=True, b_dec_init="zeros")
    bank, steps = train_pass(saes, cfg, batches, n_steps)
    assert steps == n_steps
    w_dec = bank.member_weights("a")["W_dec"].double()
    best_cos = (atoms.double() @ w_dec.T).max(dim=1).values
    assert best_cos.mean() >= 0.9, best_cos


def _trained_bank(normalizer, d=12):
    saes = (
        SAEConfig("relu", d, 24, "relu", l1=0.5, lr=5e-3, seed=1),
        SAEConfig("topk", d, 24, "topk", k=4, lr=5e-3, seed=2),
        SAEConfig("btk", d, 36, "batchtopk", k=3, lr=5e-3, seed=3),
    )
    cfg = TrainConfig(saes=saes, batch_size=64, warmup_steps=2, l1_warmup_steps=2, quiet=True)
    g = torch.Generator().manual_seed(0)
    raw = [torch.randn(64, d, generator=g) * 4 + 7 for _ in range(30)]
    bank, _ = train_pass(saes, cfg, raw, 30, normalizer)
    return bank, saes


def test_export_reload_reproduces_encodings(tmp_path, rng):
    d = 12
    norm = Normalizer(rng.normal(size=d) * 3 + 7, 0.37)
    bank, saes = _trained_bank(norm, d)
    for c in saes:
        export_sae(tmp_path / "run" / c.name, c, bank.member_weights(c.name), norm, hook="blocks.3", store="s.zarr",
                   tokens="patches", freq=np.full(c.d_sae, 0.01), metrics={"fvu": 0.5})
    (tmp_path / "run" / "run.json").write_text(json.dumps({"saes": [c.name for c in saes]}))
    x_raw = torch.tensor(rng.normal(size=(50, d)) * 4 + 7, dtype=torch.float32)
    x_norm = norm.apply(x_raw)
    with torch.no_grad():
        outs = bank(x_norm, train=False)
    loaded = load_run(tmp_path / "run")
    assert list(loaded) == ["relu", "topk", "btk"]
    for c in saes:
        gi, i = bank.index[c.name]
        z_ref, xhat_ref = outs[gi].latents[i], outs[gi].x_hat[i]
        sae = loaded[c.name]
        assert (sae.d_in, sae.d_sae, sae.hook, sae.store, sae.tokens) == (d, c.d_sae, "blocks.3", "s.zarr", "patches")
        z = sae.encode(x_raw)
        assert (z > 0).sum() > 0
        torch.testing.assert_close(z * norm.scale, z_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sae.decode(z), norm.invert(xhat_ref), rtol=1e-4, atol=1e-4)
        # SAELens 6 layout: exactly these tensors and fields.
        dpath = tmp_path / "run" / c.name
        tensors = safetensors.torch.load_file(str(dpath / "sae_weights.safetensors"))
        want = {"W_enc", "W_dec", "b_enc", "b_dec"} | ({"threshold"} if c.arch == "batchtopk" else set())
        assert set(tensors) == want
        assert tensors["W_enc"].shape == (d, c.d_sae) and tensors["W_dec"].shape == (c.d_sae, d)
        cfg = json.loads((dpath / "cfg.json").read_text())
        assert cfg["architecture"] == {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu"}[c.arch]
        assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is True
        assert cfg["metadata"]["sae_lens_version"] == "6.0.0" and cfg["metadata"]["hook_name"] == "blocks.3"
        assert cfg.get("k") == (4 if c.arch == "topk" else None)
        np.testing.assert_allclose(load_sparsity(dpath), np.log10(0.01 + 1e-10), rtol=1e-6)


class Source:
    """A resumable in-memory batch stream (the ShuffledLoader protocol); optionally dies after `die_after` batches."""

    def __init__(self, batches, die_after=None):
        self.batches, self.i, self.die_after, self.n_yielded = batches, 0, die_after, 0

    def __iter__(self):
        while self.i < len(self.batches):
            if self.die_after is not None and self.n_yielded == self.die_after:
                raise KeyboardInterrupt
            b = self.batches[self.i]
            self.i += 1
            self.n_yielded += 1
            yield b

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, d):
        self.i = d["i"]


def test_interrupted_resume_equals_uninterrupted(tmp_path):
    d, n_steps = 10, 17
    saes = (SAEConfig("r", d, 20, "relu", l1=1.0, lr=3e-3, seed=1), SAEConfig("t", d, 30, "topk", k=3, lr=3e-3, seed=2,
                                                                              dead_after=40))
    cfg = TrainConfig(saes=saes, batch_size=32, warmup_steps=4, l1_warmup_steps=5, schedule="cosine", ckpt_every=5,
                      b_dec_init="median", quiet=True)
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(32, d, generator=g) for _ in range(n_steps)]
    ref, _ = train_pass(saes, cfg, Source(data), n_steps)
    ckpt = tmp_path / "ckpt.pt"
    with pytest.raises(KeyboardInterrupt):
        train_pass(saes, cfg, Source(data, die_after=12), n_steps, ckpt_fpath=ckpt)
    assert torch.load(ckpt, weights_only=False)["step"] == 10
    resumed, steps = train_pass(saes, cfg, Source(data), n_steps, ckpt_fpath=ckpt)
    assert steps == n_steps
    for k, v in ref.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_widths_and_sweep_file(tmp_path):
    assert parse_width("8x", 320) == 2560 and parse_width(4, 320) == 1280 and parse_width("24576", 768) == 24576
    saes = expand({"width": ["4x", "8x", "16x"], "l1": [1, 3, 10], "lr": [1e-3]}, 32)
    assert len(saes) == 9 and {s.d_sae for s in saes} == {128, 256, 512} and len({s.name for s in saes}) == 9
    f = tmp_path / "sweep.toml"
    f.write_text('lr = 2e-3\nwidth = ["2x"]\n[[sae]]\nl1 = [1.0, 2.0]\n[[sae]]\narch = "topk"\nk = [4, 8]\nwidth = [64, 1000]\n')
    saes = from_toml(str(f), 32)
    got = sorted((s.arch, s.d_sae, s.l1, s.k, s.lr) for s in saes)
    assert got == sorted([("relu", 64, 1.0, 0, 2e-3), ("relu", 64, 2.0, 0, 2e-3), ("topk", 2048, 0.0, 4, 2e-3),
                          ("topk", 2048, 0.0, 8, 2e-3), ("topk", 1000, 0.0, 4, 2e-3), ("topk", 1000, 0.0, 8, 2e-3)])
