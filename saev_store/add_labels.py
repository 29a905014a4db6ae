"""Patch labels for a store: from label masks through the image geometry to per-patch classes.

    saev-store add-labels demo/fmnist.zarr --masks pixels               # Fashion-MNIST's own pixels
    saev-store add-labels ade.zarr --masks /data/ade20k/annotations/training --patch-labels prefer-fg
    saev-store record --out ade.zarr ... --masks DIR                     # the same labels, in the recording pass

`add_labels` labels every image of an existing store without running the model: the store's dataset
is reopened from its recorded description (its fingerprint must match), each mask goes through the
store's preprocessing (`patch_labels.mask_to_input`) and is cut into the grid of every hook. One label
set is written per distinct grid (`patch_labels/7x7`). Like recording, it works chunk by chunk: a
chunk's labels are written (checksummed) and then marked done, so an interrupted run resumes where it
stopped and gives the same bytes; a rerun with other settings is refused unless --overwrite.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np
import torch

from . import format as fmt
from .datasets.masks import MaskConfig, MaskSource, create_mask_source
from .errors import UserError
from .options import option
from .patch_labels import IGNORE, PatchLabeler
from .store import Store, open_store

COMPARED = ("grid", "image_size", "rule", "background", "ignore_index", "source")
"""Attributes that must agree for a run to resume (or skip) an existing label set."""


@dataclasses.dataclass(frozen=True)
class AddLabelsConfig:
    """Which store to label, from which masks, and how."""

    store: str = option(argument=True)
    """The store (`NAME.zarr`) to add patch labels to."""
    masks: MaskConfig = option(flatten=True)
    """Where the masks come from and the aggregation rule."""
    data_root: str | None = None
    """Where the store's dataset lives now, if it moved since recording."""
    num_workers: int = 1
    """Processes reading masks."""
    batch_size: int = 64
    """Images per worker batch (batches never cross chunks)."""
    overwrite: bool = False
    """Replace existing patch labels made with other settings."""
    quiet: bool = False
    """No progress bar."""

    def __post_init__(self):
        if not self.masks.enabled:
            raise UserError("add-labels needs masks: --masks DIR (folder datasets), --masks pixels (fashion-mnist) or --mask-column (hf-disk).")
        if self.num_workers < 0 or self.batch_size < 1:
            raise UserError(f"--num-workers {self.num_workers} must be >= 0 and --batch-size {self.batch_size} >= 1.")


def open_recorded_dataset(attrs: dict, data_root: str | None = None):
    """The ImageSource a store was recorded from (its `dataset` field), checked by size and fingerprint."""
    from .datasets import reopen_dataset

    desc = attrs.get("dataset")
    if not desc or not desc.get("kind"):
        raise UserError("the store records no dataset, so its images (and masks) cannot be found; record it with saev-store record.")
    src = reopen_dataset(desc, root=data_root)
    if len(src) < int(attrs["n_images"]) or (desc.get("fingerprint") and src.fingerprint() != desc["fingerprint"]):
        raise UserError(f"the dataset at {data_root or desc.get('root')} is not the one the store was recorded from (its size or "
                        "fingerprint differs); pass --data-root with the recorded images.")
    return src


def store_grids(st: Store) -> dict[str, tuple[int, int]]:
    """Grid key -> grid of every hook of the store that has patch tokens."""
    grids = {}
    for hook in st.hooks:
        grid = st.hook(hook).layout.grid
        if grid is not None:
            grids[fmt.grid_key(grid)] = tuple(grid)
    if not grids:
        raise UserError(f"no hook of {st.path} stores patch tokens (tokens={st.attrs.get('tokens')!r}), so there is nothing to label.")
    return grids


def label_set_attrs(masks: MaskSource, cfg: MaskConfig, preprocess, grid: tuple[int, int]) -> dict:
    """The attributes of one label set (FORMAT.md, patch labels), less those the store fills in."""
    return {
        "grid": [int(grid[0]), int(grid[1])],
        "image_size": [int(s) for s in preprocess.image_size],
        "rule": cfg.rule,
        "background": int(cfg.background),
        "ignore_index": IGNORE,
        "class_names": None if masks.class_names is None else list(masks.class_names),
        "source": masks.describe(),
    }


def label_set_diff(have: dict, want: dict) -> list[str]:
    """What differs between an existing label set and this run's (empty when it can be resumed)."""
    diffs = [f"{k}: store has {have.get(k)!r}, this run has {want.get(k)!r}" for k in COMPARED if have.get(k) != want.get(k)]
    if want.get("class_names") is not None and have.get("class_names") not in (None, want["class_names"]):
        diffs.append("class_names differ")
    return diffs


class LabelDataset(torch.utils.data.Dataset):
    """Image index -> (index, {grid key: labels}, error) for a DataLoader; a bad mask becomes an error
    string (raised by the caller with its own message) rather than a worker traceback."""

    def __init__(self, labeler: PatchLabeler, skip: np.ndarray | None = None):
        self.labeler = labeler
        self.skip = skip
        """bool (n_images,): images labelled IGNORE without reading a mask (invalid images)."""

    def __len__(self) -> int:
        return len(self.labeler.masks)

    def __getitem__(self, i: int):
        if self.skip is not None and self.skip[i]:
            return i, None, ""
        try:
            return i, self.labeler(i), ""
        except UserError as err:
            return i, None, str(err)


def _collate(items):
    return items


def _chunk_batches(st: Store, chunks: list[int], batch_size: int) -> list[list[int]]:
    out = []
    for i in chunks:
        a, b = st.chunk_bounds(i)
        out += [list(range(s, min(s + batch_size, b))) for s in range(a, b, batch_size)]
    return out


def add_labels(cfg: AddLabelsConfig) -> dict:
    """Write (or finish) the patch labels of `cfg.store`; returns what was done."""
    from .models.preprocess import PreprocessConfig

    st = open_store(cfg.store, mode="r+")
    src = open_recorded_dataset(st.attrs, cfg.data_root)
    if not st.attrs.get("preprocessing"):
        raise UserError(f"{st.path} records no preprocessing, so masks cannot be put on the model's input pixels.")
    pre = PreprocessConfig.from_dict(st.attrs["preprocessing"])
    masks = create_mask_source(cfg.masks, src)
    grids = store_grids(st)
    existing = st.patch_label_sets()
    for key, grid in grids.items():
        want = label_set_attrs(masks, cfg.masks, pre, grid)
        if key in existing:
            diffs = label_set_diff(existing[key], want)
            if not diffs:
                continue
            if not cfg.overwrite:
                raise UserError(f"{st.path} already has patch labels {key} made with other settings:\n  " + "\n  ".join(diffs)
                                + "\nRerun with those settings to finish them, or pass --overwrite to replace them.")
        st.create_patch_labels(key, want, overwrite=key in existing)
    done_kc = np.stack([st.patch_labels_done(k) for k in grids])
    pending = [int(i) for i in np.flatnonzero(~done_kc.all(axis=0))]
    t0 = time.perf_counter()
    labeler = PatchLabeler(masks, pre, grids, cfg.masks.rule, cfg.masks.background)
    n_images = write_label_chunks(st, labeler, pending, done_kc, cfg)
    result = {"store": st.path, "grids": list(grids), "chunks_written": len(pending), "images": n_images,
              "seconds": time.perf_counter() - t0, "already_complete": not pending and all(
                  existing.get(k, {}).get("complete") for k in grids)}
    result["sets"] = {k: st.finalize_patch_labels(k) for k in grids}
    return result


def write_label_chunks(st: Store, labeler: PatchLabeler, chunks: list[int], done_kc: np.ndarray, cfg: AddLabelsConfig) -> int:
    """Label the images of `chunks` (DataLoader workers read the masks) and write each chunk of each
    grid not yet done. Returns the number of images labelled."""
    keys = list(labeler.grids)
    skip = ~st.valid()
    ds = LabelDataset(labeler, skip)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=_chunk_batches(st, chunks, cfg.batch_size),
                                         num_workers=cfg.num_workers, collate_fn=_collate)
    bar = None
    if not cfg.quiet:
        from tqdm import tqdm

        bar = tqdm(total=sum(st.chunk_bounds(i)[1] - st.chunk_bounds(i)[0] for i in chunks), unit="img", desc="add-labels",
                   dynamic_ncols=True, file=sys.stderr)
    n_done = 0
    bufs: dict[int, dict[str, np.ndarray]] = {}
    filled: dict[int, int] = {}
    try:
        for items in loader:
            for i, labs, err in items:
                if err:
                    raise UserError(f"{err} (image {i}; the labels of finished chunks are kept, rerun to resume)")
                c = i // st.images_per_chunk
                a, b = st.chunk_bounds(c)
                buf = bufs.setdefault(c, {k: np.full((b - a, h * w), IGNORE, np.int16) for k, (h, w) in labeler.grids.items()})
                if labs is not None:
                    for k in keys:
                        buf[k][i - a] = labs[k]
                filled[c] = filled.get(c, 0) + 1
                if filled[c] == b - a:
                    for j, k in enumerate(keys):
                        if not done_kc[j, c]:
                            st.write_patch_labels(k, c, bufs[c][k])
                    del bufs[c]
                n_done += 1
            if bar is not None:
                bar.update(len(items))
    finally:
        if bar is not None:
            bar.close()
    return n_done


class LabeledRecordDataset(torch.utils.data.Dataset):
    """The recorder's dataset plus each image's patch labels, for recording them in the same pass:
    items are a RecordDataset item followed by ({grid key: labels} or None, mask error or "")."""

    def __init__(self, base, labeler: PatchLabeler):
        self.base = base
        self.labeler = labeler

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, j: int):
        index, image, ok, err = self.base[j]
        if not ok:  # an unreadable image keeps IGNORE labels (and is stored invalid, or stops the run)
            return index, image, ok, err, None, ""
        try:
            return index, image, ok, err, self.labeler(index), ""
        except UserError as mask_err:
            return index, image, ok, err, None, str(mask_err)


def collate_labeled(items):
    """(RecordBatch, [labels per image], [mask error per image]) from LabeledRecordDataset items."""
    from .datasets.torch_dataset import collate

    return collate([it[:4] for it in items]), [it[4] for it in items], [it[5] for it in items]
