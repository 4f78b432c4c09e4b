# SPDX-License-Identifier: Apache-2.0
"""Local analytic denoisers: each pixel is denoised by a softmax over training *patches* around
it, not over whole images.

- :class:`PatchSetDenoiser`: patch-set posterior composites with square patches (Niedoba,
  Zwartsenberg, Murphy, Wood 2024, "Towards a mechanistic explanation of diffusion model
  generalization"); each p×p crop's posterior mean over the same crop of every training image,
  averaged over the crops covering a pixel; ``p`` = image size is the empirical denoiser.
- :class:`LocalScoreDenoiser`: the local score machine (LS) and its translation-equivariant
  form (ELS, with or without border awareness) of Kamb & Ganguli 2024, "An analytic theory of
  creativity in convolutional diffusion models": per pixel, a softmax over candidate k×k
  training patches returning the candidate's centre pixel.
- :class:`PCALocalityDenoiser`: Lukoianov, Yuan, Solomon, Sitzmann 2025, "Locality in image
  diffusion models emerges from data statistics": per output element a softmax over the
  training images with a distance masked by the normalised Wiener filter of the training
  covariance.

All share one exact core: every softmax over candidates runs through the fused empirical-
denoiser kernel (:func:`diffrepro.empirical_denoiser_partial`, :func:`~diffrepro.merge_states`,
:func:`~diffrepro.finalize`) with query patches as queries and candidate patches as rows (uint8
rows decoded in the kernel), streamed in chunks whose states merge exactly (never normalised per
chunk, unlike some reference implementations). Patch and kernel sizes may follow a per-step
schedule (:class:`StepSchedule`). Every model takes ``labels`` for class-conditional use and
computes in float32 or float64.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from ..ops import empirical_denoiser_partial, finalize, merge_states
from ..schedules import edm_sigmas
from .base import Denoiser, _class_indices, _per_sample, _torch_dtype, _training_images
from .empirical import sha256_rows
from .gaussian import GaussianDenoiser

# Candidate-row bytes per kernel call when streaming patch rows (the state merges are exact).
_CHUNK_BYTES = 64 << 20
# PCA locality: elements of the [queries, rows, D] block of the general (real-valued mask) path.
_DENSE_BLOCK = 1 << 24
# The reference's guard for a vanishing diagonal of the Wiener filter (Lukoianov et al. 2025).
_DIAG_EPS = 1e-6


class StepSchedule:
    """A size per sampler step, looked up by σ: the step whose grid σ is nearest (in σ, as the
    PSPC reference's ``patch_size_schedule`` does with EDM times).

    Args:
        sizes: an int (one size for every σ) or a sequence of ints, one per step.
        sigmas: the σ of each step, ``t_0 > t_1 > ...`` (default for a sequence: EDM's grid with
            ``len(sizes)`` steps, σ in [0.002, 80], ρ = 7). Pass the sampler's grid when it
            differs, so that each evaluation finds its own step.
        name: the argument's name in error messages.
    """

    def __init__(self, sizes, sigmas=None, *, name: str = "size"):
        seq = [sizes] if isinstance(sizes, (int, np.integer)) and not isinstance(sizes, bool) else sizes
        try:
            values = [int(v) for v in seq]
            ok = all(v == w and not isinstance(w, bool) for v, w in zip(values, seq)) and len(values) > 0
        except (TypeError, ValueError):
            ok = False
        if not ok or min(values) < 1:
            raise ValueError(f"{name} must be a positive int or a non-empty sequence of positive ints, got {sizes!r}")
        self.sizes = values
        if len(values) == 1:
            if sigmas is not None:
                raise ValueError(f"{name}: sigmas is only used with a per-step sequence, got one size {values[0]}")
            self.sigmas = None
            return
        grid = edm_sigmas(len(values)) if sigmas is None else torch.as_tensor(sigmas, dtype=torch.float64)
        if grid.shape != (len(values),) or not bool(torch.isfinite(grid).all() & (grid > 0).all()):
            raise ValueError(f"sigmas must be {len(values)} positive finite values (one per {name}), got "
                             f"{list(np.asarray(grid).reshape(-1)[:8])}")
        self.sigmas = grid.tolist()

    def at(self, sigma: float) -> int:
        """The size of the step nearest to ``sigma`` (the lower step on a tie)."""
        if self.sigmas is None:
            return self.sizes[0]
        return self.sizes[int(np.argmin([abs(t - sigma) for t in self.sigmas]))]

    def identity(self) -> dict:
        return {"sizes": self.sizes, "sigmas": self.sigmas}


def parse_sizes(text: str) -> int | list[int]:
    """``"7"`` -> 7, ``"32,23,15"`` -> [32, 23, 15] (the CLI's --patch-size)."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"expected a positive int or a comma-separated list of them, got {text!r}") from None
    if min(values) < 1:
        raise ValueError(f"expected positive sizes, got {text!r}")
    return values[0] if len(values) == 1 else values


def _decode(t: torch.Tensor, dtype) -> torch.Tensor:
    """Rows in the compute dtype, uint8 decoded exactly as the kernel does (``u/127.5 − 1``)."""
    return t.to(dtype) / 127.5 - 1 if t.dtype == torch.uint8 else t.to(dtype)


def _softmax_mean(q: torch.Tensor, chunks, sigma: torch.Tensor):
    """Exact softmax-weighted mean of candidate rows for each query row.

    ``out_j = Σ_i softmax_i(−‖q_j − r_i‖² / 2σ_j²) r_i`` over every row yielded by ``chunks``
    (``(rows [n, D], global offset)``), one online pass: each chunk's state from the fused kernel,
    merged exactly. Returns ``(out [Q, D], finalize's info)``; ``nearest_index`` is global and
    ``info["top_weight"]`` [Q] float64 is that row's softmax weight."""
    state = None
    for rows, offset in chunks:
        part = empirical_denoiser_partial(q, rows, sigma, row_offset=int(offset))
        state = part if state is None else merge_states(state, part)
    if state is None:
        raise ValueError("no candidate rows")
    out, info = finalize(state)
    # The nearest row holds the largest logit, the state's running max: its weight is 1/Σ exp(l_i − max).
    info["top_weight"] = 1 / state.sum_exp.to(torch.float64)
    return out, info


def _rows_per_chunk(row_bytes: int, total: int) -> int:
    return max(1, min(total, _CHUNK_BYTES // max(1, row_bytes)))


class _LocalDenoiser(Denoiser):
    """The training set, labels, dtype and device shared by the local models, the class split of
    a batch, the schedule lookup and the run identity. Subclasses implement ``_apply(x, sigma,
    images, size)`` for one class group and one schedule size, and ``_model_identity()``."""

    def __init__(self, train, *, labels=None, label_dim=None, dtype=torch.float32, device="cpu"):
        train, labels = _training_images(train, labels, dtype)
        n, c, h, w = train.shape
        if _torch_dtype(train) not in (torch.uint8, torch.float32, torch.float64):
            raise TypeError(f"train must be uint8 or float32/float64, got dtype {train.dtype}")
        self.dtype, self.device = dtype, torch.device(device)
        t = torch.from_numpy(np.ascontiguousarray(train)) if isinstance(train, np.ndarray) else train
        t = t.to(self.device)
        self._train = (t if t.dtype == torch.uint8 else t.to(dtype)).contiguous()
        self.img_channels, self.img_resolution, self.num_rows = int(c), int(h), int(n)
        self.label_dim, self._class_rows, self._class_images = 0, [], {}
        self._labels_sha256 = None
        if labels is not None:
            labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
            if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
                raise ValueError(f"labels must be {n} non-negative integers, got {labels.dtype} {labels.shape}")
            self.label_dim = int(label_dim if label_dim is not None else labels.max() + 1)
            if labels.max() >= self.label_dim:
                raise ValueError(f"label_dim={self.label_dim} but labels go up to {labels.max()}")
            self._class_rows = [np.flatnonzero(labels == k) for k in range(self.label_dim)]
            self._labels_sha256 = hashlib.sha256(labels.astype(np.int64).tobytes()).hexdigest()
        self._train_sha256 = None

    def fingerprint(self) -> dict:
        """Content identity for run records: the model and its parameters, sha256 of the training
        rows as stored and of the labels, the compute dtype and device."""
        if self._train_sha256 is None:
            self._train_sha256 = sha256_rows(self._train)
        return {"model": self._model_identity(), "train_sha256": self._train_sha256, "n_train": self.num_rows,
                "rows_dtype": str(self._train.dtype).replace("torch.", ""), "labels_sha256": self._labels_sha256,
                "label_dim": self.label_dim, "dtype": str(self.dtype).replace("torch.", ""),
                "device": self.device.type}

    def class_count(self, k: int) -> int:
        """Number of training images of class ``k`` (0 for a class outside ``[0, label_dim)``)."""
        return len(self._class_rows[k]) if 0 <= k < self.label_dim else 0

    def _images(self, k: int | None) -> torch.Tensor:
        """Training images of class ``k`` (all for None), gathered once per class."""
        if k is None:
            return self._train
        if k not in self._class_images:
            self._class_images[k] = self._train.index_select(0, torch.from_numpy(self._class_rows[k]).to(self.device))
        return self._class_images[k]

    def _groups(self, x, class_labels):
        classes = _class_indices(class_labels, x.shape[0], self.label_dim, "cpu")
        if classes is None:
            yield torch.arange(x.shape[0]), None
            return
        for k in torch.unique(classes).tolist():
            if len(self._class_rows[k]) == 0:
                raise ValueError(f"class_labels ask for class {k}, which has no training images")
            yield torch.nonzero(classes == k).reshape(-1), k

    def _denoise(self, x, sigma, class_labels):
        if getattr(self, "_record", False):
            self._last = (x.detach().clone(), sigma.detach().clone(),
                          None if class_labels is None else torch.as_tensor(class_labels).clone())
        q = x.to(device=self.device, dtype=self.dtype)
        sigma = sigma.to(self.device)
        out = torch.empty_like(q)
        for sel, k in self._groups(x, class_labels):
            sizes = torch.tensor([self._schedule.at(float(s)) for s in sigma[sel].tolist()])
            for size in torch.unique(sizes).tolist():
                idx = sel[sizes == size].to(self.device)
                out[idx] = self._apply(q[idx], sigma[idx], self._images(k), int(size))
        return out.to(device=x.device, dtype=x.dtype)

    def _apply(self, x, sigma, images, size):
        raise NotImplementedError

    def provenance(self, x, sigma, class_labels=None) -> dict:
        """Which training patch dominates each output pixel of ``D(x; σ)``: one extra evaluation.

        For each query and output pixel, the candidate of largest softmax weight (ties to the
        lowest candidate index): ``"image"`` int64 ``[B, H, W]`` (index into the training set),
        ``"row"``/``"col"`` int64 ``[B, H, W]``, the pixel of that image the output pixel is
        drawn from (the winning patch's centre for ELS; the pixel itself for LS, PSPC and PCA
        locality, whose candidates sit at the query's own position), and ``"weight"`` float64
        ``[B, H, W]``, that candidate's softmax weight. Where a pixel has several softmaxes
        (PSPC: every crop covering it; PCA locality: one per channel) the one whose winner has
        the largest weight is kept (the first crop in raster order, the lowest channel, on a tie).

        Args: as :meth:`__call__` (x ``[B, C, H, W]``, sigma scalar or ``[B]``, class_labels)."""
        self._check_x(x)
        sigma = _per_sample(sigma, x.shape[0], "cpu", "sigma")
        q = x.to(device=self.device, dtype=self.dtype)
        b, _, h, w = x.shape
        out = {"image": torch.empty(b, h, w, dtype=torch.int64), "row": torch.empty(b, h, w, dtype=torch.int64),
               "col": torch.empty(b, h, w, dtype=torch.int64), "weight": torch.empty(b, h, w, dtype=torch.float64)}
        for sel, k in self._groups(x, class_labels):
            sizes = torch.tensor([self._schedule.at(float(s)) for s in sigma[sel].tolist()])
            for size in torch.unique(sizes).tolist():
                idx = sel[sizes == size]
                got = self._winners(q[idx.to(self.device)], sigma[idx].to(self.device), self._images(k), int(size))
                image = got["image"].cpu()
                if k is not None:  # class-local row -> training-set row
                    image = torch.from_numpy(self._class_rows[k]).to(torch.int64)[image]
                out["image"][idx] = image
                for key in ("row", "col", "weight"):
                    out[key][idx] = got[key].cpu().to(out[key].dtype)
        return out

    def _winners(self, x, sigma, images, size) -> dict:
        raise NotImplementedError

    def training_rows(self) -> torch.Tensor:
        """The training images as stored (uint8, or float in the compute dtype), ``[N, C, H, W]``."""
        return self._train

    def record_last(self, on: bool = True) -> None:
        """Keep (a copy of) the input of the latest call, for :meth:`last_provenance`."""
        self._record = bool(on)
        self._last = None

    def last_provenance(self) -> dict | None:
        """:meth:`provenance` of the latest call since :meth:`record_last` (None before any)."""
        last = getattr(self, "_last", None)
        return None if last is None else self.provenance(*last)

    def _model_identity(self) -> dict:
        raise NotImplementedError


def _own_pixels(b: int, h: int) -> dict:
    """Row and column maps of every pixel's own position, ``[b, h, h]``."""
    r = torch.arange(h, dtype=torch.int64)
    return {"row": r[None, :, None].expand(b, h, h), "col": r[None, None, :].expand(b, h, h)}


def _crop_chunks(images: torch.Tensor, r0: int, r1: int, c0: int, c1: int):
    """The crop ``[r0:r1, c0:c1]`` of every image as contiguous rows, streamed in chunks."""
    n = images.shape[0]
    step = _rows_per_chunk(images.shape[1] * (r1 - r0) * (c1 - c0) * images.element_size(), n)
    for a in range(0, n, step):
        yield images[a:a + step, :, r0:r1, c0:c1].reshape(min(step, n - a), -1), a


def _crop_mean(x, sigma, images, r0, r1, c0, c1):
    """Posterior mean of the crop ``[r0:r1, c0:c1]`` of x over the same crop of every image:
    ``[b, C, r1 − r0, c1 − c0]``."""
    b, c = x.shape[:2]
    q = x[:, :, r0:r1, c0:c1].reshape(b, -1)
    out, _ = _softmax_mean(q, _crop_chunks(images, r0, r1, c0, c1), sigma)
    return out.reshape(b, c, r1 - r0, c1 - c0)


class PatchSetDenoiser(_LocalDenoiser):
    """Patch-set posterior composites with square patches, PSPC-square (Niedoba et al. 2024).

    For patch size p and every top-left ``(u, v)`` with the p×p crop ``C_uv`` inside the image,
    ``m_uv = Σ_i softmax_i(−‖C_uv x − C_uv y_i‖²/2σ²) C_uv y_i`` over the training images; the
    output at a pixel is the mean of the ``m_uv`` of the crops covering it. ``p`` equal to the
    image size is the empirical denoiser. Each crop's softmax is one exact streamed pass of the
    fused kernel over that crop of every training image ((H − p + 1)² passes per call).

    Args:
        train: uint8 ``[N, C, H, W]`` (numpy or tensor), float in [-1, 1], or a Dataset.
        patch_size: an int ≤ H, or one per sampler step (:class:`StepSchedule`; the CIFAR-10
            schedule of the paper is :data:`CIFAR_PATCH_SCHEDULE` over EDM's 18 steps).
        sigmas: the step grid the schedule refers to (default: EDM's with ``len(patch_size)``
            steps).
        labels, label_dim: class labels for class-conditional use.
        dtype: torch.float32 (default) or torch.float64. device: where the kernel runs.
    """

    def __init__(self, train, patch_size, *, sigmas=None, labels=None, label_dim=None,
                 dtype=torch.float32, device="cpu"):
        super().__init__(train, labels=labels, label_dim=label_dim, dtype=dtype, device=device)
        self._schedule = StepSchedule(patch_size, sigmas, name="patch_size")
        if max(self._schedule.sizes) > self.img_resolution:
            raise ValueError(f"patch_size must be <= the image size {self.img_resolution} (a crop that fits), "
                             f"got {patch_size!r}")

    def _model_identity(self) -> dict:
        return {"name": "pspc", "patch_size": self._schedule.identity()}

    def _apply(self, x, sigma, images, p):
        # One fused-kernel pass per crop. A two-pass box-filter form (cost independent of p) was
        # measured 1.8-2.6x slower at p = 3 and 15 (16 queries, 256 images, 2 loaded cores).
        h = self.img_resolution
        out = torch.zeros_like(x)
        count = torch.zeros(h, h, dtype=x.dtype, device=x.device)
        for u in range(h - p + 1):
            for v in range(h - p + 1):
                out[:, :, u:u + p, v:v + p] += _crop_mean(x, sigma, images, u, u + p, v, v + p)
                count[u:u + p, v:v + p] += 1
        return out / count

    def _winners(self, x, sigma, images, p):
        """Per crop, the image of largest weight; per pixel, the covering crop whose winner weighs
        most (the first in raster order on a tie). The source pixel is the pixel itself."""
        b, h = x.shape[0], self.img_resolution
        image = torch.zeros(b, h, h, dtype=torch.int64, device=x.device)
        weight = torch.full((b, h, h), -1.0, dtype=torch.float64, device=x.device)
        for u in range(h - p + 1):
            for v in range(h - p + 1):
                q = x[:, :, u:u + p, v:v + p].reshape(b, -1)
                _, info = _softmax_mean(q, _crop_chunks(images, u, u + p, v, v + p), sigma)
                top = info["top_weight"].to(x.device)[:, None, None].expand(b, p, p)
                win = info["nearest_index"].to(x.device)[:, None, None].expand(b, p, p)
                better = top > weight[:, u:u + p, v:v + p]
                weight[:, u:u + p, v:v + p] = torch.where(better, top, weight[:, u:u + p, v:v + p])
                image[:, u:u + p, v:v + p] = torch.where(better, win, image[:, u:u + p, v:v + p])
        return {"image": image, **_own_pixels(b, h), "weight": weight}


CIFAR_PATCH_SCHEDULE = (32, 32, 32, 32, 32, 32, 32, 23, 15, 11, 7, 5, 3, 3, 3, 3, 3, 3)
# The paper's CIFAR-10 cumulative thresholds for the flex masks (per EDM step, 18 steps).
CIFAR_THRESHOLD_SCHEDULE = (1.0,) * 7 + (0.7, 0.7, 0.5, 0.4, 0.4, 0.4, 0.4, 0.3, 0.3, 0.3, 0.3)


def heatmap_mask(heatmap: torch.Tensor, threshold: float) -> torch.Tensor:
    """The pixels of a heatmap that hold a cumulative ``threshold`` of its total: sorted
    ascending, a pixel is kept when the cumulative normalised sum up to it is ≥ 1 − threshold
    (Niedoba et al. 2024's masks from gradient heatmaps). Returns a bool ``[H, W]``."""
    flat = heatmap.reshape(-1).to(torch.float64)
    values, order = torch.sort(flat / flat.sum(), stable=True)
    keep = torch.empty_like(flat, dtype=torch.bool)
    keep[order] = torch.cumsum(values, 0) >= 1 - threshold
    return keep.reshape(heatmap.shape)


class FlexPatchSetDenoiser(_LocalDenoiser):
    """Patch-set posterior composites with flexible masks, PSPC-flex (Niedoba et al. 2024).

    For each pixel, the mask :func:`heatmap_mask` of its heatmap at the step's threshold selects
    a set of pixels (all channels); the mask's posterior mean over the same pixels of every
    training image is added to the composite over the mask, and each pixel averages what covers
    it. Pixels with equal masks share one softmax (weighted by their number, which is exact).

    Args:
        train: uint8 ``[N, C, H, W]``, float in [-1, 1], or a Dataset.
        heatmaps: ``[L, H, W, H, W]`` non-negative, ``heatmaps[t, r, c]`` the map of pixel (r, c)
            at step t (the paper's average gradient heatmaps of a trained network).
        thresholds: ``[L]`` cumulative fractions in (0, 1] (:data:`CIFAR_THRESHOLD_SCHEDULE`).
        sigmas: the step grid (default: EDM's with L steps).
        labels, label_dim, dtype, device: as :class:`PatchSetDenoiser`.
    """

    def __init__(self, train, heatmaps, thresholds, *, sigmas=None, labels=None, label_dim=None,
                 dtype=torch.float32, device="cpu"):
        super().__init__(train, labels=labels, label_dim=label_dim, dtype=dtype, device=device)
        h = self.img_resolution
        maps = torch.as_tensor(heatmaps, dtype=torch.float64)
        thr = torch.as_tensor(thresholds, dtype=torch.float64).reshape(-1)
        if maps.ndim != 5 or tuple(maps.shape[1:]) != (h, h, h, h) or maps.shape[0] != len(thr):
            raise ValueError(f"heatmaps must have shape [L={len(thr)}, {h}, {h}, {h}, {h}] (one map per step and "
                             f"pixel), got {tuple(maps.shape)}")
        if not bool(torch.isfinite(maps).all() & (maps >= 0).all() & (maps.sum((-1, -2)) > 0).all()):
            raise ValueError("heatmaps must be finite, >= 0 and not all zero for any pixel")
        if not bool(((thr > 0) & (thr <= 1)).all()):
            raise ValueError(f"thresholds must be in (0, 1], got {thr.tolist()[:8]}")
        # "sizes" are step numbers 1..L: _denoise groups the queries by step
        self._schedule = StepSchedule(list(range(1, len(thr) + 1)), sigmas, name="thresholds") \
            if len(thr) > 1 else StepSchedule(1)
        self._masks = [[heatmap_mask(maps[t, r, c], float(thr[t])) for r in range(h) for c in range(h)]
                       for t in range(len(thr))]
        for t, masks in enumerate(self._masks):
            covered = torch.stack(masks).any(0)
            if not bool(covered.all()):
                r, c = (int(v) for v in torch.nonzero(~covered)[0])
                raise ValueError(f"heatmaps: at step {t} no pixel's mask covers pixel ({r}, {c}) (its output would "
                                 "be 0/0); expected masks that together cover the image")
        self._identity = {"name": "pspc-flex", "heatmaps_sha256": sha256_rows(maps.reshape(len(thr), -1)),
                          "thresholds": thr.tolist(), "sigmas": self._schedule.sigmas}

    def _model_identity(self) -> dict:
        return dict(self._identity)

    def _apply(self, x, sigma, images, step):
        b, c, h, _ = x.shape
        distinct: dict[bytes, list] = {}
        for m in self._masks[step - 1]:
            key = np.packbits(m.numpy()).tobytes()
            distinct.setdefault(key, [m, 0])[1] += 1
        out = torch.zeros(b, c, h * h, dtype=x.dtype, device=x.device)
        count = torch.zeros(h * h, dtype=x.dtype, device=x.device)
        flat_x, flat_y = x.reshape(b, c, -1), images.reshape(images.shape[0], c, -1)
        for m, times in distinct.values():
            idx = torch.nonzero(m.reshape(-1)).reshape(-1).to(x.device)
            rows = flat_y.index_select(2, idx).reshape(images.shape[0], -1)
            step_rows = _rows_per_chunk(rows.shape[1] * rows.element_size(), rows.shape[0])
            chunks = ((rows[a:a + step_rows], a) for a in range(0, rows.shape[0], step_rows))
            mean, _ = _softmax_mean(flat_x.index_select(2, idx).reshape(b, -1), chunks, sigma)
            out[:, :, idx] += times * mean.reshape(b, c, -1)
            count[idx] += times
        return (out / count).reshape(x.shape)


def _patch_rows(images: torch.Tensor, k: int, centres: torch.Tensor, pad: str | None, dtype) -> torch.Tensor:
    """k×k patches centred at ``centres`` ([P, 2] row, column) of every image, as rows
    ``[n·P, C·k·k]`` (image-major: row ``i·P + p``). ``pad`` None: every patch lies inside (uint8
    kept); "zeros"/"circular": the images are padded by k//2 first (decoded to ``dtype``: zero
    is 0.0 in the diffusion scale, not a uint8 value)."""
    d = k // 2
    if pad is None:
        src, top = images, centres - d
    else:
        src = F.pad(_decode(images, dtype), (d, d, d, d), mode="constant" if pad == "zeros" else "circular")
        top = centres
    win = src.unfold(2, k, 1).unfold(3, k, 1)  # [n, C, H', W', k, k]
    sel = win[:, :, top[:, 0], top[:, 1]]  # [n, C, P, k, k]
    return sel.permute(0, 2, 1, 3, 4).reshape(-1, images.shape[1] * k * k)


class LocalScoreDenoiser(_LocalDenoiser):
    """Local score machines of Kamb & Ganguli 2024: LS and the equivariant ELS.

    Per pixel q, ``D(x)_q = Σ_c softmax_c(−‖P_q x − P_c‖²/2σ²) center(P_c)`` over candidate
    k×k training patches ``P_c``:

    - LS (``equivariant=False``): the patches of every training image at q's own position, zero
      padding (as ``LocalScoreModule``); the patch distances are box sums of per-pixel squared
      distances, so any k costs the same (k ≥ 2H − 1 is the empirical denoiser). This path is
      float64 torch with an exact online softmax, not the fused kernel.
    - ELS (``equivariant=True``): the patches at every valid position of every training image
      (translation equivariance), query patches circularly padded (as ``LocalEquivScoreModule``).
    - border-aware ELS (``equivariant=True, borders=True``): query and candidates zero padded;
      per axis a border coordinate matches only itself and an interior coordinate any interior
      one (as ``LocalEquivBordersScoreModule``: interior pixels as ELS, edge pixels over the
      patches along the same edge, corners over the same corner).

    Both equivariant forms fall back to LS for k ≥ H (as the borders reference does).

    Args:
        train: uint8 ``[N, C, H, W]``, float in [-1, 1], or a Dataset.
        kernel_size: an odd int, or one per sampler step (:class:`StepSchedule`).
        equivariant, borders: the model (above).
        sigmas: the step grid of a kernel-size schedule.
        labels, label_dim, dtype, device: as :class:`PatchSetDenoiser`.
    """

    def __init__(self, train, kernel_size, *, equivariant: bool = False, borders: bool = False, sigmas=None,
                 labels=None, label_dim=None, dtype=torch.float32, device="cpu"):
        super().__init__(train, labels=labels, label_dim=label_dim, dtype=dtype, device=device)
        self._schedule = StepSchedule(kernel_size, sigmas, name="kernel_size")
        if any(k % 2 == 0 for k in self._schedule.sizes):
            raise ValueError(f"kernel_size must be odd (a patch centred on its pixel), got {kernel_size!r}")
        if borders and not equivariant:
            raise ValueError("borders=True is the border-aware equivariant model; pass equivariant=True")
        self.equivariant, self.borders = bool(equivariant), bool(borders)

    def _model_identity(self) -> dict:
        name = "ls" if not self.equivariant else ("els-borders" if self.borders else "els")
        return {"name": name, "kernel_size": self._schedule.identity()}

    def _apply(self, x, sigma, images, k):
        if not self.equivariant or k >= self.img_resolution:
            return self._local(x, sigma, images, k)
        return self._classes(x, sigma, images, k, self._groups_of(k))

    def _groups_of(self, k):
        """The ``(query pixels, candidate centres, padding)`` groups of the equivariant model."""
        h = self.img_resolution
        if not self.borders:
            return [(_grid(range(h), range(h)), _interior(h, k), "circular")]
        d = k // 2
        axis = [[i] for i in range(d)] + [list(range(d, h - d))] + [[i] for i in range(h - d, h)]
        groups = []
        for rows in axis:
            for cols in axis:
                where = _grid(rows, cols)
                inside = d <= min(rows[0], cols[0]) and max(rows[-1], cols[-1]) < h - d
                groups.append((where, where, None if inside else "zeros"))
        return groups

    def _local(self, x, sigma, images, k):
        return _box_softmax(x, sigma, images, k)[0]

    def _winners(self, x, sigma, images, k):
        b, h = x.shape[0], self.img_resolution
        if not self.equivariant or k >= h:
            _, arg, weight = _box_softmax(x, sigma, images, k)
            return {"image": arg, **_own_pixels(b, h), "weight": weight}
        image = torch.empty(b, h, h, dtype=torch.int64)
        row, col, weight = torch.empty_like(image), torch.empty_like(image), torch.empty(b, h, h, dtype=torch.float64)
        for where, centres, pad in self._groups_of(k):
            _, info = self._group_softmax(x, sigma, images, k, where, centres, pad)
            idx = info["nearest_index"].cpu().reshape(b, len(where))
            top = info["top_weight"].cpu().reshape(b, len(where))
            r, c = where[:, 0], where[:, 1]
            image[:, r, c] = idx // len(centres)
            row[:, r, c], col[:, r, c] = centres[idx % len(centres), 0], centres[idx % len(centres), 1]
            weight[:, r, c] = top
        return {"image": image, "row": row, "col": col, "weight": weight}

    def _classes(self, x, sigma, images, k, groups):
        """For each ``(query pixels, candidate centres, padding)``: one softmax per query patch
        over the candidate patches of every image; the output pixel is the mean's centre.
        Padding "circular" pads the queries only (the candidates lie inside), "zeros" both."""
        b, c = x.shape[:2]
        d, out = k // 2, torch.empty_like(x)
        for where, centres, pad in groups:
            mean, _ = self._group_softmax(x, sigma, images, k, where, centres, pad)
            centre = mean.reshape(b, len(where), c, k, k)[:, :, :, d, d]  # [b, P, C]
            out[:, :, where[:, 0], where[:, 1]] = centre.permute(0, 2, 1)
        return out

    @staticmethod
    def _group_softmax(x, sigma, images, k, where, centres, pad):
        """The softmax of one group: query patches at ``where`` (rows batch-major ``[b·P]``)
        over the patches at ``centres`` of every image (global row ``image·len(centres) + p``)."""
        c = x.shape[1]
        q = _patch_rows(x, k, where, pad, x.dtype)  # [b·P, C·k·k], batch-major
        rows_pad = None if pad == "circular" else pad
        sig = sigma.repeat_interleave(len(where))
        n = images.shape[0]
        row_bytes = len(centres) * c * k * k * (images.element_size() if rows_pad is None else x.element_size())
        step = _rows_per_chunk(row_bytes, n)
        chunks = ((_patch_rows(images[a:a + step], k, centres, rows_pad, x.dtype), a * len(centres))
                  for a in range(0, n, step))
        return _softmax_mean(q, chunks, sig)


def _box_softmax(x, sigma, images, k):
    """LS: per pixel q, ``‖P_q x − P_q y_i‖²`` is the k×k box sum (zeros outside the image) of
    the per-pixel squared distances ``Σ_c (x − y_i)²``, so its cost does not depend on k; one
    exact online softmax per (query, pixel) over the images, streamed in chunks. Returns the
    mean ``[b, C, H, W]`` in x's dtype, the image of largest weight (lowest index on a tie) and
    its weight, ``[b, H, W]``."""
    b, c, h, w = x.shape
    d = k // 2
    step = max(1, _DENSE_BLOCK // (b * c * h * w))
    scale = (2 * sigma.to(torch.float64) ** 2).reshape(b, 1, 1, 1)
    best = torch.full((b, 1, h, w), -math.inf, dtype=torch.float64, device=x.device)
    arg = torch.zeros(b, 1, h, w, dtype=torch.int64, device=x.device)
    total, acc = torch.zeros_like(best), torch.zeros(b, c, h, w, dtype=torch.float64, device=x.device)
    for a in range(0, images.shape[0], step):
        y = _decode(images[a:a + step], x.dtype)
        m = len(y)
        per_pixel = ((x[:, None] - y[None]) ** 2).sum(2).reshape(b * m, 1, h, w)
        box = F.avg_pool2d(per_pixel, k, stride=1, padding=d, count_include_pad=True) * (k * k)
        logit = -box.reshape(b, m, h, w).to(torch.float64) / scale
        top, where = logit.max(1, keepdim=True)
        arg = torch.where(top > best, where + a, arg)
        new = torch.maximum(best, top)
        fade = torch.where(best == -math.inf, 0.0, torch.exp(best - new))
        e = torch.exp(logit - new)
        total = total * fade + e.sum(1, keepdim=True)
        acc = acc * fade + torch.einsum("bmhw,mchw->bchw", e, y.to(torch.float64))
        best = new
    return (acc / total).to(x.dtype), arg[:, 0], (1 / total)[:, 0]


def _grid(rows, cols) -> torch.Tensor:
    return torch.tensor([(r, c) for r in rows for c in cols], dtype=torch.int64)


def _interior(h: int, k: int) -> torch.Tensor:
    d = k // 2
    return _grid(range(d, h - d), range(d, h - d))


class PCALocalityDenoiser(_LocalDenoiser):
    """PCA locality (Lukoianov, Yuan, Solomon, Sitzmann 2025): masks from the Wiener filter of
    the training covariance, then a per-element softmax over the training images.

    With ``Σ = U Λ Uᵀ`` the training covariance (biased, float64), at noise level σ the Wiener
    filter ``W = U diag(λ/(λ + σ²)) Uᵀ`` has each row divided by its diagonal entry (rows whose
    diagonal is below 1e-6 are left as they are), ``M[n, m] = W[n, m]/W[n, n]``. With
    ``mask_threshold`` > 0 entries with ``|M| ≥ threshold · max|M|`` become 1 and the rest 0;
    with 0 the real-valued M is kept (as the reference). Output element m (a channel of a
    pixel) is ``Σ_i softmax_i(−d_i(m)/(2σ² T)) y_{i,m}`` with ``d_i(m) = Σ_n M[n, m] (x_n − y_{i,n})²``
    (mask column m) and T the temperature.

    The masked distances of all elements are one float64 GEMM per chunk of images,
    ``((x − y_i)²)ᵀ M``, followed by an exact online softmax per element (O(B·N·D²) per call).
    On CIFAR-10 the binary masks at threshold 0.02 keep about two thirds of the D = 3072
    elements at every σ, so one pass of the fused kernel per mask column (tried first) was ~75×
    slower than the GEMM (3072 small passes, each decoding and gathering its rows). The result is
    float64 for either compute dtype, returned in x's dtype.

    The masks come from the whole training set's covariance also when ``labels`` restrict each
    query's softmax to its class.

    Args:
        train: uint8 ``[N, C, H, W]``, float in [-1, 1], or a Dataset.
        mask_threshold: ≥ 0 (default 0.02, the reference's).
        temperature: T > 0 (default 1).
        labels, label_dim, dtype, device: as :class:`PatchSetDenoiser`.
    """

    def __init__(self, train, *, mask_threshold: float = 0.02, temperature: float = 1.0, labels=None,
                 label_dim=None, dtype=torch.float32, device="cpu"):
        super().__init__(train, labels=labels, label_dim=label_dim, dtype=dtype, device=device)
        if not (isinstance(mask_threshold, (int, float)) and math.isfinite(mask_threshold) and mask_threshold >= 0):
            raise ValueError(f"mask_threshold must be a finite number >= 0, got {mask_threshold!r}")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.mask_threshold, self.temperature = float(mask_threshold), float(temperature)
        self._schedule = StepSchedule(1)
        self._eig = None
        self._masks: dict[float, torch.Tensor] = {}

    def _model_identity(self) -> dict:
        return {"name": "pca-locality", "mask_threshold": self.mask_threshold, "temperature": self.temperature}

    def _eigenpairs(self):
        """λ and U of the training covariance (through the N×N Gram matrix when N < D)."""
        if self._eig is None:
            fit = GaussianDenoiser.from_data(self._train, device=self.device)
            self._eig = (fit.lam, fit.U)
        return self._eig

    def mask(self, sigma: float) -> torch.Tensor:
        """The float64 ``[D, D]`` mask M at noise level σ (column m masks output element m)."""
        sigma = float(sigma)
        if sigma not in self._masks:
            lam, u = self._eigenpairs()
            u = u[:, lam > 0]  # directions of λ = 0 have gain 0: rank-r product, O(D² r)
            lam = lam[lam > 0]
            w = (u * (lam / (lam + sigma ** 2))) @ u.T
            diag = torch.diagonal(w).clone()
            diag[diag.abs() < _DIAG_EPS] = 1.0
            m = w / diag[:, None]
            if self.mask_threshold > 0:
                m = (m.abs() >= m.abs().max() * self.mask_threshold).to(torch.float64)
            if len(self._masks) >= 64:
                self._masks.pop(next(iter(self._masks)))
            self._masks[sigma] = m
        return self._masks[sigma]

    def _apply(self, x, sigma, images, _size):
        b = x.shape[0]
        out = torch.empty(b, x[0].numel(), dtype=x.dtype, device=x.device)
        for s in torch.unique(sigma).tolist():
            sel = torch.nonzero(sigma == s).reshape(-1)
            out[sel] = self._at_sigma(x[sel].reshape(len(sel), -1), s, images)[0].to(x.dtype)
        return out.reshape(x.shape)

    def _at_sigma(self, q, s, images):
        flat = images.reshape(images.shape[0], -1)
        cols = torch.arange(flat.shape[1], device=q.device)
        return _masked_softmax(q, flat, self.mask(s), cols, 2 * s * s * self.temperature)

    def _winners(self, x, sigma, images, _size):
        """Per element the image of largest weight; per pixel the channel whose winner weighs
        most (the lowest channel on a tie). The source pixel is the pixel itself."""
        b, c, h, w = x.shape
        arg = torch.empty(b, c, h, w, dtype=torch.int64, device=x.device)
        top = torch.empty(b, c, h, w, dtype=torch.float64, device=x.device)
        for s in torch.unique(sigma).tolist():
            sel = torch.nonzero(sigma == s).reshape(-1)
            _, a, t = self._at_sigma(x[sel].reshape(len(sel), -1), s, images)
            arg[sel], top[sel] = a.reshape(len(sel), c, h, w), t.reshape(len(sel), c, h, w)
        weight, channel = top.max(1)
        return {"image": arg.gather(1, channel[:, None])[:, 0], **_own_pixels(b, h), "weight": weight}


def _masked_softmax(q, flat, w, elems, scale: float):
    """Exact float64 online softmax for real-valued masks: for each query b and element e_j,
    ``Σ_i softmax_i(−Σ_n w[n, j] (q_bn − y_in)² / scale) y_{i,e_j}``, chunked over the images
    (one running max, sum and weighted sum per (b, j); nothing normalised per chunk). Returns
    the means ``[b, J]``, the image of largest weight (lowest index on a tie) and its weight."""
    q64, b, d = q.double(), q.shape[0], q.shape[1]
    step = max(1, _DENSE_BLOCK // (b * d))
    best = torch.full((b, w.shape[1]), -math.inf, dtype=torch.float64, device=q.device)
    arg = torch.zeros(best.shape, dtype=torch.int64, device=q.device)
    total, acc = torch.zeros_like(best), torch.zeros_like(best)
    for a in range(0, flat.shape[0], step):
        y = _decode(flat[a:a + step], torch.float64)
        dist = ((q64[:, None] - y[None]) ** 2).reshape(-1, d) @ w
        logit = -dist.reshape(b, len(y), -1) / scale
        top, where = logit.max(1)
        arg = torch.where(top > best, where + a, arg)
        new = torch.maximum(best, top)
        fade = torch.where(best == -math.inf, 0.0, torch.exp(best - new))
        e = torch.exp(logit - new[:, None])
        total = total * fade + e.sum(1)
        acc = acc * fade + (e * y[:, elems][None]).sum(1)
        best = new
    return acc / total, arg, 1 / total


LOCAL_MODELS = ("pspc", "ls", "els", "els-borders", "pca-locality")


def local_denoiser(name: str, train, *, patch_size=None, sigmas=None, mask_threshold: float = 0.02,
                   temperature: float = 1.0, labels=None, label_dim=None, dtype=torch.float32, device="cpu"):
    """One of the local models by name (``diffrepro generate --denoiser``).

    Args:
        name: "pspc", "ls", "els", "els-borders" or "pca-locality".
        train: the training images (as the models take them).
        patch_size: the patch (pspc) or kernel (ls, els) size, an int or one per step.
        sigmas: the step grid of a per-step size.
        mask_threshold, temperature: pca-locality's parameters.
        labels, label_dim, dtype, device: as the models take them.
    """
    common = dict(labels=labels, label_dim=label_dim, dtype=dtype, device=device)
    if name not in LOCAL_MODELS:
        raise ValueError(f"name must be one of {', '.join(LOCAL_MODELS)}, got {name!r}")
    if name == "pca-locality":
        return PCALocalityDenoiser(train, mask_threshold=mask_threshold, temperature=temperature, **common)
    if patch_size is None:
        raise ValueError(f"the {name} model needs a patch size (an int or one per step), got None")
    if name == "pspc":
        return PatchSetDenoiser(train, patch_size, sigmas=sigmas, **common)
    return LocalScoreDenoiser(train, patch_size, equivariant=name != "ls", borders=name == "els-borders",
                              sigmas=sigmas, **common)
