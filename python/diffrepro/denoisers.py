# SPDX-License-Identifier: Apache-2.0
# Denoisers with the EDM network interface: the empirical (multi-delta) optimal denoiser, the
# Gaussian (Wiener) denoiser with closed-form trajectories, linear models, and network adapters.
"""Denoisers ``D(x, sigma, class_labels=None)`` that behave like EDM networks (SPEC §1, §2, §6).

Every denoiser takes ``x`` as a float ``[B, C, H, W]`` tensor of the *unscaled* variable
``x̃ = x/s`` (the EDM convention; the samplers' float64 state) and ``sigma`` as a scalar or a
``[B]`` tensor, and returns the x0-prediction ``D(x̃; σ)`` in ``x``'s dtype and device. Like
EDM networks they carry ``img_channels``, ``img_resolution``, ``label_dim``, ``sigma_min``,
``sigma_max`` and ``round_sigma``. For other families (VP, VE, DDPM) use the methods
``x0``/``eps``/``score``, which take the scaled state ``x = s·x̃`` and the signal scale ``s``
(SPEC §0): ``eps = (x − s·D(x/s;σ))/(s·σ)`` and ``score = (s·D(x/s;σ) − x)/(s²σ²)``.
"""

from __future__ import annotations

import math
import os
import pickle
import sys
from typing import Callable, Sequence

import numpy as np
import torch

from .data import Dataset, atomic_save_npz
from .ops import empirical_denoiser, empirical_denoiser_partial, finalize, merge_states

__all__ = [
    "Denoiser",
    "EmpiricalDenoiser",
    "GaussianDenoiser",
    "LinearDenoiser",
    "LinearDenoiserSet",
    "CallableDenoiser",
    "DiffusersDenoiser",
    "as_denoiser",
    "load_edm_pickle",
    "gaussian_statistics",
    "wiener_gain",
]

# Memmapped training sets larger than this are streamed in chunks instead of loaded whole.
_RESIDENT_LIMIT_BYTES = 1 << 30
# Default chunk size (bytes of training rows) when streaming.
_STREAM_CHUNK_BYTES = 256 << 20
# Relative tolerance for matching a requested σ to a linear model's σ.
_SIGMA_RTOL = 1e-6


# ------------------------------------------------------------------------------------------------
# Shared helpers


def _per_sample(value, batch: int, device, name: str) -> torch.Tensor:
    """Turn a scalar, ``[B]`` or ``[B,1,1,1]`` value into a positive finite float64 ``[B]`` tensor."""
    t = torch.as_tensor(value, dtype=torch.float64, device=device)
    if t.numel() == 1:
        t = t.reshape(1).expand(batch)
    elif t.numel() == batch:
        t = t.reshape(batch)
    else:
        raise ValueError(f"{name} must be a scalar or have {batch} elements (one per sample), "
                         f"got shape {tuple(t.shape)}")
    if not bool(torch.all(torch.isfinite(t) & (t > 0))):
        raise ValueError(f"{name} must be positive and finite, got {t.tolist()[:8]}")
    return t


def _torch_dtype(a) -> torch.dtype:
    """The torch dtype of a tensor or numpy array (numpy dtypes mapped via torch.from_numpy)."""
    return a.dtype if isinstance(a, torch.Tensor) else torch.from_numpy(np.empty(0, a.dtype)).dtype


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """View a ``[B]`` tensor so that it broadcasts against ``x`` (``[B, ...]``), in x's dtype."""
    return v.to(dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))


def _infer_shape(d: int) -> tuple[int, int, int]:
    """Guess a square CHW image shape (3 or 1 channels) from a flattened dimension."""
    for c in (3, 1):
        r = math.isqrt(d // c)
        if d % c == 0 and r * r * c == d:
            return c, r, r
    raise ValueError(f"cannot infer an image shape from dimension {d}; pass shape=(C, H, W)")


def _class_indices(class_labels, batch: int, label_dim: int, device=None) -> torch.Tensor | None:
    """One-hot ``[B, label_dim]`` or integer ``[B]``/scalar class labels -> int64 ``[B]``."""
    if class_labels is None:
        return None
    if label_dim == 0:
        raise ValueError("class_labels were given but this denoiser is unconditional (label_dim=0)")
    t = torch.as_tensor(class_labels, device=device)
    if t.ndim == 2:
        if t.shape != (batch, label_dim):
            raise ValueError(f"one-hot class_labels must have shape ({batch}, {label_dim}), "
                             f"got {tuple(t.shape)}")
        if not bool(((t == 0) | (t == 1)).all() & (t.sum(1) == 1).all()):
            raise ValueError("class_labels given as a 2-D tensor must be one-hot rows")
        t = t.argmax(1)
    elif t.is_floating_point():
        raise ValueError(f"integer class_labels expected, got dtype {t.dtype}")
    t = t.to(torch.int64).reshape(-1)
    if t.numel() == 1:
        t = t.expand(batch)
    if t.numel() != batch or bool(((t < 0) | (t >= label_dim)).any()):
        raise ValueError(f"class_labels must be {batch} integers in [0, {label_dim}), "
                         f"got {t.tolist()[:8]}")
    return t


def wiener_gain(lam: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-direction gain of the Gaussian (Wiener) denoiser, ``λ / (λ + σ²)`` (P2 eq. 6).

    Args:
        lam: ``[r]`` eigenvalues (≥ 0).
        sigma: ``[B]`` noise levels (or a 0-d tensor).

    Returns:
        ``[B, r]`` gains (``[r]`` for 0-d sigma).
    """
    return lam / (lam + sigma.unsqueeze(-1) ** 2)


# ------------------------------------------------------------------------------------------------
# Base class


class Denoiser:
    """Base of all denoisers: an EDM-network-like callable returning x0-predictions.

    Subclasses implement :meth:`_denoise` (the unscaled-variable prediction) and set the
    attributes below; :meth:`_x0` may be overridden when the implementation can apply the
    signal scale ``s`` itself.

    Attributes:
        img_channels: C.
        img_resolution: H (= W).
        label_dim: number of classes (0: unconditional).
        sigma_min: smallest supported σ (samplers clamp their grids to it).
        sigma_max: largest supported σ.
    """

    img_channels: int
    img_resolution: int
    label_dim: int = 0
    sigma_min: float = 0.0
    sigma_max: float = math.inf

    def round_sigma(self, sigma):
        """Snap σ to the values the model supports (identity, as in EDM's preconditioners)."""
        return torch.as_tensor(sigma)

    def __call__(self, x: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        """x0-prediction ``D(x; σ)`` of the unscaled variable.

        Args:
            x: float ``[B, C, H, W]`` (the sampler's float64 state, or float32).
            sigma: scalar or ``[B]`` noise levels (> 0).
            class_labels: None, one-hot ``[B, label_dim]`` or integer ``[B]``.

        Returns:
            ``[B, C, H, W]`` in x's dtype and device.
        """
        self._check_x(x)
        return self._x0(x, _per_sample(sigma, x.shape[0], x.device, "sigma"), None, class_labels)

    def x0(self, x: torch.Tensor, sigma, s=1.0, class_labels=None) -> torch.Tensor:
        """``D(x/s; σ)`` for the scaled state ``x = s·(y + σε)``; shapes as in :meth:`__call__`."""
        self._check_x(x)
        b = x.shape[0]
        return self._x0(x, _per_sample(sigma, b, x.device, "sigma"),
                        _per_sample(s, b, x.device, "s"), class_labels)

    def eps(self, x: torch.Tensor, sigma, s=1.0, class_labels=None) -> torch.Tensor:
        """Noise prediction ``(x − s·D(x/s;σ)) / (s·σ)``; shapes as in :meth:`__call__`."""
        self._check_x(x)
        b = x.shape[0]
        sig, s_ = _per_sample(sigma, b, x.device, "sigma"), _per_sample(s, b, x.device, "s")
        d = self._x0(x, sig, s_, class_labels)
        return (x - _bcast(s_, x) * d) / _bcast(s_ * sig, x)

    def score(self, x: torch.Tensor, sigma, s=1.0, class_labels=None) -> torch.Tensor:
        """Score ``∇ log p = (s·D(x/s;σ) − x) / (s²σ²)``; shapes as in :meth:`__call__`."""
        self._check_x(x)
        b = x.shape[0]
        sig, s_ = _per_sample(sigma, b, x.device, "sigma"), _per_sample(s, b, x.device, "s")
        d = self._x0(x, sig, s_, class_labels)
        return (_bcast(s_, x) * d - x) / _bcast((s_ * sig) ** 2, x)

    def _check_x(self, x) -> None:
        shape = (self.img_channels, self.img_resolution, self.img_resolution)
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim != 4 \
                or tuple(x.shape[1:]) != shape:
            got = (f"{type(x).__name__} {getattr(x, 'dtype', '')} "
                   f"{tuple(getattr(x, 'shape', ()))}")
            raise ValueError(f"x must be a float tensor of shape [B, {shape[0]}, {shape[1]}, "
                             f"{shape[2]}], got {got}")

    def _x0(self, x, sigma, s, class_labels):
        """Prediction for the scaled state; ``sigma``/``s`` are float64 ``[B]`` (s None means 1)."""
        return self._denoise(x if s is None else x / _bcast(s, x), sigma, class_labels)

    def _denoise(self, x: torch.Tensor, sigma: torch.Tensor, class_labels) -> torch.Tensor:
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------
# Empirical (multi-delta) optimal denoiser


class EmpiricalDenoiser(Denoiser):
    """Posterior mean of the empirical training distribution (SPEC §1; P1 Thm 1, P2 eq. 5).

    ``D(x̃;σ) = Σ_i softmax_i(−‖x̃ − y_i‖²/(2σ²)) y_i``, computed by
    :func:`diffrepro.empirical_denoiser`. A uint8 training set stays uint8 (the kernel decodes
    ``u/127.5 − 1``), so 50k CIFAR images take 0.15 GB.

    With ``labels``, ``class_labels`` restricts each query to the rows of its class (the
    class-conditional optimum). Queries are grouped by class; each class's rows are gathered
    into one contiguous block the first time that class is asked for, and cached (at most one
    extra copy of the training set in total).

    When ``chunk_rows`` is set, or ``train`` is an ``np.memmap`` larger than 1 GiB, the
    training rows are streamed in chunks through :func:`diffrepro.empirical_denoiser_partial`,
    :func:`diffrepro.merge_states` and :func:`diffrepro.finalize` (memmap chunks are read per
    call; the result equals the in-memory one up to float rounding).

    Args:
        train: uint8 ``[N, C, H, W]`` (numpy, np.memmap or tensor), float in [-1, 1], or a
            :class:`diffrepro.data.Dataset` (its labels are used unless ``labels`` is given).
        labels: optional int ``[N]`` class labels.
        dtype: compute dtype, torch.float32 (default, fast) or torch.float64 (reference).
        device: where the training set lives and the kernel runs.
        chunk_rows: stream this many training rows per kernel call (None: one call).
        label_dim: number of classes (default ``max(labels) + 1``).
    """

    def __init__(self, train, *, labels=None, dtype: torch.dtype = torch.float32,
                 device="cpu", chunk_rows: int | None = None, label_dim: int | None = None):
        if isinstance(train, Dataset):
            labels = train.labels if labels is None else labels
            train = train.images
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if not isinstance(train, (np.ndarray, torch.Tensor)) or train.ndim != 4:
            raise ValueError(f"train must be a [N, C, H, W] array or tensor, got "
                             f"{type(train).__name__} {tuple(getattr(train, 'shape', ()))}")
        n, c, h, w = train.shape
        if n < 1 or h != w:
            raise ValueError(f"train must have N >= 1 square images, got shape {tuple(train.shape)}")
        if chunk_rows is not None and (int(chunk_rows) != chunk_rows or chunk_rows < 1):
            raise ValueError(f"chunk_rows must be a positive integer or None, got {chunk_rows!r}")
        self.dtype, self.device = dtype, torch.device(device)
        self.img_channels, self.img_resolution = int(c), int(h)
        self.num_rows = int(n)

        if _torch_dtype(train) not in (torch.uint8, torch.float32, torch.float64):
            raise TypeError(f"train must be uint8 or float32/float64, got dtype {train.dtype}")
        row_bytes = train[0].nbytes if isinstance(train, np.ndarray) else \
            train[0].numel() * train.element_size()
        self._memmap = isinstance(train, np.memmap) and n * row_bytes > _RESIDENT_LIMIT_BYTES
        if self._memmap:
            self.chunk_rows = int(chunk_rows or max(1, _STREAM_CHUNK_BYTES // row_bytes))
            self._train = train
        else:
            self.chunk_rows = None if chunk_rows is None else int(chunk_rows)
            self._train = self._to_device(np.array(train) if isinstance(train, np.memmap)
                                          else train)

        self._class_rows: list[np.ndarray] = []
        self._class_blocks: dict[int, torch.Tensor] = {}
        self.label_dim = 0
        if labels is not None:
            labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
            if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer) \
                    or labels.min() < 0:
                raise ValueError(f"labels must be {n} non-negative integers, got "
                                 f"{labels.dtype} {labels.shape}")
            self.label_dim = int(label_dim if label_dim is not None else labels.max() + 1)
            if labels.max() >= self.label_dim:
                raise ValueError(f"label_dim={self.label_dim} but labels go up to {labels.max()}")
            self._class_rows = [np.flatnonzero(labels == k) for k in range(self.label_dim)]

    def _to_device(self, rows) -> torch.Tensor:
        """Training rows -> tensor on the device: uint8 kept, floats cast to the compute dtype."""
        t = torch.from_numpy(rows) if isinstance(rows, np.ndarray) else rows
        t = t.to(self.device)
        return (t if t.dtype == torch.uint8 else t.to(self.dtype)).contiguous()

    def _stream_rows(self, rows: np.ndarray):
        """A memmap slice for the kernel: passed as is on the CPU (the kernel reads the pages
        without a copy) when its dtype is usable there, else copied to the device."""
        usable = _torch_dtype(rows) in (torch.uint8, self.dtype)
        if self.device.type == "cpu" and usable:
            return rows
        return self._to_device(np.array(rows))

    def _class_train(self, k: int | None) -> torch.Tensor:
        """Resident rows of class ``k`` (all rows for None), cached per class."""
        if k is None:
            return self._train
        if k not in self._class_blocks:
            rows = torch.from_numpy(self._class_rows[k]).to(self.device)
            self._class_blocks[k] = self._train.index_select(0, rows)
        return self._class_blocks[k]

    def _chunks(self, k: int | None):
        """Yield ``(rows, row_offset)`` covering class ``k``'s rows (None: all) in index order.

        ``row_offset`` counts rows of the class's own (virtual, ascending-index) array, so the
        merged state's nearest index is local to that array; :meth:`_global_index` maps it back.
        """
        if not self._memmap:
            train = self._class_train(k)
            step = self.chunk_rows or len(train)
            for a in range(0, len(train), step):
                yield train[a:a + step], a
            return
        rows = None if k is None else self._class_rows[k]
        for a in range(0, self.num_rows, self.chunk_rows):
            b = min(a + self.chunk_rows, self.num_rows)
            if rows is None:
                yield self._stream_rows(self._train[a:b]), a
            else:
                lo, hi = np.searchsorted(rows, [a, b])
                if hi > lo:
                    yield self._to_device(self._train[rows[lo:hi]]), int(lo)

    def _global_index(self, idx: torch.Tensor, k: int | None) -> torch.Tensor:
        if k is None:
            return idx
        return torch.from_numpy(self._class_rows[k]).to(idx.device)[idx]

    def _streamed(self, q, sigma, s, k):
        state = None
        for rows, offset in self._chunks(k):
            part = empirical_denoiser_partial(q, rows, sigma, s=s, row_offset=offset)
            state = part if state is None else merge_states(state, part)
        if state is None:
            raise ValueError(f"class {k} has no training rows")
        return finalize(state)

    def _groups(self, x, class_labels):
        """Split the batch by class: yields ``(query index tensor or None, class or None)``."""
        classes = _class_indices(class_labels, x.shape[0], self.label_dim, "cpu")
        if classes is None:
            yield None, None
            return
        for k in torch.unique(classes).tolist():
            if len(self._class_rows[k]) == 0:
                raise ValueError(f"class_labels ask for class {k}, which has no training rows")
            yield torch.nonzero(classes == k).reshape(-1), k

    def _x0(self, x, sigma, s, class_labels):
        b = x.shape[0]
        q = x.reshape(b, -1).to(device=self.device, dtype=self.dtype)
        sigma = sigma.to(self.device)
        s = torch.ones_like(sigma) if s is None else s.to(self.device)
        out = torch.empty_like(q)
        for sel, k in self._groups(x, class_labels):
            sel = slice(None) if sel is None else sel.to(self.device)
            if self._memmap or self.chunk_rows is not None:
                out[sel] = self._streamed(q[sel], sigma[sel], s[sel], k)[0]
            else:
                out[sel] = empirical_denoiser(q[sel], self._class_train(k), sigma[sel], s=s[sel])
        return out.reshape(x.shape).to(device=x.device, dtype=x.dtype)

    def nearest(self, x: torch.Tensor, sigma, s=1.0, class_labels=None):
        """Diagnostics from the softmax: nearest training row and effective sample size.

        Args:
            x: float ``[B, C, H, W]`` scaled state (``x/s`` is compared to the training rows).
            sigma: scalar or ``[B]`` noise levels.
            s: scalar or ``[B]`` signal scales.
            class_labels: as in :meth:`__call__` (restricts the search to the class's rows).

        Returns:
            ``(nearest_index, n_eff)``: int64 ``[B]`` global row indices of the nearest training
            image (lowest index on ties) and float64 ``[B]`` ``n_eff = 1/Σ w_i²``.
        """
        self._check_x(x)
        b = x.shape[0]
        q = x.reshape(b, -1).to(device=self.device, dtype=self.dtype)
        sigma = _per_sample(sigma, b, self.device, "sigma")
        s = _per_sample(s, b, self.device, "s")
        index = torch.empty(b, dtype=torch.int64, device=self.device)
        n_eff = torch.empty(b, dtype=torch.float64, device=self.device)
        for sel, k in self._groups(x, class_labels):
            sel = slice(None) if sel is None else sel.to(self.device)
            _, info = self._streamed(q[sel], sigma[sel], s[sel], k)
            index[sel] = self._global_index(info["nearest_index"].to(self.device), k)
            n_eff[sel] = info["n_eff"].to(device=self.device, dtype=torch.float64)
        return index, n_eff


# ------------------------------------------------------------------------------------------------
# Gaussian (Wiener) denoiser


def _training_rows(train):
    """Validate a training set and return its image array (a Dataset's ``images``)."""
    if isinstance(train, Dataset):
        train = train.images
    if not isinstance(train, (np.ndarray, torch.Tensor)) or train.ndim < 2 or len(train) < 1:
        raise ValueError(f"train must be a non-empty [N, C, H, W] array or tensor, got "
                         f"{type(train).__name__} {tuple(getattr(train, 'shape', ()))}")
    return train


def _float64_chunks(train, device, chunk_rows: int):
    """Yield float64 ``[rows, d]`` chunks of ``train`` on ``device`` (uint8 as ``u/127.5 − 1``)."""
    for a in range(0, len(train), chunk_rows):
        rows = train[a:a + chunk_rows]
        t = torch.from_numpy(np.array(rows)) if isinstance(rows, np.ndarray) else rows
        t = t.to(device).reshape(len(t), -1)
        yield t.to(torch.float64) / 127.5 - 1 if t.dtype == torch.uint8 else t.to(torch.float64)


def gaussian_statistics(train, *, device="cpu", chunk_rows: int = 4096):
    """Mean and biased covariance of a training set, in float64 (SPEC §2.1, §2.4 [DR]).

    Two passes of chunked float64 work on ``device``: the mean, then ``Σ += Y_cᵀ Y_c`` over
    centred chunks ``Y_c``, divided by N. uint8 rows are decoded as ``u/127.5 − 1``.

    Args:
        train: uint8 ``[N, C, H, W]`` (numpy, memmap or tensor) or float in [-1, 1]; a
            :class:`diffrepro.data.Dataset` is accepted.
        device: where the GEMMs run.
        chunk_rows: rows per chunk.

    Returns:
        ``(mu [d], cov [d, d], N)`` with float64 tensors on ``device``.
    """
    train = _training_rows(train)
    n = len(train)
    total = None
    for y in _float64_chunks(train, device, chunk_rows):
        total = y.sum(0) if total is None else total + y.sum(0)
    mu = total / n
    cov = torch.zeros(mu.numel(), mu.numel(), dtype=torch.float64, device=device)
    for y in _float64_chunks(train, device, chunk_rows):
        yc = y - mu
        cov.addmm_(yc.T, yc)
    return mu, cov / n, n


def _gram_eigenpairs(yc: torch.Tensor):
    """Eigenpairs of the covariance ``Y_cᵀ Y_c / N`` of ``N < d`` centred float64 rows ``Y_c``.

    The rank r ≤ N − 1 nonzero eigenpairs come from the N×N Gram matrix ``Y_c Y_cᵀ / N = V Λ Vᵀ``
    (``u_k = Y_cᵀ v_k / sqrt(N λ_k)``); eigenvalues below ``d·eps·λ_max`` (rounding noise, like
    the ± noise of a d×d ``eigh``) count as 0. A complete QR of ``[u_1..u_r]`` re-orthonormalises
    them (``R ≈ diag(±1)``) and completes the basis with d − r directions of λ = 0.

    Returns:
        ``(lam [d], U [d, d])``: λ descending (≥ 0) and orthonormal columns (signs unfixed).
    """
    n, d = yc.shape
    lam, v = torch.linalg.eigh(yc @ yc.T / n)
    lam, v = lam.flip(0), v.flip(1)
    keep = lam > lam[0].clamp_min(0) * d * torch.finfo(torch.float64).eps
    r = int(keep.sum())
    U = torch.linalg.qr(yc.T @ (v[:, keep] / torch.sqrt(n * lam[keep])), mode="complete").Q
    return torch.cat([lam[keep], lam.new_zeros(d - r)]), U


class GaussianDenoiser(Denoiser):
    """Wiener filter of the training set's Gaussian model (SPEC §2; P2 eq. 6), in float64.

    ``D(x̃;σ) = μ + U diag(λ/(λ+σ²)) Uᵀ (x̃ − μ)``, with the eigenpairs of the biased
    covariance sorted by decreasing λ (λ ≥ 0). With ``rank=r`` only the first r directions
    are kept and the discarded directions are mapped to μ (gain 0, i.e. λ_k := 0 for k ≥ r).

    Args:
        mu: ``[d]`` mean.
        lam: ``[d]`` eigenvalues, descending, ≥ 0.
        U: ``[d, d]`` eigenvectors (columns).
        n: number of training images the statistics come from (recorded, 0 if unknown).
        rank: keep the top ``rank`` directions (None: all).
        shape: image shape ``(C, H, W)`` (default: inferred from d, square, 3 or 1 channels).
        device: where the statistics live and the products run.
    """

    def __init__(self, mu, lam, U, *, n: int = 0, rank: int | None = None,
                 shape: Sequence[int] | None = None, device="cpu"):
        f64 = dict(dtype=torch.float64, device=device)
        self.mu = torch.as_tensor(mu, **f64).reshape(-1)
        self.lam = torch.as_tensor(lam, **f64).reshape(-1)
        self.U = torch.as_tensor(U, **f64)
        d = self.mu.numel()
        if self.lam.shape != (d,) or self.U.shape != (d, d):
            raise ValueError(f"mu, lam and U must have shapes [d], [d], [d, d]; got "
                             f"{tuple(self.mu.shape)}, {tuple(self.lam.shape)}, "
                             f"{tuple(self.U.shape)}")
        if bool((self.lam < 0).any()) or bool((self.lam[1:] > self.lam[:-1]).any()):
            raise ValueError("lam must be non-negative and sorted in descending order")
        if rank is not None and (int(rank) != rank or not 1 <= rank <= d):
            raise ValueError(f"rank must be an integer in [1, {d}] or None, got {rank!r}")
        c, h, w = _infer_shape(d) if shape is None else tuple(int(v) for v in shape)
        if c * h * w != d or h != w:
            raise ValueError(f"shape must be square (C, H, H) with C*H*H = {d}, got {shape}")
        self.img_channels, self.img_resolution = c, h
        self.n, self.rank, self.device = int(n), rank, torch.device(device)
        r = d if rank is None else int(rank)
        # λ with the discarded directions set to 0: their gain is 0, so they are mapped to μ.
        self.lam_eff = torch.cat([self.lam[:r], torch.zeros_like(self.lam[r:])])
        self._Ur, self._lam_r = self.U[:, :r], self.lam[:r]

    @classmethod
    def from_data(cls, train, *, rank: int | None = None, device="cpu",
                  chunk_rows: int = 4096) -> "GaussianDenoiser":
        """Fit μ and the biased covariance Σ in float64 and eigendecompose Σ.

        * ``N ≥ d``: Σ from :func:`gaussian_statistics` (chunked), then ``torch.linalg.eigh``.
        * ``N < d``: Σ has rank < N, so the eigenpairs come from the N×N Gram matrix of the
          centred rows and the basis is completed by a QR step with λ = 0 (gain 0: those
          directions map to μ). For the 500 embedded 3×32×32 images this takes about a second
          instead of a 3072×3072 ``eigh``; the denoiser is the same up to rounding.

        Either way λ is sorted descending with negative (rounding) values clamped to 0, U is
        an orthonormal d×d basis, and eigenvector signs are fixed so that each column's
        largest-magnitude entry is positive (reproducible files).

        Args:
            train: uint8 ``[N, C, H, W]`` or float in [-1, 1] (numpy, memmap, tensor or
                :class:`diffrepro.data.Dataset`).
            rank: keep the top ``rank`` directions (None: all).
            device: where the statistics are computed and kept.
            chunk_rows: rows per GEMM chunk (``N ≥ d``) or per decoded chunk (``N < d``).
        """
        images = _training_rows(train)
        n, d = len(images), math.prod(images.shape[1:])
        if n < d:
            y = torch.cat(list(_float64_chunks(images, device, chunk_rows)))
            mu = y.mean(0)
            lam, U = _gram_eigenpairs(y - mu)
        else:
            mu, cov, n = gaussian_statistics(images, device=device, chunk_rows=chunk_rows)
            lam, U = torch.linalg.eigh(cov)
            lam, U = lam.flip(0).clamp_min(0), U.flip(1)
        pivot = U.abs().argmax(0)
        U = U * torch.sign(U[pivot, torch.arange(U.shape[1], device=U.device)])
        return cls(mu, lam, U, n=n, rank=rank, shape=tuple(images.shape[1:]), device=device)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``mu`` [d], ``lam`` [d], ``U`` [d, d] (float64), ``N`` and ``shape`` to an .npz."""
        atomic_save_npz(path, mu=self.mu.cpu().numpy(), lam=self.lam.cpu().numpy(),
                        U=self.U.cpu().numpy(), N=np.int64(self.n),
                        shape=np.array([self.img_channels, self.img_resolution,
                                        self.img_resolution], np.int64))

    @classmethod
    def load(cls, path: str | os.PathLike, *, rank: int | None = None,
             device="cpu") -> "GaussianDenoiser":
        """Read statistics written by :meth:`save` (``shape`` is inferred when absent)."""
        with np.load(path) as z:
            missing = {"mu", "lam", "U"} - set(z.keys())
            if missing:
                raise ValueError(f"path {os.fspath(path)!r} lacks Gaussian statistics keys "
                                 f"{sorted(missing)}")
            shape = tuple(z["shape"]) if "shape" in z else None
            return cls(z["mu"], z["lam"], z["U"], n=int(z["N"]) if "N" in z else 0, rank=rank,
                       shape=shape, device=device)

    def _denoise(self, x, sigma, class_labels):
        if class_labels is not None:
            raise ValueError("class_labels were given but the Gaussian denoiser is unconditional")
        c = (x.reshape(x.shape[0], -1).to(self.device, torch.float64) - self.mu) @ self._Ur
        out = self.mu + (c * wiener_gain(self._lam_r, sigma.to(self.device))) @ self._Ur.T
        return out.reshape(x.shape).to(device=x.device, dtype=x.dtype)

    def linear(self, sigma: float) -> "LinearDenoiser":
        """The denoiser at one σ as an affine map ``W x + b`` (``W = U diag(g) Uᵀ``, ``b = μ − Wμ``)."""
        g = wiener_gain(self._lam_r, torch.tensor(float(sigma), dtype=torch.float64,
                                                  device=self.device))
        W = (self._Ur * g) @ self._Ur.T
        return LinearDenoiser(W, self.mu - W @ self.mu, float(sigma), mode="gaussian", M=self.n,
                              shape=(self.img_channels, self.img_resolution, self.img_resolution),
                              device=self.device)

    def _slope(self, sigma: torch.Tensor) -> torch.Tensor:
        """Per-direction PF-ODE slope: ``dc/dσ = c·(1 − gain)/σ`` (``= σ/(λ+σ²)``)."""
        return (1 - wiener_gain(self.lam_eff, sigma)) / sigma.unsqueeze(-1)

    def step_factors(self, sigmas, solver: str = "euler") -> torch.Tensor:
        """Per-direction multipliers of the coordinates ``c = Uᵀ(x − μ)`` along a σ grid (SPEC §2.3).

        Step ``i`` (σ_i → σ_{i+1}, h = σ_{i+1} − σ_i, a(σ) = σ/(λ+σ²)):

        * ``"euler"``: ``1 + h·a_i`` (to σ = 0 this is the gain ``λ/(λ+σ_i²)``);
        * ``"heun"``: ``1 + (h/2)[a_i + a_{i+1}(1 + h·a_i)]`` while σ_{i+1} > 0, Euler into 0
          (EDM Algorithm 2);
        * ``"exact"``: ``sqrt((λ+σ_{i+1}²)/(λ+σ_i²))`` (P2 eq. 7).

        Args:
            sigmas: 1-D decreasing grid ``[S+1]`` with σ_0..σ_{S−1} > 0 and σ_S ≥ 0.
            solver: ``"euler"``, ``"heun"`` or ``"exact"``.

        Returns:
            float64 ``[S, d]`` factors; the product over steps maps ``c(σ_0)`` to ``c(σ_S)``.
        """
        sig = torch.as_tensor(sigmas, dtype=torch.float64, device=self.device).reshape(-1)
        if sig.numel() < 2 or not bool((sig[:-1] > 0).all()) or sig[-1] < 0 \
                or not bool((sig[1:] < sig[:-1]).all()):
            raise ValueError(f"sigmas must be a strictly decreasing grid of >= 2 values, positive "
                             f"except possibly the last (0), got {sig.tolist()[:6]}...")
        s0, s1 = sig[:-1], sig[1:]
        h = (s1 - s0).unsqueeze(1)
        if solver == "exact":
            lam = self.lam_eff
            return torch.sqrt((lam + s1.unsqueeze(1) ** 2) / (lam + s0.unsqueeze(1) ** 2))
        a0 = self._slope(s0)
        euler = 1 + h * a0
        if solver == "euler":
            return euler
        if solver == "heun":
            a1 = self._slope(torch.where(s1 > 0, s1, s0))  # unused where σ_{i+1} = 0
            heun = 1 + h / 2 * (a0 + a1 * (1 + h * a0))
            return torch.where((s1 > 0).unsqueeze(1), heun, euler)
        raise ValueError(f"solver must be 'euler', 'heun' or 'exact', got {solver!r}")

    def trajectory(self, latents: torch.Tensor, sigmas, *, solver: str = "euler",
                   return_denoised: bool = False):
        """Closed-form deterministic sampling of the Gaussian model (SPEC §2.3).

        Starts from ``x_0 = latents · σ_0`` (as EDM's sampler) and applies, per eigen-direction,
        the product of :meth:`step_factors`, so the samples cost two ``[K, d] × [d, d]`` products
        whatever the number of steps. Equals running Euler/Heun/the exact ODE step by step
        with this denoiser.

        Args:
            latents: ``[K, C, H, W]`` unit Gaussian noise.
            sigmas: ``[S+1]`` grid, e.g. EDM's ρ-grid with the final 0 appended.
            solver: ``"euler"``, ``"heun"`` or ``"exact"``.
            return_denoised: also return the denoiser outputs ``D(x_i; σ_i)`` at every step start
                (one extra ``[S·K, d] × [d, d]`` product).

        Returns:
            float64 ``[K, C, H, W]`` samples at σ_S, and with ``return_denoised`` also
            float64 ``[S, K, C, H, W]`` denoiser outputs ``μ + U diag(λ/(λ+σ_i²)) c_i``.
        """
        self._check_x(latents)
        sig = torch.as_tensor(sigmas, dtype=torch.float64, device=self.device).reshape(-1)
        f = self.step_factors(sig, solver)
        k = latents.shape[0]
        c0 = (latents.reshape(k, -1).to(self.device, torch.float64) * sig[0] - self.mu) @ self.U
        samples = (self.mu + (c0 * f.prod(0)) @ self.U.T).reshape(latents.shape)
        if not return_denoised:
            return samples
        # Coordinates at each step start: cumulative product of the previous steps' factors.
        cum = torch.cat([torch.ones_like(f[:1]), torch.cumprod(f[:-1], 0)])
        gains = cum * wiener_gain(self.lam_eff, sig[:-1])
        denoised = self.mu + (c0.unsqueeze(0) * gains.unsqueeze(1)).reshape(-1, c0.shape[1]) \
            @ self.U.T
        return samples, denoised.reshape(len(f), *latents.shape)


# ------------------------------------------------------------------------------------------------
# Linear (affine) denoisers, one per σ


def _sigma_index(sigma: torch.Tensor, table: np.ndarray) -> np.ndarray:
    """Index into ``table`` of each requested σ (within rtol 1e-6), or raise ValueError."""
    req = sigma.detach().cpu().numpy()
    match = np.abs(req[:, None] - table[None, :]) <= _SIGMA_RTOL * table[None, :]
    bad = ~match.any(1)
    if bad.any():
        raise ValueError(f"sigma={req[bad][0]!r} has no linear model; available sigmas "
                         f"(matched within rtol {_SIGMA_RTOL}): {table.tolist()}")
    return match.argmax(1)


class LinearDenoiser(Denoiser):
    """Affine denoiser ``D(x̃) = W x̃ + b`` on flattened images (SPEC §6), valid at one σ.

    Args:
        W: ``[d, d]`` effective weight (for P2's zero-initialised ``nn.Linear`` with input
            scaling ``1/√d`` this is ``W_p/√d``).
        b: ``[d]`` bias.
        sigma: the σ the model was fitted at; calls at another σ (beyond rtol 1e-6) raise.
            None: the map is used at every σ.
        shape: image shape (C, H, W) (default: inferred from d).
        mode: how it was obtained (e.g. ``"lstsq"``, ``"adam"``, ``"gaussian"``), recorded.
        M: number of training pairs used, recorded.
        device: where W and b live.
        dtype: compute dtype (float64 default; P2 ran its linear models in float32).
    """

    def __init__(self, W, b, sigma: float | None = None, *, shape: Sequence[int] | None = None,
                 mode: str = "", M: int = 0, device="cpu", dtype: torch.dtype = torch.float64):
        self.W = torch.as_tensor(W, dtype=dtype, device=device)
        self.b = torch.as_tensor(b, dtype=dtype, device=device).reshape(-1)
        d = self.b.numel()
        if self.W.shape != (d, d):
            raise ValueError(f"W must be [d, d] with d = len(b) = {d}, got {tuple(self.W.shape)}")
        if sigma is not None and not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be positive and finite or None, got {sigma!r}")
        c, h, w = _infer_shape(d) if shape is None else tuple(int(v) for v in shape)
        if c * h * w != d or h != w:
            raise ValueError(f"shape must be square (C, H, H) with C*H*H = {d}, got {shape}")
        self.img_channels, self.img_resolution = c, h
        self.sigma = None if sigma is None else float(sigma)
        self.mode, self.M = str(mode), int(M)

    def _denoise(self, x, sigma, class_labels):
        if class_labels is not None:
            raise ValueError("class_labels were given but the linear denoiser is unconditional")
        if self.sigma is not None:
            _sigma_index(sigma, np.array([self.sigma]))
        flat = x.reshape(x.shape[0], -1).to(device=self.W.device, dtype=self.W.dtype)
        return torch.addmm(self.b, flat, self.W.T).reshape(x.shape).to(device=x.device,
                                                                       dtype=x.dtype)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``W_eff`` [d, d], ``b`` [d], ``sigma`` (NaN for None), ``mode``, ``M``, ``shape``."""
        _write_linear_npz(path, [self], single=True)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device="cpu",
             dtype: torch.dtype = torch.float64) -> "LinearDenoiser":
        """Read a file written by :meth:`save` (or a one-σ :class:`LinearDenoiserSet` file)."""
        models = _read_linear_npz(path, device, dtype)
        if len(models) != 1:
            raise ValueError(f"path {os.fspath(path)!r} holds {len(models)} linear models; use "
                             "LinearDenoiserSet.load")
        return models[0]


def _write_linear_npz(path, models: Sequence[LinearDenoiser], single: bool) -> None:
    """Save linear models: stacked ``[S, ...]`` arrays, or unstacked when ``single``."""
    pick = (lambda a: a[0]) if single else (lambda a: a)
    first = models[0]
    atomic_save_npz(
        path,
        W_eff=pick(np.stack([m.W.cpu().numpy() for m in models])),
        b=pick(np.stack([m.b.cpu().numpy() for m in models])),
        sigma=pick(np.array([np.nan if m.sigma is None else m.sigma for m in models])),
        mode=pick(np.array([m.mode for m in models])),
        M=pick(np.array([m.M for m in models], np.int64)),
        shape=np.array([first.img_channels, first.img_resolution, first.img_resolution], np.int64))


def _read_linear_npz(path, device, dtype) -> list[LinearDenoiser]:
    """Load the models of a file written by :func:`_write_linear_npz` (either layout)."""
    with np.load(path) as z:
        missing = {"W_eff", "b", "sigma"} - set(z.keys())
        if missing:
            raise ValueError(f"path {os.fspath(path)!r} lacks linear-model keys {sorted(missing)}")
        W = z["W_eff"]
        stacked = W.ndim == 3
        count = len(W) if stacked else 1

        def column(key, default):
            values = np.asarray(z[key]) if key in z else np.asarray(default)
            return values.reshape(count) if values.size == count else np.repeat(values, count)

        b = z["b"] if stacked else z["b"][None]
        W = W if stacked else W[None]
        sig, mode, M = column("sigma", np.nan), column("mode", ""), column("M", 0)
        shape = tuple(z["shape"]) if "shape" in z else None
        return [LinearDenoiser(W[i], b[i], None if np.isnan(sig[i]) else float(sig[i]),
                               shape=shape, mode=str(mode[i]), M=int(M[i]), device=device,
                               dtype=dtype) for i in range(count)]


class LinearDenoiserSet(Denoiser):
    """One :class:`LinearDenoiser` per σ; each call uses the model whose σ matches (rtol 1e-6).

    This is how P2 chains its ten distilled models in a 10-step Euler sampler.

    Args:
        models: linear denoisers with distinct σ and the same image shape.
    """

    def __init__(self, models: Sequence[LinearDenoiser]):
        self.models = list(models)
        if not self.models or any(m.sigma is None for m in self.models):
            raise ValueError("models must be a non-empty list of LinearDenoiser with sigma set")
        first = self.models[0]
        if any((m.img_channels, m.img_resolution) != (first.img_channels, first.img_resolution)
               for m in self.models):
            raise ValueError("all models must have the same image shape")
        self.sigmas = np.array([m.sigma for m in self.models], dtype=np.float64)
        if len(np.unique(self.sigmas)) != len(self.sigmas):
            raise ValueError(f"models must have distinct sigmas, got {self.sigmas.tolist()}")
        self.img_channels, self.img_resolution = first.img_channels, first.img_resolution

    def __len__(self) -> int:
        return len(self.models)

    def __getitem__(self, i: int) -> LinearDenoiser:
        return self.models[i]

    def _denoise(self, x, sigma, class_labels):
        if class_labels is not None:
            raise ValueError("class_labels were given but linear denoisers are unconditional")
        which = _sigma_index(sigma, self.sigmas)
        out = torch.empty_like(x)
        for i in np.unique(which):
            sel = torch.from_numpy(np.flatnonzero(which == i)).to(x.device)
            out[sel] = self.models[i]._denoise(x[sel], sigma[sel], None)
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write stacked ``W_eff`` [S, d, d], ``b`` [S, d], ``sigma`` [S], ``mode`` [S], ``M`` [S]."""
        _write_linear_npz(path, self.models, single=False)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device="cpu",
             dtype: torch.dtype = torch.float64) -> "LinearDenoiserSet":
        """Read a file written by :meth:`save` or :meth:`LinearDenoiser.save` (σ required)."""
        return cls(_read_linear_npz(path, device, dtype))


# ------------------------------------------------------------------------------------------------
# Network adapters


class CallableDenoiser(Denoiser):
    """Wrap any callable or torch module ``fn(x, sigma[, class_labels]) -> x0`` as a Denoiser.

    ``fn`` is called under ``torch.no_grad()`` with ``x`` on the module's device (the device of
    its first parameter, else x's) and, when ``dtype`` is given, ``x`` and ``sigma`` cast to it
    (EDM networks cast internally, so leave it None for them). ``class_labels`` is passed only
    when not None. The output is returned in x's dtype and device.

    Args:
        fn: the network or function; it receives the unscaled ``x`` and σ as a float64 ``[B]``.
        img_channels: C.
        img_resolution: H (= W).
        label_dim: number of classes (0: unconditional).
        sigma_min: smallest supported σ.
        sigma_max: largest supported σ.
        round_sigma: optional σ-snapping function (EDM's ``net.round_sigma``).
        dtype: cast inputs to this dtype before calling (None: unchanged).
    """

    def __init__(self, fn: Callable, *, img_channels: int, img_resolution: int,
                 label_dim: int = 0, sigma_min: float = 0.0, sigma_max: float = math.inf,
                 round_sigma: Callable | None = None, dtype: torch.dtype | None = None):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.img_channels, self.img_resolution = int(img_channels), int(img_resolution)
        self.label_dim = int(label_dim)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self._round_sigma, self.dtype = round_sigma, dtype

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma) if self._round_sigma is None else self._round_sigma(sigma)

    def _device(self, x):
        params = getattr(self.fn, "parameters", None)
        first = next(iter(params()), None) if callable(params) else None
        return x.device if first is None else first.device

    def _denoise(self, x, sigma, class_labels):
        dev = self._device(x)
        xin, sin = x.to(dev), sigma.to(dev)
        if self.dtype is not None:
            xin, sin = xin.to(self.dtype), sin.to(self.dtype)
        with torch.no_grad():
            out = self.fn(xin, sin) if class_labels is None else \
                self.fn(xin, sin, torch.as_tensor(class_labels, device=dev))
        return out.to(device=x.device, dtype=x.dtype)


def as_denoiser(obj, **kwargs) -> Denoiser:
    """Adapt ``obj`` to the :class:`Denoiser` interface.

    * A :class:`Denoiser` is returned unchanged.
    * An object with EDM network attributes (``img_channels``, ``img_resolution``) is wrapped
      with those attributes (``label_dim``, ``sigma_min``, ``sigma_max``, ``round_sigma`` too,
      when present); ``kwargs`` override them.
    * Any other callable needs ``img_channels`` and ``img_resolution`` in ``kwargs``.

    Raises:
        TypeError: ``obj`` is not callable, or the image shape is unknown.
    """
    if isinstance(obj, Denoiser):
        return obj
    if not callable(obj):
        raise TypeError(f"obj must be a Denoiser, a torch module or a callable, got "
                        f"{type(obj).__name__}")
    attrs = {}
    if hasattr(obj, "img_channels") and hasattr(obj, "img_resolution"):
        attrs = dict(img_channels=obj.img_channels, img_resolution=obj.img_resolution,
                     label_dim=getattr(obj, "label_dim", 0),
                     sigma_min=getattr(obj, "sigma_min", 0.0),
                     sigma_max=getattr(obj, "sigma_max", math.inf),
                     round_sigma=getattr(obj, "round_sigma", None))
    attrs.update(kwargs)
    if "img_channels" not in attrs or "img_resolution" not in attrs:
        raise TypeError(f"{type(obj).__name__} has no img_channels/img_resolution attributes; "
                        "pass img_channels=... and img_resolution=... to as_denoiser")
    return CallableDenoiser(obj, **attrs)


def _ddpm_alphas_cumprod(config: dict) -> np.ndarray:
    """ᾱ_n (float64 ``[M]``) from a diffusers DDPM/DDIM scheduler config."""
    m = int(config.get("num_train_timesteps", 1000))
    if config.get("rescale_betas_zero_snr"):
        raise ValueError("scheduler_config rescale_betas_zero_snr=True gives ᾱ = 0 (σ = ∞) at the "
                         "last step, which has no EDM σ; it is not supported")
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], dtype=np.float64)
    else:
        kind = config.get("beta_schedule", "linear")
        b0, b1 = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
        if kind == "linear":
            betas = np.linspace(b0, b1, m, dtype=np.float64)
        elif kind == "scaled_linear":
            betas = np.linspace(b0 ** 0.5, b1 ** 0.5, m, dtype=np.float64) ** 2
        elif kind == "squaredcos_cap_v2":
            # Nichol & Dhariwal (2021) cosine schedule, as diffusers' betas_for_alpha_bar.
            abar = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
            t = np.arange(m + 1, dtype=np.float64) / m
            betas = np.minimum(1 - abar(t[1:]) / abar(t[:-1]), 0.999)
        else:
            raise ValueError(f"scheduler_config beta_schedule={kind!r} is not supported; expected "
                             "'linear', 'scaled_linear', 'squaredcos_cap_v2' or trained_betas")
    return np.cumprod(1 - betas)


class DiffusersDenoiser(Denoiser):
    """Adapter for diffusers-style DDPM networks (eps-, v- or x0-prediction).

    EDM's σ and the DDPM marginals are linked by ``ᾱ = 1/(1+σ²)`` (SPEC §1.1, DDPM row): the
    network input is ``x_t = x̃/√(1+σ²)`` and its timestep is found from σ_n = √((1−ᾱ_n)/ᾱ_n):

    * ``timesteps="interpolate"`` (default): a fractional timestep, linear in ``log ᾱ`` between
      the two neighbouring trained steps (as DPM-Solver's discrete-time wrapper, which
      interpolates ``log α`` piecewise linearly), clamped to ``[0, M−1]``;
    * ``timesteps="snap"``: the integer step whose σ_n is nearest (EDM's iDDPM ``round_sigma``);
      ``round_sigma`` then snaps too, so EDM-type samplers only ask for trained σ_n.

    The prediction is converted with the σ actually passed in: eps ``D = x̃ − σ ε̂``,
    v ``D = α x_t − σα v`` (α = 1/√(1+σ²)), sample ``D = output``.

    Args:
        unet: module called as ``unet(x_t, t)`` or ``unet(x_t, t, class_labels=labels)``
            returning a tensor, a tuple or an object with ``.sample``.
        scheduler_config: a diffusers scheduler, its ``.config``, or a dict with
            ``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule`` (or
            ``trained_betas``) and ``prediction_type``.
        img_channels: C (default ``unet.config.in_channels``).
        img_resolution: H (default ``unet.config.sample_size``).
        label_dim: number of classes (default ``unet.config.num_class_embeds`` or 0).
        timesteps: ``"interpolate"`` or ``"snap"``.
        dtype: network dtype for ``x_t`` (default: the unet's parameter dtype).
    """

    def __init__(self, unet, scheduler_config, *, img_channels: int | None = None,
                 img_resolution: int | None = None, label_dim: int | None = None,
                 timesteps: str = "interpolate", dtype: torch.dtype | None = None):
        cfg = getattr(scheduler_config, "config", scheduler_config)
        cfg = dict(cfg)
        ucfg = getattr(unet, "config", {})
        ucfg = dict(ucfg) if ucfg is not None else {}
        self.unet = unet
        self.prediction_type = cfg.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"scheduler_config prediction_type={self.prediction_type!r}; expected "
                             "'epsilon', 'v_prediction' or 'sample'")
        if timesteps not in ("interpolate", "snap"):
            raise ValueError(f"timesteps must be 'interpolate' or 'snap', got {timesteps!r}")
        self.timesteps = timesteps
        abar = _ddpm_alphas_cumprod(cfg)
        self.train_sigmas = np.sqrt((1 - abar) / abar)
        self.sigma_min, self.sigma_max = float(self.train_sigmas[0]), float(self.train_sigmas[-1])
        self.img_channels = int(img_channels if img_channels is not None
                                else ucfg.get("in_channels", 0))
        res = img_resolution if img_resolution is not None else ucfg.get("sample_size", 0)
        self.img_resolution = int(res[0] if isinstance(res, (tuple, list)) else res)
        if self.img_channels < 1 or self.img_resolution < 1:
            raise ValueError("img_channels and img_resolution are not in unet.config; pass them")
        self.label_dim = int(label_dim if label_dim is not None
                             else ucfg.get("num_class_embeds") or 0)
        params = getattr(unet, "parameters", None)
        first = next(iter(params()), None) if callable(params) else None
        self._net_device = None if first is None else first.device
        self.dtype = dtype or (first.dtype if first is not None else torch.float32)

    def _snap_index(self, sigma) -> np.ndarray:
        s = np.asarray(torch.as_tensor(sigma, dtype=torch.float64).cpu()).reshape(-1)
        return np.abs(s[:, None] - self.train_sigmas[None, :]).argmin(1)

    def round_sigma(self, sigma):
        if self.timesteps == "interpolate":
            return torch.as_tensor(sigma)
        t = torch.as_tensor(sigma)
        snapped = torch.from_numpy(self.train_sigmas[self._snap_index(t)])
        return snapped.reshape(t.shape).to(device=t.device, dtype=t.dtype if t.is_floating_point()
                                          else torch.float64)

    def timestep(self, sigma) -> torch.Tensor:
        """Network timestep for each σ: float ``[B]`` (interpolate) or int64 ``[B]`` (snap)."""
        if self.timesteps == "snap":
            return torch.from_numpy(self._snap_index(sigma))
        s = np.asarray(torch.as_tensor(sigma, dtype=torch.float64).cpu()).reshape(-1)
        # −log ᾱ = log(1+σ²) increases with the step index n.
        t = np.interp(np.log1p(s ** 2), np.log1p(self.train_sigmas ** 2),
                      np.arange(len(self.train_sigmas), dtype=np.float64))
        return torch.from_numpy(t).to(torch.float32)

    def _denoise(self, x, sigma, class_labels):
        dev = self._net_device or x.device
        sig = _bcast(sigma, x)
        alpha = 1 / torch.sqrt(1 + sig ** 2)
        x_t = x * alpha
        labels = _class_indices(class_labels, x.shape[0], self.label_dim, dev)
        t = self.timestep(sigma).to(dev)
        with torch.no_grad():
            args = (x_t.to(device=dev, dtype=self.dtype), t)
            out = self.unet(*args) if labels is None else self.unet(*args, class_labels=labels)
        out = getattr(out, "sample", out)
        out = (out[0] if isinstance(out, (tuple, list)) else out).to(device=x.device,
                                                                     dtype=x.dtype)
        if self.prediction_type == "epsilon":
            return x - sig * out
        if self.prediction_type == "v_prediction":
            return alpha * x_t - sig * alpha * out
        return out


def load_edm_pickle(path: str | os.PathLike, edm_root: str | os.PathLike | None = None, *,
                    device="cpu") -> Denoiser:
    """Load an EDM network pickle's ``['ema']`` model and wrap it as a :class:`Denoiser`.

    EDM pickles reference EDM's ``dnnlib``/``torch_utils`` modules, so a checkout of
    https://github.com/NVlabs/edm (not bundled: CC BY-NC-SA) is put at the front of ``sys.path``.
    Unpickling runs code from the file: only load pickles you trust.

    Args:
        path: the ``.pkl`` file (e.g. ``edm-cifar10-32x32-uncond-vp.pkl``).
        edm_root: the EDM checkout (default: the ``EDM_ROOT`` environment variable).
        device: where to move the network.

    Returns:
        A :class:`CallableDenoiser` with the network's attributes (EDM preconditioners take
        float64 x and σ and cast internally).

    Raises:
        ValueError: no ``edm_root``, or the pickle has no ``'ema'`` entry.
        FileNotFoundError: ``path`` or the EDM modules are missing.
    """
    root = edm_root if edm_root is not None else os.environ.get("EDM_ROOT")
    if root is None:
        raise ValueError("edm_root is None and EDM_ROOT is not set: pass the path of an EDM "
                         "checkout (the folder holding dnnlib/ and torch_utils/)")
    root = os.path.abspath(os.fspath(root))
    for module in ("dnnlib", "torch_utils"):
        if not os.path.isdir(os.path.join(root, module)):
            raise FileNotFoundError(f"edm_root {root!r} has no {module}/ folder; expected an EDM "
                                    "checkout (https://github.com/NVlabs/edm)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path {os.fspath(path)!r} does not exist")
    if root not in sys.path:
        sys.path.insert(0, root)
    with open(path, "rb") as f:
        data = pickle.load(f)
    if not isinstance(data, dict) or "ema" not in data:
        raise ValueError(f"path {os.fspath(path)!r} is not an EDM network pickle: no 'ema' entry")
    net = data["ema"].eval().requires_grad_(False).to(device)
    return as_denoiser(net)
