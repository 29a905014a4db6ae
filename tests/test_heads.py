"""`saev-tools head`: linear heads on stored activations, trained as a grid on one pass per epoch.

Oracles: torch's own `nn.Linear` + `F.cross_entropy` + `torch.optim.AdamW` for one head; the same
heads trained one at a time; scikit-learn's LogisticRegression on the same features with the same
L2 strength; planted linearly separable stores (100%); a brute-force float64 confusion matrix; a
numpy bilinear upsampling; the v1 store recorded before this change.
"""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.numpy import load_file

from conftest import make_store
from saev_store.errors import UserError
from saev_store.layout import TokenLayout
from saev_store.patch_labels import IGNORE
from saev_store.store import open_store
from tools.cli import main as tools_cli
from tools.heads import HeadConfig, load_head, train_heads
from tools.heads.bank import HeadBank
from tools.heads.data import ClassifyRows, SegmentRows, split_images
from tools.heads.metrics import confusions, scores
from tools.heads.optim import BankAdamW
from tools.heads.train import evaluate, fit

torch.set_num_threads(2)


def planted_classify(path, n=600, d=12, n_classes=4, spread=1.0, n_patches=4, seed=0):
    """[CLS] + patches; the CLS token (and every patch, less strongly) is the class prototype plus noise."""
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(n_classes, d)) * 3
    y = rng.integers(0, n_classes, n)
    x = rng.normal(size=(n, 1 + n_patches, d)) * spread + 5.0  # a common offset: normalization removes it
    x[:, 0] += protos[y]
    x[:, 1:] += 0.5 * protos[y][:, None]
    g = int(math.isqrt(n_patches))
    lay = TokenLayout(n_tokens=1 + n_patches, cls=0, grid=(g, g), grid_start=1)
    make_store(path, {"h": x.astype(np.float32)}, images_per_chunk=50, labels=y.astype(np.int32), layouts={"h": lay},
               metadata={"class_names": [f"c{k}" for k in range(n_classes)]})
    return x, y


def planted_segment(path, n=200, d=8, n_classes=3, grid=(3, 3), seed=0, noise=0.3):
    """A CNN-like hook; each patch is its class prototype plus noise, some patches IGNORE."""
    rng = np.random.default_rng(seed)
    p = grid[0] * grid[1]
    protos = rng.normal(size=(n_classes, d)) * 3
    lab = rng.integers(0, n_classes, (n, p))
    x = protos[lab] + rng.normal(size=(n, p, d)) * noise
    lab[rng.random((n, p)) < 0.1] = IGNORE
    make_store(path, {"h": x.astype(np.float32)}, images_per_chunk=40, layouts={"h": TokenLayout.cnn(*grid)})
    st = open_store(path, mode="r+")
    key = f"{grid[0]}x{grid[1]}"
    st.create_patch_labels(key, {"grid": list(grid), "image_size": [grid[0] * 4, grid[1] * 4], "rule": "majority", "background": 0,
                                 "ignore_index": IGNORE, "class_names": [f"s{k}" for k in range(n_classes)], "source": {"kind": "planted"}})
    for i in range(st.n_chunks):
        a, b = st.chunk_bounds(i)
        st.write_patch_labels(key, i, lab[a:b])
    st.finalize_patch_labels(key)
    return x, lab


def test_a_bank_member_follows_torch_adamw_exactly():
    rng = np.random.default_rng(0)
    d, c, lrs, wds = 6, 5, [1e-2, 3e-3, 3e-2], [0.0, 0.1, 0.5]
    bank = HeadBank(d, c, 3, seed=4)
    opt = BankAdamW(bank, lrs, wds)
    refs = []
    for g in range(3):
        lin = torch.nn.Linear(d, c)
        w, b = bank.member(g)
        with torch.no_grad():
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        refs.append((lin, torch.optim.AdamW([{"params": [lin.weight], "weight_decay": wds[g]},
                                             {"params": [lin.bias], "weight_decay": 0.0}], lr=lrs[g])))
    torch.manual_seed(4)
    assert torch.equal(refs[0][0].weight, torch.nn.Linear(d, c).weight.detach())  # the same default init
    for _ in range(30):
        x = torch.from_numpy(rng.normal(size=(16, d)).astype(np.float32))
        y = torch.from_numpy(rng.integers(0, c, 16))
        loss_g = bank.backward(x, y)
        opt.step()
        for g, (lin, o) in enumerate(refs):
            o.zero_grad()
            loss = F.cross_entropy(lin(x), y)
            loss.backward()
            o.step()
            assert float(loss_g[g]) == pytest.approx(loss.item(), rel=1e-5)
    for g, (lin, _) in enumerate(refs):
        w, b = bank.member(g)
        torch.testing.assert_close(w, lin.weight.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b, lin.bias.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("task", ["classify", "segment"])
def test_heads_trained_together_equal_heads_trained_one_at_a_time(task, tmp_path):
    path = tmp_path / "s.zarr"
    if task == "classify":
        planted_classify(path, n=300, spread=3.0)
    else:
        planted_segment(path, n=120, noise=2.0)
    st = open_store(path)
    cfg = HeadConfig(store=str(path), hook="h", task=task, lrs=(3e-3, 3e-2), weight_decays=(0.0, 0.3), n_epochs=3,
                     batch_size=64, quiet=True, buffer_mb=0.05)
    if task == "classify":
        train, held = split_images(st, st.labels() >= 0, 0.2, 0, None)
        rows = ClassifyRows(st, "h", "cls", True, train, held)
    else:
        train, held = split_images(st, (st.patch_labels("3x3") != IGNORE).any(1), 0.2, 0, None)
        rows = SegmentRows(st, "h", "3x3", True, train, held, buffer_mb=0.05)
    grid = cfg.grid()
    bank = HeadBank(st.hook("h").d, 4 if task == "classify" else 3, len(grid), seed=0)
    fit(bank, BankAdamW(bank, [g[0] for g in grid], [g[1] for g in grid]), rows, cfg, "cpu")
    conf = evaluate(bank, rows, bank.n_classes, "cpu")
    for g, (lr, wd) in enumerate(grid):
        one = HeadBank(st.hook("h").d, bank.n_classes, 1, seed=0)
        fit(one, BankAdamW(one, [lr], [wd]), rows, cfg, "cpu")
        torch.testing.assert_close(one.member(0)[0], bank.member(g)[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(one.member(0)[1], bank.member(g)[1], rtol=1e-4, atol=1e-5)
        assert torch.equal(evaluate(one, rows, bank.n_classes, "cpu")[0], conf[g])
    # The whole command: the kept head of the grid is the head its settings give alone.
    run = train_heads(HeadConfig(**{**cfg.to_dict(), "out_dpath": str(tmp_path / "grid")}))
    lr, wd = grid[run.best]
    alone = train_heads(HeadConfig(**{**cfg.to_dict(), "lrs": (lr,), "weight_decays": (wd,), "out_dpath": str(tmp_path / "one")}))
    a, b = load_file(str(tmp_path / "grid" / "head.safetensors")), load_file(str(tmp_path / "one" / "head.safetensors"))
    np.testing.assert_allclose(a["weight"], b["weight"], rtol=1e-4, atol=1e-5)
    assert run.metrics == alone.metrics


def test_classification_head_matches_sklearn_logistic_regression(tmp_path):
    from sklearn.linear_model import LogisticRegression

    path = tmp_path / "s.zarr"
    planted_classify(path, n=3000, d=10, n_classes=4, spread=4.0)
    lam = 1e-3
    run = train_heads(HeadConfig(store=str(path), hook="h", task="classify", lrs=(1e-2,), weight_decays=(lam,), n_epochs=30,
                                 batch_size=128, held_out_frac=0.25, out_dpath=str(tmp_path / "head"), quiet=True))
    st = open_store(path)
    train, held = split_images(st, st.labels() >= 0, 0.25, 0, None)
    rows = ClassifyRows(st, "h", "cls", True, train, held)
    # Our objective per step: mean cross-entropy, weights decayed by lr * lam (an L2 strength lam per sample);
    # sklearn's: 0.5 ||W||^2 + C * sum of cross-entropies, so C = 1 / (lam * n_train).
    clf = LogisticRegression(C=1.0 / (lam * rows.n_train_rows), max_iter=2000).fit(rows.x_train.numpy(), rows.y_train.numpy())
    sk_acc = float((clf.predict(rows.x_eval.numpy()) == rows.y_eval.numpy()).mean())
    ours = run.metrics["image"]["accuracy"]
    assert 0.5 < sk_acc < 0.98  # overlapping classes: the comparison means something
    assert abs(ours - sk_acc) <= 0.01, (ours, sk_acc)


def test_linearly_separable_planted_stores_reach_100_percent(tmp_path):
    planted_classify(tmp_path / "c.zarr", n=400, spread=0.3)
    run = train_heads(HeadConfig(store=str(tmp_path / "c.zarr"), hook="h", task="classify", tokens="mean", n_epochs=20,
                                 batch_size=64, out_dpath=str(tmp_path / "hc"), quiet=True))
    assert run.metrics["image"]["accuracy"] == 1.0 and run.metrics["image"]["mean_class_accuracy"] == 1.0
    planted_segment(tmp_path / "s.zarr", n=200, noise=0.3)
    run = train_heads(HeadConfig(store=str(tmp_path / "s.zarr"), hook="h", task="segment", n_epochs=20, batch_size=128,
                                 out_dpath=str(tmp_path / "hs"), quiet=True, buffer_mb=0.05))
    assert run.metrics["patch"]["accuracy"] == 1.0 and run.metrics["patch"]["miou"] == 1.0
    assert "pixel" not in run.metrics and "skipped" in run.info["pixel_eval_note"]  # a planted store has no images


def test_metrics_equal_a_brute_force_float64_confusion_matrix():
    rng = np.random.default_rng(2)
    c, n, g = 5, 3000, 3
    target = rng.integers(-1, c - 1, n)  # class 4 never a target; -1 ignored
    pred = rng.integers(0, c, (n, g))
    pred[:, 1] = np.where(rng.random(n) < 0.7, np.maximum(target, 0), pred[:, 1])
    pred[:, 2] = np.minimum(pred[:, 2], c - 2)  # class 4 never predicted by head 2 either
    conf = confusions(torch.from_numpy(pred), torch.from_numpy(target), c).numpy()
    for h in range(g):
        brute = np.zeros((c, c), np.float64)
        for t, p in zip(target, pred[:, h]):
            if t != -1:
                brute[t, p] += 1.0
        np.testing.assert_array_equal(conf[h], brute)
        m = scores(conf[h])
        tp = np.diag(brute)
        assert m["accuracy"] == pytest.approx(tp.sum() / brute.sum())
        for k in range(c):
            sup, union = brute[k].sum(), brute[k].sum() + brute[:, k].sum() - tp[k]
            assert m["per_class_accuracy"][k] == (None if sup == 0 else pytest.approx(tp[k] / sup))
            assert m["iou"][k] == (None if union == 0 else pytest.approx(tp[k] / union))
        present_acc = [tp[k] / brute[k].sum() for k in range(c) if brute[k].sum()]
        present_iou = [tp[k] / (brute[k].sum() + brute[:, k].sum() - tp[k]) for k in range(c) if brute[k].sum() + brute[:, k].sum()]
        assert m["mean_class_accuracy"] == pytest.approx(np.mean(present_acc))
        assert m["miou"] == pytest.approx(np.mean(present_iou))
    assert scores(conf[2])["iou"][4] is None and scores(conf[0])["iou"][4] == 0.0  # predicted, never true: IoU 0


def _bilinear_numpy(z_chw: np.ndarray, size_hw) -> np.ndarray:
    """align_corners=False bilinear in float64: output pixel centre u maps to (u + 0.5) * h / H - 0.5, clamped."""
    c, h, w = z_chw.shape
    H, W = size_hw
    out = np.zeros((c, H, W))
    for u in range(H):
        sy = min(max((u + 0.5) * h / H - 0.5, 0), h - 1)
        y0 = int(np.floor(sy))
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for v in range(W):
            sx = min(max((v + 0.5) * w / W - 0.5, 0), w - 1)
            x0 = int(np.floor(sx))
            x1, fx = min(x0 + 1, w - 1), sx - x0
            out[:, u, v] = ((1 - fy) * ((1 - fx) * z_chw[:, y0, x0] + fx * z_chw[:, y0, x1])
                            + fy * ((1 - fx) * z_chw[:, y1, x0] + fx * z_chw[:, y1, x1]))
    return out


def test_a_loaded_head_is_the_saved_linear_map_on_the_hooks_activations(tmp_path):
    x, _ = planted_classify(tmp_path / "c.zarr", n=120)
    for tokens in ("cls", "mean"):
        run = train_heads(HeadConfig(store=str(tmp_path / "c.zarr"), hook="h", tokens=tokens, n_epochs=2, out_dpath=str(tmp_path / tokens),
                                     quiet=True, lrs=(1e-3,), weight_decays=(0.0,)))
        head = load_head(run.out_dpath)
        t = load_file(str(tmp_path / tokens / "head.safetensors"))
        xn = (x.astype(np.float64) - t["mean"]) * t["scale"][0]
        feat = xn[:, 0] if tokens == "cls" else xn[:, 1:].mean(axis=1)
        want = feat @ t["weight"].T.astype(np.float64) + t["bias"]
        got = head(torch.from_numpy(x.astype(np.float32))).detach().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        raw_feat = x[:, 0] if tokens == "cls" else x[:, 1:].mean(axis=1)  # (B, d): tokens already picked, raw
        np.testing.assert_allclose(head(torch.from_numpy(raw_feat.astype(np.float32))).detach().numpy(), want, rtol=1e-4, atol=1e-4)
        info = json.loads((tmp_path / tokens / "head.json").read_text())
        assert info["tokens"] == tokens and info["class_names"] == ["c0", "c1", "c2", "c3"] and len(info["members"]) == 1
        assert isinstance(head, torch.nn.Module) and not head.training

    xs, _ = planted_segment(tmp_path / "s.zarr", n=60)
    run = train_heads(HeadConfig(store=str(tmp_path / "s.zarr"), hook="h", task="segment", n_epochs=1, out_dpath=str(tmp_path / "seg"),
                                 quiet=True, lrs=(1e-3,), weight_decays=(0.0,), batch_size=64, buffer_mb=0.05))
    head = load_head(run.out_dpath)
    t = load_file(str(tmp_path / "seg" / "head.safetensors"))
    want = ((xs.astype(np.float64) - t["mean"]) * t["scale"][0]) @ t["weight"].T + t["bias"]  # (n, 9, C)
    acts = torch.from_numpy(xs[:2].astype(np.float32))
    np.testing.assert_allclose(head(acts).detach().numpy(), want[:2], rtol=1e-4, atol=1e-4)
    zmap = head.logit_map(acts).detach().numpy()
    np.testing.assert_allclose(zmap, want[:2].reshape(2, 3, 3, -1).transpose(0, 3, 1, 2), rtol=1e-4, atol=1e-4)
    up = head.upsample(acts, (12, 10)).detach().numpy()
    np.testing.assert_allclose(up[1], _bilinear_numpy(zmap[1].astype(np.float64), (12, 10)), rtol=1e-4, atol=1e-4)


def test_the_v1_store_trains_both_heads_through_the_cli(v1_store, tmp_path):
    """The store recorded before patch labels existed: a classifier on the mean of its patches, then
    patch labels from Fashion-MNIST's pixels and a segmentation head scored per patch and per pixel."""
    from saev_store.cli import main as store_cli

    cli = CliRunner()
    r = cli.invoke(tools_cli, ["head", str(v1_store), "--hook", "_blocks.3", "--task", "segment", "--quiet"])
    assert r.exit_code == 2 and "add-labels" in r.output
    r = cli.invoke(tools_cli, ["head", str(v1_store), "--hook", "_blocks.3", "--out", str(tmp_path / "clf"), "--n-epochs", "3",
                               "--held-out", "0.25", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "_blocks.3 classify, image level: top-1" in r.output and "<- kept" in r.output
    info = json.loads((tmp_path / "clf" / "head.json").read_text())
    assert info["tokens"] == "mean" and len(info["members"]) == 12 and info["store"]["format_version"] == 1
    for f in ("confusion.png", "per_class.md", "per_class.csv", "train_log.jsonl", "head.safetensors"):
        assert (tmp_path / "clf" / f).is_file()

    assert cli.invoke(store_cli, ["add-labels", str(v1_store), "--masks", "pixels", "--quiet", "--num-workers", "0"]).exit_code == 0
    r = cli.invoke(tools_cli, ["head", str(v1_store), "--hook", "_blocks.3", "--task", "segment", "--out", str(tmp_path / "seg"),
                               "--n-epochs", "3", "--held-out", "0.25", "--lr", "1e-3,1e-2", "--wd", "0", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "patch level" in r.output and "pixel level" in r.output and "mIoU" in r.output
    run = json.loads((tmp_path / "seg" / "head.json").read_text())
    assert run["class_names"][0] == "background" and run["patch_labels"]["key"] == "2x2"
    # The pixel scores, brute force: held-out images, the head upsampled, Fashion-MNIST's masks by numpy.
    st = open_store(v1_store)
    held = split_images(st, (st.patch_labels("2x2") != IGNORE).any(1), 0.25, 0, None)[1]
    head = load_head(tmp_path / "seg")
    images = np.flatnonzero(held)
    pred = head.upsample(torch.from_numpy(st.read("_blocks.3", 0, st.n_images)[images]), (16, 16)).argmax(1).numpy()
    px, labels = _fmnist(16)
    src = np.floor((np.arange(18) + 0.5) * 28 / 18).astype(int)[1:17]  # resize 18, crop 16 at offset 1
    brute = np.zeros((11, 11), np.float64)
    for j, i in enumerate(images):
        m = np.where(px[i] > 10, labels[i] + 1, 0)[np.ix_(src, src)]
        for t, p in zip(m.ravel(), pred[j].ravel()):
            brute[t, p] += 1
    assert run["metrics"]["pixel"]["n"] == brute.sum() == len(images) * 256
    assert run["metrics"]["pixel"]["accuracy"] == pytest.approx(np.trace(brute) / brute.sum())


def _fmnist(n):
    import gzip

    with gzip.open("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz") as f:
        px = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    with gzip.open("/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:n].astype(np.int64)
    return px, labels


def test_bad_head_requests_are_one_clear_error(tmp_path):
    planted_classify(tmp_path / "c.zarr", n=40)
    make_store(tmp_path / "cnn.zarr", {"h": np.zeros((8, 4, 3), np.float32)}, layouts={"h": TokenLayout.cnn(2, 2)},
               labels=np.arange(8, dtype=np.int32) % 2)
    with pytest.raises(UserError, match="stores no CLS token; use --tokens mean"):
        train_heads(HeadConfig(store=str(tmp_path / "cnn.zarr"), hook="h", tokens="cls", quiet=True, out_dpath=str(tmp_path / "x")))
    with pytest.raises(UserError, match="no patch labels for the 2x2 grid"):
        train_heads(HeadConfig(store=str(tmp_path / "cnn.zarr"), hook="h", task="segment", quiet=True, out_dpath=str(tmp_path / "x")))
    with pytest.raises(UserError, match="drop --tokens"):
        HeadConfig(store="s", hook="h", task="segment", tokens="cls")
    with pytest.raises(UserError, match="chosen on held-out images"):
        HeadConfig(store="s", hook="h", held_out_frac=0.0)
    (tmp_path / "taken").mkdir()
    with pytest.raises(UserError, match="--overwrite"):
        train_heads(HeadConfig(store=str(tmp_path / "c.zarr"), hook="h", quiet=True, out_dpath=str(tmp_path / "taken")))
