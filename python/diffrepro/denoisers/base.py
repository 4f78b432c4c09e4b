# SPDX-License-Identifier: Apache-2.0
"""The denoiser interface shared by every family: EDM-network attributes, the scaled-variable
methods (``x0``, ``eps``, ``score``), the flow-matching ``velocity``, the Jacobian products
``jvp``/``vjp`` and input helpers."""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from ..data import Dataset

# σ standing in for ∞ at the flow time t = 1 (see Denoiser.velocity).
_SIGMA_INFINITY = 1e30


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


def _training_images(train, labels, dtype: torch.dtype):
    """``(images, labels)`` of a training set given as a :class:`~diffrepro.data.Dataset` (its
    labels unless ``labels`` is given) or a ``[N, C, H, W]`` array/tensor of N >= 1 square images,
    for a denoiser computing in ``dtype`` (float32 or float64); one clear error otherwise."""
    if isinstance(train, Dataset):
        labels = train.labels if labels is None else labels
        train = train.images
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if not isinstance(train, (np.ndarray, torch.Tensor)) or train.ndim != 4:
        raise ValueError(f"train must be a [N, C, H, W] array or tensor, got "
                         f"{type(train).__name__} {tuple(getattr(train, 'shape', ()))}")
    n, _, h, w = train.shape
    if n < 1 or h != w:
        raise ValueError(f"train must have N >= 1 square images, got shape {tuple(train.shape)}")
    return train, labels


def wiener_gain(lam: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-direction gain of the Gaussian (Wiener) denoiser, ``λ / (λ + σ²)`` (P2 eq. 6).

    Args:
        lam: ``[r]`` eigenvalues (≥ 0).
        sigma: ``[B]`` noise levels (or a 0-d tensor).

    Returns:
        ``[B, r]`` gains (``[r]`` for 0-d sigma).
    """
    return lam / (lam + sigma.unsqueeze(-1) ** 2)


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

    def jvp(self, x: torch.Tensor, sigma, v: torch.Tensor, class_labels=None) -> torch.Tensor:
        """Jacobian–vector product ``(∂D(x;σ)/∂x) v`` of the unscaled-variable prediction.

        The inverse-problem solvers (Chung et al. 2023, DPS) need these products of the
        denoiser. Analytic denoisers override :meth:`_jvp` with exact formulas; the default
        differentiates :meth:`_x0` with autograd (network adapters), double-backward style.

        Args:
            x: float ``[B, C, H, W]``.
            sigma: scalar or ``[B]`` noise levels (> 0).
            v: tangent vectors, x's shape.
            class_labels: as in :meth:`__call__`.

        Returns:
            ``[B, C, H, W]`` in x's dtype and device.
        """
        sig = self._check_product(x, sigma, v)
        return self._jvp(x, sig, v, class_labels)

    def vjp(self, x: torch.Tensor, sigma, v: torch.Tensor, class_labels=None) -> torch.Tensor:
        """Vector–Jacobian product ``vᵀ ∂D(x;σ)/∂x`` (returned as ``[B, C, H, W]``); arguments
        as in :meth:`jvp`. For the empirical and Gaussian denoisers the Jacobian is symmetric
        (``Cov[x0 | x]/σ²``) and this equals :meth:`jvp`."""
        sig = self._check_product(x, sigma, v)
        return self._vjp(x, sig, v, class_labels)

    def velocity(self, x: torch.Tensor, t, class_labels=None) -> torch.Tensor:
        """Exact flow-matching velocity of this denoiser's data distribution.

        For the linear interpolant ``x_t = (1 − t) x0 + t ε`` (rectified flow; Liu et al. 2023,
        Lipman et al. 2023) the noise family is ``s(t) = 1 − t``, ``σ(t) = t/(1 − t)``
        (:class:`diffrepro.schedules.RectifiedFlow`), so ``E[x0 | x_t] = D(x_t/(1 − t); σ(t))``
        and the velocity ``E[ε − x0 | x_t]`` is ``v = (x_t − D)/t``. At ``t = 1`` (σ = ∞) ``D``
        is evaluated at σ = 1e30, where the analytic denoisers are at their σ → ∞ limit
        ``E[x0]`` to the last bit (the empirical softmax logits differ by < 1e-50 and round to
        uniform weights; the Wiener gains are < 1e-55).

        Args:
            x: float ``[B, C, H, W]`` state ``x_t``.
            t: scalar or ``[B]`` times in ``(0, 1]``.
            class_labels: as in :meth:`__call__`.

        Returns:
            ``[B, C, H, W]`` in x's dtype and device.
        """
        self._check_x(x)
        t = _per_sample(t, x.shape[0], x.device, "t")
        if bool((t > 1).any()):
            raise ValueError(f"t must be in (0, 1], got {t.tolist()[:8]}")
        end = t == 1
        s = torch.where(end, torch.ones_like(t), 1 - t)
        sigma = torch.where(end, torch.full_like(t, _SIGMA_INFINITY), t / s)
        return (x - self._x0(x, sigma, s, class_labels)) / _bcast(t, x)

    def _check_product(self, x, sigma, v) -> torch.Tensor:
        self._check_x(x)
        if not isinstance(v, torch.Tensor) or v.shape != x.shape:
            raise ValueError(f"v must be a tensor of x's shape {tuple(x.shape)}, got "
                             f"{type(v).__name__} {tuple(getattr(v, 'shape', ()))}")
        return _per_sample(sigma, x.shape[0], x.device, "sigma")

    def _jvp(self, x, sigma, v, class_labels):
        """Autograd fallback: ``torch.autograd.functional.jvp`` of :meth:`_x0`."""
        v = v.to(dtype=x.dtype, device=x.device)
        return torch.autograd.functional.jvp(lambda z: self._x0(z, sigma, None, class_labels),
                                             x.detach(), v)[1]

    def _vjp(self, x, sigma, v, class_labels):
        """Autograd fallback: ``torch.autograd.functional.vjp`` of :meth:`_x0`."""
        v = v.to(dtype=x.dtype, device=x.device)
        return torch.autograd.functional.vjp(lambda z: self._x0(z, sigma, None, class_labels),
                                             x.detach(), v)[1]

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


class TimedDenoiser:
    """Wraps a denoiser and adds up the wall time spent inside its calls.

    Attribute reads (``sigma_min``, ``round_sigma``, ...) go to the wrapped denoiser, so the
    samplers see the same network support. On CUDA the device is synchronised around each call.

    Attributes:
        inner: the wrapped denoiser.
        seconds: total seconds inside ``__call__``.
        calls: number of calls.
        rows: number of query rows passed in total.
    """

    def __init__(self, inner):
        self.inner = inner
        self.seconds, self.calls, self.rows = 0.0, 0, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, x, sigma, *args):
        return self._timed(self.inner, x, sigma, *args)

    def velocity(self, x, t, *args):
        """The wrapped denoiser's flow velocity (:meth:`Denoiser.velocity`), timed like a call."""
        return self._timed(self.inner.velocity, x, t, *args)

    def _timed(self, fn, x, *args):
        cuda = x.is_cuda
        if cuda:
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        out = fn(x, *args)
        if cuda:
            torch.cuda.synchronize(x.device)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        self.rows += x.shape[0]
        return out
