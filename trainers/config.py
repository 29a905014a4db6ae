"""What to train: one `SAEConfig` per sparse autoencoder, one `TrainConfig` per run.

A run trains every SAE in `TrainConfig.saes` on one stream of batches; `parallel` of them share a
pass over the data (more SAEs run in several passes over the same batches).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import typing
from typing import Literal

from saev_store.errors import UserError
from saev_store.layout import TokenSelection
from saev_store.loaders import DEFAULT_BUFFER_MB, DEFAULT_N_READERS
from saev_store.options import check_applies, check_choices, format_value, option, specs

Arch = Literal["relu", "topk", "batchtopk", "jumprelu", "gated"]
"""SAE architectures, named once."""
ARCHS: tuple[str, ...] = typing.get_args(Arch)
K_ARCHS: tuple[str, ...] = ("topk", "batchtopk")
"""Architectures whose sparsity is a number of active latents `k` (and that have the dead-latent auxiliary loss)."""
L1_ARCHS: tuple[str, ...] = ("relu", "gated")
"""Architectures penalized by the L1 coefficient `l1` (ReLU on its latents, Gated on its gate's ReLU)."""
Objective = Literal["vanilla", "matryoshka"]
OBJECTIVES: tuple[str, ...] = typing.get_args(Objective)
"""saev's names: one reconstruction loss, or the sum over nested prefixes of the dictionary."""
MATRYOSHKA_ARCHS: tuple[str, ...] = ("relu", "topk", "batchtopk")
"""Architectures the Matryoshka objective trains on top of (as Bussmann et al. 2025 and saev do)."""
SPARSITY_FIELD = {**{a: "l1" for a in L1_ARCHS}, **{a: "k" for a in K_ARCHS}, "jumprelu": "l0_coef"}
"""The field (sweep key, flag) that sets each architecture's sparsity."""
Schedule = Literal["constant", "cosine"]
BDecInit = Literal["mean", "median", "zeros"]
Precision = Literal["fp32", "tf32", "bf16"]
Compile = Literal["auto", "on", "off"]


@dataclasses.dataclass(frozen=True)
class SAEConfig:
    """One sparse autoencoder: width, sparsity mechanism and learning rate.

    The fields with settings in their metadata are the sweep's keys and `saev-train`'s SAE flags
    (trainers/sweep.py: each takes a list, and the SAEs are the product): a new documented field here is a
    new flag and sweep key. `grid` is what a sweep without the key trains (default: the field's default);
    `when=("arch", ...)` names the architectures that use the field: a value for another one is an error,
    and the field is stored as 0 there."""

    name: str = option(cli=False)
    """Folder name of this SAE inside the run directory (unique within a run)."""
    d_in: int = option(cli=False)
    """Input width (the hook's d)."""
    d_sae: int = option(cli=False)
    """Number of latents (from the sweep's `width`)."""
    arch: Arch = option("relu", grid_doc="relu, or topk when k is given")
    """`relu` (ReLU + L1 penalty), `topk` (keep the k largest per token), `batchtopk` (keep the k*B largest per
    batch), `jumprelu` (ReLU above a learned per-latent threshold, L0 penalty through straight-through
    estimators; Rajamanoharan et al. 2024, as SAELens trains it) or `gated` (a gate path and a magnitude path
    sharing encoder directions, L1 on the gate and an auxiliary gate reconstruction; Rajamanoharan et al. 2024a)."""
    objective: Objective = "vanilla"
    """`vanilla`: one reconstruction loss; `matryoshka` (relu, topk, batchtopk): the sum of the reconstruction
    losses of nested prefixes of the dictionary (latents 0..L-1 for each prefix length L, the whole width last;
    Bussmann et al. 2025, saev's `objective:matryoshka`). Exported as the base architecture."""
    l1: float = option(1.0, when=("arch", L1_ARCHS), grid=(1.0, 2.0, 4.0))
    """L1 coefficient (relu: on the latents; gated: on the gate's ReLU), applied after the sparsity warmup. The
    loss sums the squared error over d, and inputs are normalized to mean ||x||^2 = d, so values of about 1-5
    suit most hooks."""
    k: int = option(0, when=("arch", K_ARCHS), grid_doc="none; topk and batchtopk SAEs need it")
    """Active latents per token (topk, batchtopk)."""
    l0_coef: float = option(1.0, when=("arch", ("jumprelu",)))
    """jumprelu: coefficient of the L0 penalty (active latents per token), after the sparsity warmup
    (SAELens' `l0_coefficient`)."""
    bandwidth: float = option(0.05, when=("arch", ("jumprelu",)))
    """jumprelu: width of the rectangle kernel of the straight-through estimators (SAELens' `jumprelu_bandwidth`)."""
    init_threshold: float = option(0.01, when=("arch", ("jumprelu",)))
    """jumprelu: every latent's threshold at step 0 (SAELens' `jumprelu_init_threshold`); kept >= 0."""
    prefixes: tuple[int, ...] = option((), when=("objective", ("matryoshka",)), whole=True)
    """matryoshka: fixed prefix lengths, increasing, each < d_sae (the whole width is always the last prefix);
    one comma list is one setting. Empty (the default, as saev): `n_prefixes` lengths drawn anew every step."""
    n_prefixes: int = option(10, when=("objective", ("matryoshka",)))
    """matryoshka without fixed `prefixes`: prefixes per step, the whole width included; the others are drawn
    without replacement from 2..d_sae-1 with saev's Pareto weights (power 0.5: short prefixes are likelier)."""
    lr: float = 1e-3
    """Peak Adam learning rate (before optional width scaling)."""
    aux_coef: float = option(1 / 32, when=("arch", K_ARCHS))
    """Weight of the auxiliary dead-latent loss (topk, batchtopk), as in Gao et al. (2024)."""
    aux_k: int = option(0, when=("arch", K_ARCHS))
    """Dead latents the auxiliary loss may use per token (topk, batchtopk); 0 means d_in // 2."""
    dead_after: int = 1_000_000
    """A latent that has not fired for this many training tokens counts as dead (for the auxiliary loss and
    the dead fraction logged during training)."""
    seed: int = option(0, cli=False)
    """Seed of this SAE's initialization (independent of the others, so a bank equals one-at-a-time runs)."""

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise UserError(f"SAE {self.name!r}: architecture {self.arch!r} is unknown; choose one of {', '.join(ARCHS)}.")
        if self.objective not in OBJECTIVES:
            raise UserError(f"SAE {self.name!r}: objective {self.objective!r} is unknown; choose one of {', '.join(OBJECTIVES)}.")
        object.__setattr__(self, "prefixes", tuple(int(p) for p in self.prefixes))
        for spec in specs(SAEConfig):
            if spec.when is None or getattr(self, spec.when[0]) in spec.when[1]:
                continue
            value, unused = getattr(self, spec.name), () if spec.kind == "list" else type(spec.default)(0)
            if value not in (spec.default, unused):
                used_by = (f"{', '.join(spec.when[1])} SAEs" if spec.when[0] == "arch"
                           else f"--{spec.when[0]} {' or '.join(spec.when[1])}")
                own = (f"; its sparsity is --{SPARSITY_FIELD[self.arch].replace('_', '-')}"
                       if spec.name in SPARSITY_FIELD.values() and self.arch in SPARSITY_FIELD else "")
                raise UserError(f"SAE {self.name!r}: {spec.name}={format_value(value)} is for {used_by}; a {self.label} SAE "
                                f"does not use it ({spec.flag}){own}.")
            object.__setattr__(self, spec.name, unused)  # unused: recorded as 0 (or empty)
        if self.d_in < 1 or self.d_sae < 1:
            raise UserError(f"SAE {self.name!r}: d_in={self.d_in} and d_sae={self.d_sae} must be positive.")
        if self.arch in K_ARCHS and not 1 <= self.k <= self.d_sae:
            raise UserError(f"SAE {self.name!r}: {self.arch} needs 1 <= k <= d_sae={self.d_sae}, got k={self.k}; pass --k.")
        if self.l1 < 0 or self.l0_coef < 0:
            raise UserError(f"SAE {self.name!r}: l1={self.l1} and l0_coef={self.l0_coef} must be >= 0.")
        if self.arch == "jumprelu" and (not self.bandwidth > 0 or self.init_threshold < 0):
            raise UserError(f"SAE {self.name!r}: bandwidth={self.bandwidth} must be > 0 and init_threshold="
                            f"{self.init_threshold} >= 0.")
        if self.objective == "matryoshka":
            if self.arch not in MATRYOSHKA_ARCHS:
                raise UserError(f"SAE {self.name!r}: the matryoshka objective trains {', '.join(MATRYOSHKA_ARCHS)} SAEs, "
                                f"not {self.arch}.")
            p = self.prefixes
            if any(b <= a for a, b in zip(p, p[1:])) or (p and not 1 <= p[0] <= p[-1] < self.d_sae):
                raise UserError(f"SAE {self.name!r}: matryoshka prefixes {list(p)} must increase strictly within "
                                f"1..{self.d_sae - 1} (the whole width {self.d_sae} is always the last prefix).")
            if not p and not (self.n_prefixes == 1 or 2 <= self.n_prefixes <= self.d_sae - 1):
                # saev's weights give length 1 probability 0: d_sae - 2 lengths to draw n_prefixes - 1 from.
                raise UserError(f"SAE {self.name!r}: n_prefixes={self.n_prefixes} must be in 1..d_sae - 1 = {self.d_sae - 1}.")
        if not self.lr > 0:
            raise UserError(f"SAE {self.name!r}: learning rate {self.lr} must be positive.")
        if self.aux_k < 0 or self.dead_after < 1 or self.aux_coef < 0:
            raise UserError(f"SAE {self.name!r}: aux_k >= 0, aux_coef >= 0 and dead_after >= 1 are required.")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise UserError(f"SAE name {self.name!r} must be a plain folder name.")

    @property
    def sparsity(self) -> str:
        """Short label of the sparsity setting: `l1=5`, `k=32` or `l0_coef=1`."""
        if self.arch in L1_ARCHS:
            return f"l1={self.l1:g}"
        return f"k={self.k}" if self.arch in K_ARCHS else f"l0_coef={self.l0_coef:g}"

    @property
    def label(self) -> str:
        """Architecture with its objective, as names and tables show it: `topk`, `matryoshka-batchtopk`."""
        return self.arch if self.objective == "vanilla" else f"{self.objective}-{self.arch}"

    @property
    def sparsity_coef(self) -> float:
        """The coefficient of this SAE's sparsity penalty (before the warmup): l1 (ReLU, Gated), l0_coef
        (JumpReLU), 0 (TopK, BatchTopK: k is the constraint)."""
        if self.arch in L1_ARCHS:
            return self.l1
        return self.l0_coef if self.arch == "jumprelu" else 0.0

    @property
    def n_aux(self) -> int:
        return self.aux_k or max(1, self.d_in // 2)

    def effective_lr(self, scale_with_width: bool) -> float:
        """Peak learning rate; with width scaling lr / sqrt(d_sae / 2^14) (Gao et al. 2024)."""
        return self.lr / math.sqrt(self.d_sae / 2**14) if scale_with_width else self.lr


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train: data, budget, schedules, checkpoints, hardware (`saev-train`'s run options,
    saev_store/options.py; the SAEs come from SAEConfig's sweep keys)."""

    saes: tuple[SAEConfig, ...] = option(cli=False)
    """The SAEs of the run."""
    out_dpath: str | None = option(None, flag="--out")
    """Run directory: one subfolder per SAE, run.json, table.csv/md, metrics.jsonl, ckpt/ [default:
    runs/<store name>-<hook>]."""
    store: str | None = option(None, argument=True, required=True)
    """Store path the activations come from (None for an in-memory iterable)."""
    hook: str = option("", required=True)
    """Hook of the store to train on (see `saev-store info STORE`)."""
    tokens: TokenSelection = "patches"
    """Token selection to train on."""
    normalize: bool = True
    """Normalize inputs with the store's statistics ((x - mean) * sqrt(d) / rms_norm); recorded with each SAE."""
    batch_size: int = 4096
    """Rows per step (summed over ranks in distributed runs)."""
    n_patches: int | None = None
    """Training budget in rows (patches); the run stops after ceil(n_patches / batch_size) steps [default: --n-epochs epochs]."""
    n_epochs: int = option(1, when=("n_patches", (None,)))
    """Epochs over the training images when --n-patches is not given."""
    warmup_steps: int = 100
    """Linear learning-rate warmup from 0."""
    schedule: Schedule = "constant"
    """Learning rate after warmup: constant, or cosine decay to lr * lr_min_frac at the last step."""
    lr_min_frac: float = option(0.0, when=("schedule", ("cosine",)))
    """Final learning rate of the cosine schedule, as a fraction of the peak."""
    l1_warmup_steps: int = 100
    """Linear warmup of the sparsity coefficients from 0 (L1 of ReLU and Gated SAEs, L0 of JumpReLU SAEs)."""
    scale_lr_with_width: bool = option(False, negatable=True)
    """Scale each SAE's learning rate by 1 / sqrt(d_sae / 2^14)."""
    b_dec_init: BDecInit = "mean"
    """Decoder bias at step 0: the first batch's mean, its geometric median, or zeros."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas (saev and SAELens use the PyTorch defaults)."""
    adam_eps: float = 1e-8
    """Adam epsilon (> 0)."""
    seed: int = 0
    """Seed of data order, held-out split and (offset per SAE) initialization."""
    parallel: int = 9
    """SAEs sharing one pass over the data; more SAEs run in several passes."""
    fuse_encoders: bool = True
    """Run the encoders of equal-width SAEs as one matrix product [d_in, n * d_sae] (else one bmm)."""
    ckpt_every: int = 500
    """Steps between checkpoints (0: never, except at the end of each pass)."""
    log_every: int = 50
    """Steps between metric lines in metrics.jsonl and the progress bar."""
    held_out_frac: float = option(0.1, flag="--held-out")
    """Fraction of images (never patches) kept out of training for the final evaluation."""
    max_eval_images: int | None = 2000
    """Cap on held-out images evaluated (None: all)."""
    device: str = "cpu"
    """Torch device: cpu, cuda, cuda:1 ..."""
    precision: Precision = "fp32"
    """fp32 (default, exact); tf32 (TF32 matmuls on GPU); bf16 (bf16 matrix products and latents on GPU, fp32 master weights, Adam and losses)."""
    compile: Compile = "auto"
    """Fuse the step's element-wise stages and Adam with torch.compile (trainers/fused.py). auto: on a
    CUDA device with Triton; a CPU runs them eagerly from cache ("on" is refused there, see fused.stages).
    The first step compiles for tens of seconds."""
    buffer_mb: float = DEFAULT_BUFFER_MB
    """Shuffle buffer of the loader, MiB (per rank). Part of the result: it changes the shuffle order."""
    n_readers: int = DEFAULT_N_READERS
    """Chunk readers in flight in the loader."""
    quiet: bool = False
    """No progress bar."""

    def __post_init__(self):
        object.__setattr__(self, "saes", tuple(self.saes))
        object.__setattr__(self, "adam_betas", tuple(float(b) for b in self.adam_betas))
        if self.store is not None and "://" not in str(self.store):
            # Recorded in run.json and every SAE's saev_extra.json: absolute, so `saev-tools topk RUN`
            # finds the store from any working directory.
            object.__setattr__(self, "store", os.path.abspath(self.store))
        if self.out_dpath is None:
            stem = pathlib.Path(str(self.store).rstrip("/")).stem if self.store is not None else "run"
            object.__setattr__(self, "out_dpath", str(pathlib.Path("runs") / (f"{stem}-{self.hook}" if self.hook else stem)))
        check_choices(self)
        check_applies(self)
        if not self.saes:
            raise UserError("nothing to train: give at least one SAE (--width with --l1 or --k, or --sweep).")
        names = [s.name for s in self.saes]
        if len(set(names)) != len(names):
            raise UserError(f"SAE names must be unique within a run; got {names}.")
        if len({s.d_in for s in self.saes}) != 1:
            raise UserError("all SAEs of a run must share d_in (they read the same hook).")
        if self.batch_size < 1:
            raise UserError(f"batch size {self.batch_size} must be positive.")
        if self.n_patches is not None and self.n_patches < self.batch_size:
            raise UserError(f"--n-patches {self.n_patches} is less than one batch ({self.batch_size}); raise it.")
        if self.n_epochs < 1:
            raise UserError(f"--n-epochs {self.n_epochs} must be at least 1.")
        if self.compile == "on" and not self.device.startswith("cuda"):
            raise UserError(f"--compile on needs a CUDA device (PyTorch's CPU code generator cannot compile the "
                            f"decoder update, and the eager stages already run from cache on {self.device}); use auto or off.")
        if self.precision != "fp32" and not self.device.startswith("cuda"):
            raise UserError(f"--precision {self.precision} needs a CUDA device; use fp32 on {self.device}.")
        if not 0.0 <= self.held_out_frac < 1.0:
            raise UserError(f"held-out fraction {self.held_out_frac} must be in [0, 1).")
        if self.parallel < 1 or self.warmup_steps < 0 or self.l1_warmup_steps < 0 or self.ckpt_every < 0:
            raise UserError("parallel >= 1, warmup steps >= 0 and ckpt_every >= 0 are required.")
        if self.log_every < 1:
            raise UserError(f"log_every {self.log_every} must be at least 1.")
        if not self.adam_eps > 0 or len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise UserError(f"Adam needs eps > 0 and two betas in [0, 1); got eps={self.adam_eps}, betas={self.adam_betas}.")
        if not self.buffer_mb > 0 or self.n_readers < 1:
            raise UserError(f"--buffer-mb must be > 0 and --n-readers >= 1; got {self.buffer_mb} and {self.n_readers}.")

    @property
    def d_in(self) -> int:
        return self.saes[0].d_in

    def passes(self) -> list[tuple[SAEConfig, ...]]:
        """The SAEs in groups of at most `parallel`, one group per pass over the data.

        Equal widths are kept together so each pass stacks as few distinct shapes as possible.
        """
        order = sorted(range(len(self.saes)), key=lambda i: (self.saes[i].d_sae, i))
        saes = [self.saes[i] for i in order]
        return [tuple(saes[i : i + self.parallel]) for i in range(0, len(saes), self.parallel)]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["saes"] = [{**dataclasses.asdict(s), "prefixes": list(s.prefixes)} for s in self.saes]  # as JSON holds it
        d["adam_betas"] = list(self.adam_betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        d["saes"] = tuple(SAEConfig(**s) for s in d["saes"])
        d["adam_betas"] = tuple(d["adam_betas"])
        return cls(**d)
