"""Benchmark of `saev-tools topk`: the pass's patches/s against plain encoder matrix products, and peak memory.

    python benchmarks/tools.py                      # CPU, small defaults
    python benchmarks/tools.py --device cuda --n-images 4000 --d 768 --d-sae 16384 --n-saes 3

For each of two store sizes (n and 4n images, same shapes otherwise) a fresh child process runs the whole
pass (`run_topk`: ordered loader -> every SAE's encoder -> statistics and top-k -> files) and then, in the same
process, the baseline: `x @ W_enc` for every SAE over the same number of patches in blocks of the same
size, with the input already in memory (on the device). It prints patches/s of both, their ratio (target
>= 0.7), and the child's peak resident memory (and peak GPU memory on CUDA): bounded memory shows as the
same peak for both sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

# Run as a script, this file's folder comes first on sys.path and its name would shadow the `tools` package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [q for q in sys.path if os.path.abspath(q or os.curdir) != _HERE]

import numpy as np  # noqa: E402
import torch  # noqa: E402


def build_store(path: str, n_images: int, d: int, grid: int, seed: int) -> None:
    from saev_store.layout import TokenLayout
    from saev_store.store import HookSpec, create_store

    n_tokens = 1 + grid * grid
    st = create_store(path, n_images=n_images, hooks={"h": HookSpec(d, TokenLayout(n_tokens=n_tokens, cls=0, grid=(grid, grid), grid_start=1))},
                      metadata={"class_names": [str(c) for c in range(10)]})
    rng = np.random.default_rng(seed)
    for i in st.pending_chunks():
        s, e = st.chunk_bounds(i)
        x = rng.standard_normal((e - s, n_tokens, d), dtype=np.float32)
        st.write_block(i, {"h": x}, labels=rng.integers(0, 10, e - s).astype(np.int32))
    st.finalize()


def make_saes(n_saes: int, d: int, d_sae: int, seed: int) -> dict:
    from trainers.sae_io import SAE

    g = torch.Generator().manual_seed(seed)
    saes = {}
    for j in range(n_saes):
        w = {
            "W_enc": torch.randn(d, d_sae, generator=g) / d**0.5,
            "W_dec": torch.randn(d_sae, d, generator=g) / d**0.5,
            # Pre-activations ~ N(b, 1): b = -2.65 fires about 0.4% of latents per patch (L0 near 64 of 16384),
            # a trained SAE's sparsity.
            "b_enc": torch.full((d_sae,), -2.65),
            "b_dec": torch.zeros(d),
        }
        saes[f"sae{j}"] = SAE({"architecture": "standard", "d_in": d, "d_sae": d_sae}, w, {"hook": "h", "tokens": "patches"})
    return saes


def child(args) -> None:
    """One store: the pass and the baseline, alternated `repeats` times in this process (best of each, so a
    busy machine disturbs the ratio less); prints one JSON line."""
    from tools.topk import run_topk

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    saes = make_saes(args.n_saes, args.d, args.d_sae, args.seed)
    weights = [s.W_enc.to(dev) for s in saes.values()]
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    best_pass, best_base, peak_rss_mb, peak_gpu_mb = 0.0, 0.0, 0.0, None
    loader_patches_per_s = None
    for rep in range(args.repeats):
        prof = None
        if args.profile and rep == args.repeats - 1:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        res = run_topk(saes, args.store, args.out, k=args.k, memory_mb=args.memory_mb, device=args.device, n_readers=args.readers,
                       patchsae=not args.no_patchsae, overwrite=True, quiet=True)
        if prof is not None:
            import pstats

            prof.disable()
            pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(25)
        best_pass = max(best_pass, res.patches_per_s)
        if not peak_rss_mb:  # the pass alone, before the baseline allocates anything
            peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            peak_gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None
        best_base = max(best_base, baseline(weights, res.n_images * args.grid**2, res.block_images * args.grid**2, args.d, dev))
        if loader_patches_per_s is None:
            loader_patches_per_s = loader_only(args.store, res.block_images, dev, args.readers)
    print(json.dumps({
        "loader_patches_per_s": loader_patches_per_s,
        "n_images": res.n_images, "n_blocks": res.n_blocks, "block_images": res.block_images,
        "pass_patches_per_s": best_pass, "matmul_patches_per_s": best_base, "peak_rss_mb": peak_rss_mb, "peak_gpu_mb": peak_gpu_mb,
    }))


def loader_only(store: str, block_images: int, dev: torch.device, n_readers: int) -> float:
    """patches/s of the ordered loader alone, blocks moved to the device: the pass cannot beat this."""
    from tools.topk import iter_image_blocks
    from saev_store.store import open_store

    st = open_store(store)
    t0, n = time.perf_counter(), 0
    for acts, _, _ in iter_image_blocks(st, "h", block_images, n_readers=n_readers):
        acts.to(dev)
        n += acts.shape[0] * acts.shape[1]
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def device_check(device: str, tmp: str) -> None:
    """The pass on `device` gives exactly the CPU's results (integer activations and dyadic weights make every
    latent exact on both, so any difference is a bug, not rounding)."""
    from saev_store.layout import TokenLayout
    from saev_store.store import HookSpec, create_store
    from trainers.sae_io import SAE
    from tools.topk import load_topk, run_topk

    rng = np.random.default_rng(0)
    path = os.path.join(tmp, "check.zarr")
    st = create_store(path, n_images=50, hooks={"h": HookSpec(8, TokenLayout(n_tokens=17, cls=0, grid=(4, 4), grid_start=1))},
                      images_per_chunk=7, metadata={"class_names": ["a", "b", "c"]})
    for i in st.pending_chunks():
        s, e = st.chunk_bounds(i)
        st.write_block(i, {"h": rng.integers(-3, 4, size=(e - s, 17, 8)).astype(np.float32)}, labels=rng.integers(-1, 3, e - s).astype(np.int32))
    st.finalize()
    w = {"W_enc": torch.from_numpy(rng.integers(-2, 3, size=(8, 64)) / 4).float(), "W_dec": torch.zeros(64, 8),
         "b_enc": torch.from_numpy(rng.integers(-6, 2, size=64) / 8).float(), "b_dec": torch.zeros(8)}
    for dev in ("cpu", device):
        sae = SAE({"architecture": "standard", "d_in": 8, "d_sae": 64}, w, {"hook": "h", "tokens": "patches"})
        run_topk({"a": sae}, path, os.path.join(tmp, "check-ref" if dev == "cpu" else "check-dev"), k=5, block_images=6, device=dev, quiet=True)
    a, b = load_topk(os.path.join(tmp, "check-ref")), load_topk(os.path.join(tmp, "check-dev"))
    for f in ("n_patches_active", "n_images_active", "sum_active", "max_act", "count_dataset", "count_class"):
        assert np.array_equal(getattr(a.stats, f), getattr(b.stats, f)), f
    for r in a.stats.top:
        for f in a.stats.top[r]._fields:
            assert np.array_equal(getattr(a.stats.top[r], f), getattr(b.stats.top[r], f), equal_nan=True), (r, f)
    ca, cb = a.image_counts(), b.image_counts()
    assert all(np.array_equal(getattr(ca, f), getattr(cb, f)) for f in ca._fields)
    print(f"device check: the pass on {device} equals the CPU's, array for array", flush=True)


def baseline(weights, n_patches: int, rows: int, d: int, dev: torch.device) -> float:
    """patches/s of `x @ W_enc` for every SAE over n_patches rows, in blocks of `rows`, input already in place."""
    x = torch.randn(rows, d, device=dev)
    for w in weights:  # warm-up (kernel selection, caches)
        x @ w
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    done = 0
    while done < n_patches:
        m = min(rows, n_patches - done)
        for w in weights:
            x[:m] @ w
        done += m
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return n_patches / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-images", type=int, default=1000, help="images of the small store; the large one has 4x")
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--grid", type=int, default=8, help="patch grid side (grid x grid patches + a CLS token)")
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--n-saes", type=int, default=2)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--memory-mb", type=float, default=128,
                   help="block budget of the pass (small, so that both store sizes span several blocks)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--readers", type=int, default=4, help="store chunks read ahead in parallel")
    p.add_argument("--no-patchsae", action="store_true", help="mine without PatchSAE's statistics (saev-tools topk --no-patchsae)")
    p.add_argument("--profile", action="store_true", help="print a cProfile of the last pass (per store size)")
    p.add_argument("--repeats", type=int, default=2, help="alternations of pass and baseline (best of each counts)")
    p.add_argument("--dir", default=None, help="where to build the stores (default: a temporary folder)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        if args.device != "cpu":
            device_check(args.device, tmp)
        results = []
        for mult in (1, 4):
            n = args.n_images * mult
            store = os.path.join(tmp, f"s{n}.zarr")
            t0 = time.perf_counter()
            build_store(store, n, args.d, args.grid, args.seed)
            print(f"built a store of {n} images x {args.grid * args.grid + 1} tokens x d={args.d} in {time.perf_counter() - t0:.1f} s", flush=True)
            cmd = [sys.executable, __file__, "--child", "--store", store, "--out", os.path.join(tmp, f"topk{n}")] + ["--profile"] * args.profile + ["--no-patchsae"] * args.no_patchsae
            for key in ("d", "grid", "d_sae", "n_saes", "k", "memory_mb", "device", "threads", "seed", "repeats", "readers"):
                cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"the pass failed on {n} images:\n{proc.stderr}")
            out = proc.stdout
            if args.profile:
                print(proc.stderr, flush=True)
            r = json.loads(out.strip().splitlines()[-1])
            results.append(r)
            gpu = "" if r["peak_gpu_mb"] is None else f", peak GPU {r['peak_gpu_mb']:.0f} MiB"
            print(
                f"{r['n_images']:>7} images ({r['n_blocks']} blocks of {r['block_images']}): loader alone {r['loader_patches_per_s']:,.0f}, "
                f"pass {r['pass_patches_per_s']:,.0f} patches/s, "
                f"matmul {r['matmul_patches_per_s']:,.0f} patches/s, ratio {r['pass_patches_per_s'] / r['matmul_patches_per_s']:.2f} "
                f"(target >= 0.7); peak RSS {r['peak_rss_mb']:.0f} MiB{gpu}",
                flush=True,
            )
        a, b = results
        print(f"peak RSS, 4x images vs 1x: {b['peak_rss_mb'] / a['peak_rss_mb']:.2f}x (bounded memory: about 1x)")
        print(f"{args.n_saes} SAEs of {args.d} -> {args.d_sae} on {args.device}; ratio at 4x images: {b['pass_patches_per_s'] / b['matmul_patches_per_s']:.2f}")


if __name__ == "__main__":
    main()
