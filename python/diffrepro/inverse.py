# SPDX-License-Identifier: Apache-2.0
"""Linear inverse problems solved with any denoiser (Zhang et al. 2024, §4: reproducibility of
the solutions of inverse problems across models).

A measurement ``y = A x0 + s_y n`` of an image ``x0`` through a linear operator ``A``
(:class:`Inpainting` with box or random masks, :class:`AveragePool` super-resolution,
:class:`GaussianBlur` deblurring) is inverted by sampling the EDM probability-flow ODE with the
posterior denoiser ``E[x0 | x̃, y] = D + σ² ∇_x̃ log p(y | x̃)`` (Tweedie's formula applied to the
posterior), :class:`PosteriorDenoiser`. For the analytic priors it is exact (``"exact"``, the
default): the empirical prior's posterior given ``y`` is again an empirical distribution, the
training rows reweighted by ``exp(−‖y − A y_i‖²/(2 s_y²))``, so its posterior denoiser is one
weighted empirical-denoiser call (:meth:`~diffrepro.denoisers.EmpiricalDenoiser.reweighted`);
the Gaussian prior's posterior is Gaussian (:func:`gaussian_posterior`). Otherwise the likelihood
is either diffusion posterior sampling's
(DPS; Chung et al. 2023, Algorithm 1: ``p(y | x̃) ≈ p(y | x0 = D)`` with the step size
``ζ/‖y − A D‖``) or the Tweedie moment projection (Boys et al. 2023), which uses the exact
posterior covariance ``Cov[x0 | x̃] = σ² ∂D/∂x̃`` and is exact for Gaussian priors. Both need
only :meth:`~diffrepro.denoisers.Denoiser.jvp`/:meth:`~diffrepro.denoisers.Denoiser.vjp`, exact
for the empirical and Gaussian denoisers and autograd for networks.

Plugged into EDM's deterministic sampler this is DPS adapted to the deterministic EDM sampler:
the same seeds and noise give the same solutions, so two models' solutions can be compared seed by
seed (paper 1's experiment; ``diffrepro inverse`` writes the ``generate`` layout). For the
Gaussian model the exact posterior mean of the linear-Gaussian problem is
:func:`gaussian_posterior_mean` (the theoretical solution).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .denoisers.base import Denoiser, _bcast
from .denoisers.empirical import EmpiricalDenoiser
from .denoisers.gaussian import GaussianDenoiser

__all__ = [
    "TASKS",
    "AveragePool",
    "GaussianBlur",
    "Inpainting",
    "LIKELIHOODS",
    "LinearOperator",
    "PosteriorDenoiser",
    "check_problem",
    "conjugate_gradient",
    "exact_log_weights",
    "gaussian_posterior",
    "gaussian_posterior_mean",
    "make_operator",
]

TASKS = ("inpaint-box", "inpaint-random", "sr2", "sr4", "deblur")


class LinearOperator:
    """A linear measurement ``A`` on float ``[B, C, H, W]`` images and its adjoint ``Aᵀ``."""

    name: str = "operator"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def preview(self, y: torch.Tensor) -> torch.Tensor:
        """A measurement shown as an image (missing pixels 0, low resolution upsampled)."""
        return self.adjoint(y)

    def describe(self) -> dict:
        """JSON-able parameters (recorded in manifests)."""
        return {"name": self.name}

    def measurement_shape(self, image_shape: tuple) -> tuple:
        """The shape of ``A x`` for one image of shape ``(C, H, W)``.

        Raises:
            ValueError: the operator does not apply to such images (the operators here name
                their argument, what it got and what the images need).
        """
        try:
            return tuple(self.forward(torch.zeros(1, *image_shape, dtype=torch.float64)).shape[1:])
        except RuntimeError as exc:
            raise ValueError(f"operator {self.name!r} does not apply to images of shape {tuple(image_shape)} "
                             f"({exc})") from exc


class Inpainting(LinearOperator):
    """Keeps the pixels where ``mask`` is 1: ``A x = mask ⊙ x`` (self-adjoint).

    Args:
        mask: ``[H, W]`` or ``[C, H, W]`` of 0/1 (1 = observed).
        name: recorded description.
    """

    def __init__(self, mask, name: str = "inpaint"):
        mask = torch.as_tensor(mask, dtype=torch.float64)
        if mask.ndim not in (2, 3):
            raise ValueError(f"mask must be a [H, W] or [C, H, W] array of 0/1, got shape {tuple(mask.shape)}")
        other = ~((mask == 0) | (mask == 1))
        if bool(other.any()):
            raise ValueError(f"mask must hold only 0 and 1, got {int(other.sum())} other entries (e.g. "
                             f"{float(mask[other][0])!r})")
        self.mask, self.name = mask, name

    @classmethod
    def box(cls, resolution: int, size: int | None = None, *, top: int | None = None,
            left: int | None = None) -> "Inpainting":
        """A missing ``size × size`` box (default: half the side, centred)."""
        size = resolution // 2 if size is None else int(size)
        top = (resolution - size) // 2 if top is None else int(top)
        left = (resolution - size) // 2 if left is None else int(left)
        if not (0 < size and 0 <= top and 0 <= left and top + size <= resolution and left + size <= resolution):
            raise ValueError(f"box size={size}, top={top}, left={left} must lie inside {resolution}x{resolution}")
        mask = torch.ones(resolution, resolution, dtype=torch.float64)
        mask[top:top + size, left:left + size] = 0
        return cls(mask, f"inpaint-box({size} at {top},{left})")

    @classmethod
    def random(cls, resolution: int, missing: float = 0.7, *, seed: int = 0) -> "Inpainting":
        """Each pixel (all channels) missing with probability ``missing`` (numpy seed ``seed``)."""
        if not 0 <= missing < 1:
            raise ValueError(f"missing must be in [0, 1), got {missing!r}")
        mask = np.random.default_rng(seed).random((resolution, resolution)) >= missing
        return cls(mask.astype(np.float64), f"inpaint-random({missing}, seed {seed})")

    def forward(self, x):
        return x * self.mask.to(device=x.device, dtype=x.dtype)

    adjoint = forward

    def describe(self) -> dict:
        return {"name": self.name, "observed_fraction": float(self.mask.mean())}

    def measurement_shape(self, image_shape: tuple) -> tuple:
        c, h, w = image_shape
        if tuple(self.mask.shape) not in ((h, w), (1, h, w), (c, h, w)):
            raise ValueError(f"mask: got shape {tuple(self.mask.shape)}, expected {(h, w)} or {(c, h, w)} for "
                             f"images of shape {tuple(image_shape)}")
        return tuple(image_shape)


class AveragePool(LinearOperator):
    """``factor×`` super-resolution measurement: ``factor × factor`` average pooling.

    The adjoint spreads each low-resolution pixel, divided by ``factor²``, over its block.
    """

    def __init__(self, factor: int):
        if isinstance(factor, bool) or int(factor) != factor or factor < 1:
            raise ValueError(f"factor must be a positive integer, got {factor!r}")
        self.factor, self.name = int(factor), f"sr{int(factor)}"

    def forward(self, x):
        return F.avg_pool2d(x, self.factor)

    def adjoint(self, y):
        return self.preview(y) / self.factor ** 2

    def preview(self, y):
        return y.repeat_interleave(self.factor, -2).repeat_interleave(self.factor, -1)

    def describe(self) -> dict:
        return {"name": self.name, "factor": self.factor}

    def measurement_shape(self, image_shape: tuple) -> tuple:
        c, h, w = image_shape
        if h % self.factor or w % self.factor:
            raise ValueError(f"factor: got {self.factor}, expected a divisor of the image height and width "
                             f"({h} x {w}; average pooling would drop the remainder)")
        return (c, h // self.factor, w // self.factor)


class GaussianBlur(LinearOperator):
    """Gaussian blur of standard deviation ``std`` pixels, per channel, zero padding.

    The kernel is ``size × size`` (default ``2 ⌈3 std⌉ + 1``), normalised to sum 1; odd and
    symmetric, so with zero padding the operator is self-adjoint.
    """

    def __init__(self, std: float = 1.0, size: int | None = None):
        if not (math.isfinite(std) and std > 0):
            raise ValueError(f"std must be a finite float > 0, got {std!r}")
        size = 2 * math.ceil(3 * std) + 1 if size is None else int(size)
        if size < 1 or size % 2 == 0:
            raise ValueError(f"size must be an odd positive integer, got {size!r}")
        r = torch.arange(size, dtype=torch.float64) - size // 2
        g = torch.exp(-0.5 * (r / std) ** 2)
        self.kernel = torch.outer(g, g) / g.sum() ** 2
        self.std, self.size, self.name = float(std), size, f"deblur({std})"

    def forward(self, x):
        c = x.shape[1]
        k = self.kernel.to(device=x.device, dtype=x.dtype).expand(c, 1, self.size, self.size)
        return F.conv2d(x, k, padding=self.size // 2, groups=c)

    adjoint = forward

    def describe(self) -> dict:
        return {"name": self.name, "std": self.std, "size": self.size}

    def measurement_shape(self, image_shape: tuple) -> tuple:
        widest = 2 * max(image_shape[1:]) - 1  # wider taps never reach a pixel: the blur is not this one
        if self.size > widest:
            raise ValueError(f"kernel size: got {self.size} (std {self.std}), expected at most {widest} for images of "
                             f"shape {tuple(image_shape)} (2 x side - 1)")
        return tuple(image_shape)  # zero padding keeps the size


def make_operator(task: str, resolution: int, *, seed: int = 0, missing: float = 0.7,
                  blur_std: float = 1.0) -> LinearOperator:
    """The operator of a named task (:data:`TASKS`): a centred half-side box, random pixels
    (``missing`` fraction, ``seed``), 2×/4× average pooling or a Gaussian blur (``blur_std``)."""
    if task == "inpaint-box":
        return Inpainting.box(resolution)
    if task == "inpaint-random":
        return Inpainting.random(resolution, missing, seed=seed)
    if task in ("sr2", "sr4"):
        factor = int(task[2])
        if resolution % factor:
            raise ValueError(f"task {task!r} needs a resolution divisible by {factor}, got {resolution}")
        return AveragePool(factor)
    if task == "deblur":
        if not (math.isfinite(blur_std) and blur_std > 0 and math.ceil(3 * blur_std) <= resolution - 1):
            raise ValueError(f"blur_std: got {blur_std!r}, expected a std in (0, {(resolution - 1) / 3:.4g}] for "
                             f"{resolution}x{resolution} images (its 3-std kernel must fit in 2 x {resolution} - 1 "
                             "pixels)")
        return GaussianBlur(blur_std)
    raise ValueError(f"task must be one of {', '.join(map(repr, TASKS))}, got {task!r}")


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner products of two ``[B, ...]`` tensors."""
    return (a * b).reshape(a.shape[0], -1).sum(1)


def conjugate_gradient(matvec, b: torch.Tensor, *, iters: int = 50, tol: float = 1e-8) -> torch.Tensor:
    """Solves ``K z = b`` for a symmetric positive semi-definite ``K``, one system per sample.

    Plain conjugate gradients (Hestenes & Stiefel 1952) batched over the leading dimension; a sample
    stops moving once its residual is below ``tol · ‖b‖`` (a consistent singular system converges
    to its minimum-norm solution from z = 0).

    Args:
        matvec: ``z -> K z`` on ``[B, ...]`` tensors.
        b: right-hand sides ``[B, ...]``.
        iters: maximum iterations.
        tol: relative residual tolerance.
    """
    z = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rs = _dot(r, r)
    stop = tol**2 * rs
    for _ in range(iters):
        active = rs > stop
        if not bool(active.any()):
            break
        kp = matvec(p)
        curvature = _dot(p, kp)
        alpha = torch.where(active & (curvature > 0), rs / curvature.clamp_min(torch.finfo(b.dtype).tiny), 0.0)
        z = z + _bcast(alpha, z) * p
        r = r - _bcast(alpha, r) * kp
        rs_new = _dot(r, r)
        p = r + _bcast(torch.where(active, rs_new / rs.clamp_min(torch.finfo(b.dtype).tiny), 0.0), p) * p
        rs = torch.where(active, rs_new, rs)
    return z


def check_problem(operator: LinearOperator, measurement, image_shape: tuple) -> torch.Tensor:
    """The measurement as float64 ``[B, ...]``, checked against the operator and the images.

    Before any sampling (and any file written): the operator applies to images of ``image_shape``
    (:meth:`LinearOperator.measurement_shape`), gives finite values of that shape on a finite image
    and its adjoint maps them back to the image shape; the measurement is finite and has that
    shape, with B = 1 or one measurement per sample. A non-finite measurement would otherwise stop
    the conjugate gradients at once and return the prior's samples, and a one-channel measurement
    of RGB images would broadcast into another problem.

    Raises:
        TypeError: ``operator`` is not a :class:`LinearOperator`.
        ValueError: one line naming the argument, what it got and what was expected.
    """
    if not isinstance(operator, LinearOperator):
        raise TypeError(f"operator must be a LinearOperator, got {type(operator).__name__}")
    image_shape = tuple(int(v) for v in image_shape)
    expected = operator.measurement_shape(image_shape)
    probe = torch.randn(1, *image_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    try:
        forward = operator.forward(probe)
        backward = operator.adjoint(forward)
    except RuntimeError as exc:
        raise ValueError(f"operator {operator.name!r} does not apply to images of shape {image_shape} ({exc})") from exc
    for what, out, want in (("A x", forward, (1, *expected)), ("Aᵀ A x", backward, (1, *image_shape))):
        if tuple(out.shape) != want or not bool(torch.isfinite(out).all()):
            raise ValueError(f"operator {operator.name!r}: {what} of a finite image of shape {(1, *image_shape)} "
                             f"has shape {tuple(out.shape)} with {int((~torch.isfinite(out)).sum())} non-finite "
                             f"entries, expected finite values of shape {want}")
    y = torch.as_tensor(measurement, dtype=torch.float64)
    if y.ndim != len(expected) + 1 or tuple(y.shape[1:]) != expected or y.shape[0] < 1:
        raise ValueError(f"measurement: got shape {tuple(y.shape)}, expected [B, {', '.join(map(str, expected))}] "
                         f"with B >= 1 ({operator.name!r} of images of shape {image_shape})")
    bad = ~torch.isfinite(y)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"measurement: got {int(bad.sum())} non-finite entries (NaN or Inf; the first at index "
                         f"{first}: {float(y[first])}), expected finite values")
    return y


LIKELIHOODS = ("exact", "moment", "dps")
# Residual blocks: training rows pushed through the operator at a time (float64).
_RESIDUAL_ROWS = 1024


def _single_measurement(measurement) -> torch.Tensor:
    """The measurement as float64 ``[1, ...]``: the exact posteriors condition the prior on one
    ``y`` (a batch of identical rows is accepted)."""
    y = torch.as_tensor(measurement, dtype=torch.float64)
    if y.ndim < 2 or not bool((y == y[:1]).all()):
        raise ValueError(f"likelihood 'exact' conditions on one measurement, got shape {tuple(y.shape)} with "
                         "different rows; solve each measurement with its own PosteriorDenoiser")
    return y[:1]


def exact_log_weights(denoiser, operator: LinearOperator, measurement, noise_std: float) -> torch.Tensor:
    """Log-weights of the empirical prior's exact posterior given ``y = A x0 + s_y n``.

    Bayes' rule on ``x0 ~ (1/N) Σ_i δ_{y_i}`` gives the posterior ``Σ_i w_i δ_{y_i}`` with
    ``log w_i = −‖y − A y_i‖²/(2 s_y²)`` (+ a constant), and noising it by σ gives the posterior
    denoiser ``Σ_i softmax_i(−‖x̃ − y_i‖²/(2σ²) + log w_i) y_i``. The residuals are computed in
    float64. For a noise-free measurement (``s_y = 0``) the posterior is the limit ``s_y → 0``:
    uniform over the rows of smallest residual, where "smallest" means within the float64
    rounding of the residuals, ``r_i ≤ r_min + 16 m u (‖y‖² + ‖A y_i‖²)`` (``m`` measured values,
    ``u = 2⁻⁵³``); the others get −inf.

    Args:
        denoiser: an :class:`~diffrepro.denoisers.EmpiricalDenoiser` (its rows, in index order).
        operator: the measurement operator ``A``.
        measurement: ``y`` (``[1, ...]``).
        noise_std: ``s_y ≥ 0``.

    Returns:
        float64 ``[N]`` on the CPU.
    """
    if not (math.isfinite(noise_std) and noise_std >= 0):
        raise ValueError(f"noise_std must be a finite float >= 0, got {noise_std!r}")
    y = _single_measurement(measurement)
    resid, scale = [], []
    for rows in denoiser.float64_rows(_RESIDUAL_ROWS):
        ay = operator.forward(rows.cpu())
        if tuple(ay.shape[1:]) != tuple(y.shape[1:]):
            raise ValueError(f"measurement has shape {tuple(y.shape)}, but the operator maps a training image to "
                             f"{tuple(ay.shape[1:])}")
        resid.append((y - ay).reshape(len(ay), -1).square().sum(1))
        scale.append(ay.reshape(len(ay), -1).square().sum(1))
    r, a2 = torch.cat(resid), torch.cat(scale)
    if noise_std > 0:
        return -r / (2 * noise_std**2)
    tol = 16 * y.numel() * (torch.finfo(torch.float64).eps / 2) * (y.square().sum() + a2)
    return torch.where(r <= r.min() + tol, 0.0, -math.inf)


def gaussian_posterior(gaussian: GaussianDenoiser, operator: LinearOperator, measurement,
                       noise_std: float = 0.0) -> GaussianDenoiser:
    """The Gaussian prior ``N(μ, Σ)`` conditioned on ``y = A x0 + s_y n``, as a Gaussian denoiser.

    The posterior is ``N(μ_y, Σ_y)``, ``μ_y`` from :func:`gaussian_posterior_mean` and
    ``Σ_y = Σ − Σ Aᵀ (A Σ Aᵀ + s_y² I)⁺ A Σ``; its denoiser is the posterior denoiser
    ``E[x0 | x̃, y]`` exactly. With ``Σ = U_r Λ U_rᵀ`` and ``B = A U_r √Λ``,
    ``Σ_y = U_r √Λ (I − (BᵀB + s_y² I)⁺ BᵀB) √Λ U_rᵀ``: an ``r × r`` eigenproblem, the prior's
    discarded directions completing the basis (variance 0). ``s_y = 0`` is the noise-free limit.
    """
    if not (math.isfinite(noise_std) and noise_std >= 0):
        raise ValueError(f"noise_std must be a finite float >= 0, got {noise_std!r}")
    y = _single_measurement(measurement)
    shape = (gaussian.img_channels, gaussian.img_resolution, gaussian.img_resolution)
    r = int((gaussian.lam_eff > 0).sum())  # lam_eff is descending: the first r directions
    ur, sq = gaussian.U[:, :r], gaussian.lam_eff[:r].sqrt()
    b = operator.forward((ur * sq).T.reshape(-1, *shape)).reshape(r, -1)  # Bᵀ, [r, m]
    kappa, v = torch.linalg.eigh(b @ b.T)
    floor = (kappa[-1].clamp_min(0) + noise_std**2) * max(r, 1) * torch.finfo(torch.float64).eps
    # I − (K + s²)⁺ K in K's eigenbasis: s²/(κ + s²), and 1 where κ + s² counts as 0.
    keep = torch.where(kappa + noise_std**2 > floor, noise_std**2 / (kappa.clamp_min(0) + noise_std**2), 1.0)
    m = (v * keep) @ v.T
    nu, w = torch.linalg.eigh(sq[:, None] * m * sq[None, :])
    nu, w = nu.flip(0).clamp_min(0), w.flip(1)
    u_y = torch.cat([ur @ w, gaussian.U[:, r:]], 1)
    lam_y = torch.cat([nu, torch.zeros(gaussian.U.shape[1] - r, dtype=torch.float64, device=nu.device)])
    mu_y = gaussian_posterior_mean(gaussian, operator, y, noise_std).reshape(-1)
    return GaussianDenoiser(mu_y, lam_y, u_y, n=gaussian.n, shape=shape, device=gaussian.device)


class PosteriorDenoiser(Denoiser):
    """The posterior denoiser ``E[x0 | x̃, y] = D + σ² ∇_x̃ log p(y | x̃)`` of a linear inverse problem.

    * ``"exact"`` (the default for the analytic priors): the exact posterior denoiser. Empirical
      prior: the training rows reweighted by ``log w_i = −‖y − A y_i‖²/(2 s_y²)``
      (:func:`exact_log_weights`; the noise-free limit for ``s_y = 0``), one weighted
      empirical-denoiser call per evaluation. Gaussian prior: the denoiser of the Gaussian
      posterior (:func:`gaussian_posterior`). Needs one measurement.

    For other priors (networks) ``p(y | x̃)`` is not available in closed form; two approximations,
    both built on ``J = ∂D/∂x̃`` (symmetric for the analytic denoisers, ``Cov[x0 | x̃] = σ² J``):

    * ``"dps"`` (diffusion posterior sampling; Chung et al. 2023): ``p(y | x̃) ≈ p(y | x0 = D)`` with
      DPS's step size ``ζ/‖r‖`` in place of ``1/s_y²``, ``r = y − A D``:
      ``D_y = D + ζ σ² Jᵀ Aᵀ r / ‖r‖``. In an Euler step ``σ → σ'`` this moves the state by DPS's
      gradient step ``ζ'_i ∇‖r‖²`` with ``ζ'_i = ζ σ (σ − σ')/2``.
    * ``"moment"`` (Tweedie moment projection; Boys et al. 2023): ``p(y | x̃) ≈
      N(A D, A C Aᵀ + s_y² I)`` with ``C = σ² J``, so ``D_y = D + C Aᵀ (A C Aᵀ + s_y² I)⁻¹ r``,
      solved by conjugate gradients (one ``jvp`` and one ``vjp`` per iteration). For a Gaussian
      prior this is exactly ``E[x0 | x̃, y]``; with the empirical denoiser it conditions the
      softmax weights, so a noiseless measurement of a training image is solved by that image.

    Any EDM sampler run with it is a deterministic posterior sampler: the same seeds and noise give
    the same solutions, so two models' solutions can be compared seed by seed. ``zeta = 0``
    (``"dps"``) returns the prior denoiser's output.

    Args:
        denoiser: the prior's denoiser (its ``jvp``/``vjp`` are used).
        operator: the measurement operator ``A``.
        measurement: ``y`` (``[1, ...]`` or ``[B, ...]``, as ``operator.forward`` returns), finite;
            checked against the operator and the images by :func:`check_problem` here, before
            any sampling.
        likelihood: ``"exact"``, ``"moment"`` or ``"dps"`` (None: ``"exact"`` for the empirical
            and Gaussian priors, ``"moment"`` otherwise).
        zeta: DPS step size ``ζ`` (≥ 0; ``"dps"`` only).
        noise_std: measurement noise ``s_y`` of the likelihood (``"exact"``: 0 is the noise-free
            limit; ``"moment"``: > 0 recommended).
        cg_iters: conjugate-gradient iterations per evaluation (``"moment"``).
        cg_tol: relative residual tolerance of the conjugate gradients.
    """

    def __init__(self, denoiser: Denoiser, operator: LinearOperator, measurement: torch.Tensor, *,
                 likelihood: str | None = None, zeta: float = 1.0, noise_std: float = 0.01, cg_iters: int = 50,
                 cg_tol: float = 1e-6):
        if not isinstance(denoiser, Denoiser):
            raise TypeError(f"denoiser must be a Denoiser, got {type(denoiser).__name__}")
        if likelihood is None:
            analytic = isinstance(denoiser, (EmpiricalDenoiser, GaussianDenoiser))
            likelihood = "exact" if analytic else "moment"

        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {', '.join(map(repr, LIKELIHOODS))}, got {likelihood!r}")
        for name, value in (("zeta", zeta), ("noise_std", noise_std), ("cg_tol", cg_tol)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
        if isinstance(cg_iters, bool) or int(cg_iters) != cg_iters or cg_iters < 1:
            raise ValueError(f"cg_iters must be a positive integer, got {cg_iters!r}")
        self.base, self.operator, self.likelihood = denoiser, operator, likelihood
        self.zeta, self.noise_std, self.cg_iters, self.cg_tol = float(zeta), float(noise_std), int(cg_iters), cg_tol
        shape = (denoiser.img_channels, denoiser.img_resolution, denoiser.img_resolution)
        self.measurement = check_problem(operator, measurement, shape)
        for name in ("img_channels", "img_resolution", "label_dim", "sigma_min", "sigma_max"):
            setattr(self, name, getattr(denoiser, name))
        self.round_sigma = denoiser.round_sigma
        self.device = torch.device(getattr(denoiser, "device", "cpu"))
        self._exact = None
        if likelihood == "exact":
            if isinstance(denoiser, GaussianDenoiser):
                self._exact = gaussian_posterior(denoiser, operator, self.measurement, self.noise_std)
            elif isinstance(denoiser, EmpiricalDenoiser):
                self._exact = denoiser.reweighted(exact_log_weights(denoiser, operator, self.measurement,
                                                                    self.noise_std))
            else:
                raise ValueError(f"likelihood 'exact' needs an EmpiricalDenoiser or GaussianDenoiser prior, got "
                                 f"{type(denoiser).__name__}; use 'moment' or 'dps'")

    def describe(self) -> dict:
        """JSON-able settings (recorded in manifests)."""
        out = {"likelihood": self.likelihood, "operator": self.operator.describe()}
        if self.likelihood == "dps":
            return {**out, "zeta": self.zeta}
        if self.likelihood == "exact":
            return {**out, "noise_std": self.noise_std}
        return {**out, "noise_std": self.noise_std, "cg_iters": self.cg_iters, "cg_tol": self.cg_tol}

    def _x0(self, x, sigma, s, class_labels):
        if self._exact is not None:
            return self._exact._x0(x, sigma, s, class_labels)
        den = self.base._x0(x, sigma, s, class_labels)
        if self.likelihood == "dps" and self.zeta == 0:
            return den
        xt = x if s is None else x / _bcast(s, x)
        if self.measurement.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"measurement: holds {self.measurement.shape[0]} measurements, expected 1 or one per "
                             f"sample of the batch ({x.shape[0]})")
        r = self.measurement.to(device=x.device, dtype=x.dtype) - self.operator.forward(den)
        r = r.expand(x.shape[0], *r.shape[1:])
        op, var = self.operator, _bcast(sigma**2, x)
        if self.likelihood == "dps":
            norm = r.reshape(r.shape[0], -1).norm(dim=1).clamp_min(torch.finfo(x.dtype).tiny)
            return den + var * _bcast(self.zeta / norm, x) * self.base.vjp(xt, sigma, op.adjoint(r), class_labels)

        def kernel(z):  # (A C Aᵀ + s_y² I) z with C = σ² J
            return op.forward(var * self.base.jvp(xt, sigma, op.adjoint(z), class_labels)) + self.noise_std**2 * z

        z = conjugate_gradient(kernel, r, iters=self.cg_iters, tol=self.cg_tol)
        return den + var * self.base.vjp(xt, sigma, op.adjoint(z), class_labels)


def gaussian_posterior_mean(gaussian: GaussianDenoiser, operator: LinearOperator, measurement: torch.Tensor,
                            noise_std: float = 0.0) -> torch.Tensor:
    """Exact posterior mean of ``x0 ~ N(μ, Σ)`` given ``y = A x0 + s_y n`` (the theoretical solution).

    ``E[x0 | y] = μ + Σ Aᵀ (A Σ Aᵀ + s_y² I)⁺ (y − A μ)``. With ``Σ = R Rᵀ``, ``R = U_r √Λ_r``
    over the r directions of nonzero variance and ``B = A R`` (r operator applications), the
    push-through identity ``Bᵀ (B Bᵀ + s² I)⁺ = (Bᵀ B + s² I)⁺ Bᵀ`` (also at s = 0, where both are
    ``B⁺``) leaves an ``r × r`` problem, pseudo-inverted through its eigendecomposition
    (eigenvalues below ``r · eps · λ_max`` count as 0), so noiseless problems work too.

    Args:
        gaussian: the prior (its rank-truncated covariance when it has a rank).
        operator: the measurement operator.
        measurement: ``y`` ``[B, ...]`` (as ``operator.forward`` returns).
        noise_std: measurement noise ``s_y`` (≥ 0).

    Returns:
        float64 ``[B, C, H, W]``.
    """
    if not (math.isfinite(noise_std) and noise_std >= 0):
        raise ValueError(f"noise_std must be a finite float >= 0, got {noise_std!r}")
    shape = (gaussian.img_channels, gaussian.img_resolution, gaussian.img_resolution)
    y = check_problem(operator, measurement, shape).to(gaussian.device)
    keep = gaussian.lam_eff > 0
    root = gaussian.U[:, keep] * gaussian.lam_eff[keep].sqrt()  # Σ = root rootᵀ, [d, r]
    b = operator.forward(root.T.reshape(-1, *shape)).reshape(root.shape[1], -1)  # Bᵀ, [r, m]
    resid = y.reshape(y.shape[0], -1) - operator.forward(gaussian.mu.reshape(1, *shape)).reshape(1, -1)
    lam, vec = torch.linalg.eigh(b @ b.T + noise_std**2 * torch.eye(len(b), dtype=torch.float64,
                                                                    device=gaussian.device))
    ok = lam > lam[-1].clamp_min(0) * len(lam) * torch.finfo(torch.float64).eps
    z = (((resid @ b.T) @ vec[:, ok]) / lam[ok]) @ vec[:, ok].T  # (BᵀB + s² I)⁺ Bᵀ r, [B, r]
    return (gaussian.mu + z @ root.T).reshape(-1, *shape)
