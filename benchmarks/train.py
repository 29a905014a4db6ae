"""Training throughput of the SAE bank, against baselines measured in the same run.

    python benchmarks/train.py                       # CPU: demo shapes (d=320, widths 4x,8x,16x x 3 L1)
    python benchmarks/train.py --device cuda --d 768 --width 24576 --n 9 --precision bf16

(a) step efficiency: a nine-SAE training step performs 10 * B * d * sum(d_sae) multiply-adds x2 in
    five GEMM shapes per group (encoder forward, decoder forward, the decoder's two gradients, the
    encoder weight gradient); its FLOP/s is divided by the FLOP/s of exactly those plain matrix
    products timed alone. Both encoder layouts are measured (one fused GEMM per width group / bmm).
(b) one nine-SAE pass against nine one-SAE passes over the same (synthetic, on-disk) store, whole
    wall time including reading, evaluation and export, with the store's pages evicted while it
    runs (--warm keeps them cached).  [skipped with --no-store]
(c) patches/s of the fastest nine-SAE step (eager or torch.compile'd element-wise stages, see
    trainers/fused.py), and the projected time for 100M patches.
(d) a mixed bank, one SAE of each architecture (ReLU, TopK, BatchTopK, JumpReLU, Gated, and the
    Matryoshka objective on ReLU, TopK and BatchTopK; widths cycled over --width): its step against
    the plain matrix products of its shapes, as (a), and the (a) bank's step again, all four timed in
    interleaved rounds (best of --rounds). The extra work of the new architectures (Gated's gate
    reconstruction, two more GEMMs; Matryoshka's inner prefixes; TopK's selection; their element-wise
    terms) is in the step and not in the baseline.  [skipped with --no-mixed]
--profile prints that step's kernels by device time.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import tempfile
import time

import numpy as np
import torch

from trainers.config import TrainConfig
from trainers.sae import SAEBank
from trainers.sweep import expand
from trainers.train import compute_dtype, make_optimizer, peak_lrs, set_precision, sparsity_coefs, train_step


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, n_iter: int, n_warm: int = 2) -> float:
    for _ in range(n_warm):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n_iter):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / n_iter


def make_trainer(saes, cfg: TrainConfig, device):
    """(a fresh bank on `device`, `step(x)`: one training step of it on the batch x)."""
    bank = SAEBank(saes, cfg.fuse_encoders).to(device)
    opt = make_optimizer(bank, cfg)
    peak, coefs = peak_lrs(bank, cfg, device), sparsity_coefs(bank, device)
    state = {"step": 0}

    def step(x):
        train_step(bank, opt, x, state["step"], 10**9, cfg, peak, coefs)
        state["step"] += 1

    return bank, step


def step_fn(saes, cfg: TrainConfig, device):
    """A closure running one training step of a fresh bank on a fixed random batch."""
    _, step = make_trainer(saes, cfg, device)
    x = torch.randn(cfg.batch_size, cfg.d_in, device=device)
    return lambda: step(x)


def step_seconds(saes, cfg: TrainConfig, device, n_iter: int) -> float:
    return _time(step_fn(saes, cfg, device), device, n_iter, n_warm=3)


def profile_steps(saes, cfg: TrainConfig, device, n_rows: int = 25) -> str:
    """torch.profiler's table of the device time per kernel over 3 steps (after 3 warm-up steps)."""
    from torch.profiler import ProfilerActivity, profile

    one = step_fn(saes, cfg, device)
    for _ in range(3):
        one()
    _sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(3):
            one()
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=n_rows, max_name_column_width=60)


def check_compiled(saes, cfg: TrainConfig, device, n_steps: int = 3) -> float:
    """Train two banks from the same start on the same batches, with eager and with compiled stages;
    returns the largest relative difference ||a - b|| / ||a|| over their parameters (the compiled
    stages round in other places, so it is not 0 in bf16; a wrong kernel gives ~1)."""
    banks = []
    for comp in ("off", "on"):
        torch.manual_seed(0)
        bank, step = make_trainer(saes, dataclasses.replace(cfg, compile=comp), device)
        for _ in range(n_steps):
            step(torch.randn(cfg.batch_size, cfg.d_in, device=device))
        banks.append({k: v.detach() for k, v in bank.named_parameters()})
        del bank, step
    return max(float((banks[0][k] - banks[1][k]).norm() / banks[0][k].norm()) for k in banks[0])


def mixed_saes(widths: list[str], d: int, k: int) -> list:
    """One SAE of each architecture (the Matryoshka objective on its three bases), widths cycled."""
    specs = [{"arch": "relu", "l1": 1.0}, {"arch": "topk", "k": k}, {"arch": "batchtopk", "k": k}, {"arch": "jumprelu"},
             {"arch": "gated", "l1": 1.0}]
    specs += [{"arch": a, "objective": "matryoshka", "l1": 1.0, "k": k} for a in ("relu", "topk", "batchtopk")]
    out = []
    for i, spec in enumerate(specs):
        out += expand({**spec, "width": [widths[i % len(widths)]], "lr": [1e-3]}, d, start_index=len(out))
    return out


def gemm_seconds(saes, cfg: TrainConfig, device, n_iter: int) -> float:
    return _time(gemm_fn(saes, cfg, device), device, n_iter)


def gemm_fn(saes, cfg: TrainConfig, device):
    """A closure running the same matrix products as a training step, alone: operands already in the
    step's compute dtype (bf16 with --precision bf16) and the latents laid out as the step lays them
    out, so no cast or copy is timed here that the step would not also pay."""
    B, d, cd = cfg.batch_size, cfg.d_in, compute_dtype(cfg)
    widths = {}
    for c in saes:
        widths[c.d_sae] = widths.get(c.d_sae, 0) + 1
    x = torch.randn(B, d, device=device, dtype=cd)
    mats = []
    for s, n in widths.items():
        mats.append((torch.randn(d, n * s, device=device, dtype=cd), torch.randn(B, n, s, device=device, dtype=cd),
                     torch.randn(n, s, d, device=device, dtype=cd), torch.randn(n, B, d, device=device, dtype=cd)))

    def one():
        for w_enc, z_bns, w_dec, gx in mats:
            z = z_bns.transpose(0, 1)                   # (n, B, s), a view, as in the step
            x @ w_enc                                   # encoder forward
            torch.bmm(z, w_dec)                         # decoder forward
            torch.bmm(gx, w_dec.transpose(1, 2))        # d latents
            torch.bmm(z.transpose(1, 2), gx)            # d W_dec
            x.T @ z_bns.view(B, -1)                     # d W_enc

    return one


def interleaved_seconds(fns: dict, device, n_iter: int, n_rounds: int) -> dict:
    """Seconds per call of each closure: the best of `n_rounds` rounds that time them one after the other,
    so that on a shared machine whose speed drifts by minutes every ratio compares times taken together."""
    best = {k: float("inf") for k in fns}
    for _ in range(n_rounds):
        for k, f in fns.items():
            best[k] = min(best[k], _time(f, device, n_iter, n_warm=1))
    return best


def store_passes(args, saes, tmp: pathlib.Path) -> tuple[float, float]:
    """Wall time of one nine-SAE pass and of nine one-SAE passes over the same store."""
    from saev_store.layout import TokenLayout
    from saev_store.store import HookSpec, create_store
    from trainers.run import run_training

    rng = np.random.default_rng(0)
    n_img, T = args.store_images, 49
    st = create_store(tmp / "bench.zarr", n_images=n_img,
                      hooks={"h": HookSpec(d=args.d, layout=TokenLayout(n_tokens=T, grid=(7, 7)))}, images_per_chunk=64)
    for i in st.pending_chunks():
        a, b = st.chunk_bounds(i)
        st.write_block(i, {"h": rng.normal(size=(b - a, T, args.d)).astype(np.float32)}, image_ids=[str(j) for j in range(a, b)])
    st.finalize()
    from saev_store.bench import Evictor, chunk_files

    def run(parallel: int, name: str, n_patches: int) -> float:
        cfg = TrainConfig(saes=tuple(saes), out_dpath=str(tmp / name), store=st.path, hook="h",
                          batch_size=args.batch_size, n_patches=n_patches, warmup_steps=5, l1_warmup_steps=5,
                          parallel=parallel, ckpt_every=0, log_every=10**6, held_out_frac=0.05, max_eval_images=50,
                          buffer_mb=64, device=args.device, precision=args.precision, quiet=True)
        t0 = time.perf_counter()
        run_training(cfg)
        return time.perf_counter() - t0

    run(len(saes), "warmup", args.batch_size)  # imports, thread pools, kernels: paid once, before timing
    walls = []
    # Cold: the store's pages are dropped while training (ARCHITECTURE.md, Loading), standing in for a store
    # larger than RAM, where nine passes really read the disk nine times.
    with Evictor(chunk_files(st, "h"), enabled=not args.warm):
        for parallel in (len(saes), 1):
            walls.append(run(parallel, f"run-p{parallel}", args.store_patches))
    return walls[0], walls[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--d", type=int, default=320, help="input width")
    p.add_argument("--width", default="4x,8x,16x", help="comma list of widths (Nx or absolute)")
    p.add_argument("--n", type=int, default=9, help="SAEs per step (spread over the widths)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 1024 on CPU, 4096 on CUDA")
    p.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"])
    p.add_argument("--iters", type=int, default=None, help="timed steps (default: 5 on CPU, 20 on CUDA)")
    p.add_argument("--no-store", action="store_true", help="skip (b), the on-disk pass comparison")
    p.add_argument("--store-images", type=int, default=600)
    p.add_argument("--store-patches", type=int, default=8192)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--warm", action="store_true", help="(b) with the store in the page cache")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="also time the step with torch.compile'd element-wise stages (auto: on CUDA; CUDA only)")
    p.add_argument("--profile", action="store_true", help="print the kernels of the fastest step by device time")
    p.add_argument("--no-mixed", action="store_true", help="skip (d), the mixed-architecture bank")
    p.add_argument("--k", type=int, default=32, help="k of the mixed bank's TopK/BatchTopK members")
    p.add_argument("--rounds", type=int, default=3, help="(d): interleaved timing rounds (the best of each is kept)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.batch_size = args.batch_size or (4096 if cuda else 1024)
    n_iter = args.iters or (20 if cuda else 5)
    widths = args.width.split(",")
    per_width = -(-args.n // len(widths))
    l1s = [0.5 * 2**i for i in range(per_width)]
    saes = expand({"width": widths, "l1": l1s, "lr": [1e-3]}, args.d)[: args.n]
    print(f"device {device} ({torch.cuda.get_device_name(device) if cuda else f'{torch.get_num_threads()} threads'}), "
          f"precision {args.precision}, d={args.d}, B={args.batch_size}, {len(saes)} SAEs, widths "
          f"{sorted({c.d_sae for c in saes})}")
    base = dict(saes=tuple(saes), batch_size=args.batch_size, device=args.device, precision=args.precision, quiet=True)
    cfg = TrainConfig(**base)
    set_precision(cfg)
    flops = 10 * args.batch_size * args.d * sum(c.d_sae for c in saes)
    t_gemm = gemm_seconds(saes, cfg, device, n_iter)
    print(f"(a) plain GEMMs of the step's shapes: {t_gemm * 1e3:8.1f} ms  {flops / t_gemm / 1e9:8.1f} GFLOP/s")
    variants = [(True, "off"), (False, "off")]
    if args.compile == "on" or (args.compile == "auto" and cuda):  # TrainConfig refuses "on" off CUDA
        variants.insert(1, (True, "on"))
    if any(comp == "on" for _, comp in variants):
        err = check_compiled(saes, TrainConfig(**base), device)
        print(f"    compiled vs eager stages after 3 steps: largest relative parameter difference {err:.1e}"
              f"{'' if err < 2e-2 else '  <-- TOO LARGE: the compiled stages are wrong here'}", flush=True)
    best, best_cfg = None, None
    for fuse, comp in variants:
        vcfg = TrainConfig(**base, fuse_encoders=fuse, compile=comp)
        t = step_seconds(saes, vcfg, device, n_iter)
        label = ("fused encoder GEMM" if fuse else "bmm encoders      ") + (", compiled stages" if comp == "on" else ", eager stages   ")
        print(f"    training step, {label}: {t * 1e3:8.1f} ms  {flops / t / 1e9:8.1f} GFLOP/s  "
              f"ratio to plain GEMMs {t_gemm / t:.2f}", flush=True)
        if best is None or t < best:
            best, best_cfg = t, vcfg
    pps = args.batch_size / best
    print(f"(c) {pps:,.0f} patches/s for {len(saes)} SAEs; 100M patches would take {1e8 / pps / 60:.1f} min")
    if args.profile:
        print(profile_steps(saes, best_cfg, device))
    if not args.no_mixed:
        mixed = mixed_saes(widths, args.d, args.k)
        mcfg = dataclasses.replace(best_cfg, saes=tuple(mixed))
        m_flops = 10 * args.batch_size * args.d * sum(c.d_sae for c in mixed)
        t = interleaved_seconds({"mg": gemm_fn(mixed, mcfg, device), "m": step_fn(mixed, mcfg, device),
                                 "pg": gemm_fn(saes, best_cfg, device), "p": step_fn(saes, best_cfg, device)},
                                device, n_iter, args.rounds)
        print(f"(d) mixed bank ({', '.join(f'{c.label} {c.d_sae}' for c in mixed)}), the (c) step's settings, best of "
              f"{args.rounds} interleaved rounds: plain GEMMs {t['mg'] * 1e3:.1f} ms, step {t['m'] * 1e3:.1f} ms  "
              f"{m_flops / t['m'] / 1e9:.1f} GFLOP/s  ratio to plain GEMMs {t['mg'] / t['m']:.2f}; the {len(saes)}-SAE "
              f"bank in the same rounds: {t['p'] * 1e3:.1f} ms, ratio {t['pg'] / t['p']:.2f}", flush=True)
    if not args.no_store:
        with tempfile.TemporaryDirectory() as tmp:
            one, nine = store_passes(args, saes, pathlib.Path(tmp))
        print(f"(b) over a store ({args.store_images} images x 49 tokens, {args.store_patches} patches per SAE): one "
              f"{len(saes)}-SAE pass {one:.1f} s, {len(saes)} one-SAE passes {nine:.1f} s, speed-up {nine / one:.2f}x")


if __name__ == "__main__":
    main()
