# SPDX-License-Identifier: Apache-2.0
"""Classifier-free guidance with analytic denoisers.

Classifier-free guidance (Ho & Salimans 2022) samples with ``D_w = D_u + w (D_c − D_u)``, the
unconditional prediction moved ``w`` times its distance towards the class-conditional one (``w =
0``: unconditional, ``w = 1``: conditional, ``w > 1``: guided). With the analytic denoisers both
terms are exact: for the empirical denoiser ``D_c`` is the softmax restricted to the class's
training rows (:class:`~diffrepro.denoisers.EmpiricalDenoiser` with ``labels``), for the Gaussian
model it is the Wiener filter of the class mean and covariance (:class:`ClassConditionalDenoiser`
of per-class :class:`~diffrepro.denoisers.GaussianDenoiser`).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
import torch

from .. import samplers
from ..data import Dataset, decode
from .base import Denoiser, _class_indices
from .empirical import EmpiricalDenoiser
from .gaussian import GaussianDenoiser

__all__ = ["ClassConditionalDenoiser", "GuidedDenoiser", "guidance_commitment", "MAX_GUIDANCE", "check_guidance"]

# Largest |w| accepted. The guided prediction of images in [-1, 1] lies within 1 + 2|w| of 0, so
# beyond 1e6 it is a million times outside the image range (no sampler result is an image
# then), and near 1e308 it overflows to inf and the next denoiser call sees a NaN query.
MAX_GUIDANCE = 1e6


def check_guidance(guidance) -> float:
    """``guidance`` as a float: a real number with ``|w| <= MAX_GUIDANCE``."""
    if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real):
        raise TypeError(f"guidance must be a real number, got {guidance!r} ({type(guidance).__name__})")
    w = float(guidance)
    if not abs(w) <= MAX_GUIDANCE:
        raise ValueError(f"guidance must be a finite number in [-{MAX_GUIDANCE:g}, {MAX_GUIDANCE:g}], "
                         f"got {w:g}")
    return w


def _split(train, labels):
    """``(images, int labels)`` from a Dataset or an array and its labels (labels required)."""
    if isinstance(train, Dataset):
        labels = train.labels if labels is None else labels
        train = train.images
    if labels is None:
        raise ValueError("labels are required: pass labels=... or a Dataset with labels")
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if labels.shape != (len(train),) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise ValueError(f"labels must be {len(train)} non-negative integers, got {labels.dtype} "
                         f"{labels.shape}")
    return train, labels


class ClassConditionalDenoiser(Denoiser):
    """One denoiser per class: ``D(x; σ, c) = D_c(x; σ)``, e.g. each class's Gaussian model.

    Args:
        per_class: denoisers of classes ``0 .. K−1``, all with the same image shape; None for a
            class without a model (asking for it raises).
    """

    def __init__(self, per_class: Sequence[Denoiser | None]):
        self.per_class = list(per_class)
        models = [m for m in self.per_class if m is not None]
        if not models:
            raise ValueError("per_class must hold at least one denoiser")
        first = models[0]
        if any((m.img_channels, m.img_resolution) != (first.img_channels, first.img_resolution)
               for m in models):
            raise ValueError("per_class denoisers must share one image shape")
        self.img_channels, self.img_resolution = first.img_channels, first.img_resolution
        self.label_dim = len(self.per_class)
        self.device = torch.device(getattr(first, "device", "cpu"))
        self.sigma_min = max(m.sigma_min for m in models)
        self.sigma_max = min(m.sigma_max for m in models)

    @classmethod
    def gaussian(cls, train, labels=None, *, rank: int | None = None, device="cpu",
                 label_dim: int | None = None) -> "ClassConditionalDenoiser":
        """The Gaussian (Wiener) denoiser of each class's mean and covariance.

        Args:
            train: uint8 ``[N, C, H, W]`` or floats in [-1, 1], or a labelled Dataset.
            labels: int ``[N]`` (default: the Dataset's).
            rank: keep each class's top ``rank`` directions (None: all).
            device: where the statistics live.
            label_dim: number of classes (default ``max(labels) + 1``; empty classes get None).
        """
        train, labels = _split(train, labels)
        k = int(label_dim if label_dim is not None else labels.max() + 1)
        return cls([GaussianDenoiser.from_data(train[np.flatnonzero(labels == c)], rank=rank, device=device)
                    if (labels == c).any() else None for c in range(k)])

    def _groups(self, x, class_labels):
        classes = _class_indices(class_labels, x.shape[0], self.label_dim, "cpu")
        if classes is None:
            raise ValueError("class_labels are required: this denoiser has one model per class")
        for k in torch.unique(classes).tolist():
            if self.per_class[k] is None:
                raise ValueError(f"class_labels ask for class {k}, which has no model")
            yield torch.nonzero(classes == k).reshape(-1).to(x.device), self.per_class[k]

    def _x0(self, x, sigma, s, class_labels):
        out = torch.empty_like(x)
        for sel, model in self._groups(x, class_labels):
            out[sel] = model._x0(x[sel], sigma[sel], None if s is None else s[sel], None)
        return out

    def _jvp(self, x, sigma, v, class_labels):
        out = torch.empty_like(x)
        for sel, model in self._groups(x, class_labels):
            out[sel] = model._jvp(x[sel], sigma[sel], v[sel], None)
        return out

    def _vjp(self, x, sigma, v, class_labels):
        out = torch.empty_like(x)
        for sel, model in self._groups(x, class_labels):
            out[sel] = model._vjp(x[sel], sigma[sel], v[sel], None)
        return out


class GuidedDenoiser(Denoiser):
    """Classifier-free guidance ``D_w(x;σ,c) = D_u(x;σ) + w (D_c(x;σ,c) − D_u(x;σ))``.

    ``w = 0`` returns ``D_u`` and ``w = 1`` returns ``D_c`` bit for bit (the other term is not
    evaluated), so guided runs at these weights are the unconditional and conditional runs.
    The Jacobian products are the same combination of the two denoisers' products.

    Args:
        cond: class-conditional denoiser (``label_dim > 0``), e.g. an
            :class:`~diffrepro.denoisers.EmpiricalDenoiser` with ``labels``.
        uncond: unconditional denoiser (default: ``cond`` called without class labels, which for
            the empirical denoiser is the softmax over all rows).
        guidance: the weight ``w`` (any sign, ``|w| <= MAX_GUIDANCE``).
    """

    def __init__(self, cond: Denoiser, uncond: Denoiser | None = None, guidance: float = 1.0):
        uncond = cond if uncond is None else uncond
        if not getattr(cond, "label_dim", 0):
            raise ValueError("cond must be class-conditional (label_dim > 0)")
        if (cond.img_channels, cond.img_resolution) != (uncond.img_channels, uncond.img_resolution):
            raise ValueError("cond and uncond must share one image shape")
        self.cond, self.uncond, self.guidance = cond, uncond, check_guidance(guidance)
        self.img_channels, self.img_resolution = cond.img_channels, cond.img_resolution
        self.label_dim = cond.label_dim
        self.device = torch.device(getattr(cond, "device", "cpu"))  # where generate() draws the noise
        self.sigma_min = max(cond.sigma_min, uncond.sigma_min)
        self.sigma_max = min(cond.sigma_max, uncond.sigma_max)

    @classmethod
    def empirical(cls, train, labels=None, *, guidance: float = 1.0, dtype=torch.float32,
                  device="cpu") -> "GuidedDenoiser":
        """Guidance between the empirical denoiser of all rows and of the class's rows."""
        train, labels = _split(train, labels)
        return cls(EmpiricalDenoiser(train, labels=labels, dtype=dtype, device=device), guidance=guidance)

    @classmethod
    def gaussian(cls, train, labels=None, *, guidance: float = 1.0, rank: int | None = None,
                 device="cpu") -> "GuidedDenoiser":
        """Guidance between the Gaussian model of all rows and the Gaussian model of the class."""
        train, labels = _split(train, labels)
        return cls(ClassConditionalDenoiser.gaussian(train, labels, rank=rank, device=device),
                   GaussianDenoiser.from_data(train, rank=rank, device=device), guidance=guidance)

    def with_guidance(self, guidance: float) -> "GuidedDenoiser":
        """The same pair of denoisers at another weight (no refit)."""
        return GuidedDenoiser(self.cond, self.uncond, guidance)

    def _combine(self, class_labels, uncond, cond):
        """``u + w (c − u)`` of the two callables' outputs; one of them only at w = 0 or 1."""
        if class_labels is None:
            raise ValueError("class_labels are required: guidance moves towards a class")
        if self.guidance == 0:
            return uncond()
        c = cond()
        if self.guidance == 1:
            return c
        u = uncond()
        return u + self.guidance * (c - u)

    def _x0(self, x, sigma, s, class_labels):
        return self._combine(class_labels, lambda: self.uncond._x0(x, sigma, s, None),
                             lambda: self.cond._x0(x, sigma, s, class_labels))

    def _jvp(self, x, sigma, v, class_labels):
        return self._combine(class_labels, lambda: self.uncond._jvp(x, sigma, v, None),
                             lambda: self.cond._jvp(x, sigma, v, class_labels))

    def _vjp(self, x, sigma, v, class_labels):
        return self._combine(class_labels, lambda: self.uncond._vjp(x, sigma, v, None),
                             lambda: self.cond._vjp(x, sigma, v, class_labels))


def guidance_commitment(denoiser: GuidedDenoiser, latents: torch.Tensor, class_labels, train, *,
                        weights: Sequence[float] | None = None, **sample_kwargs) -> dict:
    """For each seed, the training image the sampler commits to with and without guidance.

    Samples the same latents at each weight (default ``0`` unconditional, ``1`` conditional
    and the denoiser's own ``w``) with :func:`diffrepro.samplers.sample` and finds each sample's
    nearest training image (squared L2 in float64, the lowest index on ties). With the
    empirical denoiser a memorising sampler lands on a training image; guidance can move the
    landing point from an image of another class to one of the requested class.

    Args:
        denoiser: the guided denoiser.
        latents: ``[B, C, H, W]`` unit Gaussian noise.
        class_labels: the class of each seed (integer ``[B]``, a scalar or one-hot rows).
        train: the training images searched (uint8 ``[N, C, H, W]``, floats, or a Dataset).
        weights: the guidance weights to compare.
        **sample_kwargs: passed to :func:`diffrepro.samplers.sample` (``sampler``, ``steps``,
            ``sigma_min``, ``sigma_max``, ``rho``).

    Returns:
        ``{"weights": [W] floats, "samples": float64 [W, B, C, H, W], "nearest": int64 [W, B]
        training indices, "nearest_sqdist": float64 [W, B]}``.
    """
    weights = [0.0, 1.0, denoiser.guidance] if weights is None else [float(w) for w in weights]
    images = train.images if isinstance(train, Dataset) else train
    search = EmpiricalDenoiser(images, dtype=torch.float64, device=getattr(denoiser.cond, "device", "cpu"))
    samples, nearest = [], []
    for w in weights:
        out = samplers.sample(denoiser.with_guidance(w), latents, class_labels, **sample_kwargs)
        samples.append(out)
        nearest.append(search.nearest(out, 1.0)[0].cpu())
    samples, nearest = torch.stack(samples), torch.stack(nearest)
    rows = torch.as_tensor(np.asarray(images[nearest.reshape(-1).numpy()]))
    rows = rows.reshape(*nearest.shape, -1)
    rows = decode(rows) if rows.dtype == torch.uint8 else rows.double()
    sqdist = ((samples.reshape(*nearest.shape, -1).cpu() - rows) ** 2).sum(-1)
    return {"weights": weights, "samples": samples, "nearest": nearest, "nearest_sqdist": sqdist}
