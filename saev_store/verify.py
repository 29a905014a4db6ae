"""`saev-store info` and `saev-store verify`: what a store holds, and whether every chunk is sound."""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import numpy as np

from . import format as fmt
from .store import Store


class Problem(NamedTuple):
    """One bad chunk (or a store-level problem, with chunk -1)."""

    array: str
    chunk: int
    reason: str

    def __str__(self) -> str:
        where = f"{self.array} chunk {self.chunk}" if self.chunk >= 0 else self.array
        return f"{where}: {self.reason}"


def verify(st: Store, progress=None) -> list[Problem]:
    """Read every chunk of every array; return the problems found (empty when the store is sound).

    Checks: each done chunk's file exists, its crc32c matches, its shape is right, its activations
    are finite; every chunk is done; the statistics exist when the store says it is complete. Patch
    labels (when the store has them) likewise: every chunk done, readable, labels in -1..n_classes-1.
    """
    problems: list[Problem] = []
    done = st.done()
    for i in np.flatnonzero(~done):
        problems.append(Problem(fmt.DONE, int(i), "not done (recording unfinished: rerun the record command)"))
    per_image = [fmt.acts_path(h) for h in st.hooks] + [fmt.LABELS, fmt.IMAGE_IDS, fmt.VALID]
    for i in range(st.n_chunks):
        if not done[i]:
            continue
        start, stop = st.chunk_bounds(i)
        for key in per_image:
            arr = st.array(key)
            fpath = st.array_chunk_fpath(key, i)
            if fpath is not None and not os.path.exists(fpath):
                problems.append(Problem(key, i, "chunk file is missing"))
                continue
            try:
                block = arr[start:stop]
            except Exception as err:  # zarr's crc32c codec raises ValueError on a mismatch
                problems.append(Problem(key, i, f"unreadable: {err}"))
                continue
            want = (stop - start,) + tuple(arr.shape[1:])
            if block.shape != want:
                problems.append(Problem(key, i, f"shape {block.shape}, expected {want}"))
            elif key.startswith(fmt.ACTS + "/"):
                x = fmt.decode_acts(block, st.store_dtype)
                if not np.all(np.isfinite(x)):
                    problems.append(Problem(key, i, "holds NaN or inf"))
        if progress is not None:
            progress(1)
    problems += _verify_patch_labels(st)
    if st.complete:
        for hook in st.hooks:
            for sel in st.hook(hook).layout.selections():
                base = fmt.stats_path(hook, sel)
                try:
                    st.array(f"{base}/mean")
                except KeyError:
                    problems.append(Problem(base, -1, "store is marked complete but its mean is missing"))
    elif done.all():
        problems.append(Problem("zarr.json", -1, "every chunk is done but statistics were never written; rerun the record command to finish"))
    return problems


def _verify_patch_labels(st: Store) -> list[Problem]:
    problems = []
    for key, attrs in st.patch_label_sets().items():
        key_path = fmt.patch_labels_path(key, fmt.PATCH_LABELS_ARRAY)
        done = st.patch_labels_done(key)
        for i in np.flatnonzero(~done):
            problems.append(Problem(fmt.patch_labels_path(key, fmt.PATCH_LABELS_DONE), int(i), "not done (rerun the add-labels command)"))
        n_classes = len(attrs.get("class_names") or []) if attrs.get("complete") else None
        for i in np.flatnonzero(done):
            fpath = st.array_chunk_fpath(key_path, int(i))
            if fpath is not None and not os.path.exists(fpath):
                problems.append(Problem(key_path, int(i), "chunk file is missing"))
                continue
            start, stop = st.chunk_bounds(int(i))
            try:
                lab = st.patch_labels(key, start, stop)
            except Exception as err:  # zarr's crc32c codec raises ValueError on a mismatch
                problems.append(Problem(key_path, int(i), f"unreadable: {err}"))
                continue
            top = n_classes - 1 if n_classes is not None else np.iinfo(np.int16).max
            if lab.size and (lab.min() < -1 or lab.max() > top):
                problems.append(Problem(key_path, int(i), f"labels outside -1..{top}"))
        if done.all() and not attrs.get("complete"):
            problems.append(Problem(fmt.patch_labels_path(key), -1, "every chunk is done but the labels were never finalized; rerun add-labels"))
    return problems


def info(st: Store) -> dict:
    """A JSON-able summary: hooks, shapes, dtype, size on disk, completion, metadata."""
    done = st.done()
    hooks = {}
    for h in st.hooks:
        hi = st.hook(h)
        hooks[h] = {
            "shape": [st.n_images, hi.n_tokens, hi.d],
            "module": hi.module,
            "layout": hi.layout.to_dict(),
            "chunk_shape": [st.images_per_chunk, hi.n_tokens, hi.d],
            "chunk_mib": round(st.images_per_chunk * hi.bytes_per_image / 2**20, 2),
        }
    valid = st.valid()
    attrs = st.attrs
    return {
        "path": st.path,
        "format_version": attrs["format_version"],
        "store_dtype": st.store_dtype,
        "n_images": st.n_images,
        "n_valid_images": int(valid[: st.n_images].sum()),
        "images_per_chunk": st.images_per_chunk,
        "chunks_done": f"{int(done.sum())}/{st.n_chunks}",
        "complete": st.complete,
        "size_bytes": st.size_bytes(),
        "hooks": hooks,
        "tokens": attrs.get("tokens"),
        "model": attrs.get("model"),
        "dataset": {k: v for k, v in (attrs.get("dataset") or {}).items() if k != "class_names"} or None,
        "class_names": attrs.get("class_names"),
        "preprocessing": attrs.get("preprocessing"),
        "patch_labels": {k: {f: a.get(f) for f in ("grid", "rule", "complete", "class_names", "source")}
                         for k, a in st.patch_label_sets().items()},
        "seed": attrs.get("seed"),
        "created": attrs.get("created"),
        "software_version": attrs.get("software_version"),
    }


def format_info(summary: dict) -> str:
    """Human-readable `saev-store info` text."""
    gb = summary["size_bytes"] / 1e9
    lines = [
        f"store      {summary['path']}",
        f"format     v{summary['format_version']}, {summary['store_dtype']}, {gb:.3f} GB on disk",
        f"images     {summary['n_images']} ({summary['n_valid_images']} valid), {summary['images_per_chunk']} per chunk",
        f"complete   {summary['complete']} (chunks done {summary['chunks_done']})",
    ]
    for name, h in summary["hooks"].items():
        lay = h["layout"]
        parts = []
        if lay["cls"] is not None:
            parts.append(f"cls@{lay['cls']}")
        if lay["registers"]:
            parts.append(f"{len(lay['registers'])} registers")
        if lay["grid"]:
            parts.append(f"grid {lay['grid'][0]}x{lay['grid'][1]}@{lay['grid_start']}")
        lines.append(f"hook       {name}: shape {tuple(h['shape'])}, chunk {h['chunk_mib']} MiB, tokens: {', '.join(parts)}")
    for key in ("model", "dataset", "preprocessing"):
        if summary.get(key):
            lines.append(f"{key:<10} {json.dumps(summary[key], sort_keys=True)}")
    for key, pl in (summary.get("patch_labels") or {}).items():
        names = pl.get("class_names") or []
        lines.append(f"patches    labels {key}: {pl.get('rule')}, {len(names)} classes, from {(pl.get('source') or {}).get('kind')}, "
                     f"complete {pl.get('complete')}")
    if summary.get("class_names"):
        lines.append(f"classes    {len(summary['class_names'])}: {', '.join(summary['class_names'][:10])}{' ...' if len(summary['class_names']) > 10 else ''}")
    return "\n".join(lines)
