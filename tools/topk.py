"""`saev-tools topk`: one ordered pass over a store serves every SAE of a run; per-latent statistics to disk.

    from tools.topk import run_topk, load_topk
    res = run_topk("runs/demo", store="demo/fmnist.zarr", out_dpath="runs/demo/topk")
    data = load_topk("runs/demo/topk", "w1280-l1=5")     # TopkData: index + LatentStats
    data.stats.freq_patch, data.stats.top["max"].images   # (d_sae,), (d_sae, k)

The pass reads each block of images once (the ordered loader, every stored token, raw activations: the
exported SAEs fold their input normalization into their weights), encodes it with every SAE in turn and
feeds each SAE's `LatentAccumulator` (tools/accumulate.py holds the definitions). Each SAE is mined on the
tokens it was trained on (its saev_extra.json): its patch tokens, or every token for an SAE trained on
`all`; a `cls` SAE has one token per image and no patch to map, and is refused. Memory is bounded: one block of
activations (sized by `memory_mb`), one chunk of latents (`accumulate.CHUNK_BYTES`), plus each
accumulator's fixed state.

Output folder (written as OUT.partial and renamed when complete, so a crash leaves nothing half-done that
looks finished; a rerun with `overwrite` starts over):

    OUT/index.json                      what was computed: store, hook, k, tau, class names, SAEs (each with
                                        the tokens it was mined on)
    OUT/<sae>/stats.safetensors         per-latent vectors (d_sae,) and count_class (n_classes, d_sae); with
                                        PatchSAE's statistics, patchsae_{n_images_active,sum_score} (d_sae,)
                                        and patchsae_count_class (n_classes, d_sae)
    OUT/<sae>/exemplars.safetensors     <ranking>_{values,images,labels,entropy} (d_sae, k) / (d_sae,),
                                        <ranking>_patches (d_sae, k, P), ranking in {max, mean, patchsae}
    OUT/<sae>/image_counts.zarr         sparse per-image counts: 1-D arrays image, latent, count
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import queue
import shutil
import threading
import time
from typing import Iterator, Mapping, NamedTuple

import numpy as np
import safetensors.numpy
import torch
import zarr

from saev_store import __version__
from saev_store.errors import UserError
from saev_store.store import Store, open_store

from .accumulate import PATCHSAE_RANKING, RANKINGS, Exemplars, ImageCounts, LatentAccumulator, LatentStats, Scratch
from .config import MINED_TOKENS, TopkConfig

INDEX_FNAME = "index.json"
STATS_FNAME = "stats.safetensors"
EXEMPLARS_FNAME = "exemplars.safetensors"
COUNTS_DNAME = "image_counts.zarr"
FORMAT = "saev-tools-topk"
FORMAT_VERSION = 2

STAT_FIELDS = ("n_patches_active", "n_images_active", "sum_active", "max_act", "count_dataset", "count_class")
PATCHSAE_FIELDS = ("patchsae_n_images_active", "patchsae_sum_score", "patchsae_count_class")
"""PatchSAE's statistics (tools/accumulate.py), in stats.safetensors when computed."""
_COUNTS_FLUSH = 1 << 20  # sparse count entries buffered before an append to Zarr (12 MiB)


class TopkResult(NamedTuple):
    """What `run_topk` did."""

    out_dpath: str
    """The output folder."""
    names: list[str]
    """SAEs processed, in order."""
    n_images: int
    """Valid images streamed."""
    n_blocks: int
    """Blocks the pass read (> 1 when the store is larger than the memory budget)."""
    block_images: int
    """Images per block."""
    elapsed_s: float
    """Wall time of the pass."""
    patches_per_s: float
    """Patches streamed per second (each one through every SAE)."""


class TopkData(NamedTuple):
    """One SAE's results, read back from a topk folder."""

    dpath: str
    """The topk folder."""
    name: str
    """The SAE's name."""
    index: dict
    """The folder's index.json."""
    stats: LatentStats
    """Every per-latent statistic and both exemplar rankings."""

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.index["grid"])

    @property
    def class_names(self) -> list[str] | None:
        return self.index.get("class_names")

    def image_counts(self) -> ImageCounts:
        """The sparse per-image counts (patches above tau), whole."""
        return load_image_counts(os.path.join(self.dpath, self.name, COUNTS_DNAME))


# ---- which SAEs --------------------------------------------------------------------------------------
def resolve_saes(run_or_sae: str | os.PathLike, device: str = "cpu") -> dict:
    """An SAE folder -> {its name: SAE}; a run folder -> every SAE of the run, in run.json's order."""
    from trainers.sae_io import CFG_FNAME, load_run, load_sae

    dpath = pathlib.Path(run_or_sae)
    if not dpath.is_dir():
        raise UserError(f"{dpath} does not exist; pass a training run folder (runs/<run>) or one SAE folder (runs/<run>/<sae>).")
    if (dpath / CFG_FNAME).is_file():
        sae = load_sae(dpath, device)
        return {sae.name or dpath.name: sae}
    return load_run(dpath, device)


def _common(saes: Mapping, attr: str, given):
    """The one value of `attr` all SAEs agree on (or `given` when passed)."""
    if given is not None:
        return given
    values = {getattr(s, attr, None) for s in saes.values()} - {None, ""}
    if len(values) > 1:
        raise UserError(f"the SAEs were trained on different values of {attr} ({', '.join(sorted(map(str, values)))}); pass --{attr} or process them separately.")
    return values.pop() if values else None


# ---- the pass ----------------------------------------------------------------------------------------
def mined_tokens(name: str, sae, tokens: str | None) -> str:
    """The token selection SAE `name` is mined on: the one it was trained on (`tokens` must agree when
    given, and is needed when the SAE does not record it)."""
    own = getattr(sae, "tokens", None)
    if own is None and tokens is None:
        raise UserError(f"SAE {name!r} does not record which tokens it was trained on (no saev_extra.json); "
                        f"pass --tokens ({' or '.join(MINED_TOKENS)}).")
    if own is not None and tokens is not None and own != tokens:
        raise UserError(f"SAE {name!r} was trained on {own!r} tokens, not {tokens!r}: mining other tokens than it was "
                        "trained on would describe inputs it never saw. Leave out --tokens.")
    sel = own or tokens
    if sel not in MINED_TOKENS:
        raise UserError(f"SAE {name!r} was trained on {sel!r} tokens: one token per image, with no patch to map a "
                        f"heatmap onto, so topk cannot mine it (it mines SAEs trained on {' or '.join(MINED_TOKENS)} tokens).")
    return sel


def plan_block_images(n_tokens: int, d: int, memory_mb: float) -> int:
    """Images per block under `memory_mb`, budgeting 12*T*d bytes per image (T: the tokens read): the block
    as the loader gives it, its float32 copy on the device (none on a CPU) and its copy centered on each SAE's
    b_dec, float32.

    The latents are not in it: the pass encodes a block in chunks of a fixed size (`CHUNK_BYTES` of latents,
    reused), so they cost the same whatever the block. Sizing blocks for their full latents (16*T*d_sae per
    image, as this did before) made them tiny on a GPU: 31 images for three 16,384-wide SAEs at 512 MiB,
    and a block costs a fixed ~20 ms there.
    """
    per_image = 12 * n_tokens * d
    return max(1, int(memory_mb * (1 << 20)) // per_image)


def iter_image_blocks(store: Store, hook: str, block_images: int, image_mask: np.ndarray | None = None, n_readers: int = 4) -> Iterator:
    """(acts_ntd float32 torch, images int64, labels int32) of the valid images, in image order.

    Thin over the ordered loader (every stored token, raw activations). Besides the block, the loader holds a
    few whole store chunks in flight (8-64 MiB each), also independent of the number of images."""
    from saev_store.loaders import OrderedLoader

    with OrderedLoader(store, hook, tokens="all", normalize=False, block_images=block_images, image_mask=image_mask, n_readers=n_readers) as loader:
        for block in loader:
            yield block.acts, np.asarray(block.images, dtype=np.int64), np.asarray(block.labels, dtype=np.int32)


def chunk_encoder(sae, x_md: torch.Tensor, n_tokens: int):
    """`encode(i0, i1, out_ctl)` for `LatentAccumulator.update_encoded`: `sae.encode` of the tokens of images
    i0..i1-1 of the block `x_md` (n * T rows), written into `out_ctl`.

    A ReLU SAE is computed in place: the matmul writes straight into the reused chunk buffer and the bias and
    ReLU follow in it while it is in the cache, instead of `encode`'s four fresh block-sized tensors
    ((x - b_dec), the product, + b_enc, relu). Same operations on the same rows, so the latents are bitwise
    `sae.encode`'s (tests/test_tools_stats.py checks it on random floats); a fused addmm would round
    differently. Other architectures go through `sae.encode` on the chunk's rows."""
    from trainers.sae_io import SAE

    if isinstance(sae, SAE) and sae.architecture == "standard" and sae.W_enc.device == x_md.device:
        xc_md = x_md - sae.b_dec if sae.apply_b_dec_to_input else x_md  # once per block, shared by its chunks
        w_dl, b_l = sae.W_enc, sae.b_enc

        def encode(i0: int, i1: int, out_ctl: torch.Tensor) -> None:
            out = out_ctl.view(-1, out_ctl.shape[-1])
            torch.matmul(xc_md[i0 * n_tokens : i1 * n_tokens], w_dl, out=out)
            out.add_(b_l).relu_()

    else:

        def encode(i0: int, i1: int, out_ctl: torch.Tensor) -> None:
            out_ctl.copy_(sae.encode(x_md[i0 * n_tokens : i1 * n_tokens]).reshape(out_ctl.shape))

    return encode


def n_classes_of(store: Store) -> int:
    """Classes for the class-level counts: the store's class names, else the largest label + 1."""
    if store.class_names:
        return len(store.class_names)
    labels = store.labels()
    return int(labels.max()) + 1 if labels.size and labels.max() >= 0 else 0


def run_topk(
    saes: Mapping | str | os.PathLike,
    store: Store | str | os.PathLike | None = None,
    out_dpath: str | os.PathLike | None = None,
    **options,
) -> TopkResult:
    """Stream the store once through every SAE and write the per-latent statistics to `out_dpath`.

    `saes`: {name: SAE} or a run / SAE folder. `store`: defaults to the store the SAEs were trained on.
    `out_dpath`: defaults to `<run or SAE folder>/topk`. `options`: the other TopkConfig fields (`k`,
    `tau`, `tokens`, `block_images` instead of `memory_mb`, `n_readers` ...).
    """
    from tqdm.auto import tqdm

    cfg = TopkConfig(store=store, out_dpath=None if out_dpath is None else str(out_dpath), **options)
    store, out_dpath, hook, tokens, k, tau = cfg.store, cfg.out_dpath, cfg.hook, cfg.tokens, cfg.k, cfg.tau
    block_images, device, quiet = cfg.block_images, cfg.device, cfg.quiet
    src_dpath = None
    if not isinstance(saes, Mapping):
        src_dpath = str(saes)
        saes = resolve_saes(saes, device)
    if not saes:
        raise UserError("no SAE to process.")
    store = store if store is not None else _common(saes, "store", None)
    if store is None:
        raise UserError("the SAEs do not record which store they were trained on; pass --store.")
    st = store if isinstance(store, Store) else open_store(store)
    hook = _common(saes, "hook", hook)
    if hook is None:
        raise UserError(f"the SAEs do not record their hook; pass --hook (one of {', '.join(st.hooks)}).")
    info = st.hook(hook)
    if info.layout.grid is None:
        raise UserError(f"hook {hook!r} of {st.path} stores no patch grid, so there is nothing to map exemplars onto; pick a hook with patches.")
    sel = {name: mined_tokens(name, sae, tokens) for name, sae in saes.items()}
    for name, sae in saes.items():
        if sae.d_in != info.d:
            raise UserError(f"SAE {name!r} takes inputs of width {sae.d_in} but hook {hook!r} of {st.path} has d={info.d}; pass the store and hook it was trained on.")
    if out_dpath is None:
        if src_dpath is None:
            raise UserError("pass out_dpath (where to write the statistics).")
        out_dpath = os.path.join(src_dpath, "topk")
    out = pathlib.Path(out_dpath)
    if out.exists():
        if not cfg.overwrite:
            raise UserError(f"{out} already exists; pass --overwrite to replace it or --out to write elsewhere.")
        if not (out / INDEX_FNAME).is_file():
            raise UserError(f"{out} exists and is not a topk folder (no {INDEX_FNAME}); refusing to delete it. Choose another --out.")
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # a crashed earlier run: start over
    partial.mkdir(parents=True)

    n_patches, n_tokens = info.layout.n_patches, info.layout.n_tokens
    grid_tokens = (info.layout.grid_start, n_patches)
    mined = {name: (int(idx[0]), int(idx[-1]) + 1) for name, idx in ((n, info.layout.indices(t)) for n, t in sel.items())}
    n_classes = n_classes_of(st)
    if block_images is None:
        block_images = plan_block_images(n_tokens, info.d, cfg.memory_mb)
    block_images = int(max(1, block_images))
    valid = st.valid()
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise UserError(f"store {st.path} holds no valid image; finish recording it first.")

    for sae in saes.values():
        if hasattr(sae, "to"):
            sae.to(device)
        if hasattr(sae, "eval"):
            sae.eval()
    scratch = Scratch()  # one mask buffer for all SAEs: they are processed one after another
    accs = {n: LatentAccumulator(s.d_sae, n_tokens, k=k, tau=tau, n_classes=n_classes, device=device, scratch=scratch,
                                 grid_tokens=grid_tokens, mined_tokens=mined[n], patchsae=cfg.patchsae) for n, s in saes.items()}
    writers = {n: _CountsWriter(partial / n / COUNTS_DNAME) for n in saes}

    n_blocks = 0
    t0 = time.perf_counter()
    bar = tqdm(total=n_valid, unit="img", disable=quiet, desc=f"topk {len(saes)} SAE(s)")
    try:
        with torch.inference_mode():
            for acts_ntd, images, labels in iter_image_blocks(st, hook, block_images, n_readers=cfg.n_readers):
                n = acts_ntd.shape[0]
                x = acts_ntd.to(device, torch.float32).reshape(n * n_tokens, info.d)
                for name, sae in saes.items():
                    writers[name].add(accs[name].update_encoded(n, chunk_encoder(sae, x, n_tokens), images, labels))
                n_blocks += 1
                bar.update(n)
                bar.set_postfix_str(f"{bar.n * n_patches / max(1e-9, time.perf_counter() - t0):,.0f} patches/s", refresh=False)
        for w in writers.values():
            w.close()
    finally:
        bar.close()
        for w in writers.values():  # a no-op after close(); after an error, stops the threads
            w.abort()
    elapsed_s = time.perf_counter() - t0

    entries = {}
    for name, sae in saes.items():
        _write_stats(partial / name, accs[name].result())
        entries[name] = {"d_sae": int(sae.d_sae), "sae_dpath": _sae_dpath(src_dpath, name, sae), "tokens": sel[name],
                         "mined_tokens": list(mined[name]), "n_mined": mined[name][1] - mined[name][0]}
    has_labels = bool((st.labels()[valid] >= 0).any())
    index = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "software_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "store": os.path.abspath(st.path) if "://" not in st.path else st.path,
        "hook": hook,
        "grid": list(info.layout.grid),
        "n_patches": n_patches,
        "n_tokens": n_tokens,
        "grid_tokens": list(grid_tokens),
        "n_images": n_valid,
        "n_store_images": st.n_images,
        "k": k,
        "tau": tau,
        "rankings": list(RANKINGS) + ([PATCHSAE_RANKING] if cfg.patchsae else []),
        "patchsae": cfg.patchsae,
        "has_cls": info.layout.cls is not None,
        "has_labels": has_labels,
        "class_names": st.class_names,
        "n_classes": n_classes,
        "saes": entries,
        "elapsed_s": elapsed_s,
    }
    (partial / INDEX_FNAME).write_text(json.dumps(index, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    n_img = sum(a.n_images for a in accs.values()) // len(accs)
    return TopkResult(str(out), list(saes), n_img, n_blocks, block_images, elapsed_s, n_img * n_patches / max(elapsed_s, 1e-9))


def _sae_dpath(src_dpath: str | None, name: str, sae) -> str | None:
    if src_dpath is None:
        return None
    p = pathlib.Path(src_dpath)
    return str((p if (p / "cfg.json").is_file() else p / name).resolve())


# ---- files -------------------------------------------------------------------------------------------
class _CountsWriter:
    """Appends sparse per-image counts to three 1-D Zarr arrays from a background thread, so disk writes overlap
    the next blocks' encoding; buffers so appends are few and large. The queue is short, so memory stays bounded."""

    def __init__(self, dpath: pathlib.Path):
        dpath.parent.mkdir(parents=True, exist_ok=True)
        group = zarr.open_group(str(dpath), mode="w")
        self.arrays = {
            key: group.create_array(key, shape=(0,), chunks=(_COUNTS_FLUSH,), dtype=dtype)
            for key, dtype in (("image", "int64"), ("latent", "int32"), ("count", "int32"))
        }
        self.buf: list[ImageCounts] = []
        self.n_buf = 0
        self.error: BaseException | None = None
        self.queue: queue.Queue = queue.Queue(maxsize=4)
        self.thread = threading.Thread(target=self._run, name=f"counts-{dpath.parent.name}", daemon=True)
        self.thread.start()

    def add(self, c: ImageCounts) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(c)

    def _run(self) -> None:
        while True:
            c = self.queue.get()
            if c is None:
                break
            if self.error is not None:
                continue  # drain, so add() never blocks on a dead writer
            try:
                self.buf.append(c)
                self.n_buf += len(c.images)
                if self.n_buf >= _COUNTS_FLUSH:
                    self._flush()
            except BaseException as err:  # reported to the pass by add() / close()
                self.error = err
        if self.error is None:
            try:
                self._flush()
            except BaseException as err:
                self.error = err

    def _flush(self) -> None:
        if not self.n_buf:
            return
        for key, field in (("image", "images"), ("latent", "latents"), ("count", "counts")):
            self.arrays[key].append(np.concatenate([getattr(c, field) for c in self.buf]))
        self.buf, self.n_buf = [], 0

    def close(self) -> None:
        """Write what is buffered and stop the thread; raises what went wrong in it."""
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        """After an error in the pass: stop the thread without waiting (the .partial folder is redone next time)."""
        if self.thread.is_alive():
            self.queue.put(None)


def load_image_counts(dpath: str | os.PathLike) -> ImageCounts:
    g = zarr.open_group(str(dpath), mode="r")
    return ImageCounts(np.asarray(g["image"][:]), np.asarray(g["latent"][:]), np.asarray(g["count"][:]))


def _write_stats(dpath: pathlib.Path, s: LatentStats) -> None:
    dpath.mkdir(parents=True, exist_ok=True)
    vectors = {f: np.ascontiguousarray(getattr(s, f)) for f in STAT_FIELDS + PATCHSAE_FIELDS if getattr(s, f) is not None}
    safetensors.numpy.save_file(
        vectors, str(dpath / STATS_FNAME), metadata={"n_images": str(s.n_images), "n_patches": str(s.n_patches), "tau": repr(s.tau)}
    )
    ex = {}
    for r, e in s.top.items():
        for f in Exemplars._fields:
            ex[f"{r}_{f}"] = np.ascontiguousarray(getattr(e, f))
    safetensors.numpy.save_file(ex, str(dpath / EXEMPLARS_FNAME))


def list_saes(dpath: str | os.PathLike) -> list[str]:
    """Names of the SAEs a topk folder holds."""
    return list(_read_index(dpath)["saes"])


def _read_index(dpath) -> dict:
    fpath = pathlib.Path(dpath) / INDEX_FNAME
    if not fpath.is_file():
        raise UserError(f"{dpath} is not a topk folder (no {INDEX_FNAME}); run `saev-tools topk` first.")
    index = json.loads(fpath.read_text())
    if index.get("format") != FORMAT or index.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{fpath} is not a {FORMAT} v{FORMAT_VERSION} index; rerun `saev-tools topk`.")
    return index


def load_topk(dpath: str | os.PathLike, name: str | None = None) -> TopkData:
    """Read one SAE's statistics back. `name` may be left out when the folder holds one SAE."""
    index = _read_index(dpath)
    names = list(index["saes"])
    if name is None:
        if len(names) != 1:
            raise UserError(f"{dpath} holds {len(names)} SAEs ({', '.join(names)}); name one with --sae.")
        name = names[0]
    if name not in index["saes"]:
        raise UserError(f"{dpath} has no SAE {name!r}; it has: {', '.join(names)}.")
    sdir = pathlib.Path(dpath) / name
    vec = safetensors.numpy.load_file(str(sdir / STATS_FNAME))
    ex = safetensors.numpy.load_file(str(sdir / EXEMPLARS_FNAME))
    top = {r: Exemplars(*(ex[f"{r}_{f}"] for f in Exemplars._fields)) for r in index["rankings"]}
    stats = LatentStats(
        n_images=int(index["n_images"]), n_patches=int(index["saes"][name]["n_mined"]), tau=float(index["tau"]), top=top,
        **{f: vec[f] for f in STAT_FIELDS + PATCHSAE_FIELDS if f in vec}
    )
    return TopkData(str(dpath), name, index, stats)
