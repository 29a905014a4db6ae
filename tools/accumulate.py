"""Per-latent statistics of one SAE, accumulated over blocks of whole images in one ordered pass.

Everything here is a pure function of the latents it is fed, `z_ntl` (n images, T tokens, L latents),
their image indices and labels; nothing reads a store or knows a model, so the statistics can be
checked against brute-force numpy on any array of latents (tests/test_tools_stats.py).

The statistics cover the *mined* tokens of each image (`mined_tokens`, a range of the T): the tokens
the SAE was trained on, so its patch tokens, or every token for an SAE trained on all tokens
(`tools/topk.py` chooses). Below, "patch" means a mined token. An exemplar's heatmap values are the
latent on the patch grid (`grid_tokens`), whatever is mined. By default all T tokens are the grid and
are mined.

Latents must be >= 0, as every SAE architecture here gives them (ReLU, TopK, JumpReLU; checked on the
first block). Definitions (a latent is "active" on a patch when its value is > 0):
* `freq_patch`  = active patches / (valid images * T);
* `freq_image`  = images with at least one active patch / valid images;
* `mean_active` = mean of the latent's value over the patches where it is active (0 when never active);
* `max_act`     = largest value over all patches;
* counts over the threshold `tau`: an image's count is its number of patches with value > tau, a class's
  count the sum over its images (unlabeled images, label -1, count for no class), the dataset's the sum
  over all images;
* exemplars, two rankings: an image's score is its largest patch value (`max`) or the mean of its patch
  values, zeros included (`mean`). Each latent keeps the k best images with score > 0, ordered by score
  descending and, among equal scores, by image index ascending (so the result does not depend on how
  images were split into blocks). Slots no image fills hold image -1, score 0 and zero patches;
* `entropy`: each label's share of the summed scores of the labeled exemplars, H = -sum p ln p (natural
  log); NaN when no labeled exemplar has a positive score.

PatchSAE's definitions (Lim et al. 2025, `tasks/compute_sae_feature_data.py` and
`compute_class_wise_sae_activation.py`), beside ours when `patchsae=True`, over ALL T tokens fed (the
pass feeds every stored token: CLS included when the store has one, registers too when they were kept),
whatever is mined; PatchSAE applies its SAE to every token, CLS included, so an SAE trained on patches
is applied to the CLS token here as well:
* image score `a(img)` = mean of the latent over the image's T tokens;
* `patchsae_freq` = images with a(img) > 0 / valid images;
* `patchsae_mean_act` = mean of a(img) over those images (NaN when there is none, as in PatchSAE);
* exemplars `patchsae`: the k images with the largest a(img) > 0 (our tie rule), their entropy as ours
  (PatchSAE also adds 1e-9 inside the log and reports -1 for fewer than k exemplars or no labels; we
  report the entropy of whatever exemplars there are, NaN without labels);
* `patchsae_count_class`: per class, the tokens (all T, CLS included) with value > tau.

Memory is independent of the number of images: the running exemplars take 2 rankings * k * L * T * 4 bytes
(the patch activations of each exemplar are kept as it enters the top-k, so no second pass over the
store is needed), the counters O(L * n_classes). Per-image counts are returned per block, sparsely, for
the caller to write to disk.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

RANKINGS = ("max", "mean")
"""How an image is scored for a latent: its largest patch value, or the mean over its patches."""
PATCHSAE_RANKING = "patchsae"
"""PatchSAE's ranking: the mean over all the image's tokens, CLS included."""
RANKING_TITLES = {"max": "by maximum patch activation", "mean": "by mean activation over the image's patches",
                  PATCHSAE_RANKING: "by PatchSAE's score (mean over all the image's tokens, CLS included)"}
"""What each ranking is, in words (report headings, plot labels)."""


class Exemplars(NamedTuple):
    """The top-k images of every latent under one ranking (numpy)."""

    values: np.ndarray
    """(L, k) float32 scores, descending; 0 in unfilled slots."""
    images: np.ndarray
    """(L, k) int64 store image indices; -1 in unfilled slots."""
    labels: np.ndarray
    """(L, k) int32 labels of those images; -1 when unlabeled or unfilled."""
    patches: np.ndarray
    """(L, k, P) float32 the latent's value on every patch of the grid of the exemplar (for heatmaps)."""
    entropy: np.ndarray
    """(L,) float64 label entropy of the exemplars (natural log); NaN when no labeled exemplar."""


class LatentStats(NamedTuple):
    """Everything one pass learns about one SAE's latents."""

    n_images: int
    """Valid images seen."""
    n_patches: int
    """Mined tokens per image (the T of the frequencies): the patches, or every token (see the module docstring)."""
    tau: float
    """Threshold of the activation counts."""
    n_patches_active: np.ndarray
    """(L,) int64 patches with value > 0."""
    n_images_active: np.ndarray
    """(L,) int64 images with at least one patch > 0."""
    sum_active: np.ndarray
    """(L,) float64 sum of the values > 0."""
    max_act: np.ndarray
    """(L,) float32 largest value (0 for a latent never above 0)."""
    count_dataset: np.ndarray
    """(L,) int64 patches with value > tau over the whole store."""
    count_class: np.ndarray
    """(n_classes, L) int64 patches with value > tau summed over each class's images."""
    top: dict
    """ranking name ("max", "mean", and "patchsae" when computed) -> Exemplars."""
    patchsae_n_images_active: np.ndarray | None = None
    """(L,) int64 images whose PatchSAE score (mean over all tokens) is > 0; None when not computed."""
    patchsae_sum_score: np.ndarray | None = None
    """(L,) float64 sum of the PatchSAE scores over all images."""
    patchsae_count_class: np.ndarray | None = None
    """(n_classes, L) int64 tokens (all of them, CLS included) with value > tau, summed over each class's images."""

    @property
    def freq_patch(self) -> np.ndarray:
        return self.n_patches_active / max(1, self.n_images * self.n_patches)

    @property
    def freq_image(self) -> np.ndarray:
        return self.n_images_active / max(1, self.n_images)

    @property
    def mean_active(self) -> np.ndarray:
        return np.divide(self.sum_active, self.n_patches_active, out=np.zeros(self.sum_active.shape), where=self.n_patches_active > 0)

    @property
    def has_patchsae(self) -> bool:
        return self.patchsae_n_images_active is not None

    @property
    def patchsae_freq(self) -> np.ndarray:
        """PatchSAE's activated frequency: the fraction of images with score > 0."""
        return self.patchsae_n_images_active / max(1, self.n_images)

    @property
    def patchsae_mean_act(self) -> np.ndarray:
        """PatchSAE's mean activation: the mean score over the images where it is > 0 (NaN where none)."""
        n = self.patchsae_n_images_active
        return np.divide(self.patchsae_sum_score, n, out=np.full(n.shape, np.nan), where=n > 0)


class ImageCounts(NamedTuple):
    """Sparse per-image counts of one block: entry j says image `images[j]` has `counts[j]` patches of latent
    `latents[j]` above tau. Only nonzero counts appear."""

    images: np.ndarray
    """(m,) int64."""
    latents: np.ndarray
    """(m,) int32."""
    counts: np.ndarray
    """(m,) int32."""


class _RunningTopK:
    """The k best (score, image) pairs per latent, with the exemplar's patch values and label."""

    def __init__(self, k: int, d_sae: int, n_patches: int, device: torch.device):
        self.k = k
        # Empty slots hold score 0 (and image -1): only scores > 0 are exemplars, so they are never reported.
        self.values = torch.zeros((k, d_sae), device=device)
        self.images = torch.full((k, d_sae), -1, dtype=torch.int64, device=device)
        self.labels = torch.full((k, d_sae), -1, dtype=torch.int32, device=device)
        # An exemplar's patch values stay in the slot they were written to; `slots` says which slot holds each
        # rank. A merge then writes the new entries' patches only, instead of shifting k * T values per latent.
        self.patches = torch.zeros((k, d_sae, n_patches), device=device)
        self.slots = torch.arange(k, device=device)[:, None].repeat(1, d_sae)

    def update(self, score_nl: torch.Tensor, z_ntl: torch.Tensor, images_n: torch.Tensor, labels_n: torch.Tensor,
               grid_start: int = 0) -> None:
        """Merge one block. Its images must come after every image seen so far (ordered pass). `z_ntl`: the
        block's latents on all its tokens (contiguous); the heatmap is tokens grid_start .. grid_start + P - 1."""
        k = self.k
        # Only latents whose best score in the block beats their k-th value can change (a tie loses: the
        # running entries are earlier images). After the first blocks these are few, so the merge below runs
        # on a handful of columns instead of all L.
        cols = (score_nl.amax(dim=0) > self.values[k - 1]).nonzero().squeeze(1)
        if cols.numel() == 0:
            return
        run_v = self.values[:, cols]
        cand = torch.cat([run_v, score_nl[:, cols]], dim=0)
        # One int64 key per candidate orders by score, then by candidate position: running entries (earlier
        # images, already in tie order) before the block's, the block's in image order. A float32 >= 0 orders
        # like its bit pattern, so the key is exact, and top-k over unique keys is deterministic (a stable
        # sort of all candidates would do the same at several times the cost).
        pos = torch.arange(cand.shape[0], device=cand.device, dtype=torch.int64)[:, None]
        key = (cand.view(torch.int32).to(torch.int64) << 32) | ((1 << 32) - 1 - pos)
        order = torch.topk(key, k, dim=0, sorted=True).indices
        from_run = order < k
        src_r = order.clamp(max=k - 1)
        src_b = (order - k).clamp(min=0)
        self.values[:, cols] = cand.gather(0, order)
        self.images[:, cols] = torch.where(from_run, self.images[:, cols].gather(0, src_r), images_n[src_b])
        self.labels[:, cols] = torch.where(from_run, self.labels[:, cols].gather(0, src_r), labels_n[src_b])
        # Kept running entries are the best ranks of the column, so the evicted ones are its last n_new ranks:
        # the column's j-th new entry takes the slot of rank k - n_new + j.
        is_new = ~from_run
        n_new = is_new.sum(dim=0)
        free_r = (k - n_new)[None, :] + is_new.cumsum(dim=0) - 1
        old_slots = self.slots[:, cols]
        new_slots = torch.where(from_run, old_slots.gather(0, src_r), old_slots.gather(0, free_r.clamp(0, k - 1)))
        self.slots[:, cols] = new_slots
        jj, cc = is_new.nonzero(as_tuple=True)
        # z[b, :, l] for each new entry through flat offsets: indexing z[b, :, l] directly makes torch copy
        # all of z into (n, L, T) order first.
        t = self.patches.shape[2]
        t_all, n_lat = z_ntl.shape[1], z_ntl.shape[2]
        lat = cols[cc]
        base = src_b[jj, cc] * (t_all * n_lat) + grid_start * n_lat + lat
        offsets = base[:, None] + torch.arange(t, device=base.device) * n_lat
        self.patches[new_slots[jj, cc], lat] = z_ntl.reshape(-1)[offsets]

    def result(self) -> Exemplars:
        values = self.values.T.cpu().numpy().astype(np.float32)
        images = self.images.T.cpu().numpy()
        labels = self.labels.T.cpu().numpy()
        lat = torch.arange(self.slots.shape[1], device=self.slots.device)
        patches = self.patches[self.slots, lat].permute(1, 0, 2).cpu().numpy()
        empty = ~(values > 0)
        values = np.where(empty, 0.0, values).astype(np.float32)
        images = np.where(empty, -1, images)
        labels = np.where(empty, -1, labels).astype(np.int32)
        patches = np.where(empty[:, :, None], 0.0, patches).astype(np.float32)
        return Exemplars(values, images, labels, patches, label_entropy(values, labels))


def label_entropy(values_lk: np.ndarray, labels_lk: np.ndarray) -> np.ndarray:
    """Entropy (natural log) of each row's label distribution weighted by `values`; labels < 0 are ignored.

    Row l: p_c = sum(values[l, labels == c]) / sum(values[l, labels >= 0]); H = -sum_c p_c ln p_c. NaN when the
    labeled values of a row sum to 0.
    """
    values = np.where(labels_lk >= 0, np.maximum(values_lk, 0), 0).astype(np.float64)
    out = np.full(values.shape[0], np.nan)
    if values.shape[1] == 0:
        return out
    n_classes = int(labels_lk.max()) + 1 if labels_lk.size else 0
    if n_classes <= 0:
        return out
    per_class = np.zeros((values.shape[0], n_classes))
    rows = np.repeat(np.arange(values.shape[0]), values.shape[1])
    np.add.at(per_class, (rows, np.maximum(labels_lk, 0).ravel()), values.ravel())
    total = per_class.sum(axis=1)
    ok = total > 0
    p = per_class[ok] / total[ok, None]
    out[ok] = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0.0), axis=1)
    return out


CHUNK_BYTES = {"cpu": 16 << 20, "cuda": 512 << 20}
"""Latents of one chunk (the images one step handles at once), per device type. On a CPU the chunk stays in
the cache between the encoder writing it and the statistics reading it several times (16 MiB: measured
faster than 8 or 32 MiB on a 32 MiB L3, fewer per-chunk top-k merges than smaller ones); on a GPU it only bounds the temporaries and the number of steps."""


class Scratch:
    """Reusable float32 buffers, one per slot, grown on demand: the chunk's latents and its 0/1 mask are written
    into the same memory every chunk (a fresh tensor per chunk costs page faults and cache misses)."""

    def __init__(self):
        self.bufs: dict = {}

    def get(self, shape, device, slot: str = "mask") -> torch.Tensor:
        numel = math.prod(shape)
        buf = self.bufs.get(slot)
        if buf is None or buf.numel() < numel or buf.device != torch.device(device):
            buf = self.bufs[slot] = torch.empty(numel, device=device)
        return buf[:numel].view(shape)


def _sparse_counts(count_nl: torch.Tensor, images: np.ndarray) -> ImageCounts:
    """The nonzero entries of a block's (n, L) per-image counts, found where the counts are (only they cross
    to the host from a GPU; numpy's nonzero is the faster one on a CPU)."""
    if count_nl.device.type == "cpu":
        c = count_nl.numpy()
        rows, cols = np.nonzero(c)
        vals = c[rows, cols]
    else:
        rows_t, cols_t = count_nl.nonzero(as_tuple=True)
        vals = count_nl[rows_t, cols_t].cpu().numpy()
        rows, cols = rows_t.cpu().numpy(), cols_t.cpu().numpy()
    return ImageCounts(images[rows], cols.astype(np.int32), vals.astype(np.int32))


class LatentAccumulator:
    """Streams blocks of one SAE's latents (images in increasing order) into `LatentStats`.

    A block is handled in chunks of `chunk_images` images (by default about `CHUNK_BYTES` of latents): every
    statistic and the top-k merge of a chunk read its latents while they are still in the cache, and
    `update_encoded` never holds more than one chunk of latents."""

    def __init__(self, d_sae: int, n_tokens: int, *, k: int = 16, tau: float = 0.2, n_classes: int = 0, device="cpu", scratch=None,
                 chunk_images: int | None = None, grid_tokens: tuple[int, int] | None = None,
                 mined_tokens: tuple[int, int] | None = None, patchsae: bool = False):
        """`n_tokens`: T, the tokens per image of the latents fed. `grid_tokens`: (first, count) of the patch
        grid's tokens (default: all T); `mined_tokens`: [start, stop) of the tokens the statistics cover
        (default: the grid). `patchsae`: also PatchSAE's statistics, over all T tokens."""
        if k < 1:
            raise ValueError(f"k={k} must be at least 1.")
        if tau < 0:
            raise ValueError(f"tau={tau} must be >= 0 (a count threshold below 0 would count inactive patches).")
        self.grid_tokens = (0, n_tokens) if grid_tokens is None else (int(grid_tokens[0]), int(grid_tokens[1]))
        g0, n_grid = self.grid_tokens
        self.mined_tokens = (g0, g0 + n_grid) if mined_tokens is None else (int(mined_tokens[0]), int(mined_tokens[1]))
        m0, m1 = self.mined_tokens
        if not (0 <= g0 and g0 + n_grid <= n_tokens and 0 <= m0 < m1 <= n_tokens):
            raise ValueError(f"grid tokens {self.grid_tokens} and mined tokens {self.mined_tokens} must lie in 0..{n_tokens}.")
        self.d_sae, self.n_tokens, self.k, self.tau, self.n_classes = d_sae, n_tokens, k, float(tau), n_classes
        self.n_patches = m1 - m0
        """Mined tokens per image."""
        dev = self.device = torch.device(device)
        if chunk_images is None:
            chunk_images = CHUNK_BYTES.get(dev.type, CHUNK_BYTES["cuda"]) // (4 * n_tokens * d_sae)
        self.chunk_images = max(1, int(chunk_images))
        self.n_images = 0
        self.last_image = -1
        self.n_patches_active = torch.zeros(d_sae, dtype=torch.int64, device=dev)
        self.n_images_active = torch.zeros(d_sae, dtype=torch.int64, device=dev)
        self.sum_active = torch.zeros(d_sae, dtype=torch.float64, device=dev)
        self.max_act = torch.zeros(d_sae, device=dev)
        self.count_dataset = torch.zeros(d_sae, dtype=torch.int64, device=dev)
        self._count_class = torch.zeros((n_classes + 1, d_sae), dtype=torch.int64, device=dev)
        """Per class, and a last row that collects unlabeled images (label < 0 or >= n_classes) and is dropped:
        routing them there instead of selecting the labeled rows spares a device-to-host sync per chunk."""
        self.count_class = self._count_class[:n_classes]
        self.patchsae = bool(patchsae)
        rankings = RANKINGS + ((PATCHSAE_RANKING,) if self.patchsae else ())
        self.top = {r: _RunningTopK(k, d_sae, n_grid, dev) for r in rankings}
        if self.patchsae:
            self.ps_n_images_active = torch.zeros(d_sae, dtype=torch.int64, device=dev)
            self.ps_sum_score = torch.zeros(d_sae, dtype=torch.float64, device=dev)
            self._ps_count_class = torch.zeros((n_classes + 1, d_sae), dtype=torch.int64, device=dev)
        self.scratch = scratch if scratch is not None else Scratch()
        """Chunk buffers; accumulators of one pass share them (they run one after another)."""

    @staticmethod
    def bytes_needed(d_sae: int, n_patches: int, k: int, n_classes: int = 0, patchsae: bool = False) -> int:
        """Memory the accumulator holds, whatever the number of images (the shared chunk buffers aside);
        `n_patches`: the grid's patches (each exemplar keeps their values)."""
        per_rank = k * d_sae * (4 + 8 + 4 + 4 * n_patches)
        n_rank = len(RANKINGS) + bool(patchsae)
        return n_rank * per_rank + d_sae * (8 * 5 + 4 + 16 * bool(patchsae)) + n_classes * d_sae * 8 * (1 + bool(patchsae))

    @torch.no_grad()
    def update(self, z_ntl: torch.Tensor, images: np.ndarray, labels: np.ndarray) -> ImageCounts:
        """Add the latents of n whole images (valid ones only). Returns their nonzero per-image tau counts."""
        n, t, d_sae = z_ntl.shape
        if (t, d_sae) != (self.n_tokens, self.d_sae):
            raise ValueError(f"latents of shape {tuple(z_ntl.shape)}; expected (n, {self.n_tokens}, {self.d_sae}).")
        z = z_ntl.to(self.device, torch.float32).contiguous()
        return self._blocks(n, images, labels, lambda s, e: z[s:e])

    @torch.no_grad()
    def update_encoded(self, n: int, encode, images: np.ndarray, labels: np.ndarray) -> ImageCounts:
        """Like `update`, for latents made chunk by chunk: `encode(i0, i1, out_ctl)` writes the latents of the
        block's images i0..i1-1 into `out_ctl` (float32, contiguous, on this device), which is reused."""

        def chunk(s: int, e: int) -> torch.Tensor:
            out = self.scratch.get((e - s, self.n_tokens, self.d_sae), self.device, slot="latents")
            encode(s, e, out)
            return out

        return self._blocks(n, images, labels, chunk)

    def _blocks(self, n: int, images, labels, chunk) -> ImageCounts:
        images = np.asarray(images, dtype=np.int64)
        if len(images) != n:
            raise ValueError(f"{len(images)} image indices for a block of {n} images.")
        if n and (images[0] <= self.last_image or np.any(np.diff(images) <= 0)):
            raise ValueError("blocks must hold images in strictly increasing order across the pass (the top-k tie rule depends on it).")
        if n == 0:
            return ImageCounts(np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int32))
        images_t = torch.as_tensor(images, device=self.device)
        labels_t = torch.as_tensor(np.asarray(labels, dtype=np.int32), device=self.device)
        parts = []
        for s in range(0, n, self.chunk_images):
            e = min(n, s + self.chunk_images)
            z = chunk(s, e)
            if self.n_images == 0 and s == 0 and bool((z.amin() < 0).item()):
                raise ValueError("latents must be >= 0 (ReLU, TopK and JumpReLU SAEs give such latents); got negative values.")
            parts.append(self._chunk(z, images[s:e], images_t[s:e], labels_t[s:e]))
        self.last_image = int(images[-1])
        self.n_images += n
        if len(parts) == 1:
            return parts[0]
        return ImageCounts(*(np.concatenate([getattr(p, f) for p in parts]) for f in ImageCounts._fields))

    def _chunk(self, z: torch.Tensor, images: np.ndarray, images_t: torch.Tensor, labels_t: torch.Tensor) -> ImageCounts:
        """Every statistic of one chunk, each from per-image reductions over the mined tokens (one cached read
        of z apiece; a view when they are not all T). The 0/1 masks go to a reused float32 buffer: a fresh
        tensor per mask costs more in page faults than the comparison, and float sums are exact here
        (counts <= T < 2**24)."""
        m0, m1 = self.mined_tokens
        zm = z if (m0, m1) == (0, z.shape[1]) else z[:, m0:m1]
        img_sum = zm.sum(dim=1)
        img_max = zm.amax(dim=1)
        mask = self.scratch.get(z.shape, z.device, slot="mask")
        mask_m = mask if zm is z else mask[:, m0:m1]
        torch.gt(z, 0, out=mask)
        n_active_nl = mask_m.sum(dim=1)
        torch.gt(z, self.tau, out=mask)
        count_nl = mask_m.sum(dim=1).to(torch.int32)

        self.n_patches_active += n_active_nl.sum(dim=0, dtype=torch.float64).to(torch.int64)
        self.sum_active += img_sum.sum(dim=0, dtype=torch.float64)  # latents are >= 0: the sum of the values > 0
        self.n_images_active += (img_max > 0).sum(dim=0)
        torch.maximum(self.max_act, img_max.amax(dim=0), out=self.max_act)
        self.count_dataset += count_nl.sum(dim=0, dtype=torch.int64)
        if self.n_classes:
            labeled = (labels_t >= 0) & (labels_t < self.n_classes)
            self._count_class.index_add_(0, torch.where(labeled, labels_t, self.n_classes).long(), count_nl.long())

        g0 = self.grid_tokens[0]
        if self.patchsae:  # before the top-k merges: `mask` still holds z > tau
            self._patchsae(z, zm, img_sum, count_nl, mask, labels_t, images_t, g0)
        self.top["max"].update(img_max, z, images_t, labels_t, g0)
        self.top["mean"].update(img_sum / (m1 - m0), z, images_t, labels_t, g0)
        return _sparse_counts(count_nl, images)

    def _patchsae(self, z, zm, img_sum, count_nl, mask_tau, labels_t, images_t, g0: int) -> None:
        """PatchSAE's statistics of one chunk, over all T tokens: the mined tokens' sums and counts plus those
        of the other tokens (the CLS token and registers, a thin slice), rather than a second pass over z."""
        m0, m1 = self.mined_tokens
        t = z.shape[1]
        all_sum, all_count = img_sum, count_nl
        if zm is not z:
            rest = [(a, b) for a, b in ((0, m0), (m1, t)) if b > a]
            all_sum = img_sum + sum(z[:, a:b].sum(dim=1) for a, b in rest)
            all_count = count_nl + sum(mask_tau[:, a:b].sum(dim=1).to(torch.int32) for a, b in rest)
        score = all_sum / t
        self.ps_n_images_active += (score > 0).sum(dim=0)
        self.ps_sum_score += score.sum(dim=0, dtype=torch.float64)
        if self.n_classes:
            labeled = (labels_t >= 0) & (labels_t < self.n_classes)
            self._ps_count_class.index_add_(0, torch.where(labeled, labels_t, self.n_classes).long(), all_count.long())
        self.top[PATCHSAE_RANKING].update(score, z, images_t, labels_t, g0)

    def result(self) -> LatentStats:
        ps = {}
        if self.patchsae:
            ps = {"patchsae_n_images_active": self.ps_n_images_active.cpu().numpy(),
                  "patchsae_sum_score": self.ps_sum_score.cpu().numpy(),
                  "patchsae_count_class": self._ps_count_class[: self.n_classes].cpu().numpy()}
        return LatentStats(
            n_images=self.n_images,
            n_patches=self.n_patches,
            tau=self.tau,
            n_patches_active=self.n_patches_active.cpu().numpy(),
            n_images_active=self.n_images_active.cpu().numpy(),
            sum_active=self.sum_active.cpu().numpy(),
            max_act=self.max_act.cpu().numpy(),
            count_dataset=self.count_dataset.cpu().numpy(),
            count_class=self.count_class.cpu().numpy(),
            top={r: t.result() for r, t in self.top.items()},
            **ps,
        )
