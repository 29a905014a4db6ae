"""Local weight files: checking paths, reading state dicts, fingerprinting.

Nothing here downloads: a store records the sha256 of the exact bytes it was made from, so a weights
file must be a local file the user can name again.
"""

from __future__ import annotations

import hashlib
import os
import pathlib

import torch

from saev_store.errors import UserError

# Files inside a model directory (HF save_pretrained, open_clip local dirs) that hold weights.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".npz", ".msgpack", ".h5")
_HASH_BLOCK = 16 * 1024 * 1024


def check_weights_file(weights: str | os.PathLike, spec: str) -> pathlib.Path:
    """The weights path as an existing file, or a UserError that says how to pass one."""
    fpath = pathlib.Path(weights).expanduser()
    if fpath.is_file():
        return fpath.resolve()
    what = "is a directory, not a file" if fpath.is_dir() else "does not exist"
    raise UserError(
        f"weights file {str(fpath)!r} for model {spec!r} {what}. Weights are read only from local files "
        "(nothing is downloaded): save the checkpoint (.safetensors, .pth, .bin) to disk and pass its path "
        "with --weights PATH (weights=PATH in Python), or pass no weights for a randomly initialized model."
    )


def sha256_file(fpath: str | os.PathLike) -> str:
    """Hex sha256 of one file's bytes."""
    h = hashlib.sha256()
    with open(fpath, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def weight_files(dpath: str | os.PathLike) -> list[pathlib.Path]:
    """Weight files under a model directory, sorted by relative path."""
    root = pathlib.Path(dpath)
    files = [p for p in root.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def sha256_dir(dpath: str | os.PathLike) -> str:
    """Hex sha256 over a directory's weight files: for each, in sorted order, its relative path, a NUL
    byte, then its bytes. Renaming, adding or changing a weight file changes the digest; configs do not."""
    root = pathlib.Path(dpath)
    h = hashlib.sha256()
    for fpath in weight_files(root):
        h.update(fpath.relative_to(root).as_posix().encode() + b"\0")
        with open(fpath, "rb") as f:
            while block := f.read(_HASH_BLOCK):
                h.update(block)
    return h.hexdigest()


def read_state_dict(fpath: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict from a .safetensors or torch checkpoint, unwrapping the usual containers
    ({'state_dict': ...}, {'model': ...}, {'module': ...}) and a DistributedDataParallel 'module.' prefix."""
    fpath = pathlib.Path(fpath)
    if fpath.suffix == ".safetensors":
        import safetensors.torch

        return dict(safetensors.torch.load_file(str(fpath), device="cpu"))
    try:
        # weights_only refuses pickled code: a checkpoint is data, never a program.
        obj = torch.load(fpath, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(
            f"could not read weights file {str(fpath)!r} ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
            "pass a .safetensors file or a torch state_dict saved with torch.save(model.state_dict(), path)."
        ) from err
    for key in ("state_dict", "model", "module", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(
            f"weights file {str(fpath)!r} holds no state dict of tensors; save one with "
            "torch.save(model.state_dict(), path) or safetensors.torch.save_file."
        )
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


def load_into(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], fpath, spec: str) -> None:
    """Strictly load a state dict; a mismatch is a UserError naming what is missing or extra."""
    try:
        result = module.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise UserError(
            f"weights file {str(fpath)!r} does not fit model {spec!r}: {str(err).splitlines()[-1].strip()[:300]}; "
            "pass the checkpoint saved for exactly this architecture."
        ) from err
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        raise UserError(
            f"weights file {str(fpath)!r} does not fit model {spec!r}: "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}; "
            "pass the checkpoint saved for exactly this architecture."
        )


RANDOM_INIT_SEED = 0
"""Models built without weights are initialized from this seed, so "random" is the same model every
time (a resumed recording must not mix two different random networks)."""


class seeded_init:
    """Context manager: build a model under a fixed CPU RNG seed without disturbing the caller's RNG."""

    def __enter__(self):
        self._rng = torch.random.fork_rng(devices=[])
        self._rng.__enter__()
        torch.manual_seed(RANDOM_INIT_SEED)
        return self

    def __exit__(self, *exc):
        return self._rng.__exit__(*exc)


def unknown_name(backend: str, name: str, names: list[str]) -> UserError:
    """A UserError for a model name the backend does not know, suggesting close names."""
    import difflib

    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else f"it knows {len(names)} names, e.g. {', '.join(names[:5])}."
    return UserError(f"{backend} has no model named {name!r}; {hint}")
