# SPDX-License-Identifier: Apache-2.0
"""The Gaussian (Wiener) denoiser of a training set's mean and covariance, with closed-form
trajectories."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import Dataset, atomic_save_npz, decode
from .base import Denoiser, _infer_shape, wiener_gain
from .linear import LinearDenoiser


def _training_rows(train):
    """Validate a training set and return its image array (a Dataset's ``images``)."""
    if isinstance(train, Dataset):
        train = train.images
    if not isinstance(train, (np.ndarray, torch.Tensor)) or train.ndim < 2 or len(train) < 1:
        raise ValueError(
            f"train must be a non-empty [N, C, H, W] array or tensor, got "
            f"{type(train).__name__} {tuple(getattr(train, 'shape', ()))}"
        )
    return train


def _float64_chunks(train, device, chunk_rows: int, bar=None):
    """Yield float64 ``[rows, d]`` chunks of ``train`` on ``device`` (uint8 as ``u/127.5 − 1``),
    advancing the progress bar ``bar`` by the rows of each chunk."""
    for a in range(0, len(train), chunk_rows):
        if bar is not None:
            bar.update(min(chunk_rows, len(train) - a))
        rows = train[a : a + chunk_rows]
        t = torch.from_numpy(np.array(rows)) if isinstance(rows, np.ndarray) else rows
        t = t.to(device).reshape(len(t), -1)
        yield decode(t) if t.dtype == torch.uint8 else t.to(torch.float64)


def gaussian_statistics(train, *, device="cpu", chunk_rows: int = 4096, progress: bool = False):
    """Mean and biased covariance of a training set, in float64 (the Gaussian model of Li, Dai, Qu 2024).

    Two passes of chunked float64 work on ``device``: the mean, then ``Σ += Y_cᵀ Y_c`` over
    centred chunks ``Y_c``, divided by N. uint8 rows are decoded as ``u/127.5 − 1``.

    Args:
        train: uint8 ``[N, C, H, W]`` (numpy, memmap or tensor) or float in [-1, 1]; a
            :class:`diffrepro.data.Dataset` is accepted.
        device: where the GEMMs run.
        chunk_rows: rows per chunk.
        progress: show a progress bar over the two passes.

    Returns:
        ``(mu [d], cov [d, d], N)`` with float64 tensors on ``device``.
    """
    train = _training_rows(train)
    n = len(train)
    total = None
    with tqdm(total=2 * n, desc="Gaussian fit (mean, covariance)", unit="img", disable=not progress) as bar:
        for y in _float64_chunks(train, device, chunk_rows, bar):
            total = y.sum(0) if total is None else total + y.sum(0)
        mu = total / n
        cov = torch.zeros(mu.numel(), mu.numel(), dtype=torch.float64, device=device)
        for y in _float64_chunks(train, device, chunk_rows, bar):
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
    """Wiener filter of the training set's Gaussian model (Li, Dai, Qu 2024, eq. 6), in float64.

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

    def __init__(
        self, mu, lam, U, *, n: int = 0, rank: int | None = None, shape: Sequence[int] | None = None, device="cpu"
    ):
        f64 = dict(dtype=torch.float64, device=device)
        self.mu = torch.as_tensor(mu, **f64).reshape(-1)
        self.lam = torch.as_tensor(lam, **f64).reshape(-1)
        self.U = torch.as_tensor(U, **f64)
        d = self.mu.numel()
        if self.lam.shape != (d,) or self.U.shape != (d, d):
            raise ValueError(
                f"mu, lam and U must have shapes [d], [d], [d, d]; got "
                f"{tuple(self.mu.shape)}, {tuple(self.lam.shape)}, "
                f"{tuple(self.U.shape)}"
            )
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
    def from_data(
        cls, train, *, rank: int | None = None, device="cpu", chunk_rows: int = 4096, progress: bool = False
    ) -> "GaussianDenoiser":
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
            progress: show the progress of the statistics passes and say when the
                eigendecomposition runs.
        """
        images = _training_rows(train)
        n, d = len(images), math.prod(images.shape[1:])
        if n < d:
            y = torch.cat(list(_float64_chunks(images, device, chunk_rows)))
            mu = y.mean(0)
            lam, U = _gram_eigenpairs(y - mu)
        else:
            mu, cov, n = gaussian_statistics(images, device=device, chunk_rows=chunk_rows, progress=progress)
            if progress:
                tqdm.write(f"Gaussian fit: eigendecomposition of the {d} x {d} covariance ...")
            lam, U = torch.linalg.eigh(cov)
            lam, U = lam.flip(0).clamp_min(0), U.flip(1)
        pivot = U.abs().argmax(0)
        U = U * torch.sign(U[pivot, torch.arange(U.shape[1], device=U.device)])
        return cls(mu, lam, U, n=n, rank=rank, shape=tuple(images.shape[1:]), device=device)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``mu`` [d], ``lam`` [d], ``U`` [d, d] (float64), ``N`` and ``shape`` to an .npz."""
        atomic_save_npz(
            path,
            mu=self.mu.cpu().numpy(),
            lam=self.lam.cpu().numpy(),
            U=self.U.cpu().numpy(),
            N=np.int64(self.n),
            shape=np.array([self.img_channels, self.img_resolution, self.img_resolution], np.int64),
        )

    @classmethod
    def load(cls, path: str | os.PathLike, *, rank: int | None = None, device="cpu") -> "GaussianDenoiser":
        """Read statistics written by :meth:`save` (``shape`` is inferred when absent)."""
        with np.load(path) as z:
            missing = {"mu", "lam", "U"} - set(z.keys())
            if missing:
                raise ValueError(f"path {os.fspath(path)!r} lacks Gaussian statistics keys {sorted(missing)}")
            shape = tuple(z["shape"]) if "shape" in z else None
            return cls(
                z["mu"], z["lam"], z["U"], n=int(z["N"]) if "N" in z else 0, rank=rank, shape=shape, device=device
            )

    def _denoise(self, x, sigma, class_labels):
        if class_labels is not None:
            raise ValueError("class_labels were given but the Gaussian denoiser is unconditional")
        c = (x.reshape(x.shape[0], -1).to(self.device, torch.float64) - self.mu) @ self._Ur
        out = self.mu + (c * wiener_gain(self._lam_r, sigma.to(self.device))) @ self._Ur.T
        return out.reshape(x.shape).to(device=x.device, dtype=x.dtype)

    def _jvp(self, x, sigma, v, class_labels):
        """Exact ``U diag(λ/(λ+σ²)) Uᵀ v``: the denoiser is affine in x̃ with this symmetric
        Jacobian (``Cov[x0 | x̃]/σ²`` of the Gaussian model), so it is also the VJP."""
        if class_labels is not None:
            raise ValueError("class_labels were given but the Gaussian denoiser is unconditional")
        c = v.reshape(v.shape[0], -1).to(self.device, torch.float64) @ self._Ur
        out = (c * wiener_gain(self._lam_r, sigma.to(self.device))) @ self._Ur.T
        return out.reshape(x.shape).to(device=x.device, dtype=x.dtype)

    _vjp = _jvp

    def linear(self, sigma: float) -> "LinearDenoiser":
        """The denoiser at one σ as an affine map ``W x + b`` (``W = U diag(g) Uᵀ``, ``b = μ − Wμ``)."""
        g = wiener_gain(self._lam_r, torch.tensor(float(sigma), dtype=torch.float64, device=self.device))
        W = (self._Ur * g) @ self._Ur.T
        return LinearDenoiser(
            W,
            self.mu - W @ self.mu,
            float(sigma),
            mode="gaussian",
            M=self.n,
            shape=(self.img_channels, self.img_resolution, self.img_resolution),
            device=self.device,
        )

    def _slope(self, sigma: torch.Tensor) -> torch.Tensor:
        """Per-direction PF-ODE slope: ``dc/dσ = c·(1 − gain)/σ`` (``= σ/(λ+σ²)``)."""
        return (1 - wiener_gain(self.lam_eff, sigma)) / sigma.unsqueeze(-1)

    def step_factors(self, sigmas, solver: str = "euler") -> torch.Tensor:
        """Per-direction multipliers of the coordinates ``c = Uᵀ(x − μ)`` along a σ grid (each ODE
        step is diagonal in the eigenbasis).

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
        if sig.numel() < 2 or not bool((sig[:-1] > 0).all()) or sig[-1] < 0 or not bool((sig[1:] < sig[:-1]).all()):
            raise ValueError(
                f"sigmas must be a strictly decreasing grid of >= 2 values, positive "
                f"except possibly the last (0), got {sig.tolist()[:6]}..."
            )
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

    def trajectory(self, latents: torch.Tensor, sigmas, *, solver: str = "euler", return_denoised: bool = False):
        """Closed-form deterministic sampling of the Gaussian model (the PF-ODE is linear and diagonal
        in the eigenbasis).

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
        denoised = self.mu + (c0.unsqueeze(0) * gains.unsqueeze(1)).reshape(-1, c0.shape[1]) @ self.U.T
        return samples, denoised.reshape(len(f), *latents.shape)
