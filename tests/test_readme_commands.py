"""README.md is executable: every line of its ```bash blocks and every ```python block runs here, in README's
order, in one working folder, on small data, and the files README says a command writes must be there.

A bash line is looked up in COMMANDS by its text (continuations joined, the comment dropped, spaces
collapsed). Its entry says what README's `...` stands for, or which flags to add for small data (added at the
end: a later flag overrides README's), and which files must appear (globs, each matching at least once).
SUBSTITUTIONS then turn README's placeholders and GPU flags into what runs here, as whole words. Console
scripts (pyproject's [project.scripts]) run in this process; launchers run as subprocesses. Two lines that
come out as the same command (the GPU form and the CPU form of a launch) run once. A line with no entry fails,
saying which line to add; an entry no line uses fails too. Python blocks are looked up in SNIPPETS by their
first line and run with the names `py_given` makes; a ```toml block whose first line is `# NAME.toml` is written
to NAME.toml, for the commands that read it.

To document a new command, add its README line and one entry here, e.g.
    "saev-store add-labels STORE labels.csv": Run(makes=("demo/fmnist.zarr/labels_extra/zarr.json",)),
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import subprocess
import sys
import tomllib
import traceback
from typing import Callable, NamedTuple

import numpy as np
import pytest
import torch
from click.testing import CliRunner

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PY = sys.executable


class Run(NamedTuple):
    """How a README line runs here."""

    args: str = ""
    """Replaces README's `...`, or, without one, is added at the end (small data; later flags win)."""
    makes: tuple[str, ...] = ()
    """Files the README says the command writes: globs under the working folder, each must match."""
    before: Callable[[list[str]], None] | None = None
    """Makes the state the line assumes (gets the command as it will run)."""


class Exempt(NamedTuple):
    """A line that does not run here, and why."""

    reason: str


class Snippet(NamedTuple):
    """How a README Python block runs here: `replace` maps exact text of the block to what runs instead."""

    replace: dict[str, str] = {}


SAE = "relu-896-l1_1-lr_0.004"
"""An SAE of demo/run (d=112 at width 8x; `--lr 4e-3` as `make demo` trains them)."""
ACCELERATE_CPU = "--num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no"

SUBSTITUTIONS = {
    # README's placeholders: the store `make demo` records (GIVEN), its hook, an SAE of demo/run
    "STORE": "demo/fmnist.zarr",
    "H": "_blocks.10",
    "NAME": SAE,
    # paths outside the working folder; the folder holds 8 labeled PNGs (GIVEN)
    "/data/imagenet/train": "images/train",
    "/shared/vit.zarr": "shared/vit.zarr",
    "/data/ade20k/images/training": "ade/images/training",  # 6 PNGs with label-map masks (GIVEN)
    "/data/ade20k/annotations/training": "ade/annotations/training",
    # ViT-B/16's architecture at 1/16 of its parameters; vit_b16.safetensors holds its random init (GIVEN)
    "timm:vit_base_patch16_224": "timm:vit_tiny_patch16_224",
    # GPU flags -> this machine's CPUs
    "--device cuda": "",  # cpu, the default: the GPU and the CPU form of a launch then run as one command
    "--precision bf16": "--precision fp32",
    "--num_processes 8": ACCELERATE_CPU,
    "--num_processes 4": ACCELERATE_CPU,
    # the launchers: this Python's, on free ports (other jobs on the machine may hold the default one)
    "accelerate launch --multi_gpu": f"{PY} -m accelerate.commands.launch --multi_gpu --main_process_port 0",
    "torchrun": f"{PY} -m torch.distributed.run --standalone",
}

SMALL_RECORD = "--limit 4 --num-workers 0 --quiet"
LAUNCH_RECORD = "--data /data/imagenet/train --layer 10 --image-size 64 --images-per-chunk 2 --num-workers 0 --quiet"
"""What a launch line's `...` stands for: the default model on the 8 PNGs, 2 chunks per process (a ViT would
only add timm's import to every process)."""
SMALL_TRAIN = "--batch-size 128 --n-patches 512 --warmup-steps 2 --l1-warmup-steps 4 --buffer-mb 4 --quiet"
LAUNCH_TRAIN = "--width 4x --l1 1 " + SMALL_TRAIN
"""What a launch line's `...` stands for: one SAE (every process pays for each SAE's steps)."""
RUN_FILES = ("table.md", "table.csv", "run.json", "metrics.jsonl", "*/cfg.json", "*/sae_weights.safetensors",
             "*/sparsity.safetensors", "*/saev_extra.json", "*/metrics.json", "*/freq.png")
"""What README's Train section says a run directory holds."""


def run_files(dpath: str) -> tuple[str, ...]:
    return tuple(f"{dpath}/{f}" for f in RUN_FILES)


def HEAD_FILES(dpath: str) -> tuple[str, ...]:
    """What README's Task heads section says a head folder holds."""
    return tuple(f"{dpath}/{f}" for f in ("head.safetensors", "head.json", "confusion.png", "per_class.md", "per_class.csv",
                                          "train_log.jsonl"))


def vit_store(argv: list[str]) -> None:
    """vit.zarr as README's ViT recording made it (the launch lines after it overwrote it with the default model)."""
    res = _invoke(shlex.split("saev-store record --out vit.zarr --model timm:vit_tiny_patch16_224 --weights vit_b16.safetensors "
                              "--layer 10 --dataset folder --data images/train --overwrite " + SMALL_RECORD.replace("4", "8", 1)))
    assert res.exit_code == 0, res.output


def hf_mask_store(argv: list[str]) -> None:
    """ds.zarr: a `datasets` save_to_disk folder with an `annotation` column of label maps (255 = no label), recorded."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (40, 44, 3), dtype=np.uint8)) for _ in range(4)]
    masks = [Image.fromarray(np.where(rng.random((40, 44)) < 0.1, 255, rng.integers(0, 3, (40, 44))).astype(np.uint8))
             for _ in range(4)]
    ds = datasets.Dataset.from_dict({"image": images, "annotation": masks, "label": [0, 1, 0, 1]})
    ds.cast_column("image", datasets.Image()).cast_column("annotation", datasets.Image()).save_to_disk("hfds")
    res = _invoke(shlex.split("saev-store record --out ds.zarr --data hfds --layer 10 --image-size 64 --num-workers 0 --quiet"))
    assert res.exit_code == 0, res.output


def interrupted(argv: list[str]) -> None:
    """The same training without --resume, stopped (Ctrl-C) at its second checkpoint."""
    import trainers.train

    save = trainers.train.save_checkpoint
    calls = []

    def save_then_stop(*args, **kwargs):
        save(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as m:
        m.setattr(trainers.train, "save_checkpoint", save_then_stop)
        res = _invoke([a for a in argv if a != "--resume"])
    assert res.exit_code == 130 and "interrupted: the last checkpoint is kept" in res.output, res.output


COMMANDS: dict[str, Run | Exempt] = {
    "make demo": Exempt("3.5 minutes on 6,000 images; its steps are record, info, saev-train, topk and report, which run below"),
    "make test": Exempt("this test is part of it"),
    "saev-store record --out demo.zarr": Run("--image-size 64 " + SMALL_RECORD, makes=("demo.zarr/zarr.json",)),
    "saev-store record --out vit.zarr --model timm:vit_base_patch16_224 --weights vit_b16.safetensors --layer 10 --dataset folder "
    "--data /data/imagenet/train --device cuda --batch-size 256": Run(SMALL_RECORD, makes=("vit.zarr/zarr.json", "vit.zarr/acts/*")),
    "saev-store info vit.zarr": Run(),
    "saev-store verify vit.zarr": Run(),
    "saev-store hooks --model timm:vit_base_patch16_224": Run(),
    "accelerate launch --multi_gpu --num_processes 8 -m saev_store.cli record --out /shared/vit.zarr --device cuda ...":
        Run(LAUNCH_RECORD, makes=("shared/vit.zarr/zarr.json",)),
    "accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no -m saev_store.cli "
    "record --out /shared/vit.zarr ...": Run(LAUNCH_RECORD, makes=("shared/vit.zarr/zarr.json",)),
    "torchrun --nproc_per_node 2 -m saev_store.cli record --out vit.zarr ...": Run(LAUNCH_RECORD + " --overwrite", makes=("vit.zarr/zarr.json",)),
    "saev-store bench acts.zarr": Run("--seconds 0.2 --buffer-mb 64"),
    "saev-store bench acts.zarr --warm": Run("--seconds 0.2 --buffer-mb 64"),
    "saev-train demo/fmnist.zarr --hook _blocks.10 --out demo/run": Run("--lr 4e-3 " + SMALL_TRAIN, makes=run_files("demo/run")),
    "saev-train STORE --hook H --arch topk --k 16,32,64 --width 16x": Run(SMALL_TRAIN, makes=run_files("runs/fmnist-_blocks.10")),
    "saev-train STORE --hook H --sweep sweep.toml --parallel 6 --n-patches 100_000_000 --device cuda --precision bf16":
        Run("--out runs/sweep " + SMALL_TRAIN, makes=run_files("runs/sweep")),
    "saev-train STORE --hook H --out runs/x --resume": Run(SMALL_TRAIN + " --ckpt-every 1", before=interrupted, makes=run_files("runs/x")),
    "accelerate launch --multi_gpu --num_processes 4 -m trainers.cli STORE --hook H ...":
        Run("--out runs/ddp " + LAUNCH_TRAIN, makes=run_files("runs/ddp")),
    "accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no -m trainers.cli "
    "STORE --hook H ...": Run("--out runs/ddp " + LAUNCH_TRAIN, makes=run_files("runs/ddp")),
    "torchrun --nproc_per_node 2 -m trainers.cli STORE --hook H ...": Run("--out runs/ddp2 " + LAUNCH_TRAIN, makes=run_files("runs/ddp2")),
    "saev-tools topk demo/run": Run("--quiet", makes=("demo/run/topk/index.json", "demo/run/topk/*/stats.safetensors",
                                                      "demo/run/topk/*/exemplars.safetensors", "demo/run/topk/*/image_counts.zarr")),
    "saev-tools render demo/run/topk --sae NAME --latents 3,17": Run("--quiet", makes=(
        f"demo/run/topk/{SAE}/render/latent_3_max.png", f"demo/run/topk/{SAE}/render/latent_17_mean.png",
        f"demo/run/topk/{SAE}/render/scatter.png", f"demo/run/topk/{SAE}/render/freq_hist.png")),
    "saev-store add-labels demo/fmnist.zarr --masks pixels": Run("--quiet", makes=("demo/fmnist.zarr/patch_labels/7x7/zarr.json",)),
    "saev-store record --out ade.zarr ... --dataset folder --data /data/ade20k/images/training --masks /data/ade20k/annotations/training":
        Run("--layer 10 --image-size 64 --num-workers 0 --quiet", makes=("ade.zarr/patch_labels/*/zarr.json",)),
    "saev-store add-labels ade.zarr --masks /data/ade20k/annotations/training --patch-labels prefer-fg --mask-classes ade150.txt "
    "--overwrite": Run("--quiet", makes=("ade.zarr/patch_labels/*/zarr.json",)),
    "saev-store add-labels ds.zarr --mask-column annotation --mask-ignore 255": Run("--quiet", before=hf_mask_store,
                                                                                      makes=("ds.zarr/patch_labels/*/zarr.json",)),
    "saev-train STORE --hook H --arch jumprelu --l0-coef 0.5,1,2": Run("--out runs/jumprelu --width 4x " + SMALL_TRAIN,
                                                                       makes=run_files("runs/jumprelu")),
    "saev-train STORE --hook H --arch batchtopk --k 32 --objective matryoshka": Run("--out runs/matryoshka --width 4x " + SMALL_TRAIN,
                                                                                    makes=run_files("runs/matryoshka")),
    "saev-tools head demo/fmnist.zarr --hook _blocks.15 --task classify": Run("--out demo/heads/classify --n-epochs 2 --quiet",
                                                                              makes=HEAD_FILES("demo/heads/classify")),
    "saev-tools head vit.zarr --hook blocks.10 --task classify --tokens cls --lr 1e-4,1e-3,1e-2 --wd 0,0.1 --n-epochs 20":
        Run("--held-out 0.25 --n-epochs 2 --out heads/vit --quiet", before=vit_store, makes=HEAD_FILES("heads/vit")),
    "saev-tools head demo/fmnist.zarr --hook _blocks.10 --task segment --device cuda": Run(
        "--out demo/heads/segment --n-epochs 1 --quiet", makes=HEAD_FILES("demo/heads/segment")),
    "saev-tools report demo/run/topk": Run(f"--sae {SAE} --max-pages 2 --quiet", makes=("demo/run/topk/report/index.html",
                                                                           f"demo/run/topk/report/{SAE}/index.html")),
}

SNIPPETS: dict[str, Snippet | Exempt] = {
    "from saev_store.store import create_store, open_store, HookSpec": Snippet(),
    "from saev_store.loaders import ShuffledLoader, OrderedLoader": Snippet({"n_rows=100_000_000": "n_rows=20_000"}),
    "from trainers.sae_io import load_sae, load_run": Snippet(),
    "from tools.heads import load_head": Snippet(),
}

GIVEN = ["saev-store record --out demo/fmnist.zarr --limit 32 --image-size 112 --layer 10 --layer 15 --masks pixels --num-workers 0 "
         "--quiet"]
"""Commands for what README assumes exists: `make demo`'s store (the Makefile's flags, on 32 images)."""


def py_given() -> dict:
    """Names README's Python blocks use without defining them."""
    rng = np.random.default_rng(0)
    n = 64
    return {"n": n, "names": ["a", "b", "c"], "acts": rng.normal(size=(n, 197, 768)).astype(np.float32),
            "labels": (np.arange(n) % 3).astype(np.int32), "ids": [f"img{i}" for i in range(n)],
            "raw_acts": torch.randn(10, 112), "acts_btd": torch.randn(2, 49, 112), "rows_bd": torch.randn(2, 112)}


def make_given_files(root: pathlib.Path) -> None:
    """images/train/<class>/*.png, ade/{images,annotations}/training (images and label maps), ade150.txt and
    vit_b16.safetensors (a random vit_tiny_patch16_224)."""
    import safetensors.torch
    import timm
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / "images" / "train" / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (40 + i, 48, 3), dtype=np.uint8)).save(root / "images" / "train" / cls / f"{i}.png")
    for i in range(6):  # ADE20K-like: images and same-named PNG label maps (classes 0-3), with ade150.txt's names
        (root / "ade" / "images" / "training").mkdir(parents=True, exist_ok=True)
        (root / "ade" / "annotations" / "training").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (48, 56, 3), dtype=np.uint8)).save(root / "ade" / "images" / "training" / f"{i}.jpg")
        Image.fromarray(rng.integers(0, 4, (48, 56), dtype=np.uint8)).save(root / "ade" / "annotations" / "training" / f"{i}.png")
    (root / "ade150.txt").write_text("background\nwall\nfloor\nsky\n")
    torch.manual_seed(0)
    state = timm.create_model("vit_tiny_patch16_224").state_dict()
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(root / "vit_b16.safetensors"))


# --- README -> items ---------------------------------------------------------------------------------


class Item(NamedTuple):
    lineno: int
    kind: str  # "bash", "python" or "file"
    text: str  # the canonical line, or the block


def readme_items(text: str | None = None) -> list[Item]:
    """The README's bash lines, Python blocks and named files, in order."""
    items, lines = [], (README.read_text() if text is None else text).splitlines()
    i = 0
    while i < len(lines):
        m = re.fullmatch(r"```(\w+)\s*", lines[i])
        if not m:
            i += 1
            continue
        start, body = i + 1, []
        i += 1
        while not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1
        if m.group(1) == "bash":
            j = 0
            while j < len(body):
                lineno, line = start + j + 1, body[j]
                while line.endswith("\\"):
                    j += 1
                    line = line[:-1] + " " + body[j]
                j += 1
                words = shlex.split(line, comments=True)
                if words:
                    items.append(Item(lineno, "bash", " ".join(words)))
        elif m.group(1) == "python":
            items.append(Item(start, "python", "\n".join(body)))
        elif m.group(1) == "toml" and body and re.fullmatch(r"# ([\w.-]+\.toml)", body[0].strip()):
            items.append(Item(start, "file", "\n".join(body)))
    return items


def substitute(line: str) -> str:
    for key, value in SUBSTITUTIONS.items():
        line = re.sub(rf"(?<!\S){re.escape(key)}(?!\S)", lambda _: value, line)
    return line


def command(line: str, entry: Run) -> list[str]:
    """The README line as it runs here."""
    if " ... " in f" {line} ":
        line = re.sub(r"(?<!\S)\.\.\.(?!\S)", lambda _: entry.args, line)
    elif entry.args:
        line = f"{line} {entry.args}"
    return shlex.split(substitute(line))


def _scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def _invoke(argv: list[str]):
    """A console script (pyproject's [project.scripts]) in this process."""
    import importlib

    mod, _, fn = _scripts()[argv[0]].partition(":")
    return CliRunner().invoke(getattr(importlib.import_module(mod), fn), argv[1:], catch_exceptions=True)


def missing_entry(item: Item) -> str:
    return (f"README.md:{item.lineno} `{item.text}` has no entry in tests/test_readme_commands.py COMMANDS. Add one line:\n"
            f'    "{item.text}": Run("<flags for small data>", makes=("<files the README says it writes>",)),\n'
            f'or Exempt("<why it cannot run here>"); placeholders and GPU flags go through SUBSTITUTIONS.')


# --- the test -----------------------------------------------------------------------------------------

ITEMS = readme_items()


class Readme:
    """Runs README's items in order in one working folder (an item runs once, after every item before it)."""

    def __init__(self, root: pathlib.Path):
        self.root, self.done, self.ran, self.broken = root, 0, {}, None
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
                    "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.ns = py_given()
        make_given_files(root)
        for item in ITEMS:
            if item.kind == "file":
                first, _, body = item.text.partition("\n")
                (root / first.strip()[2:]).write_text(body + "\n")
        for line in GIVEN:
            res = _invoke(shlex.split(line))
            assert res.exit_code == 0, f"GIVEN `{line}` failed:\n{res.output}"

    def run_through(self, idx: int) -> None:
        while self.done <= idx:
            item = ITEMS[self.done]
            if self.broken is not None:
                pytest.fail(f"README.md:{self.broken} failed above, and the items after it build on it")
            self.done += 1
            try:
                self.run(item)
            except BaseException:
                self.broken = item.lineno
                raise

    def run(self, item: Item) -> None:
        if item.kind == "file":  # written before any command runs
            return
        if item.kind == "python":
            entry = SNIPPETS.get(item.text.splitlines()[0])
            assert entry is not None, (f"README.md:{item.lineno}: the Python block starting `{item.text.splitlines()[0]}` has no "
                                       f"entry in tests/test_readme_commands.py SNIPPETS; add Snippet() (with replacements "
                                       f"for small data) or Exempt(\"why\"), and any names it uses without defining to py_given.")
            if isinstance(entry, Exempt):
                return
            code = item.text
            for a, b in entry.replace.items():
                assert a in code, f"README.md:{item.lineno}: SNIPPETS replaces `{a}`, which the block no longer has"
                code = code.replace(a, b)
            exec(compile(code, f"README.md:{item.lineno}", "exec"), self.ns)
            return
        entry = COMMANDS.get(item.text)
        assert entry is not None, missing_entry(item)
        if isinstance(entry, Exempt):
            return
        argv = command(item.text, entry)
        key = tuple(argv)
        if key not in self.ran:  # the GPU and CPU forms of one launch come out the same here
            if entry.before is not None:
                entry.before(argv)
            if argv[0] in _scripts():
                res = _invoke(argv)
                out, code = res.output, res.exit_code
                if res.exception is not None and not isinstance(res.exception, SystemExit):
                    out += "".join(traceback.format_exception(res.exception))
            else:
                r = subprocess.run(argv, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=300)
                out, code = r.stdout + r.stderr, r.returncode
            self.ran[key] = code
            assert code == 0, f"README.md:{item.lineno} `{item.text}` ran as `{shlex.join(argv)}` and exited {code}:\n{out[-4000:]}"
        assert self.ran[key] == 0, f"README.md:{item.lineno}: the same command failed above"
        for pattern in entry.makes:
            assert list(self.root.glob(pattern)), f"README.md:{item.lineno} `{item.text}` did not write {pattern}"


@pytest.fixture(scope="module")
def readme(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    cwd, n_threads = os.getcwd(), torch.get_num_threads()
    os.chdir(root)
    try:
        yield Readme(root)
    finally:
        os.chdir(cwd)
        torch.set_num_threads(n_threads)


@pytest.mark.slow
@pytest.mark.parametrize("idx", range(len(ITEMS)), ids=[f"L{it.lineno}:{it.text.splitlines()[0][:60]}" for it in ITEMS])
def test_readme_item_runs(readme, idx):
    readme.run_through(idx)


def test_every_readme_line_has_an_entry_and_every_entry_a_line():
    lines = {it.text for it in ITEMS if it.kind == "bash"}
    firsts = {it.text.splitlines()[0] for it in ITEMS if it.kind == "python"}
    missing = [missing_entry(it) for it in ITEMS if it.kind == "bash" and it.text not in COMMANDS]
    assert not missing, "\n".join(missing)
    assert not set(COMMANDS) - lines, f"COMMANDS entries no README line uses (remove them): {sorted(set(COMMANDS) - lines)}"
    assert not set(SNIPPETS) - firsts, f"SNIPPETS entries no README block uses: {sorted(set(SNIPPETS) - firsts)}"
    assert firsts <= set(SNIPPETS), f"README Python blocks without a SNIPPETS entry: {sorted(firsts - set(SNIPPETS))}"


def test_an_unknown_readme_line_fails_saying_what_to_add():
    items = readme_items("```bash\nsaev-store frobnicate STORE \\\n    --fast   # new\n```\n")
    assert items == [Item(2, "bash", "saev-store frobnicate STORE --fast")]
    msg = missing_entry(items[0])
    assert "COMMANDS" in msg and '"saev-store frobnicate STORE --fast": Run(' in msg
    assert items[0].text not in COMMANDS


def test_substitutions_are_whole_words():
    assert substitute("saev-train STORE --hook H --out HOME/STORE2") == "saev-train demo/fmnist.zarr --hook _blocks.10 --out HOME/STORE2"
    assert command("torchrun --nproc_per_node 2 -m x STORE ...", Run("--a 1"))[-3:] == ["demo/fmnist.zarr", "--a", "1"]
