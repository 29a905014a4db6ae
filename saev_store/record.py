"""Record a vision model's activations over a dataset into a store.

    saev-store record --out demo.zarr                                    # EfficientNet-Lite0 on Fashion-MNIST
    saev-store record --out vit.zarr --model timm:vit_base_patch16_224 --weights vit.safetensors \
        --layer 10 --dataset folder --data /data/imagenet/train --device cuda --batch-size 256
    accelerate launch -m saev_store.cli record --out vit.zarr ...          # one process per GPU

Batches never cross chunk boundaries, so every chunk is computed from the same batches whichever
process records it and however often the run was interrupted: a resumed or multi-process store is
bitwise identical to an uninterrupted single-process one. Finished chunks go to a background writer
while the model computes the next ones.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable

import numpy as np
import torch

from . import format as fmt
from .distributed import agree, rank_world
from .datasets import DATASET_KINDS
from .datasets.masks import MaskConfig
from .errors import UserError
from .layout import TokenSelection
from .options import check_applies, check_choices, option
from .store import HookSpec, Store, create_store, open_store
from .writer import BlockWriter, RecordedChunk, WriterError

DEFAULT_MODEL = "efficientnet:lite0"
DEFAULT_DATASET = "fashion-mnist"


@dataclasses.dataclass
class RecordConfig:
    """What to record and where (`saev-store record`'s options, saev_store/options.py). Defaults record
    the embedded demo (no download needed)."""

    out: str
    """Store to create or resume (`NAME.zarr`, or a Zarr store URL)."""
    model: str = DEFAULT_MODEL
    """`BACKEND:NAME`, e.g. `timm:vit_base_patch16_224`, `open_clip:ViT-B-16`, `hf:DIR`, `torchvision:resnet50` (see Models)."""
    weights: str | None = None
    """Local weights file or directory (never downloaded); none: packaged weights, or a seeded random init."""
    hooks: tuple[str, ...] = option((), flag="--hook", multiple=True)
    """Module path to record, repeatable (see `saev-store hooks`)."""
    layers: tuple[int, ...] = option((), flag="--layer", multiple=True)
    """Layer N, repeatable: a ViT's residual stream after block N, a CNN's stage/block N; negative counts from the
    end. Without --hook and --layer: the last layer."""
    dataset: str | None = option(None, choices=DATASET_KINDS)
    """Dataset kind (see Datasets). Default: inferred from --data (idx files: fashion-mnist; a `datasets`
    save_to_disk directory: hf-disk; else a folder of images), fashion-mnist without --data."""
    data: str | None = None
    """Dataset root; the kind's default when not given (fashion-mnist: /usr/share/datasets/fashion-mnist)."""
    split: str = "train"
    """Dataset split (fashion-mnist: train, test or all; folder: the subfolder when it exists; hf-disk: needed for a DatasetDict)."""
    image_column: str | None = None
    """hf-disk: the image column (default `image`)."""
    label_column: str | None = None
    """hf-disk: the label column (default `label` when present, else unlabeled)."""
    batch_size: int = 64
    """Images per forward pass (batches never cross chunk boundaries)."""
    device: str = "cpu"
    """torch device for the model, e.g. cuda, cuda:1."""
    store_dtype: str = option("float32", choices=fmt.STORE_DTYPES)
    """Stored dtype: float16 and bfloat16 halve the disk (bfloat16 kept as its raw 16-bit pattern)."""
    tokens: TokenSelection = "all"
    """Which tokens to store."""
    keep_registers: bool = False
    """Keep ViT register tokens (dropped by default)."""
    limit: int | None = None
    """Record only the first N images of the dataset."""
    seed: int = 0
    """Seeds torch (random-weight models); recorded in the metadata."""
    num_workers: int = 1
    """Image-decoding worker processes."""
    skip_bad: bool = False
    """Record unreadable images as invalid (every reader skips them) instead of stopping."""
    overwrite: bool = False
    """Delete an existing store at --out and start over."""
    chunk_mib: int = option(32, when=("images_per_chunk", (None,)))
    """Target chunk size for the largest hook, MiB (8-64): chunks hold whole images."""
    images_per_chunk: int | None = None
    """Images per chunk, instead of --chunk-mib (small stores, tests)."""
    image_size: int | None = None
    """Override the model's input size (square), e.g. for a fast demo."""
    mean: tuple[float, float, float] | None = None
    """Override the normalization mean, e.g. 0.485,0.456,0.406."""
    std: tuple[float, float, float] | None = None
    """Override the normalization std."""
    jpeg_draft_mpx: float | None = None
    """Opt-in reduced decoding: JPEGs over this many megapixels decode at 1/2-1/8 scale (never below the
    resize; see Preprocessing). Default: every image at full size, as the model's library decodes it."""
    quiet: bool = False
    """No progress bar (it shows images/s and MB/s)."""
    masks: MaskConfig = option(default_factory=MaskConfig, flatten=True)
    """Label masks to turn into patch labels in the same pass (none by default)."""

    def __post_init__(self):
        for name in ("hooks", "layers"):
            setattr(self, name, tuple(getattr(self, name)))
        for name in ("mean", "std"):
            if getattr(self, name) is not None:
                setattr(self, name, tuple(float(v) for v in getattr(self, name)))
        check_choices(self)
        check_applies(self)
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1 (got {self.batch_size}).")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be at least 1 (got {self.limit}).")
        if not 8 <= self.chunk_mib <= 64:
            raise UserError(f"--chunk-mib {self.chunk_mib} is outside 8-64 MiB.")
        if self.jpeg_draft_mpx is not None and not self.jpeg_draft_mpx >= 0:
            raise UserError(f"--jpeg-draft-mpx {self.jpeg_draft_mpx} must be >= 0 megapixels (leave it out for full-size decoding).")

    @property
    def dataset_options(self) -> dict:
        """The dataset kind's own options that were given (create_dataset refuses those its kind does not take)."""
        return {k: v for k, v in {"image_column": self.image_column, "label_column": self.label_column}.items() if v is not None}


class Result(dict):
    """What a record run did: images and bytes written, seconds, whether the store completed."""


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def metadata_diff(store_attrs: dict, meta: dict, hooks: dict[str, HookSpec], store_dtype: str, n_images: int) -> list[str]:
    """What differs between an existing store and this run (empty when they agree)."""
    from .models.preprocess import PreprocessConfig

    diffs = []
    for key in ("model", "dataset", "preprocessing", "tokens", "keep_registers", "class_names"):
        have, want = _jsonable(store_attrs.get(key)), _jsonable(meta.get(key))
        if key == "preprocessing" and isinstance(have, dict):
            # A store written before a preprocessing key existed reads with the value that reproduces
            # its images (PreprocessConfig.from_dict), so it resumes when this run matches that value.
            have = _jsonable(PreprocessConfig.from_dict(have).to_dict())
        if have != want:
            if isinstance(have, dict) and isinstance(want, dict):
                for k in sorted(set(have) | set(want)):
                    if have.get(k) != want.get(k):
                        diffs.append(f"{key}.{k}: store has {have.get(k)!r}, this run has {want.get(k)!r}")
            else:
                diffs.append(f"{key}: store has {have!r}, this run has {want!r}")
    if store_attrs["store_dtype"] != store_dtype:
        diffs.append(f"store_dtype: store has {store_attrs['store_dtype']!r}, this run has {store_dtype!r}")
    if store_attrs["n_images"] != n_images:
        diffs.append(f"n_images: store has {store_attrs['n_images']}, this run has {n_images} (check --limit)")
    want_hooks = {h: {"n_tokens": s.n_tokens, "d": s.d, "layout": s.layout.to_dict(), "module": s.module} for h, s in hooks.items()}
    if _jsonable(store_attrs["hooks"]) != _jsonable(want_hooks):
        diffs.append(f"hooks: store has {sorted(store_attrs['hooks'])}, this run has {sorted(want_hooks)} (or their shapes differ)")
    return diffs


def label_sets_diff(have: dict[str, dict], want: dict[str, dict]) -> list[str]:
    """What differs between a store's patch-label sets and this run's (empty when they agree)."""
    from .add_labels import label_set_diff

    diffs = []
    for key in sorted(set(have) | set(want)):
        if key not in want:
            diffs.append(f"patch_labels {key}: the store records them, this run has no masks (pass the same --masks)")
        elif key not in have:
            diffs.append(f"patch_labels {key}: this run has masks, the store records no patch labels")
        else:
            diffs += [f"patch_labels {key}.{d}" for d in label_set_diff(have[key], want[key])]
    return diffs


def _dist_state(device: str) -> tuple[int, int]:
    """(rank, world_size) for a run under `accelerate launch` or `torchrun` (both set
    RANK/WORLD_SIZE/MASTER_ADDR); a plain run is rank 0 of 1. Recording needs no collective but
    the agreements around creating and finalizing the store (saev_store/distributed.py), so gloo
    serves on any device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    if device.startswith("cuda") and torch.cuda.is_available() and ":" not in device:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return rank_world()


def resolve_hooks(model, cfg: RecordConfig) -> list[str]:
    """--hook and --layer, in the order given; the model's last layer when neither is given."""
    names = list(cfg.hooks) + [model.layer_hook(n) for n in cfg.layers]
    if not names:
        names = [model.layer_hook(model.n_layers() - 1)]
    seen = []
    for n in names:
        if n not in seen:
            seen.append(n)
    return seen


def _probe_hooks(model, hooks: list[str], cfg: RecordConfig, image_hw: tuple[int, int]) -> dict[str, HookSpec]:
    """One forward pass of a blank image gives each hook's token count and width."""
    x = torch.zeros(1, 3, *image_hw, device=cfg.device)
    with torch.inference_mode():
        out = model.capture(x, hooks, keep_registers=cfg.keep_registers, tokens=cfg.tokens)
    specs = {}
    for h in hooks:
        layout = model.token_layout(h, keep_registers=cfg.keep_registers, tokens=cfg.tokens)
        t = out[h]
        if t.shape[1] != layout.n_tokens:
            raise RuntimeError(f"hook {h}: capture gave {t.shape[1]} tokens but its layout says {layout.n_tokens}")
        specs[h] = HookSpec(d=int(t.shape[2]), layout=layout, module=h)
    return specs


def _chunk_batches(st: Store, chunks: list[int], batch_size: int) -> list[list[int]]:
    """Image-index batches that never cross a chunk boundary, for the chunks in order."""
    out = []
    for i in chunks:
        start, stop = st.chunk_bounds(i)
        for b in range(start, stop, batch_size):
            out.append(list(range(b, min(b + batch_size, stop))))
    return out


def record(cfg: RecordConfig, on_progress: Callable[[int, int], None] | None = None) -> Result:
    """Record `cfg` into its store: create or resume it, fill this process's chunks, finalize.

    Returns a summary. Raises UserError for bad input (unknown hook, missing dataset, metadata
    mismatch with an existing store, unreadable image without --skip-bad, disk full).
    """
    from .datasets import create_dataset, infer_kind
    from .models import create_model

    rank, world = _dist_state(cfg.device)
    say = (lambda msg: print(msg, file=sys.stderr)) if rank == 0 else (lambda msg: None)
    torch.manual_seed(cfg.seed)
    kind = cfg.dataset
    if kind is None and cfg.data is None:
        kind = DEFAULT_DATASET
    elif kind is None:
        kind, why = infer_kind(cfg.data)
        say(f"dataset: {kind} ({cfg.data}: {why}); pass --dataset to choose another kind")
    src = create_dataset(kind, root=cfg.data, split=cfg.split, **cfg.dataset_options)
    n_images = len(src) if cfg.limit is None else min(cfg.limit, len(src))
    model = create_model(cfg.model, weights=cfg.weights, device=cfg.device)
    if model.weights == "random":
        say(f"model: {cfg.model} is randomly initialized (no --weights given; recorded as weights \"random\")")
    pre = model.preprocess
    overrides = {k: v for k, v in {"image_size": cfg.image_size, "mean": cfg.mean, "std": cfg.std}.items() if v is not None}
    if overrides:
        pre = pre.with_overrides(**overrides)
        model.preprocess = pre  # token layouts follow the input size (a CNN's grid, a ViT's patches)
    pre = dataclasses.replace(pre, jpeg_draft_mpx=cfg.jpeg_draft_mpx)  # how files decode: stored, checked on resume
    hooks = resolve_hooks(model, cfg)
    specs = _probe_hooks(model, hooks, cfg, tuple(pre.image_size))
    meta = {
        "model": model.describe(),
        "dataset": src.describe(),
        "preprocessing": pre.to_dict(),
        "class_names": src.class_names,
        "tokens": cfg.tokens,
        "keep_registers": cfg.keep_registers,
        "seed": cfg.seed,
    }
    labeler, label_sets = _labeler(cfg, src, pre, specs)

    # Process 0 creates, resumes or refuses the store; the others open what it decided.
    agree(lambda: _create_or_resume(cfg, specs, meta, n_images, label_sets), rank0_only=True)
    st = open_store(cfg.out, mode="r+")
    result = Result(store=cfg.out, hooks=hooks, n_images=n_images, rank=rank, world_size=world)
    if st.complete:
        result.update(images_written=0, bytes_written=0, seconds=0.0, complete=True, already_complete=True)
        return result

    chunks = st.pending_chunks(rank, world)
    labels_all = src.labels()[:n_images]
    ids_all = src.image_ids()[:n_images]
    t0 = time.perf_counter()
    # Every process records its chunks; an error in one (an unreadable image) stops all with its message.
    n_written = agree(lambda: _record_chunks(cfg, st, model, pre, hooks, chunks, src, labels_all, ids_all, on_progress,
                                             labeler))
    elapsed = time.perf_counter() - t0
    complete = agree(lambda: _finalize_if_done(cfg.out, label_sets), rank0_only=True)
    result.update(
        images_written=n_written["images"],
        bytes_written=n_written["bytes"],
        seconds=elapsed,
        write_seconds=n_written["write_s"],
        wait_seconds=n_written["wait_s"],
        complete=complete,
        already_complete=False,
    )
    return result


def _labeler(cfg: RecordConfig, src, pre, specs: dict[str, HookSpec]):
    """(PatchLabeler or None, grid key -> label set attributes) for `cfg.masks`."""
    if not cfg.masks.enabled:
        return None, {}
    from .add_labels import label_set_attrs
    from .datasets.masks import create_mask_source
    from .patch_labels import PatchLabeler

    masks = create_mask_source(cfg.masks, src)
    grids = {fmt.grid_key(s.layout.grid): s.layout.grid for s in specs.values() if s.layout.grid is not None}
    if not grids:
        raise UserError(f"--masks: no recorded hook keeps patch tokens (--tokens {cfg.tokens}), so there is nothing to label.")
    sets = {k: label_set_attrs(masks, cfg.masks, pre, g) for k, g in grids.items()}
    return PatchLabeler(masks, pre, grids, cfg.masks.rule, cfg.masks.background), sets


def _create_or_resume(cfg: RecordConfig, specs, meta, n_images: int, label_sets: dict) -> None:
    """Create the store, or check that the existing one records what this run would (process 0's decision)."""
    exists = os.path.exists(os.path.join(cfg.out, "zarr.json")) if "://" not in cfg.out else False
    if exists and not cfg.overwrite:
        st = open_store(cfg.out, mode="r+")
        diffs = metadata_diff(st.attrs, meta, specs, cfg.store_dtype, n_images)
        label_diffs = label_sets_diff(st.patch_label_sets(), label_sets)
        if st.complete and label_sets and label_diffs:
            raise UserError(f"{cfg.out} is already recorded; add or replace its patch labels without recording again: "
                            f"`saev-store add-labels {cfg.out}` with the same mask options (" + "; ".join(label_diffs) + ").")
        if not st.complete:
            diffs += label_diffs
        if diffs:
            raise UserError(
                f"{cfg.out} was recorded with different settings, so this run cannot resume it:\n  "
                + "\n  ".join(diffs)
                + "\nRerun with the store's settings, choose another --out, or pass --overwrite to start over."
            )
    else:
        create_store(
            cfg.out,
            n_images=n_images,
            hooks=specs,
            store_dtype=cfg.store_dtype,
            chunk_bytes=cfg.chunk_mib << 20,
            images_per_chunk=cfg.images_per_chunk,
            metadata=meta,
            patch_labels=label_sets,
            overwrite=cfg.overwrite,
        )


def _finalize_if_done(out: str, label_sets: dict) -> bool:
    """Statistics and the complete mark once every chunk is done (by any process, in any run)."""
    st = open_store(out, mode="r+")
    if not st.done().all():
        return False
    st.finalize()
    for key in label_sets:
        st.finalize_patch_labels(key)
    return True


def _record_chunks(cfg, st, model, pre, hooks, chunks, src, labels_all, ids_all, on_progress, labeler=None):
    """The loop: load batches, run the model, assemble chunks, hand them to the writer. With a
    PatchLabeler the workers also turn each image's mask into its patch labels."""
    from .add_labels import LabeledRecordDataset, collate_labeled
    from .datasets.torch_dataset import RecordDataset, collate

    batches = _chunk_batches(st, chunks, cfg.batch_size)
    ds = RecordDataset.model_input(src, pre)
    if labeler is not None:
        ds = LabeledRecordDataset(ds, labeler)
    grids = {} if labeler is None else labeler.grids
    loader = torch.utils.data.DataLoader(
        ds,
        batch_sampler=batches,
        num_workers=cfg.num_workers,
        collate_fn=collate if labeler is None else collate_labeled,
        pin_memory=cfg.device.startswith("cuda"),
        persistent_workers=False,
        prefetch_factor=4 if cfg.num_workers > 0 else None,
    )
    counts = {"images": 0, "bytes": 0, "write_s": 0.0, "wait_s": 0.0}
    pending: dict[int, dict] = {}  # chunk -> buffers being filled

    def new_buffers(i: int) -> dict:
        start, stop = st.chunk_bounds(i)
        n = stop - start
        return {
            "start": start,
            "filled": 0,
            "acts": {h: np.zeros((n, st.hook(h).n_tokens, st.hook(h).d), dtype=np.float32) for h in hooks},
            "valid": np.ones(n, dtype=bool),
            "patch_labels": {k: np.full((n, h * w), -1, dtype=np.int16) for k, (h, w) in grids.items()},
        }

    chunk_of = lambda idx: idx // st.images_per_chunk  # noqa: E731
    bar = _progress(cfg, total=sum(len(b) for b in batches))
    written_bytes = [0]

    def on_written(block: RecordedChunk):
        written_bytes[0] += block.n_bytes

    try:
        with BlockWriter(st, on_written=on_written) as writer:
            for batch in loader:
                if labeler is not None:
                    batch, patch_labels, mask_errors = batch
                idx, x, ok, errors = batch
                if not bool(ok.all()):
                    bad = [(int(i), e) for i, o, e in zip(idx, ok, errors) if not o]
                    if not cfg.skip_bad:
                        i, e = bad[0]
                        raise UserError(
                            f"cannot read image {i} ({ids_all[i]}): {e}. Fix or remove the file, or rerun with "
                            "--skip-bad to record it as invalid (readers skip invalid images); finished chunks are kept."
                        )
                with torch.inference_mode():
                    x = pre.normalize(x.to(cfg.device, non_blocking=True))
                    out = model.capture(x, hooks, keep_registers=cfg.keep_registers, tokens=cfg.tokens)
                out_np = {h: out[h].float().cpu().numpy() for h in hooks}
                i = chunk_of(int(idx[0]))
                buf = pending.setdefault(i, new_buffers(i))
                lo = int(idx[0]) - buf["start"]
                hi = lo + len(idx)
                for h in hooks:
                    buf["acts"][h][lo:hi] = out_np[h]
                buf["valid"][lo:hi] = ok.numpy().astype(bool)
                if labeler is not None:
                    _fill_patch_labels(buf["patch_labels"], lo, patch_labels, mask_errors, idx)
                buf["filled"] += len(idx)
                if buf["filled"] == len(buf["valid"]):
                    del pending[i]
                    start = buf["start"]
                    stop = start + len(buf["valid"])
                    valid = buf["valid"]
                    acts = buf["acts"]
                    for h in hooks:
                        acts[h][~valid] = 0.0  # an unreadable image stores zeros, flagged invalid
                    writer.submit(RecordedChunk(i, acts, labels_all[start:stop], ids_all[start:stop], valid, buf["patch_labels"] or None))
                counts["images"] += len(idx)
                if bar is not None:
                    bar.update(len(idx))
                    el = max(bar.format_dict["elapsed"], 1e-9)
                    bar.set_postfix_str(f"{written_bytes[0] / 2**20 / el:.1f} MB/s written", refresh=False)
                if on_progress is not None:
                    on_progress(counts["images"], len(batches))
        counts["write_s"], counts["wait_s"] = writer.write_s, writer.wait_s
    except WriterError as err:
        if isinstance(err.err, OSError) and getattr(err.err, "errno", None) == 28:
            raise UserError(
                f"the disk holding {cfg.out} is full (while writing chunk {err.chunk}). Free space and rerun the same "
                "command: finished chunks are kept and the rest resume."
            ) from err
        raise UserError(f"writing chunk {err.chunk} of {cfg.out} failed: {err.err}. Rerun the same command to resume.") from err
    finally:
        if bar is not None:
            bar.close()
    counts["bytes"] = written_bytes[0]
    return counts


def _fill_patch_labels(bufs: dict[str, np.ndarray], lo: int, labels: list, errors: list[str], idx) -> None:
    """Copy a batch's patch labels into its chunk's buffers; a mask that could not be read stops the run."""
    for j, (lab, err) in enumerate(zip(labels, errors)):
        if err:
            raise UserError(f"{err} (image {int(idx[j])}; finished chunks are kept, rerun the same command to resume)")
        if lab is not None:
            for key, lab_p in lab.items():
                bufs[key][lo + j] = lab_p


def _progress(cfg: RecordConfig, total: int):
    if cfg.quiet:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="record", dynamic_ncols=True, file=sys.stderr)


if __name__ == "__main__":  # the launcher moved to the CLI module, which imports this one (not the reverse)
    sys.exit("run `python -m saev_store.cli record ...` (or `accelerate launch -m saev_store.cli record ...`).")
