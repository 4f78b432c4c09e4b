# SPDX-License-Identifier: Apache-2.0
"""Flow matching: the rectified-flow family and grids, exact velocities, flow samplers, the
Gaussian flow against its closed form and the flow ↔ EDM reparametrisation."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffrepro import data, samplers, schedules
from diffrepro.denoisers import EmpiricalDenoiser, GaussianDenoiser, TimedDenoiser
from diffrepro.flow import VelocityDenoiser
from diffrepro.reference import empirical_denoiser_reference

F64 = torch.float64


@pytest.fixture(scope="module")
def small():
    """500 real CIFAR-10 images average-pooled to 3×8×8 (d = 192), float64 in [-1, 1]."""
    return F.avg_pool2d(data.decode(torch.from_numpy(data.default_dataset().images)), 4)


@pytest.fixture(scope="module")
def gaussian(small):
    return GaussianDenoiser.from_data(small[:400])


def _noise(b, seed=0):
    return torch.randn(b, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _eig(train):
    """Independent Gaussian fit for the oracle: mean and eigenpairs of np.cov (biased)."""
    rows = train.reshape(len(train), -1).numpy()
    lam, u = np.linalg.eigh(np.cov(rows, rowvar=False, bias=True))
    return torch.from_numpy(rows.mean(0)), torch.from_numpy(lam.clip(0)), torch.from_numpy(u)


def _flow_exact(train, eps, t, t0=1.0):
    """Closed-form flow of N(μ, Σ): with c = Uᵀ(x_t − (1 − t) μ), each direction of variance λ
    follows c(t) = c(t0) sqrt((λ(1 − t)² + t²) / (λ(1 − t0)² + t0²)), from x_{t0} = t0 ε."""
    mu, lam, u = _eig(train)
    c0 = (t0 * eps.reshape(len(eps), -1) - (1 - t0) * mu) @ u
    c = c0 * torch.sqrt((lam * (1 - t) ** 2 + t**2) / (lam * (1 - t0) ** 2 + t0**2))
    return ((1 - t) * mu + c @ u.T).reshape(eps.shape)


def _gaussian_velocity(train):
    """Closed-form velocity d x_t/dt of the Gaussian flow (derivative of _flow_exact)."""
    mu, lam, u = _eig(train)

    def v(x, t):
        t = float(t)
        c = (x.reshape(len(x), -1) - (1 - t) * mu) @ u
        rate = (t - lam * (1 - t)) / (lam * (1 - t) ** 2 + t**2)
        return (-mu + (c * rate) @ u.T).reshape(x.shape)

    return v


def test_family_is_the_linear_interpolant():
    fam = schedules.RectifiedFlow()
    t = torch.linspace(0.01, 0.99, 50, dtype=F64)
    torch.testing.assert_close(fam.s(t) * fam.sigma(t), t, rtol=1e-14, atol=0)  # x_t = (1-t) x0 + t ε
    torch.testing.assert_close(fam.sigma_inv(fam.sigma(t)), t, rtol=1e-14, atol=0)
    h = 1e-6
    for f, df in ((fam.s, fam.s_deriv), (fam.sigma, fam.sigma_deriv)):
        torch.testing.assert_close(df(t), (f(t + h) - f(t - h)) / (2 * h), rtol=1e-6, atol=1e-8)
    assert abs(float(fam.sigma(fam.t_max)) - 80) < 1e-12 and abs(float(fam.sigma(fam.t_min)) - 0.002) < 1e-15


def test_time_grids():
    torch.testing.assert_close(schedules.flow_times(4), torch.tensor([1, 0.75, 0.5, 0.25, 0], dtype=F64))
    # SD3's shift 3: t = 0.5 -> 1.5 / 2.
    assert float(schedules.shift_times(0.5, 3.0)) == 0.75
    t = schedules.flow_times(10, 3.0)
    assert t[0] == 1 and t[-1] == 0 and bool((t[1:] < t[:-1]).all())
    # diffusers FlowMatchEulerDiscreteScheduler(shift=3).set_timesteps(5), re-derived in numpy.
    m, s, n = 1000, 3.0, 5
    shift = lambda a: s * a / (1 + (s - 1) * a)  # noqa: E731
    train = shift(np.linspace(1, m, m)[::-1] / m)
    ref = np.append(shift(np.linspace(train[0] * m, train[-1] * m, n) / m), 0.0)
    np.testing.assert_allclose(schedules.flow_times(n, s, grid="diffusers").numpy(), ref, rtol=1e-14)
    with pytest.raises(ValueError, match="grid must be"):
        schedules.flow_times(4, grid="karras")
    with pytest.raises(ValueError, match="shift"):
        schedules.shift_times(0.5, 0.0)


def test_empirical_velocity_against_float64_oracle(small):
    train, x = small[10:60], _noise(3, 1)
    den = EmpiricalDenoiser(train, dtype=F64)
    for t in (0.05, 0.5, 0.9):
        ref = (x - empirical_denoiser_reference(x / (1 - t), train, t / (1 - t)).reshape(x.shape)) / t
        torch.testing.assert_close(den.velocity(x, t), ref, rtol=1e-10, atol=1e-10)
    # t = 1: pure noise, E[x0 | x_1] is the training mean, v = x − mean.
    torch.testing.assert_close(den.velocity(x, 1.0), x - train.mean(0), rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="t must be"):
        den.velocity(x, 1.5)


def test_gaussian_velocity_is_the_closed_form(small, gaussian):
    v, x = _gaussian_velocity(small[:400]), _noise(4, 2)
    for t in (1.0, 0.7, 0.2, 0.01):
        torch.testing.assert_close(gaussian.velocity(x, t), v(x, t), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("solver,order", [("euler", 1), ("heun", 2), ("midpoint", 2)])
def test_gaussian_flow_against_closed_form(small, gaussian, solver, order):
    """Integrating to t = 0.2 (away from the stiff end): error → 0 at the solver's order."""
    eps = _noise(4, 3)
    exact = _flow_exact(small[:400], eps, 0.2)
    grids = [torch.linspace(1, 0.2, n + 1, dtype=F64) for n in (16, 32)]
    errs = [float((samplers.sample_flow(gaussian, eps, solver=solver, times=t) - exact).abs().max()) for t in grids]
    assert errs[1] < {1: 5e-2, 2: 1e-3}[order]
    assert errs[0] / errs[1] > 2**order * 0.9, errs  # (midpoint is 3rd order on this linear ODE)


def test_gaussian_flow_to_zero_is_the_exact_map(small, gaussian):
    """From pure noise at t = 1 to t = 0: x_0 = μ + U √Λ Uᵀ ε (midpoint, 100 steps)."""
    eps = _noise(3, 4)
    out = samplers.sample_flow(gaussian, eps, solver="midpoint", steps=100)
    assert float((out - _flow_exact(small[:400], eps, 0.0)).abs().max()) < 1e-3


def test_flow_and_edm_exact_solutions_share_endpoints(small, gaussian):
    """x_t = (1 − t) x̃(σ(t)): the exact flow from t0 = 80/81, x = t0 ε, ends where EDM's exact
    Gaussian trajectory from σ = 80 ends (both closed forms, independently written)."""
    eps = _noise(3, 5)
    t0 = 80 / 81
    flow = _flow_exact(small[:400], eps, 0.0, t0=t0)
    edm = gaussian.trajectory(eps, torch.tensor([80.0, 0.0], dtype=F64), solver="exact")
    torch.testing.assert_close(flow, edm, rtol=1e-10, atol=1e-10)


def test_flow_euler_is_edm_euler_on_the_mapped_grid(small):
    """Euler in t on t_i = σ_i/(1 + σ_i) equals EDM's Euler in σ (float64, every step):
    x_t = (1 − t) x̃ at each grid point and the same endpoint at t = σ = 0."""
    train, eps = small[:60], _noise(2, 6)
    den = EmpiricalDenoiser(train, dtype=F64)
    sig = samplers.edm_grid(12)
    times = sig / (1 + sig)
    flow_states, edm_states = [], []
    flow = samplers.sample_flow(den, eps, solver="euler", times=times, callback=lambda d: flow_states.append(d["x"]))
    edm = samplers.edm_sampler(den, eps, num_steps=12, solver="euler", callback=lambda d: edm_states.append(d["x"]))
    for t, xf, xe in zip(times, flow_states, edm_states):
        torch.testing.assert_close(xf, (1 - t) * xe, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(flow, edm, rtol=1e-11, atol=1e-12)


class _VelocityNet(torch.nn.Module):
    """A "network" returning the Gaussian closed-form velocity at timestep 1000 t (diffusers style)."""

    def __init__(self, v):
        super().__init__()
        self.v = v
        self.config = {"in_channels": 3, "sample_size": 8}

    def forward(self, x, timestep):
        return SimpleNamespace(sample=torch.stack([self.v(xi[None], ti / 1000)[0] for xi, ti in zip(x, timestep)]))


def test_velocity_network_adapter(small, gaussian):
    net = _VelocityNet(_gaussian_velocity(small[:400]))
    den = VelocityDenoiser(net, dtype=F64)
    x = _noise(2, 7) * 3
    for sigma in (0.05, 1.0, 20.0):
        torch.testing.assert_close(den(x, sigma), gaussian(x, sigma), rtol=1e-9, atol=1e-9)
    eps = _noise(2, 8)
    times = schedules.flow_times(8, 3.0)
    torch.testing.assert_close(samplers.sample_flow(den, eps, solver="heun", times=times),
                               samplers.sample_flow(gaussian, eps, solver="heun", times=times), rtol=1e-9, atol=1e-9)
    # Autograd Jacobian products through the network equal the Gaussian's exact ones.
    v = _noise(2, 9)
    torch.testing.assert_close(den.jvp(x, 0.5, v), gaussian.jvp(x, 0.5, v), rtol=1e-8, atol=1e-9)


def test_sample_flow_validation_and_nfe(gaussian):
    eps = _noise(1)
    calls = []

    def v(x, t):
        calls.append(float(t))
        return torch.zeros_like(x)

    for solver, count in (("euler", 4), ("heun", 7), ("midpoint", 8)):
        calls.clear()
        samplers.sample_flow(v, eps, solver=solver, steps=4)
        assert len(calls) == count == samplers.flow_nfe(solver, schedules.flow_times(4))
    with pytest.raises(ValueError, match="solver must be"):
        samplers.sample_flow(gaussian, eps, solver="dpm")
    with pytest.raises(ValueError, match="times must be"):
        samplers.sample_flow(gaussian, eps, times=[1.2, 0.5, 0.0])
    with pytest.raises(ValueError, match="times must be"):
        samplers.sample_flow(gaussian, eps, times=[0.5, 0.7, 0.0])


def test_timed_denoiser_times_velocity_calls(gaussian):
    eps, times = _noise(2, 10), schedules.flow_times(5)
    timed = TimedDenoiser(gaussian)
    assert torch.equal(samplers.sample_flow(timed, eps, solver="midpoint", times=times),
                       samplers.sample_flow(gaussian, eps, solver="midpoint", times=times))
    assert timed.calls == 10 and timed.rows == 20 and timed.seconds > 0
