# SPDX-License-Identifier: Apache-2.0
"""Deterministic ODE samplers: EDM Euler/Heun, the EDM ablation sampler, general families,
DPM-Solver (singlestep 1-3, multistep 2M/3M), k-diffusion-style loops, ODE inversion and the
flow-matching ODE in t (Euler/Heun/midpoint, :func:`sample_flow`).

The sampler state is float64. A denoiser is called as ``D(x, sigma)`` or, when
class labels are given, ``D(x, sigma, class_labels)``, with ``x`` the *unscaled* state
``[B, ...]`` and ``sigma`` a 0-dim float64 tensor (``[B]`` in the k-diffusion-style functions);
its output is cast to float64.

Credits: EDM Algorithm 2 and the ablation sampler follow Karras et al. 2022 and their public
``generate.py``; ``sample_euler``/``sample_heun`` follow the call style of Crowson's
k-diffusion; DPM-Solver follows Lu et al. 2022 (DPM-Solver) and 2023 (DPM-Solver++),
including the order schedules of their reference library.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import numpy as np
import torch

from .schedules import (
    EDM,
    VP,
    EDMAblationFamily,
    NoiseFamily,
    clamp_sigma_range,
    default_sigma_range,
    discretize,
    dpm_solver_timesteps,
    edm_sigmas,
    flow_times,
    get_round_sigma,
)

__all__ = [
    "PRESETS",
    "ablation_sampler",
    "ddim_update",
    "dpm_solver",
    "dpm_solver_1_update",
    "dpm_solver_multistep",
    "dpm_solver_singlestep",
    "edm_sampler",
    "euler_update",
    "ode_inversion",
    "sample_euler",
    "sample_heun",
    "sample_ode",
    "sample_preset",
    "singlestep_orders",
    "sampler_mismatch",
    "sample",
    "SAMPLERS",
    "NETWORK_SOLVER",
    "edm_grid",
    "evaluation_sigmas",
    "nfe",
    "check_sampler",
    "has_closed_form",
    "FLOW_SOLVERS",
    "flow_nfe",
    "sample_flow",
]

_F64 = torch.float64


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _check_state(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"{name} must have shape [B, ...] with B >= 1, got {tuple(x.shape)}")
    return x


def _check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value


def _check_sigmas(name: str, sigmas, *, allow_final_zero: bool) -> torch.Tensor:
    sigmas = torch.as_tensor(sigmas, dtype=_F64)
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"{name} must be a 1-D sequence with at least 2 entries, got shape {tuple(sigmas.shape)}")
    body = sigmas[:-1] if allow_final_zero else sigmas
    if not bool(torch.isfinite(sigmas).all()) or not bool((body > 0).all()) or bool(sigmas[-1] < 0):
        what = "finite, > 0 (the last may be 0)" if allow_final_zero else "finite and > 0"
        raise ValueError(f"{name} must be {what}, got {sigmas.tolist()}")
    return sigmas


def _check_nonneg(name: str, value, allow_inf: bool = False) -> float:
    v = float(value)
    if math.isnan(v) or v < 0 or (math.isinf(v) and not allow_inf):
        raise ValueError(f"{name} must be a float >= 0, got {value!r}")
    return v


def _caller(net, class_labels) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if class_labels is None:
        return lambda x, sigma: net(x, sigma).to(_F64)
    return lambda x, sigma: net(x, sigma, class_labels).to(_F64)


# --------------------------------------------------------------------------------------------
# First-order update: Euler = DDIM (eta = 0) = DPM-Solver-1
# --------------------------------------------------------------------------------------------


def euler_update(x, denoised, sigma, sigma_next, s=1.0, s_next=1.0):
    """One first-order step of the PF-ODE in ``(s, sigma)`` form.

    ``x_next = s_next * (xt + (sigma_next - sigma) (xt - D) / sigma)`` with ``xt = x / s``,
    i.e. ``xt_next = D + (sigma_next/sigma) (xt - D)``. With ``s = 1`` this is EDM's Euler
    step bit for bit; with ``s = sqrt(abar)`` it is DDIM (eta = 0), and with ``s = alpha_t``
    it is DPM-Solver-1 (both prediction types). ``ddim_update`` and ``dpm_solver_1_update``
    are the same function.

    Args:
        x: state ``[B, ...]`` in the scaled variable.
        denoised: ``D(x/s; sigma)``, same shape.
        sigma, sigma_next: EDM noise levels (``sigma > 0``; ``sigma_next`` may be 0).
        s, s_next: signal scales at the two times.

    Returns:
        The state at ``sigma_next``, same shape.
    """
    xt = x / s
    return s_next * (xt + (sigma_next - sigma) * ((xt - denoised) / sigma))


ddim_update = euler_update
dpm_solver_1_update = euler_update


# --------------------------------------------------------------------------------------------
# EDM Algorithm 2 in sigma space (EDM sampler, k-diffusion loops, inversion)
# --------------------------------------------------------------------------------------------


def _no_noise(x):  # never called: deterministic loops run with gamma_max = 0
    raise AssertionError("churn noise requested in a deterministic loop")


def _gamma_max(S_churn, num_steps) -> float:
    return min(_check_nonneg("S_churn", S_churn) / num_steps, math.sqrt(2) - 1)


# The loop's elementwise updates: EDM's formulas, the same IEEE operations in the same order
# (bit for bit), writing only the step's own temporaries (3 new tensors a Heun step instead of
# 11: each fresh one page-faults in). Host tensors go through numpy, on this thread: torch would
# wake its OpenMP pool for each op, and its spinning threads cost more CPU than the ops (measured
# 6 ms of CPU per op on a 128 x 3072 state) and compete with the denoiser's own workers.
def _on_host(*ts: torch.Tensor) -> bool:
    first = ts[0]
    return first.dtype in (torch.float32, torch.float64) and all(
        t.device.type == "cpu" and not t.requires_grad and t.dtype == first.dtype and t.shape == first.shape
        for t in ts)


def _slope(x, denoised, t):
    """(x - denoised) / t, a new tensor."""
    if not _on_host(x, denoised):
        return torch.sub(x, denoised).div_(t)
    out = np.subtract(x.numpy(), denoised.numpy())
    np.divide(out, out.dtype.type(t), out=out)  # t in x's dtype, as torch takes a 0-d tensor
    return torch.from_numpy(out)


def _step(x, h, d):
    """x + h d, a new tensor."""
    if not _on_host(x, d):
        return (h * d).add_(x)
    out = np.multiply(d.numpy(), d.numpy().dtype.type(h))
    np.add(out, x.numpy(), out=out)
    return torch.from_numpy(out)


def _heun_step(x, h, d_cur, d_prime):
    """x + h (0.5 d_cur + 0.5 d_prime), written into d_cur and d_prime (the loop's own)."""
    if not _on_host(x, d_cur, d_prime):
        return d_cur.mul_(0.5).add_(d_prime.mul_(0.5)).mul_(h).add_(x)
    a, b = d_cur.numpy(), d_prime.numpy()
    np.multiply(a, a.dtype.type(0.5), out=a)
    np.multiply(b, b.dtype.type(0.5), out=b)
    np.add(a, b, out=a)
    np.multiply(a, a.dtype.type(h), out=a)
    np.add(a, x.numpy(), out=a)
    return d_cur


def _sigma_loop(
    call,
    x,
    t_steps,
    *,
    solver,
    round_sigma=lambda s: s,
    gamma_max=0.0,
    S_min=0.0,
    S_max=math.inf,
    S_noise=1.0,
    randn_like=_no_noise,
    callback=None,
):
    """EDM Algorithm 2 over ``t_steps`` (any direction). The Heun correction runs whenever
    ``t_next > 0``, so a grid ending in 0 takes a final Euler step, as in EDM."""
    for i in range(len(t_steps) - 1):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        gamma = gamma_max if S_min <= t_cur <= S_max else 0.0
        t_hat = torch.as_tensor(round_sigma(t_cur + gamma * t_cur), dtype=_F64)
        x_hat = x
        # Once churn is on, EDM draws randn_like(x) at every step, also outside [S_min, S_max]
        # where gamma = 0 and the draw is multiplied by 0: drawing here too keeps the noise of
        # every later churn step identical to EDM's. Without churn no draw can matter.
        if gamma_max > 0:
            x_hat = x + (t_hat**2 - t_cur**2).sqrt() * S_noise * randn_like(x)
        denoised = call(x_hat, t_hat)
        h = t_next - t_hat
        d_cur = _slope(x_hat, denoised, t_hat)
        x_next = _step(x_hat, h, d_cur)
        if callback is not None:
            callback({"i": i, "sigma": t_hat, "sigma_next": t_next, "x": x_hat, "denoised": denoised})
        if solver == "heun" and t_next > 0:
            denoised = call(x_next, t_next)
            x_next = _heun_step(x_hat, h, d_cur, _slope(x_next, denoised, t_next))
        x = x_next
    return x


def edm_grid(
    num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, net=None
) -> torch.Tensor:
    """EDM's step grid ``t_0 .. t_{N-1}, 0`` exactly as its sampler builds it (Karras et al. 2022,
    eq. 5): ``[sigma_min, sigma_max]`` clamped to ``net``'s support, each ``t_i`` through
    ``net.round_sigma`` when it has one, then ``t_N = 0``.

    Returns:
        float64 ``[num_steps + 1]``.
    """
    lo, hi = clamp_sigma_range(sigma_min, sigma_max, net)
    t = torch.as_tensor(get_round_sigma(net)(edm_sigmas(num_steps, lo, hi, rho)), dtype=_F64)
    return torch.cat([t, torch.zeros_like(t[:1])])


def edm_sampler(
    net,
    latents: torch.Tensor,
    class_labels=None,
    *,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = math.inf,
    S_noise: float = 1.0,
    solver: str = "heun",
    randn_like=torch.randn_like,
    callback=None,
) -> torch.Tensor:
    """EDM Algorithm 2 (Karras et al. 2022).

    ``[sigma_min, sigma_max]`` is clamped to ``net.sigma_min``/``net.sigma_max`` when the net
    has them and the grid goes through ``net.round_sigma`` when it has one; ``t_N = 0`` is
    appended, so the last step is Euler and ``x_N = D(x_{N-1}; t_{N-1})``. ``solver="euler"``
    skips every Heun correction (P1's optimal-denoiser sampler, NFE = N); ``"heun"`` gives
    NFE = 2N - 1. With churn, noise is drawn at every step as in EDM (also where
    ``gamma = 0``), so a seeded ``randn_like`` gives EDM's samples bit for bit; without churn
    nothing is drawn.

    Args:
        net: denoiser ``D(x, sigma[, class_labels])``.
        latents: unit-variance noise ``[B, C, H, W]`` (any float dtype).
        class_labels: passed through to ``net`` when not None.
        num_steps: ``N >= 2``.
        sigma_min, sigma_max, rho: EDM grid parameters.
        S_churn, S_min, S_max, S_noise: EDM stochasticity (0 churn = deterministic).
        solver: ``"heun"`` or ``"euler"``.
        randn_like: noise source for churn (e.g. ``StackedRandomGenerator.randn_like``).
        callback: called once per step with ``dict(i, sigma, sigma_next, x, denoised)``.

    Returns:
        float64 ``[B, C, H, W]`` samples.
    """
    latents = _check_state("latents", latents)
    _check_choice("solver", solver, ("heun", "euler"))
    t_steps = edm_grid(num_steps, sigma_min, sigma_max, rho, net).to(latents.device)
    x = latents.to(_F64) * t_steps[0]
    return _sigma_loop(
        _caller(net, class_labels),
        x,
        t_steps,
        solver=solver,
        round_sigma=get_round_sigma(net),
        gamma_max=_gamma_max(S_churn, num_steps),
        S_min=S_min,
        S_max=S_max,
        S_noise=S_noise,
        randn_like=randn_like,
        callback=callback,
    )


def _k_call(model):
    return lambda x, sigma: model(x, sigma * x.new_ones([x.shape[0]])).to(_F64)


def sample_euler(model, x: torch.Tensor, sigmas, callback=None) -> torch.Tensor:
    """k-diffusion-style Euler: ``model(x, sigma[B])`` returns the denoised ``x``.

    Args:
        model: denoiser called as ``model(x, sigma)`` with ``sigma`` float64 ``[B]``.
        x: initial state ``[B, ...]`` already at ``sigmas[0]`` (i.e. ``noise * sigmas[0]``).
        sigmas: ``[N + 1]`` noise levels; the last one is usually 0.
        callback: called per step with ``dict(i, sigma, sigma_next, x, denoised)``.

    Returns:
        float64 state at ``sigmas[-1]``.
    """
    x = _check_state("x", x).to(_F64)
    sigmas = _check_sigmas("sigmas", sigmas, allow_final_zero=True).to(x.device)
    return _sigma_loop(_k_call(model), x, sigmas, solver="euler", callback=callback)


def sample_heun(model, x: torch.Tensor, sigmas, callback=None) -> torch.Tensor:
    """k-diffusion-style Heun (EDM Algorithm 2 without churn); Euler on a step to sigma = 0.

    Arguments and return value as :func:`sample_euler`.
    """
    x = _check_state("x", x).to(_F64)
    sigmas = _check_sigmas("sigmas", sigmas, allow_final_zero=True).to(x.device)
    return _sigma_loop(_k_call(model), x, sigmas, solver="heun", callback=callback)


def ode_inversion(
    net,
    images: torch.Tensor,
    class_labels=None,
    *,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    solver: str = "heun",
    callback=None,
) -> torch.Tensor:
    """Image -> noise: integrates the EDM PF-ODE upwards on the reversed rho-grid.

    The images are taken as the state at ``sigma_min`` (the ODE cannot start at sigma = 0,
    where ``D`` is undefined; the error this adds is O(sigma_min^2 / lambda) per direction of
    variance ``lambda``). The range is clamped to the net's support and the grid goes
    through ``net.round_sigma``, as in :func:`edm_sampler`.

    Args:
        net: denoiser ``D(x, sigma[, class_labels])``.
        images: ``[B, C, H, W]`` in [-1, 1] scale.
        class_labels: passed through to ``net`` when not None.
        num_steps, sigma_min, sigma_max, rho: grid (``num_steps`` levels, ``num_steps - 1`` steps).
        solver: ``"heun"`` or ``"euler"``.
        callback: called per step with ``dict(i, sigma, sigma_next, x, denoised)``.

    Returns:
        float64 latents ``x(sigma_max) / sigma_max``, the unit-variance noise that
        :func:`edm_sampler` maps (approximately) back to ``images``.
    """
    images = _check_state("images", images)
    _check_choice("solver", solver, ("heun", "euler"))
    grid = edm_grid(num_steps, sigma_min, sigma_max, rho, net)[:-1].flip(0).to(images.device)
    x = _sigma_loop(
        _caller(net, class_labels),
        images.to(_F64),
        grid,
        solver=solver,
        round_sigma=get_round_sigma(net),
        callback=callback,
    )
    return x / grid[-1]


# --------------------------------------------------------------------------------------------
# General (s(t), sigma(t)) families: EDM ablation sampler and sample_ode
# --------------------------------------------------------------------------------------------


def _family_loop(
    call,
    latents,
    family,
    t_steps,
    *,
    solver,
    alpha,
    round_sigma=lambda s: s,
    gamma_max=0.0,
    S_min=0.0,
    S_max=math.inf,
    S_noise=1.0,
    randn_like=_no_noise,
    callback=None,
):
    sigma, s = family.sigma, family.s

    def deriv(x, t, denoised):
        sig, dsig = sigma(t), family.sigma_deriv(t)
        return (dsig / sig + family.s_deriv(t) / s(t)) * x - dsig * s(t) / sig * denoised

    x = latents.to(_F64) * (sigma(t_steps[0]) * s(t_steps[0]))
    for i in range(len(t_steps) - 1):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        sig_cur = sigma(t_cur)
        gamma = gamma_max if S_min <= sig_cur <= S_max else 0.0
        t_hat = family.sigma_inv(round_sigma(sig_cur + gamma * sig_cur))
        x_hat = s(t_hat) / s(t_cur) * x
        if gamma_max > 0:  # as in _sigma_loop: EDM draws at every step once churn is on
            x_hat = x_hat + (sigma(t_hat) ** 2 - sig_cur**2).clip(min=0).sqrt() * s(t_hat) * S_noise * randn_like(x)
        h = t_next - t_hat
        denoised = call(x_hat / s(t_hat), sigma(t_hat))
        d_cur = deriv(x_hat, t_hat, denoised)
        if callback is not None:
            callback(
                {
                    "i": i,
                    "t": t_hat,
                    "sigma": sigma(t_hat),
                    "sigma_next": sigma(t_next),
                    "x": x_hat,
                    "denoised": denoised,
                }
            )
        if solver == "euler" or not sigma(t_next) > 0:
            x = x_hat + h * d_cur
        else:
            t_prime = t_hat + alpha * h
            x_prime = x_hat + alpha * h * d_cur
            denoised = call(x_prime / s(t_prime), sigma(t_prime))
            d_prime = deriv(x_prime, t_prime, denoised)
            x = x_hat + h * ((1 - 1 / (2 * alpha)) * d_cur + 1 / (2 * alpha) * d_prime)
    return x


def ablation_sampler(
    net,
    latents: torch.Tensor,
    class_labels=None,
    *,
    num_steps: int = 18,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
    solver: str = "heun",
    discretization: str = "edm",
    schedule: str = "linear",
    scaling: str = "none",
    epsilon_s: float = 1e-3,
    C_1: float = 0.001,
    C_2: float = 0.008,
    M: int = 1000,
    alpha: float = 1.0,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = math.inf,
    S_noise: float = 1.0,
    randn_like=torch.randn_like,
    callback=None,
) -> torch.Tensor:
    """EDM's generalised sampler (``--solver/--disc/--schedule/--scaling``; Karras et al. 2022, Table 1).

    Song et al. VP: ``solver="euler", discretization="vp", schedule="vp", scaling="vp"``;
    VE: ``"euler", "ve", "ve", "none"``; iDDPM/DDIM: ``"euler", "iddpm", "linear", "none"``.
    Default sigma ranges depend on the discretisation (:func:`default_sigma_range`) and are
    clamped to the net's support; the VP betas are re-derived from the final range. The
    network is called as ``D(x / s(t), sigma(t))``. Heun uses ``t' = t + alpha h``; the last
    step is Euler. No churn noise is drawn when ``gamma = 0`` (output unchanged).

    Args:
        net: denoiser ``D(x, sigma[, class_labels])`` (optionally with ``sigma_min``,
            ``sigma_max``, ``round_sigma``).
        latents: unit-variance noise ``[B, C, H, W]``.
        (other arguments): as EDM's ``ablation_sampler``; ``alpha`` in (0, 1].
        callback: called per step with ``dict(i, t, sigma, sigma_next, x, denoised)``.

    Returns:
        float64 ``[B, C, H, W]`` samples (``s(0) = 1`` for every schedule/scaling).
    """
    latents = _check_state("latents", latents)
    _check_choice("solver", solver, ("euler", "heun"))
    _check_choice("discretization", discretization, ("vp", "ve", "iddpm", "edm"))
    _check_choice("schedule", schedule, ("vp", "ve", "linear"))
    _check_choice("scaling", scaling, ("vp", "none"))
    if not 0 < float(alpha) <= 1:
        raise ValueError(f"alpha must be a float in (0, 1], got {alpha!r}")
    d_min, d_max = default_sigma_range(discretization, epsilon_s)
    sigma_min, sigma_max = clamp_sigma_range(
        d_min if sigma_min is None else sigma_min, d_max if sigma_max is None else sigma_max, net
    )
    vp = VP.from_sigma_range(sigma_min, sigma_max, epsilon_s)
    family = EDMAblationFamily(schedule=schedule, scaling=scaling, vp_beta_d=vp.beta_d, vp_beta_min=vp.beta_0)
    sigma_steps = discretize(
        discretization, num_steps, sigma_min, sigma_max, rho=rho, epsilon_s=epsilon_s, M=M, C_1=C_1, C_2=C_2
    ).to(latents.device)
    round_sigma = get_round_sigma(net)
    t_steps = family.sigma_inv(round_sigma(sigma_steps))
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])
    return _family_loop(
        _caller(net, class_labels),
        latents,
        family,
        t_steps,
        solver=solver,
        alpha=float(alpha),
        round_sigma=round_sigma,
        gamma_max=_gamma_max(S_churn, num_steps),
        S_min=S_min,
        S_max=S_max,
        S_noise=S_noise,
        randn_like=randn_like,
        callback=callback,
    )


def sample_ode(
    denoiser,
    latents: torch.Tensor,
    class_labels=None,
    *,
    family: NoiseFamily,
    t_steps,
    solver: str = "heun",
    alpha: float = 1.0,
    callback=None,
) -> torch.Tensor:
    """Deterministic PF-ODE sampler for any family ``x = s(t) (y + sigma(t) eps)``.

    Integrates ``dx/dt = (sigma'/sigma + s'/s) x - (sigma' s / sigma) D(x/s; sigma)`` over
    ``t_steps`` (EDM eq. 4), e.g. sub-VP with ``family=SubVP()``. A step whose end has
    ``sigma(t_next) = 0`` is Euler (``D`` is undefined at sigma = 0).

    Args:
        denoiser: ``D(x, sigma[, class_labels])`` on the unscaled variable.
        latents: unit-variance noise ``[B, C, H, W]``; the start is
            ``latents * sigma(t_0) * s(t_0)``.
        class_labels: passed through when not None.
        family: a :class:`~diffrepro.schedules.NoiseFamily`.
        t_steps: ``[N + 1]`` times, strictly monotone (decreasing to sample).
        solver: ``"heun"`` or ``"euler"``.
        alpha: Heun's intermediate point ``t + alpha h``, in (0, 1].
        callback: called per step with ``dict(i, t, sigma, sigma_next, x, denoised)``.

    Returns:
        float64 state at ``t_steps[-1]`` in the scaled variable ``x``.
    """
    latents = _check_state("latents", latents)
    _check_choice("solver", solver, ("euler", "heun"))
    if not isinstance(family, NoiseFamily):
        raise TypeError(f"family must be a NoiseFamily, got {type(family).__name__}")
    if not 0 < float(alpha) <= 1:
        raise ValueError(f"alpha must be a float in (0, 1], got {alpha!r}")
    t_steps = torch.as_tensor(t_steps, dtype=_F64, device=latents.device)
    diffs = t_steps[1:] - t_steps[:-1]
    if t_steps.ndim != 1 or t_steps.numel() < 2 or not (bool((diffs < 0).all()) or bool((diffs > 0).all())):
        raise ValueError(f"t_steps must be a strictly monotone 1-D sequence of >= 2 times, got {t_steps.tolist()}")
    return _family_loop(
        _caller(denoiser, class_labels), latents, family, t_steps, solver=solver, alpha=float(alpha), callback=callback
    )


# --------------------------------------------------------------------------------------------
# DPM-Solver (Lu et al. 2022, 2023), in the unscaled variable xt = x / s with lambda = -log sigma
# --------------------------------------------------------------------------------------------
# Dividing the reference updates by alpha_t shows that they depend on the schedule only
# through sigma (EDM) and lambda = -log sigma: x_t = alpha_t * xt_t, sigma_vp = alpha sigma.


def singlestep_orders(steps: int, order: int) -> list[int]:
    """Order schedule of singlestep DPM-Solver-fast (Lu et al. 2022, §3.4); the orders sum to ``steps``.

    order 3: ``K = steps//3 + 1``; ``[3]*(K-2) + [2, 1]`` if ``steps % 3 == 0``,
    ``[3]*(K-1) + [1]`` if ``== 1``, else ``[3]*(K-1) + [2]``. order 2: ``[2]*(steps/2)`` or
    ``[2]*(steps//2) + [1]``. order 1: ``[1]*steps``.
    """
    if isinstance(order, bool) or order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < order:
        raise ValueError(f"steps must be an int >= order ({order}), got {steps!r}")
    if order == 3:
        K = steps // 3 + 1
        if steps % 3 == 0:
            return [3] * (K - 2) + [2, 1]
        if steps % 3 == 1:
            return [3] * (K - 1) + [1]
        return [3] * (K - 1) + [2]
    if order == 2:
        return [2] * (steps // 2) + [1] * (steps % 2)
    return [1] * steps


def _singlestep_update(call, x, sig, order, algorithm):
    """One singlestep update from ``sig[0]`` to ``sig[order]`` using the inner levels ``sig[1:order]``."""
    lam = -torch.log(sig)
    h = lam[-1] - lam[0]
    sig_s, sig_t = sig[0], sig[-1]
    d_s = call(x, sig_s)
    if order == 1:
        return euler_update(x, d_s, sig_s, sig_t), d_s
    r1 = (lam[1] - lam[0]) / h
    x_s1 = euler_update(x, d_s, sig_s, sig[1])
    d_s1 = call(x_s1, sig[1])
    if algorithm == "dpmsolver++":
        phi_1 = torch.expm1(-h)
        if order == 2:
            return (sig_t / sig_s) * x - phi_1 * d_s - (0.5 / r1) * phi_1 * (d_s1 - d_s), d_s
        r2 = (lam[2] - lam[0]) / h
        phi_12 = torch.expm1(-r2 * h)
        phi_22 = phi_12 / (r2 * h) + 1
        phi_2 = phi_1 / h + 1
        x_s2 = (sig[2] / sig_s) * x - phi_12 * d_s + (r2 / r1) * phi_22 * (d_s1 - d_s)
        d_s2 = call(x_s2, sig[2])
        return (sig_t / sig_s) * x - phi_1 * d_s + (1 / r2) * phi_2 * (d_s2 - d_s), d_s
    eps_s = (x - d_s) / sig_s
    eps_s1 = (x_s1 - d_s1) / sig[1]
    phi_1 = torch.expm1(h)
    if order == 2:
        return x - sig_t * phi_1 * eps_s - (0.5 / r1) * sig_t * phi_1 * (eps_s1 - eps_s), d_s
    r2 = (lam[2] - lam[0]) / h
    phi_12 = torch.expm1(r2 * h)
    phi_22 = phi_12 / (r2 * h) - 1
    phi_2 = phi_1 / h - 1
    x_s2 = x - sig[2] * phi_12 * eps_s - (r2 / r1) * sig[2] * phi_22 * (eps_s1 - eps_s)
    d_s2 = call(x_s2, sig[2])
    eps_s2 = (x_s2 - d_s2) / sig[2]
    return x - sig_t * phi_1 * eps_s - (1 / r2) * sig_t * phi_2 * (eps_s2 - eps_s), d_s


def _call_unscaled(model):
    return lambda x, sigma: model(x, sigma).to(_F64)


def dpm_solver_singlestep(model, x, sigmas, orders, *, algorithm: str = "dpmsolver", callback=None) -> torch.Tensor:
    """Singlestep DPM-Solver over a flattened noise-level grid.

    Update ``k`` (of order ``orders[k]``) goes from ``sigmas[j]`` to ``sigmas[j + orders[k]]``
    and uses the levels between them as its intermediate points (``r_1``, ``r_2`` from
    lambda = -log sigma), where ``j = sum(orders[:k])``. NFE = ``sum(orders)``.

    Args:
        model: ``model(x, sigma)`` returning the denoised (x0) prediction of the unscaled ``x``.
        x: unscaled state ``[B, ...]`` at ``sigmas[0]``.
        sigmas: ``[sum(orders) + 1]`` decreasing EDM noise levels, all > 0.
        orders: per-update orders (1, 2 or 3), e.g. from :func:`singlestep_orders`.
        algorithm: ``"dpmsolver"`` (noise prediction) or ``"dpmsolver++"`` (data prediction).
        callback: called per update with ``dict(i, sigma, sigma_next, x, denoised)``.

    Returns:
        float64 unscaled state at ``sigmas[-1]``.
    """
    x = _check_state("x", x).to(_F64)
    _check_choice("algorithm", algorithm, ("dpmsolver", "dpmsolver++"))
    sigmas = _check_sigmas("sigmas", sigmas, allow_final_zero=False).to(x.device)
    orders = [int(o) for o in orders]
    if any(o not in (1, 2, 3) for o in orders) or sum(orders) + 1 != sigmas.numel():
        raise ValueError(f"orders must be 1, 2 or 3 and sum to len(sigmas) - 1 = {sigmas.numel() - 1}, got {orders}")
    call = _call_unscaled(model)
    j = 0
    for i, order in enumerate(orders):
        x_new, d_s = _singlestep_update(call, x, sigmas[j : j + order + 1], order, algorithm)
        if callback is not None:
            callback({"i": i, "sigma": sigmas[j], "sigma_next": sigmas[j + order], "x": x, "denoised": d_s})
        x, j = x_new, j + order
    return x


def _multistep_update(x, hist, sig, algorithm):
    """Multistep update of order ``len(hist)``; ``hist`` holds ``(D, eps)`` at ``sig[:-1]``."""
    order = len(hist)
    lam = -torch.log(sig)
    sig_0, sig_t = sig[-2], sig[-1]
    h = lam[-1] - lam[-2]
    if order == 1:
        return euler_update(x, hist[-1][0], sig_0, sig_t)
    k = 0 if algorithm == "dpmsolver++" else 1
    m0, m1 = hist[-1][k], hist[-2][k]
    r0 = (lam[-2] - lam[-3]) / h
    d1_0 = (m0 - m1) / r0
    if order == 3:
        m2 = hist[-3][k]
        r1 = (lam[-3] - lam[-4]) / h
        d1_1 = (m1 - m2) / r1
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
    if algorithm == "dpmsolver++":
        phi_1 = torch.expm1(-h)
        if order == 2:
            return (sig_t / sig_0) * x - phi_1 * m0 - 0.5 * phi_1 * d1_0
        phi_2 = phi_1 / h + 1
        phi_3 = phi_2 / h - 0.5
        return (sig_t / sig_0) * x - phi_1 * m0 + phi_2 * d1 - phi_3 * d2
    phi_1 = torch.expm1(h)
    if order == 2:
        return x - sig_t * phi_1 * m0 - 0.5 * sig_t * phi_1 * d1_0
    phi_2 = phi_1 / h - 1
    phi_3 = phi_2 / h - 0.5
    return x - sig_t * phi_1 * m0 - sig_t * phi_2 * d1 - sig_t * phi_3 * d2


def dpm_solver_multistep(
    model, x, sigmas, *, order: int = 2, algorithm: str = "dpmsolver++", lower_order_final: bool = True, callback=None
) -> torch.Tensor:
    """Multistep DPM-Solver(++) 2M/3M over a noise-level grid (one NFE per step).

    The first ``order - 1`` steps use lower orders (warm-up). With ``lower_order_final`` and
    fewer than 10 steps, the last steps also lower the order, as the reference library does.

    Args:
        model: ``model(x, sigma)`` returning the denoised (x0) prediction of the unscaled ``x``.
        x: unscaled state ``[B, ...]`` at ``sigmas[0]``.
        sigmas: ``[steps + 1]`` decreasing EDM noise levels, all > 0, ``steps >= order``.
        order: 1, 2 or 3.
        algorithm: ``"dpmsolver++"`` (data prediction) or ``"dpmsolver"`` (noise prediction).
        lower_order_final: see above.
        callback: called per step with ``dict(i, sigma, sigma_next, x, denoised)``.

    Returns:
        float64 unscaled state at ``sigmas[-1]``.
    """
    x = _check_state("x", x).to(_F64)
    _check_choice("algorithm", algorithm, ("dpmsolver", "dpmsolver++"))
    sigmas = _check_sigmas("sigmas", sigmas, allow_final_zero=False).to(x.device)
    steps = sigmas.numel() - 1
    if isinstance(order, bool) or order not in (1, 2, 3) or steps < order:
        raise ValueError(f"order must be 1, 2 or 3 and <= len(sigmas) - 1 = {steps}, got {order!r}")
    call = _call_unscaled(model)

    def evaluate(x, sig):
        d = call(x, sig)
        return d, (x - d) / sig

    hist = [evaluate(x, sigmas[0])]
    for step in range(1, steps + 1):
        if step < order:
            step_order = step
        elif lower_order_final and steps < 10:
            step_order = min(order, steps + 1 - step)
        else:
            step_order = order
        x_new = _multistep_update(x, hist[-step_order:], sigmas[step - step_order : step + 1], algorithm)
        if callback is not None:
            callback(
                {"i": step - 1, "sigma": sigmas[step - 1], "sigma_next": sigmas[step], "x": x, "denoised": hist[-1][0]}
            )
        x = x_new
        if step < steps:
            hist = hist[-(order - 1) :] if order > 1 else []
            hist.append(evaluate(x, sigmas[step]))
    return x


def dpm_solver(
    denoiser,
    latents: torch.Tensor,
    class_labels=None,
    *,
    family: NoiseFamily | None = None,
    steps: int = 20,
    order: int = 3,
    method: str = "singlestep",
    skip_type: str = "logSNR",
    algorithm: str = "dpmsolver",
    t_start: float | None = None,
    t_end: float | None = None,
    lower_order_final: bool = True,
    denoise_to_zero: bool = False,
    latents_scale: float | None = None,
    callback=None,
) -> torch.Tensor:
    """DPM-Solver with the reference library's time grids and order schedules (Lu et al. 2022).

    The analytic denoisers plug in through ``eps = (xt - D(xt; sigma)) / sigma`` on the
    unscaled ``xt = x / s``. ``method="singlestep"`` uses
    :func:`singlestep_orders` with ``K + 1`` outer times (uniform in lambda for ``"logSNR"``,
    else the ``steps``-point grid subsampled at the cumulative orders) and inner times
    recomputed per interval; ``"multistep"`` uses the ``steps``-interval grid. NFE = ``steps``
    (+1 with ``denoise_to_zero``).

    Args:
        denoiser: ``D(x, sigma[, class_labels])`` on the unscaled variable.
        latents: unit-variance noise ``[B, C, H, W]``.
        class_labels: passed through when not None.
        family: noise family (default :class:`~diffrepro.schedules.VP`).
        steps: number of model evaluations.
        order: 1, 2 or 3.
        method: ``"singlestep"`` or ``"multistep"``.
        skip_type: ``"logSNR"``, ``"time_uniform"`` or ``"time_quadratic"``.
        algorithm: ``"dpmsolver"`` (noise prediction) or ``"dpmsolver++"``.
        t_start: start time (default ``family.t_max``, 1 for VP).
        t_end: end time (default ``family.t_min``, ``1/N_train`` = 1e-3 for VP).
        lower_order_final: multistep only, see :func:`dpm_solver_multistep`.
        denoise_to_zero: return ``D(x; sigma(t_end))`` after the last step.
        latents_scale: the start is ``latents * latents_scale`` in the scaled variable;
            default ``s(t_start) * sigma(t_start)`` (EDM's convention). Pass 1.0 for
            the VP convention ``x_T = eps`` of the reference library.
        callback: called per update with ``dict(i, sigma, sigma_next, x, denoised)`` (``x``
            unscaled).

    Returns:
        float64 ``[B, C, H, W]``: the state at ``t_end`` in the scaled variable
        (``s(t_end) * xt``), or the denoised output with ``denoise_to_zero``.
    """
    latents = _check_state("latents", latents)
    family = VP() if family is None else family
    if not isinstance(family, NoiseFamily):
        raise TypeError(f"family must be a NoiseFamily, got {type(family).__name__}")
    _check_choice("method", method, ("singlestep", "multistep"))
    _check_choice("skip_type", skip_type, ("logSNR", "time_uniform", "time_quadratic"))
    _check_choice("algorithm", algorithm, ("dpmsolver", "dpmsolver++"))
    t_T = float(family.t_max if t_start is None else t_start)
    t_0 = float(family.t_min if t_end is None else t_end)
    if not t_T > t_0:
        raise ValueError(f"t_start must be > t_end, got t_start={t_T!r}, t_end={t_0!r}")
    call = _caller(denoiser, class_labels)
    if method == "singlestep":
        orders = singlestep_orders(steps, order)
        if skip_type == "logSNR":
            outer = dpm_solver_timesteps(family, skip_type, t_T, t_0, len(orders))
        else:
            full = dpm_solver_timesteps(family, skip_type, t_T, t_0, steps)
            outer = full[torch.cumsum(torch.tensor([0] + orders), 0)]
        pieces = [outer[:1]]
        for k, o in enumerate(orders):
            pieces.append(dpm_solver_timesteps(family, skip_type, float(outer[k]), float(outer[k + 1]), o)[1:])
        ts = torch.cat(pieces)
    else:
        if isinstance(order, bool) or order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < order:
            raise ValueError(f"steps must be an int >= order ({order}), got {steps!r}")
        ts = dpm_solver_timesteps(family, skip_type, t_T, t_0, steps)
    ts = ts.to(latents.device)
    sigmas = family.sigma(ts)
    s_T = family.s(ts[0])
    scale = s_T * sigmas[0] if latents_scale is None else float(latents_scale)
    x = latents.to(_F64) * scale / s_T
    if method == "singlestep":
        x = dpm_solver_singlestep(call, x, sigmas, orders, algorithm=algorithm, callback=callback)
    else:
        x = dpm_solver_multistep(
            call, x, sigmas, order=order, algorithm=algorithm, lower_order_final=lower_order_final, callback=callback
        )
    if denoise_to_zero:
        return call(x, sigmas[-1])
    return family.s(ts[-1]) * x


# --------------------------------------------------------------------------------------------
# Presets: the papers' sampler settings
# --------------------------------------------------------------------------------------------

PRESETS: dict[str, dict] = {
    # Zhang et al. 2024, optimal (empirical) denoiser: EDM grid, Euler only (NFE 18).
    "p1_optimal": {"solver": "euler", "num_steps": 18, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0},
    # Zhang et al. 2024, trained networks: EDM Heun, 18 steps (NFE 35).
    "p1_net": {"solver": "heun", "num_steps": 18, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0},
    # Li, Dai, Qu 2024, CIFAR notebook: Euler, 10 steps. Its optimal-denoiser trajectories end at
    # sigma = 0.002 ...
    "p2_euler10": {"solver": "euler", "num_steps": 10, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0},
    # ... while its Gaussian and network trajectories end at 0.02, the VE network's sigma_min.
    "p2_euler10_net": {"solver": "euler", "num_steps": 10, "sigma_min": 0.02, "sigma_max": 80.0, "rho": 7.0},
}
# The solver the papers' *networks* use beside each preset: theory samples drawn with another
# solver mix the solvers' discretisation error into theory-vs-network comparisons.
NETWORK_SOLVER = {"p1_optimal": "heun", "p1_net": "heun", "p2_euler10": "euler", "p2_euler10_net": "euler"}


def sample_preset(name: str, net, latents: torch.Tensor, class_labels=None, **overrides) -> torch.Tensor:
    """Runs :func:`edm_sampler` with ``PRESETS[name]`` (keyword ``overrides`` win).

    Returns:
        float64 ``[B, C, H, W]`` samples.
    """
    if name not in PRESETS:
        raise ValueError(f"name must be one of {', '.join(repr(k) for k in PRESETS)}, got {name!r}")
    return edm_sampler(net, latents, class_labels, **{**PRESETS[name], **overrides})


def sampler_mismatch(theory_solver: str, preset: str) -> str | None:
    """Why theory samples drawn with ``theory_solver`` are not comparable with the networks of
    ``preset``, or None when they use the same solver.

    Zhang et al. sample their optimal denoiser with Euler (preset ``p1_optimal``) but their
    networks with Heun; comparing the two mixes the solvers' discretisation difference into the
    reproducibility numbers. A preset used as published is not flagged for its own solver.
    """
    net_solver = NETWORK_SOLVER[preset]
    if theory_solver == net_solver or theory_solver == PRESETS[preset]["solver"]:
        return None
    return (
        f"theory samples use solver {theory_solver!r} but the networks of preset {preset!r} use "
        f"{net_solver!r}; the comparison includes the solvers' discretisation difference"
    )


# --------------------------------------------------------------------------------------------
# One entry point for workflows: sample(denoiser, latents, sampler=..., steps=...)
# --------------------------------------------------------------------------------------------

SAMPLERS = ("heun", "euler", "dpm", "exact")


def nfe(sampler: str, steps: int) -> int:
    """Denoiser evaluations per sample: Heun ``2N − 1``, Euler ``N``, DPM-Solver ``steps + 1``
    (with the final ``D(x; σ_min)``); ``"exact"`` counts as the ODE's ``N`` steps (closed form)."""
    return {"heun": 2 * steps - 1, "euler": steps, "dpm": steps + 1, "exact": steps}[sampler]


def has_closed_form(denoiser, sampler: str, class_labels=None) -> bool:
    """True when :func:`sample` uses the denoiser's closed-form trajectory (Gaussian denoisers
    with ``"heun"``, ``"euler"`` or ``"exact"``, unconditional)."""
    return hasattr(denoiser, "trajectory") and sampler in ("heun", "euler", "exact") and class_labels is None


def check_sampler(sampler: str, steps: int, denoiser) -> None:
    """Raise ValueError unless ``sampler``/``steps`` can run with ``denoiser``."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(map(repr, SAMPLERS))}, got {sampler!r}")
    minimum = 3 if sampler == "dpm" else 2
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < minimum:
        raise ValueError(f"steps must be an integer >= {minimum} for sampler {sampler!r}, got {steps!r}")
    if sampler == "exact" and not hasattr(denoiser, "trajectory"):
        raise ValueError(
            f"sampler 'exact' (the closed-form ODE solution) needs a GaussianDenoiser, "
            f"got {type(denoiser).__name__}; use 'heun', 'euler' or 'dpm'"
        )


def _dpm_kwargs(denoiser, steps: int, sigma_min: float, sigma_max: float) -> dict:
    """DPM-Solver on the EDM family (s = 1, σ = t) from σ_max down to σ_min, then ``D(x; σ_min)``
    (``denoise_to_zero``, the analogue of EDM's final Euler step into σ = 0)."""
    lo, hi = clamp_sigma_range(sigma_min, sigma_max, denoiser)
    return {"family": EDM(), "steps": int(steps), "t_start": hi, "t_end": lo, "denoise_to_zero": True}


def evaluation_sigmas(
    denoiser, sampler: str, steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> list[float]:
    """For ``"dpm"``: the σ of every denoiser evaluation of :func:`sample`, in order (found by
    running the solver on a 1-pixel state with a recording zero denoiser). Otherwise EDM's step
    grid ``t_0 .. t_{N-1}, 0`` (:func:`edm_grid`)."""
    if sampler != "dpm":
        return edm_grid(steps, sigma_min, sigma_max, rho, denoiser).tolist()
    seen: list[float] = []

    def record(x, sigma):
        seen.append(float(sigma))
        return torch.zeros_like(x)

    dpm_solver(record, torch.zeros(1, 1, 1, 1, dtype=_F64), **_dpm_kwargs(denoiser, steps, sigma_min, sigma_max))
    return seen


def sample(
    denoiser,
    latents: torch.Tensor,
    class_labels=None,
    *,
    sampler: str = "heun",
    steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    callback=None,
) -> torch.Tensor:
    """Deterministic samples of one batch.

    * ``"heun"``/``"euler"``: :func:`edm_sampler` (EDM Algorithm 2, no churn).
    * ``"dpm"``: singlestep order-3 DPM-Solver with ``steps`` evaluations on the EDM family
      between σ_max and σ_min (log-SNR spacing), then ``D(x; σ_min)``.
    * A Gaussian denoiser with ``"heun"``, ``"euler"`` or ``"exact"`` (unconditional) uses its
      closed-form trajectory (two ``[B, d] × [d, d]`` products whatever ``steps`` is), equal to
      step-by-step sampling up to rounding.

    Args:
        denoiser: an EDM-style denoiser ``D(x, sigma[, class_labels])``.
        latents: unit Gaussian noise ``[B, C, H, W]``.
        class_labels: one-hot ``[B, label_dim]`` or None.
        sampler: one of :data:`SAMPLERS`.
        steps: EDM grid size N (``"dpm"``: the number of solver evaluations).
        sigma_min: smallest σ of the grid (clamped to the denoiser's support).
        sigma_max: largest σ of the grid (clamped to the denoiser's support).
        rho: EDM grid exponent.
        callback: per-step callback passed to the sampler (not called on the closed-form path).

    Returns:
        float64 ``[B, C, H, W]`` samples.
    """
    inner = getattr(denoiser, "inner", denoiser)  # a TimedDenoiser exposes what it wraps
    check_sampler(sampler, steps, inner)
    if has_closed_form(inner, sampler, class_labels):
        return inner.trajectory(latents, edm_grid(steps, sigma_min, sigma_max, rho, inner), solver=sampler)
    if sampler == "dpm":
        return dpm_solver(
            denoiser, latents, class_labels, callback=callback, **_dpm_kwargs(denoiser, steps, sigma_min, sigma_max)
        )
    return edm_sampler(
        denoiser,
        latents,
        class_labels,
        num_steps=steps,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        rho=rho,
        solver=sampler,
        callback=callback,
    )


# --------------------------------------------------------------------------------------------
# Flow matching: the ODE dx/dt = v(x, t) of the linear interpolant, integrated in t
# --------------------------------------------------------------------------------------------

FLOW_SOLVERS = ("euler", "heun", "midpoint")


def flow_nfe(solver: str, times) -> int:
    """Velocity evaluations of :func:`sample_flow` on a grid ``times`` (``[N + 1]``): Euler N,
    midpoint 2N, Heun 2N minus one per step that ends at t = 0 (an Euler step, as in EDM)."""
    t = torch.as_tensor(times, dtype=_F64)
    steps = t.numel() - 1
    return {"euler": steps, "midpoint": 2 * steps, "heun": 2 * steps - int((t[1:] == 0).sum())}[solver]


def _check_times(times) -> torch.Tensor:
    t = torch.as_tensor(times, dtype=_F64)
    if (
        t.ndim != 1
        or t.numel() < 2
        or not bool(torch.isfinite(t).all())
        or bool(t[0] > 1)
        or bool(t[-1] < 0)
        or not bool((t[1:] < t[:-1]).all())
    ):
        raise ValueError(
            f"times must be a strictly decreasing 1-D grid in [0, 1] with >= 2 entries, got {t.tolist()[:8]}"
        )
    return t


def sample_flow(
    model,
    latents: torch.Tensor,
    class_labels=None,
    *,
    solver: str = "euler",
    steps: int = 28,
    shift: float = 1.0,
    grid: str = "uniform",
    times=None,
    callback=None,
) -> torch.Tensor:
    """Deterministic samples of a flow-matching model: ``dx/dt = v(x, t)`` from ``t_0`` to ``t_N``.

    The linear interpolant ``x_t = (1 − t) x0 + t ε`` (:class:`~diffrepro.schedules.RectifiedFlow`)
    starts from ``x = t_0 · latents`` (pure noise ``ε`` at ``t_0 = 1``, the start of SD3/Flux
    samplers; for ``t_0 < 1`` the same start as EDM's ``σ_max ε`` in the unscaled variable) and
    steps in t with

    * ``"euler"``: ``x ← x + h v(x, t)`` (the sampler of rectified flow and diffusers'
      ``FlowMatchEulerDiscreteScheduler``; on the mapped grid it equals EDM's Euler step and DDIM);
    * ``"heun"``: the trapezoidal correction with ``v(x + h v, t + h)`` while ``t + h > 0``, an
      Euler step into ``t = 0`` (EDM Algorithm 2 in t);
    * ``"midpoint"``: ``x ← x + h v(x + (h/2) v, t + h/2)``.

    Args:
        model: an object with ``velocity(x, t, class_labels)`` (every
            :class:`~diffrepro.denoisers.Denoiser`: the exact velocity of its data distribution;
            :class:`~diffrepro.flow.VelocityDenoiser`: a velocity network), or a callable
            ``v(x, t[, class_labels])``; ``t`` is a 0-dim float64 tensor.
        latents: unit Gaussian noise ``[B, C, H, W]``.
        class_labels: passed through when not None.
        solver: one of :data:`FLOW_SOLVERS`.
        steps: N for the default grid (:func:`~diffrepro.schedules.flow_times`).
        shift: timestep shift of the default grid (SD3: 3).
        grid: ``"uniform"`` or ``"diffusers"`` (the default grid's kind).
        times: explicit decreasing grid ``[N + 1]`` in [0, 1] (overrides steps/shift/grid).
        callback: called per step with ``dict(i, t, t_next, x, velocity)``.

    Returns:
        float64 ``[B, C, H, W]`` samples (the state at ``t_N``, usually 0).
    """
    latents = _check_state("latents", latents)
    _check_choice("solver", solver, FLOW_SOLVERS)
    t = (flow_times(steps, shift, grid=grid) if times is None else _check_times(times)).to(latents.device)
    fn = getattr(model, "velocity", model)
    call = (
        (lambda x, tt: fn(x, tt).to(_F64)) if class_labels is None else (lambda x, tt: fn(x, tt, class_labels).to(_F64))
    )
    x = latents.to(_F64) * t[0]
    for i in range(t.numel() - 1):
        t_cur, t_next = t[i], t[i + 1]
        h = t_next - t_cur
        v = call(x, t_cur)
        if callback is not None:
            callback({"i": i, "t": t_cur, "t_next": t_next, "x": x, "velocity": v})
        if solver == "midpoint":
            x = x + h * call(x + 0.5 * h * v, t_cur + 0.5 * h)
        elif solver == "heun" and t_next > 0:
            x = x + 0.5 * h * (v + call(x + h * v, t_next))
        else:
            x = x + h * v
    return x
