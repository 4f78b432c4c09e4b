# SPDX-License-Identifier: Apache-2.0
"""Tests of diffrepro.samplers against independent references.

References: a plain float64 transcription of EDM Algorithm 2 and of EDM's ablation loop written
here, the closed-form PF-ODE of a Gaussian data distribution, and diffusers'
EDMEulerScheduler / DPMSolverSinglestepScheduler / DPMSolverMultistepScheduler.
"""

import math

import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EDMEulerScheduler,
)

from diffrepro import samplers as SM
from diffrepro import schedules as S

F64 = torch.float64
SHAPE = (3, 1, 2, 4)  # B, C, H, W: d = 8 directions
LAM = torch.tensor([0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 4.0, 100.0], dtype=F64).reshape(1, 1, 2, 4)
MU = torch.linspace(-0.5, 0.5, 8, dtype=F64).reshape(1, 1, 2, 4)


def wiener(x, sigma, class_labels=None):
    """Exact denoiser of N(MU, diag LAM) data (the Wiener filter); sigma scalar or [B]."""
    sig = torch.as_tensor(sigma, dtype=F64)
    if sig.ndim == 1:
        sig = sig.reshape(-1, 1, 1, 1)
    out = MU + LAM / (LAM + sig**2) * (x.to(F64) - MU)
    return out if class_labels is None else out + 0 * class_labels.sum()


def exact(x_T, sigma_T, sigma):
    """Exact PF-ODE solution of the Gaussian model from sigma_T to sigma:
    c(sigma) = c(sigma_T) sqrt((lam + sigma^2) / (lam + sigma_T^2))."""
    return MU + torch.sqrt((LAM + sigma**2) / (LAM + sigma_T**2)) * (x_T - MU)


@pytest.fixture
def latents():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def edm_algorithm2(
    D,
    latents,
    num_steps,
    sigma_min=0.002,
    sigma_max=80.0,
    rho=7.0,
    heun=True,
    S_churn=0.0,
    S_min=0.0,
    S_max=math.inf,
    S_noise=1.0,
    noise=None,
):
    """Straightforward float64 EDM Algorithm 2 (Karras et al. 2022), Python floats for t."""
    t = [
        (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
        for i in range(num_steps)
    ] + [0.0]
    x = latents.to(F64) * t[0]
    for i in range(num_steps):
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t[i] <= S_max else 0.0
        t_hat = t[i] + gamma * t[i]
        x_hat = x + math.sqrt(t_hat**2 - t[i] ** 2) * S_noise * noise(x)
        d = (x_hat - D(x_hat, t_hat)) / t_hat
        x = x_hat + (t[i + 1] - t_hat) * d
        if heun and i < num_steps - 1:
            d2 = (x - D(x, t[i + 1])) / t[i + 1]
            x = x_hat + (t[i + 1] - t_hat) * (0.5 * d + 0.5 * d2)
    return x


def seeded_noise(seed=1):
    g = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype)


# ---------------------------------------------------------------------------------------------
# EDM sampler
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["heun", "euler"])
@pytest.mark.parametrize("num_steps", [2, 10, 18])
def test_edm_sampler_matches_algorithm2(latents, solver, num_steps):
    got = SM.edm_sampler(wiener, latents, num_steps=num_steps, solver=solver)
    want = edm_algorithm2(wiener, latents, num_steps, heun=solver == "heun", noise=torch.zeros_like)
    assert got.dtype == F64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_edm_sampler_with_churn_matches_algorithm2(latents):
    # churn at every step: both draw the same noise sequence
    got = SM.edm_sampler(wiener, latents, num_steps=12, randn_like=seeded_noise(), S_churn=40.0, S_noise=1.003)
    want = edm_algorithm2(wiener, latents, 12, noise=seeded_noise(), S_churn=40.0, S_noise=1.003)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # churn restricted to a sigma window: EDM draws randn_like at every step, also outside the
    # window where gamma = 0, so a seeded stream gives the same noise to every later churn step
    kw = {"S_churn": 40.0, "S_min": 0.05, "S_max": 50.0, "S_noise": 1.003}
    got = SM.edm_sampler(wiener, latents, num_steps=12, randn_like=seeded_noise(), **kw)
    want = edm_algorithm2(wiener, latents, 12, noise=seeded_noise(), **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_gamma_zero_draws_no_noise(latents):
    def forbidden(x):
        raise AssertionError("randn_like called with gamma = 0")

    got = SM.edm_sampler(wiener, latents, randn_like=forbidden)
    torch.testing.assert_close(got, edm_algorithm2(wiener, latents, 18, noise=seeded_noise()), rtol=1e-12, atol=1e-12)


def test_euler_per_step_factor_and_p2_note(latents):
    """Euler on the Gaussian model multiplies each direction by (lam + s_i s_{i+1})/(lam + s_i^2)."""
    N = 10
    t = S.edm_sigmas(N).tolist() + [0.0]
    factor = torch.ones_like(LAM)
    for i in range(N):
        factor = factor * (LAM + t[i] * t[i + 1]) / (LAM + t[i] ** 2)
    got = SM.edm_sampler(wiener, latents, num_steps=N, solver="euler")
    torch.testing.assert_close(got, MU + factor * (80.0 * latents.double() - MU), rtol=1e-12, atol=1e-12)
    # Li, Dai, Qu's Euler-10 note: overall factor for lambda = 100 is 0.101 (Euler-10) against 0.124 (exact)
    assert float(factor[0, 0, 1, 3]) == pytest.approx(0.101, abs=5e-4)
    assert math.sqrt(100 / (100 + 80**2)) == pytest.approx(0.124, abs=5e-4)


def test_heun_per_step_factor(latents):
    N = 7
    t = S.edm_sigmas(N).tolist() + [0.0]
    factor = torch.ones_like(LAM)
    for i in range(N):
        h = t[i + 1] - t[i]
        a_i = t[i] / (LAM + t[i] ** 2)
        if i < N - 1:
            a_n = t[i + 1] / (LAM + t[i + 1] ** 2)
            factor = factor * (1 + h / 2 * (a_i + a_n * (1 + h * a_i)))
        else:
            factor = factor * LAM / (LAM + t[i] ** 2)
    got = SM.edm_sampler(wiener, latents, num_steps=N)
    torch.testing.assert_close(got, MU + factor * (80.0 * latents.double() - MU), rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("solver, ratio", [("euler", 2.0), ("heun", 4.0)])
def test_convergence_order(latents, solver, ratio):
    """Halving the step doubles (Euler) or quadruples (Heun) the accuracy, vs the exact ODE."""
    sampler = SM.sample_euler if solver == "euler" else SM.sample_heun
    x_T = 80.0 * latents.double()
    errs = []
    for n in (16, 32, 64, 128):
        sig = S.edm_sigmas(n)
        errs.append(rel_err(sampler(wiener, x_T, sig), exact(x_T, 80.0, 0.002)))
    rates = [errs[k] / errs[k + 1] for k in range(3)]
    assert all(0.85 * ratio < r < 1.2 * ratio for r in rates[1:]), (errs, rates)


def test_k_diffusion_calls_match_edm_sampler(latents):
    sig = torch.cat([S.edm_sigmas(18), torch.zeros(1, dtype=F64)])
    seen = []

    def model(x, sigma):
        assert sigma.shape == (x.shape[0],) and sigma.dtype == F64
        seen.append(float(sigma[0]))
        return wiener(x, sigma)

    for solver, fn in (("heun", SM.sample_heun), ("euler", SM.sample_euler)):
        got = fn(model, 80.0 * latents.double(), sig)
        torch.testing.assert_close(got, SM.edm_sampler(wiener, latents, solver=solver), rtol=1e-13, atol=1e-13)
    assert 0.0 not in seen


def test_network_support_and_round_sigma(latents):
    calls = []

    class VENet:
        sigma_min, sigma_max = 0.02, 100.0

        def __call__(self, x, sigma):
            calls.append(float(sigma))
            return wiener(x, sigma)

    SM.edm_sampler(VENet(), latents, num_steps=5)
    assert calls[0] == 80.0 and min(calls) == pytest.approx(0.02)

    class IDDPMNet(S.IDDPMRounding):
        def __call__(self, x, sigma):
            calls.append(float(sigma))
            return wiener(x, sigma)

    calls.clear()
    net = IDDPMNet()
    SM.edm_sampler(net, latents, num_steps=6, S_churn=10.0, randn_like=seeded_noise())
    u = S.iddpm_u().tolist()
    assert all(c in u for c in calls)
    assert min(calls) == pytest.approx(0.006425, rel=1e-3)


def test_class_labels_and_callback(latents):
    labels = torch.eye(3)
    seen = []

    def net(x, sigma, class_labels):
        assert class_labels is labels
        return wiener(x, sigma)

    SM.edm_sampler(net, latents, labels, num_steps=4, callback=seen.append)
    assert [d["i"] for d in seen] == [0, 1, 2, 3]
    assert set(seen[0]) >= {"i", "sigma", "x", "denoised"}
    assert float(seen[0]["sigma"]) == 80.0 and seen[0]["x"].shape == SHAPE


# ---------------------------------------------------------------------------------------------
# First-order update: Euler = DDIM = DPM-Solver-1
# ---------------------------------------------------------------------------------------------


def test_euler_ddim_dpm1_are_one_update(latents):
    f = S.DiscreteDDPM()
    abar = f.alphas_cumprod
    a_t, a_p = abar[700], abar[400]
    sig_t, sig_p = ((1 - a_t) / a_t).sqrt(), ((1 - a_p) / a_p).sqrt()
    x = latents.double()
    x0 = wiener(x / a_t.sqrt(), sig_t)
    eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    ddim = a_p.sqrt() * x0 + (1 - a_p).sqrt() * eps  # Song et al. 2021, eta = 0
    lam_t, lam_p = torch.log(a_t.sqrt() / (1 - a_t).sqrt()), torch.log(a_p.sqrt() / (1 - a_p).sqrt())
    dpm1 = (a_p.sqrt() / a_t.sqrt()) * x - (1 - a_p).sqrt() * torch.expm1(lam_p - lam_t) * eps  # Lu et al. 2022
    got = SM.euler_update(x, x0, sig_t, sig_p, a_t.sqrt(), a_p.sqrt())
    torch.testing.assert_close(got, ddim, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, dpm1, rtol=1e-12, atol=1e-12)
    assert SM.ddim_update is SM.euler_update and SM.dpm_solver_1_update is SM.euler_update


# ---------------------------------------------------------------------------------------------
# Ablation sampler and general families
# ---------------------------------------------------------------------------------------------


def edm_ablation_reference(
    D,
    latents,
    num_steps,
    solver,
    disc,
    schedule,
    scaling,
    net_min=0.0,
    net_max=math.inf,
    round_sigma=lambda s: s,
    eps_s=1e-3,
    rho=7.0,
    alpha=1.0,
):
    """Plain transcription of the ablation loop of EDM's generate.py (Karras et al. 2022)."""
    vp_sig = lambda bd, bm: lambda t: (math.e ** (0.5 * bd * t**2 + bm * t) - 1) ** 0.5
    smin = {"vp": vp_sig(19.9, 0.1)(eps_s), "ve": 0.02, "iddpm": 0.002, "edm": 0.002}[disc]
    smax = {"vp": vp_sig(19.9, 0.1)(1.0), "ve": 100.0, "iddpm": 81.0, "edm": 80.0}[disc]
    smin, smax = max(smin, net_min), min(smax, net_max)
    bd = 2 * (math.log(smin**2 + 1) / eps_s - math.log(smax**2 + 1)) / (eps_s - 1)
    bm = math.log(smax**2 + 1) - 0.5 * bd
    idx = torch.arange(num_steps, dtype=F64)
    if disc == "vp":
        sigma_steps = vp_sig(bd, bm)(1 + idx / (num_steps - 1) * (eps_s - 1))
    elif disc == "ve":
        sigma_steps = (smax**2 * (smin**2 / smax**2) ** (idx / (num_steps - 1))).sqrt()
    elif disc == "iddpm":
        u = S.iddpm_u()
        uf = u[(u >= smin) & (u <= smax)]
        sigma_steps = uf[((len(uf) - 1) / (num_steps - 1) * idx).round().long()]
    else:
        sigma_steps = (smax ** (1 / rho) + idx / (num_steps - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    if schedule == "vp":
        sigma = vp_sig(bd, bm)
        dsigma = lambda t: 0.5 * (bm + bd * t) * (sigma(t) + 1 / sigma(t))
        sigma_inv = lambda s: ((bm**2 + 2 * bd * (s**2 + 1).log()).sqrt() - bm) / bd
    elif schedule == "ve":
        sigma, dsigma, sigma_inv = (lambda t: t.sqrt()), (lambda t: 0.5 / t.sqrt()), (lambda s: s**2)
    else:
        sigma, dsigma, sigma_inv = (lambda t: t), (lambda t: 1), (lambda s: s)
    if scaling == "vp":
        s = lambda t: 1 / (1 + sigma(t) ** 2).sqrt()
        ds = lambda t: -sigma(t) * dsigma(t) * s(t) ** 3
    else:
        s, ds = (lambda t: 1), (lambda t: 0)
    t_steps = torch.cat([sigma_inv(round_sigma(sigma_steps)), torch.zeros(1, dtype=F64)])
    x = latents.to(F64) * (sigma(t_steps[0]) * s(t_steps[0]))
    for i in range(num_steps):
        t_hat, t_next = t_steps[i], t_steps[i + 1]
        h = t_next - t_hat
        d = (dsigma(t_hat) / sigma(t_hat) + ds(t_hat) / s(t_hat)) * x - dsigma(t_hat) * s(t_hat) / sigma(t_hat) * D(
            x / s(t_hat), sigma(t_hat)
        )
        if solver == "euler" or i == num_steps - 1:
            x = x + h * d
        else:
            tp, xp = t_hat + alpha * h, x + alpha * h * d
            dp = (dsigma(tp) / sigma(tp) + ds(tp) / s(tp)) * xp - dsigma(tp) * s(tp) / sigma(tp) * D(
                xp / s(tp), sigma(tp)
            )
            x = x + h * ((1 - 1 / (2 * alpha)) * d + 1 / (2 * alpha) * dp)
    return x


@pytest.mark.parametrize(
    "solver, disc, schedule, scaling",
    [
        ("euler", "vp", "vp", "vp"),
        ("euler", "ve", "ve", "none"),
        ("heun", "edm", "vp", "none"),
        ("heun", "vp", "linear", "vp"),
        ("heun", "ve", "ve", "vp"),
    ],
)
def test_ablation_matches_edm_reference(latents, solver, disc, schedule, scaling):
    got = SM.ablation_sampler(
        wiener, latents, num_steps=12, solver=solver, discretization=disc, schedule=schedule, scaling=scaling
    )
    want = edm_ablation_reference(wiener, latents, 12, solver, disc, schedule, scaling)
    assert rel_err(got, want) < 1e-9


def test_ablation_iddpm_with_rounding_net(latents):
    class IDDPMNet(S.IDDPMRounding):
        def __call__(self, x, sigma):
            return wiener(x, sigma)

    net = IDDPMNet()
    got = SM.ablation_sampler(net, latents, num_steps=10, solver="euler", discretization="iddpm")
    want = edm_ablation_reference(
        wiener,
        latents,
        10,
        "euler",
        "iddpm",
        "linear",
        "none",
        net_min=net.sigma_min,
        net_max=net.sigma_max,
        round_sigma=net.round_sigma,
    )
    assert rel_err(got, want) < 1e-12


def test_ablation_default_equals_edm_sampler(latents):
    got = SM.ablation_sampler(wiener, latents, num_steps=18)
    assert rel_err(got, SM.edm_sampler(wiener, latents, num_steps=18)) < 1e-12


def test_ablation_song_vp_converges_to_exact_ode(latents):
    got = SM.ablation_sampler(
        wiener, latents, num_steps=256, solver="heun", discretization="vp", schedule="vp", scaling="vp"
    )
    _lo, hi = S.default_sigma_range("vp")
    x_T = latents.double() * hi  # unscaled start
    assert rel_err(got, exact(x_T, hi, 0.0)) < 1e-3


@pytest.mark.parametrize("family", [S.SubVP(), S.VE(), S.VP(), S.DiscreteDDPM()], ids=lambda f: f.name)
def test_sample_ode_general_families(latents, family):
    errs = []
    for n in (100, 200):
        t = torch.linspace(family.t_max, family.t_min, n + 1, dtype=F64)
        got = SM.sample_ode(wiener, latents, family=family, t_steps=t, solver="heun")
        sig_T, sig_0 = family.sigma(t[0]), family.sigma(t[-1])
        errs.append(rel_err(got, family.s(t[-1]) * exact(latents.double() * sig_T, sig_T, sig_0)))
    assert errs[1] < 2e-3, errs
    if family.name != "ddpm":  # piecewise-linear log alpha: not smooth, no clean order
        assert errs[0] / errs[1] > 3.5, errs


# ---------------------------------------------------------------------------------------------
# DPM-Solver
# ---------------------------------------------------------------------------------------------


def test_singlestep_orders():
    assert SM.singlestep_orders(20, 3) == [3] * 6 + [2]
    assert SM.singlestep_orders(21, 3) == [3] * 6 + [2, 1]
    assert SM.singlestep_orders(22, 3) == [3] * 7 + [1]
    assert SM.singlestep_orders(100, 3) == [3] * 33 + [1]  # P1 App. F: 34 outer steps, 100 NFE
    assert SM.singlestep_orders(10, 2) == [2] * 5
    assert SM.singlestep_orders(11, 2) == [2] * 5 + [1]
    assert SM.singlestep_orders(4, 1) == [1] * 4


def _vp_exact_end(latents, family, t_T, t_0):
    sig_T, sig_0 = family.sigma(t_T), family.sigma(t_0)
    return family.s(t_0) * exact(latents.double() * sig_T, sig_T, sig_0)


@pytest.mark.parametrize(
    "method, order, algorithm, steps, rate",
    [
        ("singlestep", 1, "dpmsolver", (24, 48), 2),
        ("singlestep", 2, "dpmsolver", (48, 96), 4),
        ("singlestep", 3, "dpmsolver", (48, 96), 8),
        ("singlestep", 2, "dpmsolver++", (48, 96), 4),
        ("singlestep", 3, "dpmsolver++", (240, 480), 8),
        ("multistep", 2, "dpmsolver++", (48, 96), 4),
        ("multistep", 2, "dpmsolver", (48, 96), 4),
        # the first (warm-up) multistep update is first order, which caps 3M at global order 2
        ("multistep", 3, "dpmsolver++", (48, 96), 4),
        ("multistep", 3, "dpmsolver", (48, 96), 4),
    ],
)
def test_dpm_solver_convergence_order(latents, method, order, algorithm, steps, rate):
    fam = S.VP()
    want = _vp_exact_end(latents, fam, 1.0, 1e-3)
    errs = [
        rel_err(
            SM.dpm_solver(wiener, latents, family=fam, steps=n, order=order, method=method, algorithm=algorithm), want
        )
        for n in steps
    ]
    assert 0.8 * rate < errs[0] / errs[1] < 1.25 * rate, errs


@pytest.mark.parametrize("skip_type", ["time_uniform", "time_quadratic"])
def test_dpm_solver_time_skips(latents, skip_type):
    fam = S.VP()
    got = SM.dpm_solver(wiener, latents, family=fam, steps=60, order=3, skip_type=skip_type)
    assert rel_err(got, _vp_exact_end(latents, fam, 1.0, 1e-3)) < 2e-3


def test_dpm_solver_nfe_and_denoise_to_zero(latents):
    calls = []

    def counted(x, sigma):
        calls.append(float(sigma))
        return wiener(x, sigma)

    SM.dpm_solver(counted, latents, steps=20, order=3)
    assert len(calls) == 20
    calls.clear()
    SM.dpm_solver(counted, latents, steps=20, order=2, method="multistep", algorithm="dpmsolver++")
    assert len(calls) == 20
    out = SM.dpm_solver(wiener, latents, steps=60, order=3, denoise_to_zero=True)
    fam = S.VP()
    sig_0 = fam.sigma(1e-3)
    x_end = _vp_exact_end(latents, fam, 1.0, 1e-3) / fam.s(1e-3)
    assert rel_err(out, wiener(x_end, sig_0)) < 1e-3


# diffusers deprecates its noise-prediction "dpmsolver" type and trips a numpy 2 deprecation.
DIFFUSERS_WARNINGS = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


def _diffusers_model(sched):
    """eps-prediction wrapper of the Wiener denoiser for a diffusers VP scheduler."""

    def model(sample):
        sigma = sched.sigmas[sched.step_index or 0].double()
        xt = sample * torch.sqrt(1 + sigma**2)
        return (xt - wiener(xt, sigma)) / sigma  # eps = (x - alpha x0) / sigma_vp

    return model


def _run_diffusers(sched, latents):
    x = latents.double().clone()
    for t in sched.timesteps:
        x = sched.step(_diffusers_model(sched)(x), t, x).prev_sample
    return x


@DIFFUSERS_WARNINGS
@pytest.mark.parametrize(
    "order, algorithm", [(2, "dpmsolver++"), (3, "dpmsolver++"), (2, "dpmsolver"), (3, "dpmsolver")]
)
def test_dpm_multistep_matches_diffusers(latents, order, algorithm):
    sched = DPMSolverMultistepScheduler(
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        solver_order=order,
        algorithm_type=algorithm,
        final_sigmas_type="sigma_min",
        lower_order_final=True,
    )
    sched.set_timesteps(20)
    sig = sched.sigmas.double()
    want = _run_diffusers(sched, latents)
    xt = latents.double() * torch.sqrt(1 + sig[0] ** 2)
    got = SM.dpm_solver_multistep(wiener, xt, sig, order=order, algorithm=algorithm) / torch.sqrt(1 + sig[-1] ** 2)
    assert rel_err(got, want) < 1e-5


@DIFFUSERS_WARNINGS
@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
def test_dpm_singlestep_order2_matches_diffusers(latents, algorithm):
    sched = DPMSolverSinglestepScheduler(
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        solver_order=2,
        algorithm_type=algorithm,
        final_sigmas_type="sigma_min",
        lower_order_final=False,
    )
    sched.set_timesteps(20)
    sig = sched.sigmas.double()
    want = _run_diffusers(sched, latents)
    xt = latents.double() * torch.sqrt(1 + sig[0] ** 2)
    got = SM.dpm_solver_singlestep(wiener, xt, sig, [2] * 10, algorithm=algorithm) / torch.sqrt(1 + sig[-1] ** 2)
    assert rel_err(got, want) < 1e-5


@DIFFUSERS_WARNINGS
def test_edm_euler_matches_diffusers(latents):
    sched = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0, prediction_type="epsilon")
    sched.set_timesteps(18)
    sig = sched.sigmas.double()
    torch.testing.assert_close(sig[:-1], S.edm_sigmas(18), rtol=1e-6, atol=0)
    x = 80.0 * latents.double()
    for t in sched.timesteps:
        s = sched.sigmas[sched.step_index or 0].double()
        c_skip = 0.25 / (s**2 + 0.25)
        c_out = s * 0.5 / (s**2 + 0.25).sqrt()
        x = sched.step((wiener(x, s) - c_skip * x) / c_out, t, x).prev_sample
    got = SM.edm_sampler(wiener, latents, num_steps=18, solver="euler")
    assert rel_err(got, x.double()) < 1e-5


# ---------------------------------------------------------------------------------------------
# Inversion, presets, errors
# ---------------------------------------------------------------------------------------------


def test_inversion_recovers_latents(latents):
    images = SM.edm_sampler(wiener, latents, num_steps=128)
    back = SM.ode_inversion(wiener, images, num_steps=128)
    assert back.dtype == F64
    # floor ~1.5 sigma_min^2 / lambda from starting the inversion at sigma_min
    assert rel_err(back, latents.double()) < 5e-4
    # from the exact state at sigma_min, inversion is second order (Heun)
    start = exact(80.0 * latents.double(), 80.0, 0.002)
    e1, e2 = (rel_err(SM.ode_inversion(wiener, start, num_steps=n), latents.double()) for n in (128, 256))
    assert e2 < 3e-4 and 3.5 < e1 / e2 < 4.5, (e1, e2)


def test_presets(latents):
    assert SM.PRESETS["p1_optimal"]["solver"] == "euler" and SM.PRESETS["p1_optimal"]["num_steps"] == 18
    assert SM.PRESETS["p1_net"]["solver"] == "heun" and SM.PRESETS["p1_net"]["num_steps"] == 18
    assert SM.PRESETS["p2_euler10"]["solver"] == "euler" and SM.PRESETS["p2_euler10"]["num_steps"] == 10
    # Li, Dai, Qu end the optimal-denoiser trajectory at 0.002, the Gaussian and network ones at 0.02
    assert SM.PRESETS["p2_euler10"]["sigma_min"] == 0.002 and SM.PRESETS["p2_euler10_net"]["sigma_min"] == 0.02
    got = SM.sample_preset("p2_euler10", wiener, latents)
    torch.testing.assert_close(got, SM.edm_sampler(wiener, latents, num_steps=10, solver="euler"), rtol=0, atol=0)
    got = SM.sample_preset("p2_euler10_net", wiener, latents)
    want = edm_algorithm2(wiener, latents, 10, sigma_min=0.02, heun=False, noise=torch.zeros_like)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(
        ValueError, match="name must be one of 'p1_optimal', 'p1_net', 'p2_euler10', 'p2_euler10_net', got 'p3'"
    ):
        SM.sample_preset("p3", wiener, latents)


def test_sampler_mismatch_only_off_protocol():
    assert SM.sampler_mismatch("euler", "p1_optimal") is None  # the preset as published
    assert SM.sampler_mismatch("heun", "p1_net") is None
    assert "'euler' but the networks of preset 'p1_net' use 'heun'" in SM.sampler_mismatch("euler", "p1_net")
    assert "'heun' but the networks of preset 'p2_euler10' use 'euler'" in SM.sampler_mismatch("heun", "p2_euler10")


def test_cli_choices_match_the_library():
    from diffrepro import sscd, sweeps
    from diffrepro.cli import analysis, features, generate

    assert set(generate.SAMPLER_CHOICES) == set(SM.SAMPLERS) | set(SM.FLOW_SOLVERS)
    assert set(generate.PRESET_CHOICES) == set(SM.PRESETS) == set(SM.NETWORK_SOLVER)
    assert tuple(float(a) for a in analysis._P2_A.split(",")) == sweeps.P2_A_VALUES
    assert set(features._PRESETS) == set(sscd.PRESETS)


@pytest.mark.parametrize(
    "call, exc, message",
    [
        (lambda x: SM.edm_sampler(wiener, x, num_steps=1), ValueError, "num_steps must be an int >= 2, got 1"),
        (
            lambda x: SM.edm_sampler(wiener, x, solver="rk4"),
            ValueError,
            "solver must be one of 'heun', 'euler', got 'rk4'",
        ),
        (
            lambda x: SM.edm_sampler(wiener, x.long()),
            TypeError,
            "latents must be a floating-point tensor, got torch.int64",
        ),
        (lambda x: SM.edm_sampler(wiener, x.numpy()), TypeError, "latents must be a torch.Tensor, got ndarray"),
        (lambda x: SM.edm_sampler(wiener, x, S_churn=-1), ValueError, "S_churn must be a float >= 0, got -1"),
        (
            lambda x: SM.ablation_sampler(wiener, x, discretization="cos"),
            ValueError,
            "discretization must be one of 'vp', 've', 'iddpm', 'edm', got 'cos'",
        ),
        (lambda x: SM.ablation_sampler(wiener, x, alpha=0), ValueError, "alpha must be a float in (0, 1], got 0"),
        (
            lambda x: SM.sample_heun(wiener, x, [80.0]),
            ValueError,
            "sigmas must be a 1-D sequence with at least 2 entries",
        ),
        (
            lambda x: SM.sample_euler(wiener, x, [80.0, -1.0]),
            ValueError,
            "sigmas must be finite, > 0 (the last may be 0)",
        ),
        (lambda x: SM.dpm_solver(wiener, x, order=4), ValueError, "order must be 1, 2 or 3, got 4"),
        (lambda x: SM.dpm_solver(wiener, x, steps=2, order=3), ValueError, "steps must be an int >= order (3), got 2"),
        (
            lambda x: SM.dpm_solver(wiener, x, method="adaptive"),
            ValueError,
            "method must be one of 'singlestep', 'multistep', got 'adaptive'",
        ),
        (lambda x: SM.dpm_solver_multistep(wiener, x, [1.0, 0.0]), ValueError, "sigmas must be finite and > 0"),
        (
            lambda x: SM.dpm_solver_singlestep(wiener, x, [3.0, 2.0, 1.0], [3]),
            ValueError,
            "orders must be 1, 2 or 3 and sum to len(sigmas) - 1 = 2, got [3]",
        ),
        (
            lambda x: SM.sample_ode(wiener, x, family=S.VP(), t_steps=[1.0, 1.0]),
            ValueError,
            "t_steps must be a strictly monotone",
        ),
        (
            lambda x: SM.sample_ode(wiener, x, family="vp", t_steps=[1.0, 0.5]),
            TypeError,
            "family must be a NoiseFamily, got str",
        ),
    ],
)
def test_errors_name_the_argument(latents, call, exc, message):
    with pytest.raises(exc) as info:
        call(latents)
    assert message in str(info.value)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_sigma_loop_is_bitwise_edm_and_writes_nothing_it_was_given(latents, solver, dtype):
    """The loop updates its own temporaries in place (through numpy on the host); the result is
    EDM's out-of-place torch formulas bit for bit on the same grid, and neither the latents nor
    any tensor the denoiser returned (which it may keep, e.g. a cache) nor any x it was called
    with is written."""
    returned, seen = [], []

    def den(x, sigma):
        return wiener(x, sigma).to(x.dtype)

    def keeping(x, sigma):
        seen.append((x, x.clone()))
        out = den(x, sigma)
        returned.append((out, out.clone()))
        return out

    x0 = (latents.to(F64) * 80.0).to(dtype)
    x0_copy = x0.clone()
    t = SM.edm_grid(12)
    got = SM._sigma_loop(keeping, x0, t, solver=solver)
    x = x0_copy.clone()
    for i in range(len(t) - 1):  # EDM Algorithm 2 (no churn), out of place, in torch
        d = (x - den(x, t[i])) / t[i]
        x_next = x + (t[i + 1] - t[i]) * d
        if solver == "heun" and t[i + 1] > 0:
            d2 = (x_next - den(x_next, t[i + 1])) / t[i + 1]
            x_next = x + (t[i + 1] - t[i]) * (0.5 * d + 0.5 * d2)
        x = x_next
    assert got.dtype == dtype and torch.equal(got, x)
    assert torch.equal(x0, x0_copy)
    assert all(torch.equal(a, b) for a, b in returned + seen)
