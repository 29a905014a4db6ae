"""One pass of a grid of segmentation heads over a store, against the plain matrix products of the same shapes.

    python benchmarks/heads.py                                   # CPU: 4 lr x 3 wd heads, d=768, 150 classes (ADE20K)
    python benchmarks/heads.py --device cuda --n-images 2048

The pass is what `saev-tools head --task segment` does per epoch: the shuffled loader (with patch
coordinates, so each row finds its patch label), the ignore filter, the bank's forward, its
hand-written cross-entropy gradient and the AdamW update of all 12 heads. The baseline is the two
GEMMs every step must do, x (B, d) @ W (d, G*C) and x^T (d, B) @ dZ (B, G*C), timed alone on tensors
already in memory, for the same number of steps and rows. The figure is baseline time / pass time:
1.0 would mean the pass costs nothing but its matrix products.

The store (random activations, CLS-less 16x16 grid, random patch labels 10% ignored) is written to
--dir once and read warm (from the page cache), so the figure is the head's work, not the disk's.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

# Run as a script, this file's folder comes first on sys.path, and benchmarks/tools.py would shadow the `tools` package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [q for q in sys.path if os.path.abspath(q or os.curdir) != _HERE]

import numpy as np  # noqa: E402
import torch  # noqa: E402


def make_store(path: pathlib.Path, n_images: int, grid: int, d: int, n_classes: int, seed: int = 0):
    from saev_store.layout import TokenLayout
    from saev_store.store import HookSpec, create_store, open_store

    key = f"{grid}x{grid}"
    if (path / "zarr.json").exists():
        return open_store(path), key
    rng = np.random.default_rng(seed)
    p = grid * grid
    st = create_store(path, n_images=n_images, hooks={"h": HookSpec(d=d, layout=TokenLayout.cnn(grid, grid))},
                      patch_labels={key: {"grid": [grid, grid], "image_size": [grid * 16] * 2, "rule": "majority", "background": 0,
                                          "ignore_index": -1, "class_names": [str(k) for k in range(n_classes)], "source": {"kind": "benchmark"}}})
    for i in st.pending_chunks():
        a, b = st.chunk_bounds(i)
        lab = rng.integers(0, n_classes, (b - a, p))
        lab[rng.random(lab.shape) < 0.1] = -1
        st.write_block(i, {"h": rng.normal(size=(b - a, p, d)).astype(np.float32)}, labels=np.zeros(b - a, np.int32),
                       patch_labels={key: lab})
    st.finalize()
    st.finalize_patch_labels(key)
    return open_store(path), key


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=None, help="Where the store is written (default: a temporary folder).")
    ap.add_argument("--n-images", type=int, default=256)
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--classes", type=int, default=150)
    ap.add_argument("--n-lr", type=int, default=4)
    ap.add_argument("--n-wd", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3, help="Passes measured; the fastest counts.")
    args = ap.parse_args()

    from tools.heads.bank import HeadBank
    from tools.heads.config import HeadConfig
    from tools.heads.data import SegmentRows
    from tools.heads.optim import BankAdamW

    device = torch.device(args.device)
    tmp = None if args.dir else tempfile.TemporaryDirectory()
    root = pathlib.Path(args.dir or tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    st, key = make_store(root / f"heads-{args.n_images}-{args.grid}-{args.d}-{args.classes}.zarr", args.n_images, args.grid,
                         args.d, args.classes)
    train = np.ones(st.n_images, bool)
    rows = SegmentRows(st, "h", key, True, train, ~train | train, n_readers=4)
    lrs = list(np.geomspace(3e-4, 1e-2, args.n_lr))
    wds = list(np.geomspace(1e-3, 1e-1, args.n_wd))
    grid = [(lr, wd) for lr in lrs for wd in wds]
    g = len(grid)
    cfg = HeadConfig(store=st.path, hook="h", task="segment", batch_size=args.batch_size, quiet=True)

    def one_pass(epoch: int):
        bank = HeadBank(args.d, args.classes, g, seed=0, device=device)
        opt = BankAdamW(bank, [a for a, _ in grid], [b for _, b in grid])
        shapes = []
        _sync(device)
        t0 = time.perf_counter()
        for x, y in rows.batches(epoch, cfg.rows_per_step, 0):
            bank.backward(x.to(device), y.to(device))
            opt.step()
            shapes.append(x.shape[0])
        _sync(device)
        return time.perf_counter() - t0, shapes

    def gemms(shapes):
        w = torch.randn(args.d, g * args.classes, device=device)
        xs = {b: torch.randn(b, args.d, device=device) for b in set(shapes)}
        dz = {b: torch.randn(b, g * args.classes, device=device) for b in set(shapes)}
        _sync(device)
        t0 = time.perf_counter()
        for b in shapes:
            torch.mm(xs[b], w)
            torch.mm(xs[b].t(), dz[b])
        _sync(device)
        return time.perf_counter() - t0

    one_pass(0)  # warm: page cache, allocator, BLAS threads
    pass_s, gemm_s = [], []
    for r in range(args.repeats):
        t, shapes = one_pass(r + 1)
        pass_s.append(t)
        gemm_s.append(gemms(shapes))
    n_rows = sum(shapes)
    p, q = min(pass_s), min(gemm_s)
    flops = 4 * n_rows * args.d * g * args.classes
    print(f"store: {st.n_images} images x {args.grid}x{args.grid} patches x d={args.d}, {args.classes} classes; "
          f"{n_rows:,} labelled rows in {len(shapes)} steps of {args.batch_size}; {g} heads ({args.n_lr} lr x {args.n_wd} wd); {device}")
    print(f"one pass of the grid: {p:.3f} s ({n_rows / p:,.0f} rows/s, {flops / p / 1e9:.1f} GFLOP/s)")
    print(f"plain GEMMs, same shapes: {q:.3f} s ({flops / q / 1e9:.1f} GFLOP/s)")
    print(f"figure: GEMM time / pass time = {q / p:.2f}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
