"""Create, fill, open and read an activation store (format version 1, see FORMAT.md).

Any code can write a store, not only the recorder:

    from saev_store.store import create_store, open_store, HookSpec
    from saev_store.layout import TokenLayout
    st = create_store("acts.zarr", n_images=1000,
                      hooks={"blocks.10": HookSpec(d=768, layout=TokenLayout(n_tokens=197, cls=0, grid=(14, 14), grid_start=1))})
    for i in st.pending_chunks():               # chunk-aligned image blocks not yet written
        start, stop = st.chunk_bounds(i)
        st.write_block(i, {"blocks.10": acts_ntd[start:stop]}, labels=labels[start:stop])
    st.finalize()                               # per-hook statistics; marks the store complete
    st = open_store("acts.zarr")                # read-only; refuses unknown format versions
    x = st.read("blocks.10", 0, 64)             # float32 (64, 197, 768)

A chunk is a block of whole images and the unit of work: `write_block` writes it into every array and
then sets `done[i]`, so an interrupted writer leaves at worst a chunk that is not done, which a rerun
rewrites. Writers that own disjoint chunks may run concurrently (one process per GPU).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import pathlib
import shutil
from typing import Any, Mapping

import numpy as np
import zarr
import zarr.codecs

from . import __version__
from . import format as fmt
from .errors import UserError
from .layout import TokenLayout
from .stats import BlockStats, Moments, Normalizer, TokenSums, reduce_blocks, token_sums


@dataclasses.dataclass(frozen=True)
class HookSpec:
    """What one hook stores per image: `layout.n_tokens` tokens of width `d`."""

    d: int
    """Token width (channels for a CNN hook)."""
    layout: TokenLayout
    """Which token index is what."""
    module: str | None = None
    """Module path the activations came from, when they came from a model."""

    def __post_init__(self):
        if self.d < 1:
            raise ValueError(f"HookSpec: d={self.d} must be positive.")

    @property
    def n_tokens(self) -> int:
        return self.layout.n_tokens


@dataclasses.dataclass(frozen=True)
class HookInfo:
    """One stored hook, as a reader sees it."""

    name: str
    n_tokens: int
    d: int
    layout: TokenLayout
    module: str | None
    images_per_chunk: int
    n_chunks: int
    store_dtype: str

    @property
    def bytes_per_image(self) -> int:
        return self.n_tokens * self.d * np.dtype(fmt.ON_DISK_DTYPE[self.store_dtype]).itemsize


def write_chunk_file(fpath: str, stored: np.ndarray, pad_to: int) -> None:
    """Write a chunk file as zarr's bytes+crc32c codecs would: little-endian array bytes, zero
    padding up to the full chunk (zarr stores the edge chunk at full shape, fill value 0), then a
    4-byte little-endian CRC-32C. Written to a temporary file and renamed, so a crash leaves
    either the old file or the new one."""
    import crc32c

    data = np.ascontiguousarray(stored, dtype=stored.dtype.newbyteorder("<"))
    pad = (pad_to - data.shape[0]) * int(np.prod(data.shape[1:])) * data.itemsize
    crc = crc32c.crc32c(data.data)
    if pad:
        crc = crc32c.crc32c(bytes(pad), value=crc)
    os.makedirs(os.path.dirname(fpath), exist_ok=True)
    tmp_fpath = f"{fpath}.{os.getpid()}.partial"
    with open(tmp_fpath, "wb") as f:
        f.write(data.data)
        if pad:
            f.write(bytes(pad))
        f.write(crc.to_bytes(4, "little"))
    os.replace(tmp_fpath, fpath)


def _is_url(path: str) -> bool:
    return "://" in path


def _chunk_array(group, name, shape, chunks, dtype, fill_value, compressors=None):
    return group.create_array(
        name,
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        fill_value=fill_value,
        compressors=compressors,
        filters=None,
        config={"write_empty_chunks": True},
    )


def create_store(
    path: str | os.PathLike,
    *,
    n_images: int,
    hooks: Mapping[str, HookSpec],
    store_dtype: str = "float32",
    images_per_chunk: int | None = None,
    chunk_bytes: int = fmt.DEFAULT_CHUNK_BYTES,
    metadata: Mapping[str, Any] | None = None,
    patch_labels: Mapping[str, Mapping[str, Any]] | None = None,
    overwrite: bool = False,
) -> "Store":
    """Create an empty store with every array at its final shape; returns it open for writing.

    `metadata` fills the root fields model, dataset, preprocessing, class_names, tokens,
    keep_registers and seed (FORMAT.md); anything else is an error, so nothing is stored unread.
    `patch_labels` maps a grid key ("7x7") to its label set's attributes (FORMAT.md, patch labels;
    software_version, created and complete are filled in), to record patch labels in the same pass.
    A local store is built as `NAME.partial` and renamed into place, so a crash leaves no half store.
    """
    path = str(path)
    metadata = dict(metadata or {})
    allowed = {"model", "dataset", "preprocessing", "class_names", "tokens", "keep_registers", "seed"}
    unknown = set(metadata) - allowed
    if unknown:
        raise ValueError(f"create_store: unknown metadata fields {sorted(unknown)}; allowed: {sorted(allowed)}.")
    if store_dtype not in fmt.STORE_DTYPES:
        raise UserError(f"store dtype {store_dtype!r} is not supported; choose one of {', '.join(fmt.STORE_DTYPES)}.")
    if n_images < 1:
        raise UserError(f"a store needs at least one image (got n_images={n_images}).")
    if not hooks:
        raise UserError("a store needs at least one hook.")
    for name, spec in hooks.items():
        fmt.check_hook_name(name)
        if not isinstance(spec, HookSpec):
            raise TypeError(f"hook {name!r}: expected a HookSpec, got {type(spec).__name__}.")

    itemsize = np.dtype(fmt.ON_DISK_DTYPE[store_dtype]).itemsize
    bytes_per_image = max(s.n_tokens * s.d * itemsize for s in hooks.values())
    if images_per_chunk is None:
        images_per_chunk = fmt.images_per_chunk_for(bytes_per_image, n_images, chunk_bytes)
    images_per_chunk = int(min(images_per_chunk, n_images))
    if images_per_chunk < 1:
        raise ValueError(f"images_per_chunk={images_per_chunk} must be at least 1.")
    n_chunks = fmt.n_chunks_for(n_images, images_per_chunk)

    if _is_url(path):
        build_path = path
        if overwrite:
            zarr.open_group(path, mode="w")
    else:
        final = pathlib.Path(path)
        if final.exists():
            if not overwrite:
                raise UserError(f"{final} already exists; open it to resume, or pass --overwrite to start over.")
            _remove_store_dir(final)
        build_path = str(final.with_name(final.name + ".partial"))
        if os.path.exists(build_path):
            shutil.rmtree(build_path)

    root = zarr.open_group(build_path, mode="w")
    hook_entries = {}
    for name, spec in hooks.items():
        _chunk_array(
            root,
            fmt.acts_path(name),
            shape=(n_images, spec.n_tokens, spec.d),
            chunks=(images_per_chunk, spec.n_tokens, spec.d),
            dtype=fmt.ON_DISK_DTYPE[store_dtype],
            fill_value=0,
            compressors=[zarr.codecs.Crc32cCodec()],
        ).attrs.update({"dtype": store_dtype, "layout": spec.layout.to_dict()})
        hook_entries[name] = {"n_tokens": spec.n_tokens, "d": spec.d, "layout": spec.layout.to_dict(), "module": spec.module}
        sels = spec.layout.selections()
        _chunk_array(
            root, f"{fmt.stats_path(name)}/{fmt.BLOCK_SUMS}", (n_chunks, len(sels), spec.d + 3), (1, len(sels), spec.d + 3), "float64", 0.0
        ).attrs.update({"selections": list(sels), "columns": ["sum"] * spec.d + ["sumsq", "sumnorm", "count"]})
    _chunk_array(root, fmt.LABELS, (n_images,), (images_per_chunk,), "int32", -1)
    root.create_array(fmt.IMAGE_IDS, shape=(n_images,), chunks=(images_per_chunk,), dtype=str, config={"write_empty_chunks": True})
    _chunk_array(root, fmt.VALID, (n_images,), (images_per_chunk,), "bool", False)
    _chunk_array(root, fmt.DONE, (n_chunks,), (1,), "bool", False)
    if patch_labels:
        pl_root = root.require_group(fmt.PATCH_LABELS)
        for key, pl_attrs in patch_labels.items():
            _build_patch_label_group(pl_root.create_group(key), pl_attrs, n_images, images_per_chunk, n_chunks)

    attrs = {
        "format_version": fmt.FORMAT_VERSION,
        "software_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "n_images": int(n_images),
        "images_per_chunk": images_per_chunk,
        "n_chunks": n_chunks,
        "store_dtype": store_dtype,
        "hooks": hook_entries,
        "tokens": metadata.get("tokens", "all"),
        "keep_registers": bool(metadata.get("keep_registers", False)),
        "seed": metadata.get("seed"),
        "model": metadata.get("model"),
        "dataset": metadata.get("dataset"),
        "preprocessing": metadata.get("preprocessing"),
        "class_names": metadata.get("class_names"),
        "complete": False,
    }
    assert set(attrs) == set(fmt.ROOT_FIELDS), "ROOT_FIELDS and create_store disagree"
    root.attrs.update({fmt.ATTRS_KEY: attrs})
    if build_path != path:
        os.replace(build_path, path)
    return open_store(path, mode="r+")


def _build_patch_label_group(group: zarr.Group, attrs: Mapping[str, Any], n_images: int, images_per_chunk: int, n_chunks: int) -> None:
    """The arrays and attributes of one patch-label set (FORMAT.md) in an empty group."""
    attrs = {
        **attrs,
        "software_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "complete": False,
    }
    if set(attrs) != set(fmt.PATCH_LABEL_FIELDS):
        raise ValueError(f"patch label attributes {sorted(attrs)} differ from FORMAT.md's {sorted(fmt.PATCH_LABEL_FIELDS)}.")
    h, w = (int(v) for v in attrs["grid"])
    _chunk_array(group, fmt.PATCH_LABELS_ARRAY, (n_images, h * w), (images_per_chunk, h * w), "int16", -1,
                 compressors=[zarr.codecs.Crc32cCodec()])
    _chunk_array(group, fmt.PATCH_LABELS_DONE, (n_chunks,), (1,), "bool", False)
    group.attrs.update(attrs)


def _remove_store_dir(p: pathlib.Path) -> None:
    """Delete an existing store for --overwrite, refusing anything that is not a store."""
    if p.is_dir() and (p / "zarr.json").exists():
        shutil.rmtree(p)
        return
    raise UserError(f"{p} exists and is not a saev-store (no zarr.json); refusing to delete it. Choose another path.")


def open_store(path: str | os.PathLike, mode: str = "r") -> "Store":
    """Open a store; mode "r" (read-only) or "r+" (fill it). Refuses stores of unknown versions."""
    path = str(path)
    if mode not in ("r", "r+"):
        raise ValueError(f"open_store: mode must be 'r' or 'r+', not {mode!r}.")
    if not _is_url(path) and not os.path.exists(os.path.join(path, "zarr.json")):
        if os.path.exists(path + ".partial"):
            raise UserError(f"{path} was never finished being created (found {path}.partial); rerun with --overwrite.")
        raise UserError(f"no store at {path}: expected a Zarr v3 folder with zarr.json. Record one with `saev-store record --out {path}`.")
    try:
        root = zarr.open_group(path, mode=mode)
    except Exception as err:  # zarr raises several types for a bad folder
        raise UserError(f"{path} is not a readable Zarr v3 group ({err}); check the path.") from err
    attrs = root.attrs.get(fmt.ATTRS_KEY)
    if attrs is None:
        raise UserError(f"{path} is a Zarr group but not a saev-store (no '{fmt.ATTRS_KEY}' attributes).")
    version = attrs.get("format_version")
    if version != fmt.FORMAT_VERSION:
        raise UserError(
            f"{path} has store format version {version}; this saev-store {__version__} reads version "
            f"{fmt.FORMAT_VERSION} only. Use a saev-store release that knows version {version}."
        )
    return Store(path, root, attrs, mode)


class Store:
    """An open store. Use `create_store` / `open_store` rather than this constructor."""

    def __init__(self, path: str, root: zarr.Group, attrs: dict, mode: str):
        self.path = path
        self.mode = mode
        self._root = root
        self._attrs = attrs
        self._arrays: dict[str, zarr.Array] = {}
        self._hook_infos: dict[str, HookInfo] = {}
        self._fast_write: dict[str, bool] = {}

    # ---- metadata -------------------------------------------------------------------------------
    @property
    def attrs(self) -> dict:
        """The store's metadata (FORMAT.md, root fields)."""
        return self._attrs

    @property
    def hooks(self) -> list[str]:
        return list(self._attrs["hooks"])

    @property
    def n_images(self) -> int:
        return int(self._attrs["n_images"])

    @property
    def n_chunks(self) -> int:
        return int(self._attrs["n_chunks"])

    @property
    def images_per_chunk(self) -> int:
        return int(self._attrs["images_per_chunk"])

    @property
    def store_dtype(self) -> str:
        return self._attrs["store_dtype"]

    @property
    def class_names(self) -> list[str] | None:
        return self._attrs.get("class_names")

    @property
    def complete(self) -> bool:
        return bool(self._attrs.get("complete"))

    def hook(self, name: str) -> HookInfo:
        info = self._hook_infos.get(name)
        if info is None:  # parsed once: the writer and readers ask for it on every chunk
            info = self._hook_infos[name] = self._parse_hook(name)
        return info

    def _parse_hook(self, name: str) -> HookInfo:
        entry = self._attrs["hooks"].get(name)
        if entry is None:
            raise UserError(f"store {self.path} has no hook {name!r}; it has: {', '.join(self.hooks)}.")
        return HookInfo(
            name=name,
            n_tokens=int(entry["n_tokens"]),
            d=int(entry["d"]),
            layout=TokenLayout.from_dict(entry["layout"]),
            module=entry.get("module"),
            images_per_chunk=self.images_per_chunk,
            n_chunks=self.n_chunks,
            store_dtype=self.store_dtype,
        )

    def chunk_bounds(self, i: int) -> tuple[int, int]:
        """Image range [start, stop) of chunk i."""
        if not 0 <= i < self.n_chunks:
            raise IndexError(f"chunk {i} is outside 0..{self.n_chunks - 1}.")
        start = i * self.images_per_chunk
        return start, min(start + self.images_per_chunk, self.n_images)

    def array(self, key: str) -> zarr.Array:
        """A raw Zarr array of the store by its path (FORMAT.md, arrays)."""
        arr = self._arrays.get(key)
        if arr is None:
            # Runtime config is not persisted: every handle must write all-fill chunks too, so a
            # complete store has every chunk file and `verify` can tell a missing one.
            arr = self._root[key].with_config({"write_empty_chunks": True})
            self._arrays[key] = arr
        return arr

    def acts(self, hook: str) -> zarr.Array:
        """The raw stored activation array of a hook (on-disk dtype; see `read` for float32)."""
        self.hook(hook)
        return self.array(fmt.acts_path(hook))

    def chunk_fpath(self, hook: str, i: int) -> str | None:
        """The file holding chunk i of a hook in a local store, or None for a remote store."""
        return self.array_chunk_fpath(fmt.acts_path(hook), i)

    def array_chunk_fpath(self, key: str, i: int) -> str | None:
        """The file holding chunk i (along the first axis) of any array of a local store, or None
        for a remote store. Every array is chunked along its first axis only."""
        if _is_url(self.path):
            return None
        ndim = len(self.array(key).shape)
        return os.path.join(self.path, key, "c", str(i), *(["0"] * (ndim - 1)))

    # ---- reading --------------------------------------------------------------------------------
    def read(self, hook: str, start: int, stop: int) -> np.ndarray:
        """Activations of images [start, stop) as float32 (n, n_tokens, d)."""
        return fmt.decode_acts(self.acts(hook)[start:stop], self.store_dtype)

    def read_chunk(self, hook: str, i: int) -> np.ndarray:
        """Activations of the images of chunk i as float32."""
        start, stop = self.chunk_bounds(i)
        return self.read(hook, start, stop)

    def labels(self) -> np.ndarray:
        return np.asarray(self.array(fmt.LABELS)[:], dtype=np.int32)

    def image_ids(self) -> list[str]:
        return [str(s) for s in self.array(fmt.IMAGE_IDS)[:]]

    def valid(self) -> np.ndarray:
        """Which images hold real activations: written and readable."""
        return np.asarray(self.array(fmt.VALID)[:], dtype=bool)

    def done(self) -> np.ndarray:
        return np.asarray(self.array(fmt.DONE)[:], dtype=bool)

    def pending_chunks(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """Chunks not yet done that writer `rank` of `world_size` owns (i % world_size == rank)."""
        done = self.done()
        return [i for i in range(self.n_chunks) if not done[i] and i % world_size == rank]

    def moments(self, hook: str, tokens: str = "patches") -> Moments:
        """Statistics of a hook's selected tokens over the valid images written so far (float64)."""
        info = self.hook(hook)
        if tokens not in info.layout.selections():
            raise UserError(f"hook {hook!r} stores no {tokens!r} tokens; it has: {', '.join(info.layout.selections())}.")
        arr = self.array(f"{fmt.stats_path(hook)}/{fmt.BLOCK_SUMS}")
        sums = np.asarray(arr[:, list(arr.attrs["selections"]).index(tokens)])
        d = info.d
        return reduce_blocks(sums[:, :d], sums[:, d], sums[:, d + 1], sums[:, d + 2])

    def normalizer(self, hook: str, tokens: str = "patches") -> Normalizer:
        """The input normalization of a hook's selected tokens from the stored statistics."""
        if not self.complete:
            raise UserError(f"store {self.path} is not complete, so its statistics are partial; finish recording first (rerun the same record command).")
        return Normalizer.from_moments(self.moments(hook, tokens))

    # ---- writing --------------------------------------------------------------------------------
    def _check_writable(self):
        if self.mode != "r+":
            raise UserError(f"store {self.path} is open read-only; open it with mode='r+' to write.")

    def write_block(
        self,
        i: int,
        acts: Mapping[str, np.ndarray],
        *,
        labels: np.ndarray | None = None,
        image_ids: list[str] | np.ndarray | None = None,
        valid: np.ndarray | None = None,
        patch_labels: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Write chunk i in every array, then mark it done. `acts[hook]` is float (n, n_tokens, d);
        `patch_labels[key]` is (n, h*w) for each label set recorded in the same pass."""
        self._check_writable()
        start, stop = self.chunk_bounds(i)
        n = stop - start
        if set(acts) != set(self.hooks):
            raise ValueError(f"write_block: got hooks {sorted(acts)}, the store has {sorted(self.hooks)}.")
        valid = np.ones(n, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
        if valid.shape != (n,):
            raise ValueError(f"write_block: valid has shape {valid.shape}, chunk {i} holds {n} images.")
        for hook, x in acts.items():
            info = self.hook(hook)
            want = (n, info.n_tokens, info.d)
            if tuple(x.shape) != want:
                raise ValueError(f"write_block: hook {hook!r} got shape {tuple(x.shape)}, chunk {i} needs {want}.")
            stored = fmt.encode_acts(np.asarray(x), self.store_dtype)
            decoded = stored if self.store_dtype == "float32" else fmt.decode_acts(stored, self.store_dtype)
            sums = token_sums(decoded if valid.all() else decoded[valid])
            if sums is None:
                raise UserError(
                    f"chunk {i} of hook {hook!r} holds NaN or inf activations (images {start}..{stop - 1}); "
                    "refusing to store them. Check the model's weights and inputs, or use a wider --store-dtype."
                )
            self._write_acts_chunk(hook, i, stored)
            self._write_block_stats(hook, i, sums)
        lab = np.full(n, -1, dtype=np.int32) if labels is None else np.asarray(labels, dtype=np.int32)
        self.array(fmt.LABELS)[start:stop] = lab
        ids = [""] * n if image_ids is None else [str(s) for s in image_ids]
        if len(ids) != n or lab.shape != (n,):
            raise ValueError(f"write_block: labels/image_ids must hold {n} entries for chunk {i}.")
        self.array(fmt.IMAGE_IDS)[start:stop] = np.array(ids, dtype=object)
        self.array(fmt.VALID)[start:stop] = valid
        for key, lab_np in (patch_labels or {}).items():
            self.write_patch_labels(key, i, lab_np)
        # Last: the chunk is done only once everything above is on disk.
        self.array(fmt.DONE)[i] = True

    def _write_acts_chunk(self, hook: str, i: int, stored: np.ndarray) -> None:
        """Write one activation chunk. A local store with the default codecs gets the chunk file
        written directly (raw bytes + crc32c, to a temporary file renamed into place): the same
        bytes zarr writes, at about twice zarr's speed (benchmarks/record.py)."""
        self._write_chunk(fmt.acts_path(hook), i, stored)

    def _write_chunk(self, key: str, i: int, stored: np.ndarray) -> None:
        """Chunk i of the per-image array `key`: the chunk file directly where the codecs allow."""
        start, stop = self.chunk_bounds(i)
        fpath = self.array_chunk_fpath(key, i)
        if key not in self._fast_write:
            self._fast_write[key] = self._default_codecs(key)
        if fpath is None or not self._fast_write[key]:
            self.array(key)[start:stop] = stored
            return
        write_chunk_file(fpath, stored, pad_to=self.images_per_chunk)

    def _default_codecs(self, key: str) -> bool:
        codecs = self.array(key).metadata.codecs
        return (
            len(codecs) == 2
            and isinstance(codecs[0], zarr.codecs.BytesCodec)
            and codecs[0].endian is not None
            and codecs[0].endian.value == "little"
            and isinstance(codecs[1], zarr.codecs.Crc32cCodec)
        )

    def _write_block_stats(self, hook: str, i: int, sums: "TokenSums") -> None:
        layout = self.hook(hook).layout
        rows = []
        for sel in layout.selections():
            s: BlockStats = sums.select(layout.indices(sel))
            rows.append(np.concatenate([s.sum_d, [s.sumsq, s.sumnorm, float(s.count)]]))
        self.array(f"{fmt.stats_path(hook)}/{fmt.BLOCK_SUMS}")[i] = np.stack(rows)

    def finalize(self) -> None:
        """Reduce the per-chunk statistics and mark the store complete. Every chunk must be done."""
        self._check_writable()
        missing = np.flatnonzero(~self.done())
        if missing.size:
            raise UserError(f"store {self.path} has {missing.size} chunks not done (first: {missing[:5].tolist()}); rerun the record command to finish them.")
        for hook in self.hooks:
            info = self.hook(hook)
            for sel in info.layout.selections():
                m = self.moments(hook, sel)
                base = fmt.stats_path(hook, sel)
                arr = self._root.create_array(f"{base}/mean", shape=(info.d,), chunks=(info.d,), dtype="float64", overwrite=True)
                arr[:] = m.mean
                self._root[base].attrs.update({"n_rows": m.n_rows, "rms_norm": m.rms_norm, "mean_norm": m.mean_norm})
        self.set_attrs(complete=True)

    # ---- patch labels (optional; FORMAT.md, "Patch labels") ------------------------------------
    def patch_label_sets(self) -> dict[str, dict]:
        """Grid key ("7x7") -> attributes of every patch-label set; empty for a store without any."""
        try:
            group = self._root[fmt.PATCH_LABELS]
        except KeyError:
            return {}
        return {name: dict(sub.attrs) for name, sub in sorted(group.groups())}

    def patch_label_key(self, hook: str) -> str:
        """The label set a hook's patches use (by its grid); UserError naming the fix when there is none."""
        grid = self.hook(hook).layout.grid
        if grid is None:
            raise UserError(f"hook {hook!r} of {self.path} stores no patch tokens, so it has no patch labels; pick a hook with a grid.")
        key = fmt.grid_key(grid)
        if key not in self.patch_label_sets():
            have = ", ".join(self.patch_label_sets()) or "none"
            raise UserError(f"{self.path} has no patch labels for the {key} grid of hook {hook!r} (it has: {have}); "
                            f"add them with `saev-store add-labels {self.path} --masks ...`.")
        return key

    def patch_labels(self, key: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """(n, h*w) int16 labels of images [start, stop) for grid `key`; -1 = ignore (or not written yet)."""
        if key not in self.patch_label_sets():
            raise UserError(f"{self.path} has no patch labels {key!r}; it has: {', '.join(self.patch_label_sets()) or 'none'}.")
        return np.asarray(self.array(fmt.patch_labels_path(key, fmt.PATCH_LABELS_ARRAY))[start:stop], dtype=np.int16)

    def patch_labels_done(self, key: str) -> np.ndarray:
        return np.asarray(self.array(fmt.patch_labels_path(key, fmt.PATCH_LABELS_DONE))[:], dtype=bool)

    def create_patch_labels(self, key: str, attrs: Mapping[str, Any], overwrite: bool = False) -> None:
        """Add an empty label set `key` (attributes as for `create_store(patch_labels=...)`) to this store.

        A local set is built beside the store as `NAME.zarr.<key>.partial` and renamed into
        `patch_labels/<key>`, so a crash leaves either no set or a whole empty one."""
        self._check_writable()
        exists = key in self.patch_label_sets()
        if exists and not overwrite:
            raise UserError(f"{self.path} already has patch labels {key!r}; pass --overwrite to replace them.")
        self._root.require_group(fmt.PATCH_LABELS)
        self._arrays = {k: v for k, v in self._arrays.items() if not k.startswith(fmt.patch_labels_path(key) + "/")}
        self._fast_write = {k: v for k, v in self._fast_write.items() if not k.startswith(fmt.patch_labels_path(key) + "/")}
        if _is_url(self.path):
            group = self._root.require_group(fmt.PATCH_LABELS).create_group(key, overwrite=True)
            _build_patch_label_group(group, attrs, self.n_images, self.images_per_chunk, self.n_chunks)
            return
        dest = os.path.join(self.path, fmt.PATCH_LABELS, key)
        tmp = f"{self.path.rstrip(os.sep)}.{key}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        _build_patch_label_group(zarr.open_group(tmp, mode="w"), attrs, self.n_images, self.images_per_chunk, self.n_chunks)
        if exists:
            shutil.rmtree(dest)
        os.replace(tmp, dest)

    def write_patch_labels(self, key: str, i: int, labels: np.ndarray) -> None:
        """Write chunk i of label set `key` ((n, h*w) integers, -1 = ignore), then mark it done."""
        self._check_writable()
        start, stop = self.chunk_bounds(i)
        arr_key = fmt.patch_labels_path(key, fmt.PATCH_LABELS_ARRAY)
        want = (stop - start, self.array(arr_key).shape[1])
        lab = np.asarray(labels)
        if lab.shape != want:
            raise ValueError(f"write_patch_labels: {key} chunk {i} needs shape {want}, got {lab.shape}.")
        if lab.size and (lab.min() < -1 or lab.max() > np.iinfo(np.int16).max):
            raise ValueError(f"write_patch_labels: {key} chunk {i} holds labels outside -1..32767.")
        self._write_chunk(arr_key, i, lab.astype(np.int16))
        self.array(fmt.patch_labels_path(key, fmt.PATCH_LABELS_DONE))[i] = True

    def finalize_patch_labels(self, key: str) -> dict:
        """Mark label set `key` complete (every chunk must be done); a set whose source names no classes
        gets "0".."max label". Returns its attributes."""
        self._check_writable()
        missing = np.flatnonzero(~self.patch_labels_done(key))
        if missing.size:
            raise UserError(f"patch labels {key} of {self.path} have {missing.size} chunks not done (first: {missing[:5].tolist()}); "
                            "rerun the same add-labels (or record) command to finish them.")
        group = self._root[fmt.patch_labels_path(key)]
        names = group.attrs.get("class_names")
        if names is None:
            top = int(self.patch_labels(key).max(initial=-1))
            names = [str(k) for k in range(top + 1)]
        group.attrs.update({"class_names": list(names), "complete": True})
        return dict(group.attrs)

    def set_attrs(self, **fields) -> None:
        """Update root fields (FORMAT.md); unknown names are an error."""
        self._check_writable()
        unknown = set(fields) - set(fmt.ROOT_FIELDS)
        if unknown:
            raise ValueError(f"set_attrs: unknown fields {sorted(unknown)}.")
        self._attrs = {**self._attrs, **fields}
        self._root.attrs.update({fmt.ATTRS_KEY: self._attrs})

    def size_bytes(self) -> int:
        """Bytes on disk of a local store (0 for a remote one)."""
        if _is_url(self.path):
            return 0
        return sum(f.stat().st_size for f in pathlib.Path(self.path).rglob("*") if f.is_file())
