"""Reading whole chunks of one hook, and choosing which of their rows a loader uses.

The fast path reads a local chunk file straight into a reused buffer with one big `readinto` and
checks its crc32c; it needs the array to use exactly the format's default codecs (little-endian
bytes + crc32c, no compression, no sharding). Anything else (a remote store, another codec) falls
back to zarr's own read, which is correct everywhere but allocates and decodes through asyncio.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import crc32c
import numpy as np

from .. import format as fmt
from ..errors import UserError
from ..store import HookInfo, Store, open_store

CRC_BYTES = 4
"""The crc32c codec appends a little-endian uint32 of the chunk's bytes."""


class ChunkCorruptError(UserError):
    """A chunk file that is missing, has the wrong size, or fails its checksum."""


def as_store(store: Store | str | os.PathLike) -> Store:
    """Accept an open store or a path to one."""
    return store if isinstance(store, Store) else open_store(store)


def fast_path_ok(store: Store, hook: str) -> bool:
    """True when the hook's chunk files can be read directly: local, bytes(little) + crc32c only."""
    if store.chunk_fpath(hook, 0) is None:
        return False
    meta_fpath = os.path.join(store.path, fmt.acts_path(hook), "zarr.json")
    try:
        with open(meta_fpath) as f:
            meta = json.load(f)
    except OSError:
        return False
    codecs = meta.get("codecs", [])
    names = [c.get("name") for c in codecs]
    if names != ["bytes", "crc32c"]:
        return False
    if codecs[0].get("configuration", {}).get("endian", "little") != "little":
        return False
    enc = meta.get("chunk_key_encoding", {})
    if enc.get("name") != "default" or enc.get("configuration", {}).get("separator", "/") != "/":
        return False
    return True


class ChunkReader:
    """Reads chunk i of one hook as its on-disk array `(images in chunk, n_tokens, d)`.

    Thread-safe: each call works on the buffer it is given. `read` returns a view of that buffer on
    the fast path (valid until the buffer is reused) and a fresh array on the zarr path.
    """

    def __init__(self, store: Store, hook: str, *, fast: bool | None = None):
        self.store = store
        self.info: HookInfo = store.hook(hook)
        self.hook = hook
        self.disk_dtype = np.dtype(fmt.ON_DISK_DTYPE[self.info.store_dtype]).newbyteorder("<")
        self.chunk_shape = (self.info.images_per_chunk, self.info.n_tokens, self.info.d)
        self.chunk_nbytes = int(np.prod(self.chunk_shape)) * self.disk_dtype.itemsize
        can = fast_path_ok(store, hook)
        if fast and not can:
            raise ValueError(f"hook {hook!r} of {store.path} cannot be read on the fast path (remote store or non-default codecs).")
        self.fast = can if fast is None else bool(fast)

    @property
    def file_nbytes(self) -> int:
        """Bytes of one chunk file on the fast path (zarr writes edge chunks at full size)."""
        return self.chunk_nbytes + CRC_BYTES

    def new_buffer(self) -> np.ndarray | None:
        """A buffer `read` can fill; None on the zarr path, which allocates its own."""
        return np.empty(self.file_nbytes, dtype=np.uint8) if self.fast else None

    def read(self, i: int, buf: np.ndarray | None = None) -> np.ndarray:
        start, stop = self.store.chunk_bounds(i)
        if not self.fast:
            return np.asarray(self.store.acts(self.hook)[start:stop])
        if buf is None:
            buf = self.new_buffer()
        fpath = self.store.chunk_fpath(self.hook, i)
        where = f"chunk {i} (images {start}..{stop - 1}) of hook {self.hook!r} in {self.store.path}"
        try:
            with open(fpath, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                if size != self.file_nbytes:
                    raise ChunkCorruptError(
                        f"{where} is {size} bytes, expected {self.file_nbytes} ({fpath}); the file is truncated "
                        "or from another store. Re-record that chunk (clear its `done` flag and rerun record)."
                    )
                view = memoryview(buf)[: self.file_nbytes]
                got = 0
                while got < self.file_nbytes:  # one read usually; loop in case the kernel returns short
                    k = f.readinto(view[got:])
                    if not k:
                        break
                    got += k
        except FileNotFoundError:
            raise ChunkCorruptError(
                f"{where} has no file ({fpath}) although the store marks it done; re-record that chunk."
            ) from None
        if got != self.file_nbytes:
            raise ChunkCorruptError(f"{where}: read {got} of {self.file_nbytes} bytes from {fpath}; the file changed while reading.")
        body = view[: self.chunk_nbytes]
        want = int.from_bytes(view[self.chunk_nbytes :], "little")
        if crc32c.crc32c(body) != want:
            raise ChunkCorruptError(
                f"{where} fails its crc32c checksum ({fpath}): the file is corrupt. Re-record that chunk "
                "(clear its `done` flag and rerun record) or restore the file from a copy."
            )
        acts = buf[: self.chunk_nbytes].view(self.disk_dtype).reshape(self.chunk_shape)
        return acts[: stop - start]


class Selection(NamedTuple):
    """Which rows of a hook a loader uses: images (valid and masked-in) and one token range."""

    images: np.ndarray
    """bool (n_images,): valid and in the image mask."""
    tok0: int
    """First stored token index of the selection."""
    n_sel_tokens: int
    """Tokens per image in the selection (T); they are stored contiguously from tok0."""
    n_tokens: int
    """Stored tokens per image (the gid of a row is image * n_tokens + token)."""
    images_per_chunk: int

    def chunk_images(self, i: int) -> np.ndarray:
        """Offsets (within chunk i) of its selected images, int64."""
        a = i * self.images_per_chunk
        return np.flatnonzero(self.images[a : a + self.images_per_chunk])

    def rows_per_chunk(self) -> np.ndarray:
        """Selected rows of every chunk, int64 (n_chunks,)."""
        n = self.images.shape[0]
        n_chunks = -(-n // self.images_per_chunk)
        padded = np.zeros(n_chunks * self.images_per_chunk, dtype=bool)
        padded[:n] = self.images
        return padded.reshape(n_chunks, self.images_per_chunk).sum(axis=1).astype(np.int64) * self.n_sel_tokens


def make_selection(store: Store, hook: str, tokens: str, image_mask: np.ndarray | None) -> Selection:
    """The rows a loader reads, checking the token selection, the mask and that the chunks are done."""
    info = store.hook(hook)
    if tokens not in ("all", "patches", "cls"):
        raise UserError(f"tokens={tokens!r} is not a token selection; choose all, patches or cls.")
    if tokens not in info.layout.selections():
        raise UserError(f"hook {hook!r} stores no {tokens!r} tokens; it has: {', '.join(info.layout.selections())}.")
    idx = info.layout.indices(tokens)
    # Every selection of a TokenLayout is a contiguous run (cls is one token, patches one grid range).
    assert np.array_equal(idx, np.arange(idx[0], idx[0] + idx.size)), "token selection is not contiguous"
    images = store.valid()
    if image_mask is not None:
        mask = np.asarray(image_mask)
        if mask.dtype != np.bool_ or mask.shape != (store.n_images,):
            raise UserError(
                f"image_mask must be a bool array of shape ({store.n_images},) (one entry per image of {store.path}); "
                f"got {mask.dtype} {mask.shape}."
            )
        images = images & mask
    if not store.complete:
        pending = np.flatnonzero(~store.done())
        if pending.size:
            raise UserError(
                f"store {store.path} is incomplete: {pending.size} chunks are not done (first: {pending[:5].tolist()}). "
                "Finish recording (rerun the same record command) before loading it."
            )
    if not images.any():
        raise UserError(f"no image of {store.path} is both valid and in the image mask; nothing to load.")
    return Selection(images, int(idx[0]), int(idx.size), info.n_tokens, info.images_per_chunk)


def copy_rows(raw_ntd: np.ndarray, sel: Selection, img_off: np.ndarray, lo: int, hi: int, out: np.ndarray, slots: np.ndarray) -> None:
    """Scatter selected rows [lo, hi) of a chunk into rows `slots` (hi - lo,) of `out`, without temporaries.

    The selected rows of a chunk are its selected images (offsets `img_off`) times the selected
    token range, image-major. Runs of consecutive whole images go with one indexed assignment each.
    """
    t = sel.n_sel_tokens
    t0 = sel.tok0
    p, p_end = lo // t, -(-hi // t)
    dst = 0
    while p < p_end:
        a = max(lo - p * t, 0)
        b = min(hi - p * t, t)
        if a == 0 and b == t:
            # Extend a run of whole, consecutive images.
            q = p + 1
            while q < p_end and (q + 1) * t <= hi and img_off[q] == img_off[q - 1] + 1:
                q += 1
            m = q - p
            i0 = int(img_off[p])
            out[slots[dst : dst + m * t].reshape(m, t)] = raw_ntd[i0 : i0 + m, t0 : t0 + t]
            dst += m * t
            p = q
        else:
            out[slots[dst : dst + b - a]] = raw_ntd[int(img_off[p]), t0 + a : t0 + b]
            dst += b - a
            p += 1
    assert dst == hi - lo


def row_gids(chunk: int, sel: Selection, img_off: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Global row ids (image * n_tokens + token) of selected rows [lo, hi) of a chunk, int64."""
    r = np.arange(lo, hi, dtype=np.int64)
    images = chunk * sel.images_per_chunk + img_off[r // sel.n_sel_tokens]
    return images * sel.n_tokens + sel.tok0 + r % sel.n_sel_tokens
