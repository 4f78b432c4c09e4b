# SPDX-License-Identifier: Apache-2.0
"""Affine denoisers ``D(x; σ) = W x + b``, one per σ (e.g. distilled or Wiener weights)."""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
import torch

from ..data import atomic_save_npz
from .base import Denoiser, _infer_shape

# Relative tolerance for matching a requested σ to a linear model's σ.
_SIGMA_RTOL = 1e-6

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
    """Affine denoiser ``D(x̃) = W x̃ + b`` on flattened images (Li, Dai, Qu 2024, §3.1), valid at one σ.

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
