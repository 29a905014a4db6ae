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
from trainers.sae import SAEBank
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


PLANTED = (  # one of each architecture, trained as one bank (a bank equals its members trained alone)
    SAEConfig("topk", 16, 48, "topk", k=3, lr=1e-2, seed=1),
    SAEConfig("batchtopk", 16, 48, "batchtopk", k=3, lr=1e-2, seed=1),
    SAEConfig("relu", 16, 48, "relu", l1=0.3, lr=1e-2, seed=1),
    SAEConfig("jumprelu", 16, 48, "jumprelu", l0_coef=0.2, lr=2e-2, seed=1),
    SAEConfig("gated", 16, 48, "gated", l1=1.0, lr=1e-2, seed=1),
    # Matryoshka with one inner prefix of 36 latents: saev's random draws include prefixes of 2-5 latents,
    # whose best reconstruction of i.i.d. planted atoms is a blend of atoms (the objective doing its job),
    # so those early latents are not atoms and the mean best cosine drops to ~0.87.
    SAEConfig("matryoshka-relu", 16, 48, "relu", l1=0.5, lr=1e-2, seed=1, objective="matryoshka", prefixes=(36,)),
    SAEConfig("matryoshka-topk", 16, 48, "topk", k=3, lr=1e-2, seed=1, objective="matryoshka", prefixes=(36,)),
    SAEConfig("matryoshka-batchtopk", 16, 48, "batchtopk", k=3, lr=1e-2, seed=1, objective="matryoshka", prefixes=(36,)),
    SAEConfig("matryoshka-topk-8", 16, 48, "topk", k=3, lr=1e-2, seed=1, objective="matryoshka", prefixes=(8, 24)),
)


@pytest.fixture(scope="module")
def planted():
    """(atoms, the bank trained on them for 1000 steps of 256 rows, 4096 fresh rows of the same atoms)."""
    d, n_atoms, n_steps = 16, 24, 1000
    atoms, batches = _dictionary_batches(n_steps, 256, d, n_atoms, seed=0)
    cfg = TrainConfig(saes=PLANTED, batch_size=256, warmup_steps=20, quiet=True, b_dec_init="zeros")
    bank, steps = train_pass(PLANTED, cfg, batches, n_steps)
    assert steps == n_steps
    g = torch.Generator().manual_seed(7)
    mask = torch.rand(4096, n_atoms, generator=g) < 3 / n_atoms
    return atoms, bank, (mask * (0.5 + torch.rand(4096, n_atoms, generator=g))) @ atoms


@pytest.mark.slow
@pytest.mark.parametrize("name", [c.name for c in PLANTED if c.name != "matryoshka-topk-8"])
def test_recovers_known_sparse_dictionary(planted, name):
    atoms, bank, _ = planted
    w_dec = bank.member_weights(name)["W_dec"].double()
    best_cos = (atoms.double() @ w_dec.T).max(dim=1).values
    assert best_cos.mean() >= 0.9, best_cos


def _prefix_fvu(bank, name, x, n):
    """FVU of the reconstruction from the first n latents alone (inference latents, float64)."""
    gi, i = bank.index[name]
    g = bank.groups[gi]
    with torch.no_grad():
        z, _ = g.activate(g.pre_acts(x, i, i + 1), i, i + 1, train=False)
        x_hat = z[0, :, :n].double() @ g.W_dec[i, :n].double() + g.b_dec[i].double()
    xd = x.double()
    return float(((xd - x_hat) ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum())


@pytest.mark.slow
def test_matryoshka_first_prefix_reconstructs_better(planted):
    """The first prefix (8 latents) of a Matryoshka TopK SAE reconstructs held-out planted rows better than
    the first 8 latents of the plain TopK SAE trained beside it (same seed, data, k and width)."""
    _, bank, x = planted
    nested, plain = _prefix_fvu(bank, "matryoshka-topk-8", x, 8), _prefix_fvu(bank, "topk", x, 8)
    assert nested < 0.8 * plain, (nested, plain)
    assert _prefix_fvu(bank, "matryoshka-topk-8", x, 48) < 0.3  # and the whole SAE still reconstructs


@pytest.mark.parametrize("prefixes", [(3, 10), ()], ids=["fixed", "drawn"])
def test_matryoshka_prefix_losses_equal_direct_computation(prefixes):
    """Each prefix's loss, and the training step's summed inner losses, against numpy float64: the
    reconstruction from latents 0..L-1 alone, mean over rows of the squared error summed over d."""
    from trainers.archs import prefix_mses

    d, s, B, step = 6, 24, 40, 5
    c = SAEConfig("m", d, s, "topk", k=4, seed=3, objective="matryoshka", prefixes=prefixes, n_prefixes=6)
    bank = SAEBank([c]).double()
    g = bank.groups[0]
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        g.b_dec.copy_(torch.randn(g.b_dec.shape, generator=gen, dtype=torch.float64))
    x = torch.randn(B, d, generator=gen, dtype=torch.float64)
    lengths = g.prefixes(0, step)
    assert lengths[-1] == s and len(lengths) == (len(prefixes) + 1 if prefixes else 6)
    if prefixes:
        assert lengths[:-1] == prefixes
    with torch.no_grad():
        out = g(x, train=True, step=step)
    z, w, b = out.latents[0].detach().numpy(), g.W_dec[0].detach().numpy(), g.b_dec[0].detach().numpy()
    direct = np.array([(((z[:, :n] @ w[:n] + b) - x.numpy()) ** 2).sum(-1).mean() for n in lengths])
    np.testing.assert_allclose(prefix_mses(out.latents[0], g.W_dec[0], g.b_dec[0], x, lengths).detach().numpy(), direct,
                               rtol=1e-12)
    assert direct[-1] == pytest.approx(float(out.mse[0]), rel=1e-12)  # the whole width is the ordinary loss
    assert float(out.nested[0]) == pytest.approx(direct[:-1].sum(), rel=1e-12)
    stats = g.train_grads(x, torch.zeros(1, dtype=torch.float64), torch.float64, step=step).stats
    assert float(stats.nested[0]) == pytest.approx(direct[:-1].sum(), rel=1e-12)
    assert float(stats.loss[0]) == pytest.approx(direct.sum(), rel=1e-12)


def test_sample_prefixes_follow_saev():
    """saev's draws: n - 1 distinct lengths in 1..d_sae-1 plus d_sae, sorted, a function of (seed, step);
    over many steps the lengths' frequencies match saev's Pareto weights (l-1)^-1/2 - l^-1/2, l >= 2."""
    from trainers.archs import sample_prefixes

    d_sae = 40
    draws = [sample_prefixes(d_sae, 4, seed=3, step=t) for t in range(6000)]
    assert all(len(p) == 4 and p[-1] == d_sae and list(p) == sorted(set(p)) and p[0] >= 1 for p in draws)
    assert sample_prefixes(d_sae, 4, 3, 17) == draws[17] and sample_prefixes(d_sae, 4, 4, 17) != draws[17]
    assert sample_prefixes(d_sae, 1, 3, 0) == (d_sae,)
    l = np.arange(1, d_sae)
    w = np.where(l >= 2, (np.maximum(l - 1, 1.0)) ** -0.5 - l**-0.5, 0.0)
    w /= w.sum()
    # n_prefixes = 2 draws one length: distributed exactly as w.
    first = np.array([sample_prefixes(d_sae, 2, seed=5, step=t)[0] for t in range(20000)])
    freq = np.bincount(first, minlength=d_sae)[1:] / first.size
    assert freq[0] == 0 and 0.5 * np.abs(freq - w).sum() < 0.02


def _trained_bank(normalizer, d=12):
    saes = (
        SAEConfig("relu", d, 24, "relu", l1=0.5, lr=5e-3, seed=1),
        SAEConfig("topk", d, 24, "topk", k=4, lr=5e-3, seed=2),
        SAEConfig("btk", d, 36, "batchtopk", k=3, lr=5e-3, seed=3),
        SAEConfig("jump", d, 24, "jumprelu", l0_coef=0.5, lr=5e-3, seed=4),
        SAEConfig("gated", d, 24, "gated", l1=0.5, lr=5e-3, seed=5),
        SAEConfig("mtopk", d, 36, "topk", k=3, lr=5e-3, seed=6, objective="matryoshka"),
        SAEConfig("mbtk", d, 36, "batchtopk", k=3, lr=5e-3, seed=7, objective="matryoshka", prefixes=(6, 20)),
    )
    cfg = TrainConfig(saes=saes, batch_size=64, warmup_steps=2, l1_warmup_steps=2, quiet=True)
    g = torch.Generator().manual_seed(0)
    raw = [torch.randn(64, d, generator=g) * 4 + 7 for _ in range(30)]
    bank, _ = train_pass(saes, cfg, raw, 30, normalizer)
    return bank, saes


def test_export_reload_reproduces_encodings(tmp_path, rng):
    """Every architecture's export, loaded by our reader and by SAELens 6 itself (`SAE.load_from_disk`),
    encodes raw activations to the bank's latents / s and decodes them to its raw reconstructions."""
    from sae_lens import SAE as SAELensSAE

    d = 12
    norm = Normalizer(rng.normal(size=d) * 3 + 7, 0.37)
    bank, saes = _trained_bank(norm, d)
    gen = torch.Generator().manual_seed(1)
    for g in bank.groups:  # thresholds and magnitude gains far from their init, so a reader that drops one fails
        with torch.no_grad():
            for p in (g.jump_threshold, g.r_mag, g.b_mag):
                if p is not None:
                    p.copy_(torch.rand(p.shape, generator=gen) * (0.8 if p is g.jump_threshold else 0.5))
    for c in saes:
        export_sae(tmp_path / "run" / c.name, c, bank.member_weights(c.name), norm, hook="blocks.3", store="s.zarr",
                   tokens="patches", freq=np.full(c.d_sae, 0.01), metrics={"fvu": 0.5})
    (tmp_path / "run" / "run.json").write_text(json.dumps({"saes": [c.name for c in saes]}))
    x_raw = torch.tensor(rng.normal(size=(50, d)) * 4 + 7, dtype=torch.float32)
    x_norm = norm.apply(x_raw)
    with torch.no_grad():
        outs = bank(x_norm, train=False)
    loaded = load_run(tmp_path / "run")
    assert list(loaded) == [c.name for c in saes]
    for c in saes:
        gi, i = bank.index[c.name]
        z_ref, xhat_ref = outs[gi].latents[i], outs[gi].x_hat[i]
        sae = loaded[c.name]
        assert (sae.d_in, sae.d_sae, sae.hook, sae.store, sae.tokens) == (d, c.d_sae, "blocks.3", "s.zarr", "patches")
        z = sae.encode(x_raw)
        assert (z > 0).sum() > 0
        if c.arch == "jumprelu":  # the thresholds decide: some positive pre-activations are cut
            assert int(((sae.pre_acts(x_raw) > 0) & (z_ref == 0)).sum()) > 20
        torch.testing.assert_close(z * norm.scale, z_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sae.decode(z), norm.invert(xhat_ref), rtol=1e-4, atol=1e-4)
        dpath = tmp_path / "run" / c.name
        lens = SAELensSAE.load_from_disk(str(dpath))
        with torch.no_grad():
            z_lens = lens.encode(x_raw)
            torch.testing.assert_close(z_lens * norm.scale, z_ref, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(lens.decode(z_lens), norm.invert(xhat_ref), rtol=1e-4, atol=1e-4)
        # SAELens 6 layout: exactly these tensors and fields.
        tensors = safetensors.torch.load_file(str(dpath / "sae_weights.safetensors"))
        want = {"W_enc", "W_dec", "b_dec"} | ({"b_gate", "b_mag", "r_mag"} if c.arch == "gated" else {"b_enc"})
        want |= {"threshold"} if c.arch in ("batchtopk", "jumprelu") else set()
        assert set(tensors) == want
        assert tensors["W_enc"].shape == (d, c.d_sae) and tensors["W_dec"].shape == (c.d_sae, d)
        cfg = json.loads((dpath / "cfg.json").read_text())
        assert cfg["architecture"] == {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu",
                                       "gated": "gated"}[c.arch]
        assert type(lens).__name__ == {"standard": "StandardSAE", "topk": "TopKSAE", "jumprelu": "JumpReLUSAE",
                                       "gated": "GatedSAE"}[cfg["architecture"]]
        assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is True
        assert cfg["metadata"]["sae_lens_version"] == "6.0.0" and cfg["metadata"]["hook_name"] == "blocks.3"
        assert cfg.get("k") == (c.k if c.arch == "topk" else None)
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


def test_new_architecture_options_names_and_errors(tmp_path):
    """Sweep expansion picks each architecture's sparsity key and names say the architecture; bad
    combinations are one UserError naming the option; the options survive run.json's round trip."""
    from saev_store.errors import UserError

    saes = expand({"arch": ["jumprelu", "gated", "topk"], "l0_coef": [0.5, 1], "l1": [2.0], "k": [8], "width": ["4x"],
                   "bandwidth": 0.1, "lr": 1e-3}, 16)
    assert [s.name for s in saes] == ["jumprelu-64-l0_0.5-lr_0.001", "jumprelu-64-l0_1-lr_0.001", "gated-64-l1_2-lr_0.001",
                                      "topk-64-k8-lr_0.001"]
    assert [s.sparsity_coef for s in saes] == [0.5, 1.0, 2.0, 0.0]
    assert [s.bandwidth for s in saes] == [0.1, 0.1, 0.0, 0.0]  # a setting an architecture does not use is recorded as 0
    saes = expand({"arch": "batchtopk", "objective": ["vanilla", "matryoshka"], "k": 4, "prefixes": [4, 16], "width": ["2x"]}, 16)
    assert [(s.name, s.prefixes) for s in saes] == [("batchtopk-32-k4-lr_0.001", ()),
                                                    ("matryoshka-batchtopk-32-k4-lr_0.001", (4, 16))]
    bad = [
        (dict(arch="jumprelu", k=3), "--l0-coef"),
        (dict(arch="gated", objective="matryoshka"), "matryoshka objective trains"),
        (dict(arch="relu", prefixes=(4,)), "--objective matryoshka"),
        (dict(arch="topk", k=2, objective="matryoshka", prefixes=(8, 4)), "increase strictly"),
        (dict(arch="topk", k=2, objective="matryoshka", prefixes=(4, 32)), "increase strictly"),
        (dict(arch="topk", k=2, objective="matryoshka", n_prefixes=32), "n_prefixes"),
        (dict(arch="jumprelu", bandwidth=0.0), "bandwidth"),
        (dict(arch="jumprelu", l0_coef=-1.0), "l0_coef"),
        (dict(arch="relu", objective="nested"), "objective 'nested' is unknown"),
    ]
    for kw, msg in bad:
        with pytest.raises(UserError, match=msg):
            SAEConfig("x", 8, 32, **kw)
    with pytest.raises(UserError, match="--prefixes .prefixes. only applies to objective matryoshka"):
        expand({"arch": "topk", "k": 4, "prefixes": [4]}, 16)
    cfg = TrainConfig(saes=tuple(saes), quiet=True)
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.to_dict() == cfg.to_dict()
