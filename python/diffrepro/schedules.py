# SPDX-License-Identifier: Apache-2.0
"""Noise families ``s(t), sigma(t)`` and time discretisations (Karras et al. 2022, Table 1 and eq. 5;
Lu et al. 2022 for DPM-Solver's grids).

Conventions (Karras et al. 2022, §4): the perturbation kernel is ``x = s(t) * (y + sigma(t) * eps)``, so
``sigma`` is the EDM noise level of the *unscaled* variable ``x / s``. Every family exposes
``s``, ``s_deriv``, ``sigma``, ``sigma_deriv`` and ``sigma_inv``; they accept a Python float
or a tensor and return float64 tensors. All grids are float64.

Formulas follow Karras et al. 2022 (EDM, Algorithm 2 and Table 1, and its public
``generate.py`` ablation sampler), Song et al. 2021 (score_sde VP/VE/sub-VP), Ho et al. 2020
(discrete DDPM), Nichol & Dhariwal 2021 (iDDPM ``u_j`` recursion) and Lu et al. 2022
(DPM-Solver time grids and its piecewise-linear ``log alpha`` for discrete models).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = [
    "EDM",
    "VE",
    "VP",
    "DiscreteDDPM",
    "EDMAblationFamily",
    "IDDPMRounding",
    "NoiseFamily",
    "RectifiedFlow",
    "SubVP",
    "clamp_sigma_range",
    "default_sigma_range",
    "discretize",
    "dpm_solver_timesteps",
    "edm_sigmas",
    "flow_times",
    "shift_times",
    "get_round_sigma",
    "iddpm_sigmas",
    "iddpm_u",
    "network_sigma_range",
    "round_sigma_identity",
    "ve_sigmas",
    "vp_sigmas",
]

_F64 = torch.float64


def _f64(t) -> torch.Tensor:
    """Converts a float or tensor to a float64 tensor (no copy when already float64)."""
    return torch.as_tensor(t, dtype=_F64)


def _check_positive(name: str, value, *, allow_inf: bool = False) -> float:
    value = float(value)
    if not (value > 0) or (math.isinf(value) and not allow_inf) or math.isnan(value):
        raise ValueError(f"{name} must be a finite float > 0, got {value!r}")
    return value


def _check_num_steps(num_steps, minimum: int = 2) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < minimum:
        raise ValueError(f"num_steps must be an int >= {minimum}, got {num_steps!r}")
    return num_steps


def _check_range(sigma_min, sigma_max) -> tuple[float, float]:
    sigma_min = _check_positive("sigma_min", sigma_min)
    sigma_max = _check_positive("sigma_max", sigma_max)
    if not sigma_min < sigma_max:
        raise ValueError(f"sigma_min must be < sigma_max, got sigma_min={sigma_min!r}, sigma_max={sigma_max!r}")
    return sigma_min, sigma_max


# --------------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------------


class NoiseFamily:
    """Interface of a noise family ``x_t = s(t) (y + sigma(t) eps)``.

    Subclasses are frozen dataclasses. ``t_min``/``t_max`` give the family's default
    integration range (used by DPM-Solver when ``t_end``/``t_start`` are not given).
    ``lambda_(t) = -log sigma(t)`` is DPM-Solver's half log-SNR.
    """

    name: str = "family"
    t_min: float = 0.0
    t_max: float = 1.0

    def s(self, t) -> torch.Tensor:
        raise NotImplementedError

    def s_deriv(self, t) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t) -> torch.Tensor:
        raise NotImplementedError

    def sigma_deriv(self, t) -> torch.Tensor:
        raise NotImplementedError

    def sigma_inv(self, sigma) -> torch.Tensor:
        raise NotImplementedError

    def lambda_(self, t) -> torch.Tensor:
        """Half log-SNR ``log(s / (s sigma)) = -log sigma(t)``."""
        return -torch.log(self.sigma(t))

    def lambda_inv(self, lam) -> torch.Tensor:
        """Inverse of :meth:`lambda_`: the time ``t`` with ``-log sigma(t) = lam``."""
        return self.sigma_inv(torch.exp(-_f64(lam)))


@dataclass(frozen=True)
class EDM(NoiseFamily):
    """EDM family: ``s = 1``, ``sigma = t`` (Karras et al. 2022, Table 1), default range ``[0.002, 80]``."""

    t_min: float = 0.002
    t_max: float = 80.0
    name: str = field(default="edm", init=False)

    def s(self, t):
        return torch.ones_like(_f64(t))

    def s_deriv(self, t):
        return torch.zeros_like(_f64(t))

    def sigma(self, t):
        return _f64(t)

    def sigma_deriv(self, t):
        return torch.ones_like(_f64(t))

    def sigma_inv(self, sigma):
        return _f64(sigma)


@dataclass(frozen=True)
class VP(NoiseFamily):
    """Continuous VP family (score_sde DDPM++; Karras et al. 2022, Table 1).

    ``s = alpha_t = exp(-t^2 beta_d / 4 - t beta_0 / 2)`` and
    ``sigma = sqrt(exp(t^2 beta_d / 2 + beta_0 t) - 1)`` with ``beta_d = beta_1 - beta_0``.
    This is also EDM's ``--schedule=vp --scaling=vp`` (``s = 1/sqrt(1 + sigma^2)``).

    Args:
        beta_0: ``beta_min`` (0.1).
        beta_1: ``beta_max`` (20).
        t_min: default end time (DPM-Solver ``1/N_train`` = 1e-3).
        t_max: default start time (1).
    """

    beta_0: float = 0.1
    beta_1: float = 20.0
    t_min: float = 1e-3
    t_max: float = 1.0
    name: str = field(default="vp", init=False)

    @property
    def beta_d(self) -> float:
        return self.beta_1 - self.beta_0

    @classmethod
    def from_sigma_range(cls, sigma_min: float, sigma_max: float, epsilon_s: float = 1e-3) -> VP:
        """Betas re-derived from a sigma range as EDM's ablation sampler does.

        ``sigma(epsilon_s) = sigma_min`` and ``sigma(1) = sigma_max``; the EDM defaults give
        ``beta_d = 19.9`` and ``beta_0 = 0.1`` back.
        """
        sigma_min, sigma_max = _check_range(sigma_min, sigma_max)
        epsilon_s = _check_positive("epsilon_s", epsilon_s)
        beta_d = 2 * (math.log(sigma_min**2 + 1) / epsilon_s - math.log(sigma_max**2 + 1)) / (epsilon_s - 1)
        beta_0 = math.log(sigma_max**2 + 1) - 0.5 * beta_d
        return cls(beta_0=beta_0, beta_1=beta_0 + beta_d)

    def log_alpha(self, t) -> torch.Tensor:
        t = _f64(t)
        return -0.25 * t**2 * self.beta_d - 0.5 * t * self.beta_0

    def s(self, t):
        return torch.exp(self.log_alpha(t))

    def s_deriv(self, t):
        t = _f64(t)
        return self.s(t) * (-0.5 * self.beta_d * t - 0.5 * self.beta_0)

    def sigma(self, t):
        t = _f64(t)
        return torch.sqrt(torch.expm1(0.5 * self.beta_d * t**2 + self.beta_0 * t))

    def sigma_deriv(self, t):
        t = _f64(t)
        sig = self.sigma(t)
        return 0.5 * (self.beta_0 + self.beta_d * t) * (sig + 1 / sig)

    def sigma_inv(self, sigma):
        sigma = _f64(sigma)
        return (torch.sqrt(self.beta_0**2 + 2 * self.beta_d * torch.log1p(sigma**2)) - self.beta_0) / self.beta_d


@dataclass(frozen=True)
class VE(NoiseFamily):
    """VE family (SMLD / NCSN++): ``s = 1``, ``sigma = sigma_min (sigma_max/sigma_min)^t``.

    Args:
        sigma_min: 0.01 for score_sde CIFAR-10.
        sigma_max: 50 for score_sde CIFAR-10.
        t_min: default end time (score_sde uses 1e-5).
        t_max: default start time (1).
    """

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    t_min: float = 1e-5
    t_max: float = 1.0
    name: str = field(default="ve", init=False)

    def __post_init__(self):
        _check_range(self.sigma_min, self.sigma_max)

    @property
    def _log_ratio(self) -> float:
        return math.log(self.sigma_max / self.sigma_min)

    def s(self, t):
        return torch.ones_like(_f64(t))

    def s_deriv(self, t):
        return torch.zeros_like(_f64(t))

    def sigma(self, t):
        return self.sigma_min * torch.exp(_f64(t) * self._log_ratio)

    def sigma_deriv(self, t):
        return self.sigma(t) * self._log_ratio

    def sigma_inv(self, sigma):
        return torch.log(_f64(sigma) / self.sigma_min) / self._log_ratio


@dataclass(frozen=True)
class SubVP(NoiseFamily):
    """sub-VP family: ``s = alpha_t`` (as VP) and ``sigma = (1 - alpha_t^2) / alpha_t``.

    From ``x_t = alpha_t x_0 + (1 - alpha_t^2) z`` (Song et al. 2021, sub-VP SDE), so ``s sigma = 1 - alpha_t^2``.
    """

    beta_0: float = 0.1
    beta_1: float = 20.0
    t_min: float = 1e-3
    t_max: float = 1.0
    name: str = field(default="subvp", init=False)

    @property
    def beta_d(self) -> float:
        return self.beta_1 - self.beta_0

    def _dlog_alpha(self, t):
        return -0.5 * self.beta_d * _f64(t) - 0.5 * self.beta_0

    def s(self, t):
        t = _f64(t)
        return torch.exp(-0.25 * t**2 * self.beta_d - 0.5 * t * self.beta_0)

    def s_deriv(self, t):
        return self.s(t) * self._dlog_alpha(t)

    def sigma(self, t):
        a = self.s(t)
        return (1 - a) * (1 + a) / a

    def sigma_deriv(self, t):
        # sigma = 1/a - a  =>  sigma' = -a'(1/a^2 + 1)
        a = self.s(t)
        return -self.s_deriv(t) * (1 / a**2 + 1)

    def sigma_inv(self, sigma):
        sigma = _f64(sigma)
        # alpha solves alpha^2 + sigma alpha - 1 = 0 (positive root, written without cancellation).
        alpha = 2 / (sigma + torch.sqrt(sigma**2 + 4))
        log_alpha = torch.log(alpha)
        return (torch.sqrt(self.beta_0**2 - 4 * self.beta_d * log_alpha) - self.beta_0) / self.beta_d


@dataclass(frozen=True)
class RectifiedFlow(NoiseFamily):
    """Linear interpolant ``x_t = (1 − t) x0 + t ε`` of flow matching / rectified flow (Lipman et
    al. 2023; Liu et al. 2023; Stable Diffusion 3 and Flux).

    In EDM form ``s = 1 − t`` and ``σ = t/(1 − t)`` (so ``t = σ/(1 + σ)``): a flow trajectory
    ``x_t`` is the EDM trajectory ``x̃ = x_t/(1 − t)`` at ``σ(t)``. ``t = 1`` is pure noise
    (``σ = ∞``); the default range ``[0.002/1.002, 80/81]`` is EDM's ``[0.002, 80]``.
    """

    t_min: float = 0.002 / 1.002
    t_max: float = 80.0 / 81.0
    name: str = field(default="flow", init=False)

    def s(self, t):
        return 1 - _f64(t)

    def s_deriv(self, t):
        return -torch.ones_like(_f64(t))

    def sigma(self, t):
        t = _f64(t)
        return t / (1 - t)

    def sigma_deriv(self, t):
        return (1 - _f64(t)) ** -2

    def sigma_inv(self, sigma):
        sigma = _f64(sigma)
        return sigma / (1 + sigma)


def shift_times(t, shift: float) -> torch.Tensor:
    """Timestep shift of Stable Diffusion 3 (Esser et al. 2024, eq. 23) and Flux:
    ``t' = s t / (1 + (s − 1) t)``; keeps 0 and 1, and moves the grid towards noise for ``s > 1``
    (Flux's resolution-dependent ``mu`` is ``s = exp(mu)``). float64."""
    shift = _check_positive("shift", shift)
    t = _f64(t)
    return shift * t / (1 + (shift - 1) * t)


def flow_times(
    num_steps: int, shift: float = 1.0, *, grid: str = "uniform", num_train_timesteps: int = 1000
) -> torch.Tensor:
    """Time grid of a flow sampler, from ``t = 1`` (noise) to 0, float64 ``[num_steps + 1]``.

    * ``"uniform"``: ``shift_times(linspace(1, 0, N + 1), shift)`` (rectified flow's Euler grid
      for ``shift = 1``);
    * ``"diffusers"``: the grid of diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps``
      with a static shift: ``shift_times(linspace(1, t_min, N), shift)`` and a final 0, where
      ``t_min = shift_times(1/M, shift)`` is the scheduler's smallest training time (computed in
      float64 here; diffusers rounds to float32).

    Args:
        num_steps: steps N (>= 1).
        shift: timestep shift (1: none; SD3 uses 3).
        grid: ``"uniform"`` or ``"diffusers"``.
        num_train_timesteps: M of the diffusers scheduler.
    """
    num_steps = _check_num_steps(num_steps, minimum=1)
    if grid == "uniform":
        return shift_times(torch.linspace(1, 0, num_steps + 1, dtype=_F64), shift)
    if grid == "diffusers":
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be an int >= 1, got {num_train_timesteps!r}")
        t_min = float(shift_times(1.0 / num_train_timesteps, shift))
        t = shift_times(torch.linspace(1, t_min, num_steps, dtype=_F64), shift)
        return torch.cat([t, t.new_zeros(1)])
    raise ValueError(f"grid must be 'uniform' or 'diffusers', got {grid!r}")


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation with linear extrapolation from the end segments.

    ``xp`` must be increasing. Same behaviour as DPM-Solver's ``interpolate_fn``.
    """
    idx = torch.searchsorted(xp, x.reshape(-1)).clamp(1, xp.numel() - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    out = f0 + (x.reshape(-1) - x0) * (f1 - f0) / (x1 - x0)
    return out.reshape(x.shape)


@dataclass(frozen=True)
class DiscreteDDPM(NoiseFamily):
    """Discrete DDPM (Ho et al. 2020): linear betas, ``M`` steps.

    Index ``n = 0..M-1`` has ``s = sqrt(abar_n)``, ``sigma = sqrt(1/abar_n - 1)``. The
    continuous-time view used by DPM-Solver puts index ``n`` at ``t_n = (n + 1)/M`` and
    interpolates ``log alpha`` piecewise-linearly in ``t``.

    Args:
        beta_start: first beta (1e-4).
        beta_end: last beta (0.02).
        num_timesteps: ``M`` (1000).
    """

    beta_start: float = 1e-4
    beta_end: float = 0.02
    num_timesteps: int = 1000
    name: str = field(default="ddpm", init=False)

    def __post_init__(self):
        if isinstance(self.num_timesteps, bool) or not isinstance(self.num_timesteps, int) or self.num_timesteps < 2:
            raise ValueError(f"num_timesteps must be an int >= 2, got {self.num_timesteps!r}")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(
                f"betas must satisfy 0 < beta_start <= beta_end < 1, got beta_start={self.beta_start!r}, "
                f"beta_end={self.beta_end!r}"
            )

    @property
    def t_min(self) -> float:
        return 1.0 / self.num_timesteps

    @property
    def t_max(self) -> float:
        return 1.0

    @property
    def betas(self) -> torch.Tensor:
        """``[M]`` float64 betas."""
        return torch.linspace(self.beta_start, self.beta_end, self.num_timesteps, dtype=_F64)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """``[M]`` float64 ``abar_n``."""
        return torch.cumprod(1 - self.betas, 0)

    @property
    def sigmas(self) -> torch.Tensor:
        """``[M]`` float64 EDM sigmas ``sqrt(1/abar_n - 1)`` (increasing)."""
        abar = self.alphas_cumprod
        return torch.sqrt((1 - abar) / abar)

    def _grid(self, device=None):
        t_grid = torch.arange(1, self.num_timesteps + 1, dtype=_F64) / self.num_timesteps
        log_alpha = 0.5 * torch.cumsum(torch.log1p(-self.betas), 0)
        return t_grid.to(device), log_alpha.to(device)

    def log_alpha(self, t) -> torch.Tensor:
        t = _f64(t)
        t_grid, log_alpha = self._grid(t.device)
        return _interp(t, t_grid, log_alpha)

    def _dlog_alpha(self, t):
        t = _f64(t)
        t_grid, log_alpha = self._grid(t.device)
        idx = torch.searchsorted(t_grid, t.reshape(-1)).clamp(1, t_grid.numel() - 1)
        slope = (log_alpha[idx] - log_alpha[idx - 1]) / (t_grid[idx] - t_grid[idx - 1])
        return slope.reshape(t.shape)

    def s(self, t):
        return torch.exp(self.log_alpha(t))

    def s_deriv(self, t):
        return self.s(t) * self._dlog_alpha(t)

    def sigma(self, t):
        return torch.sqrt(torch.expm1(-2 * self.log_alpha(t)))

    def sigma_deriv(self, t):
        # sigma^2 = exp(-2 log a) - 1  =>  sigma' = -(sigma^2 + 1) (log a)' / sigma
        sig = self.sigma(t)
        return -(sig**2 + 1) * self._dlog_alpha(t) / sig

    def sigma_inv(self, sigma):
        sigma = _f64(sigma)
        t_grid, log_alpha = self._grid(sigma.device)
        target = -0.5 * torch.log1p(sigma**2)
        return _interp(target, log_alpha.flip(0), t_grid.flip(0))


@dataclass(frozen=True)
class EDMAblationFamily(NoiseFamily):
    """The ``--schedule``/``--scaling`` combinations of EDM's ablation sampler (Karras et al. 2022, Table 1).

    Args:
        schedule: ``"vp"`` (``sigma = sqrt(exp(beta_d t^2/2 + beta_min t) - 1)``),
            ``"ve"`` (``sigma = sqrt(t)``) or ``"linear"`` (``sigma = t``).
        scaling: ``"vp"`` (``s = 1/sqrt(1 + sigma^2)``) or ``"none"`` (``s = 1``).
        vp_beta_d: ``beta_d`` of the vp schedule (19.9).
        vp_beta_min: ``beta_min`` of the vp schedule (0.1).
    """

    schedule: str = "linear"
    scaling: str = "none"
    vp_beta_d: float = 19.9
    vp_beta_min: float = 0.1
    name: str = field(default="edm_ablation", init=False)

    def __post_init__(self):
        if self.schedule not in ("vp", "ve", "linear"):
            raise ValueError(f"schedule must be one of 'vp', 've', 'linear', got {self.schedule!r}")
        if self.scaling not in ("vp", "none"):
            raise ValueError(f"scaling must be one of 'vp', 'none', got {self.scaling!r}")

    def _vp(self) -> VP:
        return VP(beta_0=self.vp_beta_min, beta_1=self.vp_beta_min + self.vp_beta_d)

    def sigma(self, t):
        if self.schedule == "vp":
            return self._vp().sigma(t)
        if self.schedule == "ve":
            return torch.sqrt(_f64(t))
        return _f64(t)

    def sigma_deriv(self, t):
        if self.schedule == "vp":
            return self._vp().sigma_deriv(t)
        if self.schedule == "ve":
            return 0.5 / torch.sqrt(_f64(t))
        return torch.ones_like(_f64(t))

    def sigma_inv(self, sigma):
        if self.schedule == "vp":
            return self._vp().sigma_inv(sigma)
        if self.schedule == "ve":
            return _f64(sigma) ** 2
        return _f64(sigma)

    def s(self, t):
        if self.scaling == "vp":
            return 1 / torch.sqrt(1 + self.sigma(t) ** 2)
        return torch.ones_like(_f64(t))

    def s_deriv(self, t):
        if self.scaling == "vp":
            return -self.sigma(t) * self.sigma_deriv(t) * self.s(t) ** 3
        return torch.zeros_like(_f64(t))


# --------------------------------------------------------------------------------------------
# round_sigma hooks and network support
# --------------------------------------------------------------------------------------------


def round_sigma_identity(sigma):
    """The ``round_sigma`` of EDMPrecond, VPPrecond and VEPrecond: returns ``sigma`` unchanged."""
    return sigma


def iddpm_u(M: int = 1000, C_1: float = 0.001, C_2: float = 0.008) -> torch.Tensor:
    """iDDPM noise levels ``u_0 > u_1 > ... > u_M = 0`` (Nichol & Dhariwal 2021, as EDM discretises
    them), float64 ``[M + 1]``.

    ``u_{j-1} = sqrt((u_j^2 + 1) / max(abar(j-1)/abar(j), C_1) - 1)`` with
    ``abar(j) = sin^2(pi j / (2 M (C_2 + 1)))``. EDM evaluates ``abar`` in float32 (its index
    tensor is an integer tensor); diffrepro uses float64, a relative difference of ~1e-7.
    """
    if isinstance(M, bool) or not isinstance(M, int) or M < 1:
        raise ValueError(f"M must be an int >= 1, got {M!r}")
    return _iddpm_u_cached(M, float(C_1), float(C_2)).clone()


@functools.lru_cache(maxsize=8)
def _iddpm_u_cached(M: int, C_1: float, C_2: float) -> torch.Tensor:
    j = torch.arange(M + 1, dtype=_F64)
    abar = torch.sin(0.5 * math.pi * j / M / (C_2 + 1)) ** 2
    u = torch.zeros(M + 1, dtype=_F64)
    for k in range(M, 0, -1):
        ratio = max(float(abar[k - 1] / abar[k]), C_1)
        u[k - 1] = math.sqrt((float(u[k]) ** 2 + 1) / ratio - 1)
    return u


@dataclass(frozen=True)
class IDDPMRounding:
    """``round_sigma`` of EDM's iDDPMPrecond: snaps sigma to the nearest ``u_j``.

    A network wrapper may subclass it (or copy ``round_sigma``, ``sigma_min`` and
    ``sigma_max``) to get EDM's iDDPM behaviour in the samplers. Attributes
    ``sigma_min = u_{M-1}`` (0.006425) and ``sigma_max = u_0`` (~2.03e4) give the network support.
    Ties go to the lowest index (as ``argmin``).
    """

    M: int = 1000
    C_1: float = 0.001
    C_2: float = 0.008

    @property
    def u(self) -> torch.Tensor:
        return iddpm_u(self.M, self.C_1, self.C_2)

    @property
    def sigma_min(self) -> float:
        return float(self.u[self.M - 1])

    @property
    def sigma_max(self) -> float:
        return float(self.u[0])

    def round_sigma(self, sigma):
        """Rounds ``sigma`` (float or tensor, any shape) to the nearest ``u_j``; float64 out."""
        sigma = _f64(sigma)
        u = self.u.to(sigma.device)
        index = (sigma.reshape(-1, 1) - u.reshape(1, -1)).abs().argmin(1)
        return u[index].reshape(sigma.shape)

    def __call__(self, sigma):
        """Same as :meth:`round_sigma`, so an instance can be passed wherever a hook is expected."""
        return self.round_sigma(sigma)


def get_round_sigma(net) -> Callable:
    """``net.round_sigma`` when the network has one, else :func:`round_sigma_identity`."""
    return getattr(net, "round_sigma", round_sigma_identity)


def clamp_sigma_range(sigma_min: float, sigma_max: float, net=None) -> tuple[float, float]:
    """Clamps ``[sigma_min, sigma_max]`` to the network's support, as EDM's sampler does.

    ``sigma_min <- max(sigma_min, net.sigma_min)`` and ``sigma_max <- min(sigma_max,
    net.sigma_max)`` for whichever of the attributes ``net`` has.

    Raises:
        ValueError: if the clamped range is empty.
    """
    lo = max(float(sigma_min), float(getattr(net, "sigma_min", 0.0)))
    hi = min(float(sigma_max), float(getattr(net, "sigma_max", math.inf)))
    if not lo < hi:
        raise ValueError(
            f"sigma range [{sigma_min!r}, {sigma_max!r}] does not intersect the network support "
            f"[{getattr(net, 'sigma_min', 0.0)!r}, {getattr(net, 'sigma_max', math.inf)!r}]"
        )
    return lo, hi


def network_sigma_range(kind: str) -> tuple[float, float]:
    """Support ``(sigma_min, sigma_max)`` of EDM's preconditioners (Karras et al. 2022, Table 1).

    Args:
        kind: ``"edm"`` ([0, inf)), ``"vp"`` (``[sigma_vp(1e-5), sigma_vp(1)]`` with
            ``beta_d=19.9, beta_min=0.1``), ``"ve"`` ([0.02, 100]) or ``"iddpm"``
            (``[u_{M-1}, u_0]``).
    """
    if kind == "edm":
        return 0.0, math.inf
    if kind == "vp":
        vp = VP(beta_0=0.1, beta_1=20.0)
        return float(vp.sigma(1e-5)), float(vp.sigma(1.0))
    if kind == "ve":
        return 0.02, 100.0
    if kind == "iddpm":
        r = IDDPMRounding()
        return r.sigma_min, r.sigma_max
    raise ValueError(f"kind must be one of 'edm', 'vp', 've', 'iddpm', got {kind!r}")


# --------------------------------------------------------------------------------------------
# Discretisations (return the N noise levels, without the appended 0)
# --------------------------------------------------------------------------------------------


def edm_sigmas(
    num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> torch.Tensor:
    """EDM rho-grid ``(smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho`` (Karras et al. 2022, eq. 5).

    Evaluated in float64 exactly as EDM's sampler does.

    Returns:
        ``[num_steps]`` float64 tensor, decreasing from ``sigma_max`` to ``sigma_min``.
    """
    num_steps = _check_num_steps(num_steps)
    sigma_min, sigma_max = _check_range(sigma_min, sigma_max)
    rho = _check_positive("rho", rho)
    i = torch.arange(num_steps, dtype=_F64)
    return (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def vp_sigmas(num_steps: int, sigma_min: float, sigma_max: float, epsilon_s: float = 1e-3) -> torch.Tensor:
    """EDM ``--disc=vp``: ``t_i = 1 + i/(N-1) (epsilon_s - 1)``, ``sigma_i = sigma_vp(t_i)``.

    The VP betas are re-derived from the sigma range (:meth:`VP.from_sigma_range`).

    Returns:
        ``[num_steps]`` float64 tensor, decreasing.
    """
    num_steps = _check_num_steps(num_steps)
    vp = VP.from_sigma_range(sigma_min, sigma_max, epsilon_s)
    i = torch.arange(num_steps, dtype=_F64)
    return vp.sigma(1 + i / (num_steps - 1) * (epsilon_s - 1))


def ve_sigmas(num_steps: int, sigma_min: float = 0.02, sigma_max: float = 100.0) -> torch.Tensor:
    """EDM ``--disc=ve``: ``sigma_i = sqrt(smax^2 (smin^2/smax^2)^(i/(N-1)))`` (geometric).

    Returns:
        ``[num_steps]`` float64 tensor, decreasing.
    """
    num_steps = _check_num_steps(num_steps)
    sigma_min, sigma_max = _check_range(sigma_min, sigma_max)
    i = torch.arange(num_steps, dtype=_F64)
    return torch.sqrt(sigma_max**2 * (sigma_min**2 / sigma_max**2) ** (i / (num_steps - 1)))


def iddpm_sigmas(
    num_steps: int,
    sigma_min: float = 0.002,
    sigma_max: float = 81.0,
    M: int = 1000,
    C_1: float = 0.001,
    C_2: float = 0.008,
) -> torch.Tensor:
    """EDM ``--disc=iddpm``: ``u`` filtered to ``[sigma_min, sigma_max]``, then
    ``sigma_i = u_f[round((len(u_f) - 1) i / (N - 1))]`` (round half to even, as torch).

    Returns:
        ``[num_steps]`` float64 tensor, non-increasing.
    """
    num_steps = _check_num_steps(num_steps)
    sigma_min, sigma_max = _check_range(sigma_min, sigma_max)
    u = iddpm_u(M, C_1, C_2)
    u_f = u[(u >= sigma_min) & (u <= sigma_max)]
    if u_f.numel() == 0:
        raise ValueError(f"no iDDPM level u_j lies in [sigma_min, sigma_max] = [{sigma_min!r}, {sigma_max!r}]")
    i = torch.arange(num_steps, dtype=_F64)
    return u_f[((u_f.numel() - 1) / (num_steps - 1) * i).round().to(torch.int64)]


_DISC_DEFAULTS = {"vp": None, "ve": (0.02, 100.0), "iddpm": (0.002, 81.0), "edm": (0.002, 80.0)}


def default_sigma_range(discretization: str, epsilon_s: float = 1e-3) -> tuple[float, float]:
    """Default ``(sigma_min, sigma_max)`` per discretisation of EDM's ablation sampler (Karras et al. 2022, Table 1).

    vp: ``(sigma_vp(epsilon_s), sigma_vp(1))`` with ``beta_d=19.9, beta_min=0.1``
    (0.010486, 152.167); ve: (0.02, 100); iddpm: (0.002, 81); edm: (0.002, 80).
    """
    if discretization not in _DISC_DEFAULTS:
        raise ValueError(f"discretization must be one of 'vp', 've', 'iddpm', 'edm', got {discretization!r}")
    if discretization == "vp":
        vp = VP(beta_0=0.1, beta_1=20.0)
        return float(vp.sigma(epsilon_s)), float(vp.sigma(1.0))
    return _DISC_DEFAULTS[discretization]


def discretize(
    discretization: str,
    num_steps: int,
    sigma_min: float,
    sigma_max: float,
    *,
    rho: float = 7.0,
    epsilon_s: float = 1e-3,
    M: int = 1000,
    C_1: float = 0.001,
    C_2: float = 0.008,
) -> torch.Tensor:
    """Dispatches to :func:`edm_sigmas`, :func:`vp_sigmas`, :func:`ve_sigmas` or :func:`iddpm_sigmas`.

    Returns:
        ``[num_steps]`` float64 noise levels (no trailing 0).
    """
    if discretization == "edm":
        return edm_sigmas(num_steps, sigma_min, sigma_max, rho)
    if discretization == "vp":
        return vp_sigmas(num_steps, sigma_min, sigma_max, epsilon_s)
    if discretization == "ve":
        return ve_sigmas(num_steps, sigma_min, sigma_max)
    if discretization == "iddpm":
        return iddpm_sigmas(num_steps, sigma_min, sigma_max, M, C_1, C_2)
    raise ValueError(f"discretization must be one of 'vp', 've', 'iddpm', 'edm', got {discretization!r}")


def dpm_solver_timesteps(family: NoiseFamily, skip_type: str, t_T: float, t_0: float, N: int) -> torch.Tensor:
    """DPM-Solver's ``get_time_steps`` (Lu et al. 2022), in float64.

    Args:
        family: noise family giving ``lambda(t) = -log sigma(t)`` and its inverse.
        skip_type: ``"logSNR"`` (uniform in lambda), ``"time_uniform"`` (uniform in t) or
            ``"time_quadratic"`` (uniform in sqrt(t)).
        t_T: start time (largest).
        t_0: end time.
        N: number of intervals.

    Returns:
        ``[N + 1]`` float64 times from ``t_T`` to ``t_0``.
    """
    if isinstance(N, bool) or not isinstance(N, int) or N < 1:
        raise ValueError(f"N must be an int >= 1, got {N!r}")
    if skip_type == "logSNR":
        lam = torch.linspace(float(family.lambda_(t_T)), float(family.lambda_(t_0)), N + 1, dtype=_F64)
        return family.lambda_inv(lam)
    if skip_type == "time_uniform":
        return torch.linspace(float(t_T), float(t_0), N + 1, dtype=_F64)
    if skip_type == "time_quadratic":
        return torch.linspace(float(t_T) ** 0.5, float(t_0) ** 0.5, N + 1, dtype=_F64) ** 2
    raise ValueError(f"skip_type must be one of 'logSNR', 'time_uniform', 'time_quadratic', got {skip_type!r}")
