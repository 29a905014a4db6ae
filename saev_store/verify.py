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
    are finite; every chunk is done; the statistics exist when the store says it is complete.
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
    if summary.get("class_names"):
        lines.append(f"classes    {len(summary['class_names'])}: {', '.join(summary['class_names'][:10])}{' ...' if len(summary['class_names']) > 10 else ''}")
    return "\n".join(lines)
