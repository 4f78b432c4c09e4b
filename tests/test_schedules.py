# SPDX-License-Identifier: Apache-2.0
"""Tests of diffrepro.schedules against the papers' published values and independent closed forms."""

import math

import pytest
import torch

from diffrepro import schedules as S

F64 = torch.float64

# Full precision: Li, Dai, Qu's ten noise levels.
GRID10 = [
    80.0,
    42.41518931851267,
    21.10867673619376,
    9.723201355260132,
    4.066123602953759,
    1.501741979068008,
    0.46997905799774714,
    0.1166385635251784,
    0.020435334553438746,
    0.002,
]
# Print precision: Zhang et al.'s 18 levels.
GRID18 = [
    80,
    57.586,
    40.786,
    28.375,
    19.352,
    12.910,
    8.401,
    5.315,
    3.257,
    1.923,
    1.088,
    0.585,
    0.296,
    0.1395,
    0.0600,
    0.0229,
    0.00753,
    0.002,
]


def test_edm_grid_10_levels_exact():
    g = S.edm_sigmas(10)
    assert g.dtype == F64
    torch.testing.assert_close(g, torch.tensor(GRID10, dtype=F64), rtol=1e-12, atol=0)


def test_edm_grid_18_levels_print_precision():
    g = S.edm_sigmas(18).tolist()
    for got, want in zip(g, GRID18):
        digits = len(str(want).split(".")[-1]) if "." in str(want) else 0
        assert abs(got - want) <= 0.5 * 10 ** (-digits) + 1e-12, (got, want)


def test_edm_grid_formula_other_rho():
    n, lo, hi, rho = 5, 0.01, 50.0, 3.0
    want = [(hi ** (1 / rho) + i / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for i in range(n)]
    torch.testing.assert_close(S.edm_sigmas(n, lo, hi, rho), torch.tensor(want, dtype=F64), rtol=1e-14, atol=0)


@pytest.mark.parametrize(
    "family",
    [
        S.EDM(),
        S.VP(),
        S.VE(),
        S.SubVP(),
        S.DiscreteDDPM(),
        S.EDMAblationFamily("vp", "vp"),
        S.EDMAblationFamily("ve", "vp"),
        S.EDMAblationFamily("linear", "none"),
    ],
    ids=lambda f: f"{f.name}",
)
def test_family_inverse_and_derivatives(family):
    t = torch.tensor([0.0123, 0.3105, 0.7777], dtype=F64)  # not on the DDPM nodes
    torch.testing.assert_close(family.sigma_inv(family.sigma(t)), t, rtol=1e-10, atol=1e-12)
    eps = 1e-6
    num_ds = (family.sigma(t + eps) - family.sigma(t - eps)) / (2 * eps)
    num_s = (family.s(t + eps) - family.s(t - eps)) / (2 * eps)
    torch.testing.assert_close(family.sigma_deriv(t), num_ds, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(family.s_deriv(t), num_s, rtol=1e-6, atol=1e-8)
    lam = family.lambda_(t)
    torch.testing.assert_close(family.lambda_inv(lam), t, rtol=1e-10, atol=1e-12)


def test_vp_closed_forms():
    vp = S.VP()
    t = torch.tensor([0.001, 0.5, 1.0], dtype=F64)
    alpha = torch.exp(-0.25 * t**2 * 19.9 - 0.5 * t * 0.1)
    torch.testing.assert_close(vp.s(t), alpha, rtol=1e-14, atol=0)
    torch.testing.assert_close(vp.sigma(t), torch.sqrt(alpha**-2 - 1), rtol=1e-10, atol=0)
    # EDM's vp schedule with vp scaling is the same family.
    ab = S.EDMAblationFamily("vp", "vp", vp_beta_d=19.9, vp_beta_min=0.1)
    torch.testing.assert_close(ab.s(t), vp.s(t), rtol=1e-13, atol=0)
    torch.testing.assert_close(ab.sigma(t), vp.sigma(t), rtol=1e-13, atol=0)


def test_subvp_closed_forms():
    f = S.SubVP()
    t = torch.tensor([0.01, 0.5, 1.0], dtype=F64)
    alpha = torch.exp(-0.25 * t**2 * 19.9 - 0.5 * t * 0.1)
    torch.testing.assert_close(f.s(t) * f.sigma(t), 1 - alpha**2, rtol=1e-12, atol=0)
    assert float(f.sigma(0.0)) == 0.0


def test_ve_closed_forms():
    f = S.VE(sigma_min=0.01, sigma_max=50.0)
    assert float(f.sigma(0.0)) == pytest.approx(0.01, rel=1e-14)
    assert float(f.sigma(1.0)) == pytest.approx(50.0, rel=1e-14)


def test_discrete_ddpm_matches_direct_products():
    f = S.DiscreteDDPM()
    betas = [1e-4 + (0.02 - 1e-4) * n / 999 for n in range(1000)]
    abar, prod = [], 1.0
    for b in betas:
        prod *= 1 - b
        abar.append(prod)
    torch.testing.assert_close(f.alphas_cumprod, torch.tensor(abar, dtype=F64), rtol=1e-12, atol=0)
    # at the node t_n = (n+1)/M the continuous view equals the discrete values
    n = torch.tensor([0, 499, 999])
    t = (n + 1).to(F64) / 1000
    torch.testing.assert_close(f.s(t), torch.tensor(abar, dtype=F64)[n].sqrt(), rtol=1e-12, atol=0)
    torch.testing.assert_close(f.sigma(t), f.sigmas[n], rtol=1e-10, atol=0)
    assert f.t_min == 1e-3 and f.t_max == 1.0


def test_vp_betas_rederived_from_sigma_range():
    lo, hi = S.default_sigma_range("vp")
    assert lo == pytest.approx(0.010486, abs=5e-7)
    assert hi == pytest.approx(152.167, abs=5e-4)
    vp = S.VP.from_sigma_range(lo, hi, 1e-3)
    assert vp.beta_d == pytest.approx(19.9, rel=1e-10)
    assert vp.beta_0 == pytest.approx(0.1, rel=1e-10)


def test_network_supports_and_clamp():
    lo, hi = S.network_sigma_range("vp")
    assert lo == pytest.approx(0.0010005, rel=1e-4) and hi == pytest.approx(152.17, rel=1e-4)
    lo, hi = S.network_sigma_range("iddpm")
    assert lo == pytest.approx(0.006425, rel=1e-3) and hi == pytest.approx(2.03e4, rel=5e-3)

    class VENet:
        sigma_min, sigma_max = 0.02, 100.0

    assert S.clamp_sigma_range(0.002, 80, VENet()) == (0.02, 80.0)
    assert S.clamp_sigma_range(0.002, 80, object()) == (0.002, 80.0)
    assert S.clamp_sigma_range(0.002, 80, S.IDDPMRounding()) == (pytest.approx(0.006425, rel=1e-3), 80.0)
    with pytest.raises(ValueError, match="does not intersect"):
        S.clamp_sigma_range(200.0, 300.0, VENet())


def test_iddpm_recursion_and_rounding():
    M, C_1, C_2 = 1000, 0.001, 0.008
    abar = lambda j: math.sin(0.5 * math.pi * j / M / (C_2 + 1)) ** 2
    u = [0.0] * (M + 1)
    for j in range(M, 0, -1):
        u[j - 1] = math.sqrt((u[j] ** 2 + 1) / max(abar(j - 1) / abar(j), C_1) - 1)
    torch.testing.assert_close(S.iddpm_u(M, C_1, C_2), torch.tensor(u, dtype=F64), rtol=1e-12, atol=0)
    r = S.IDDPMRounding()
    x = torch.tensor([0.5, 3.0, 79.0], dtype=F64)
    out = r(x)
    ut = torch.tensor(u, dtype=F64)
    table = S.iddpm_u()  # equal to ut within 1e-12 (above), not bitwise: torch.sin and math.sin may differ
    for xi, oi in zip(x, out):
        assert oi == table[(ut - xi).abs().argmin()]  # the level nearest by the oracle's table
    torch.testing.assert_close(r(out), out, rtol=0, atol=0)  # idempotent
    g = S.iddpm_sigmas(18)
    assert all(bool((S.iddpm_u() == gi).any()) for gi in g)
    assert float(g[0]) <= 81 and float(g[-1]) == pytest.approx(0.006425, rel=1e-3)


def test_ve_and_vp_discretisations():
    g = S.ve_sigmas(5, 0.02, 100.0)
    ratios = g[1:] / g[:-1]
    torch.testing.assert_close(ratios, ratios[:1].expand(4), rtol=1e-12, atol=0)
    assert float(g[0]) == pytest.approx(100.0) and float(g[-1]) == pytest.approx(0.02)
    lo, hi = S.default_sigma_range("vp")
    g = S.vp_sigmas(4, lo, hi)
    assert float(g[0]) == pytest.approx(hi, rel=1e-10) and float(g[-1]) == pytest.approx(lo, rel=1e-8)
    torch.testing.assert_close(S.discretize("edm", 10, 0.002, 80), S.edm_sigmas(10), rtol=0, atol=0)


def test_dpm_solver_timesteps():
    vp = S.VP()
    t = S.dpm_solver_timesteps(vp, "logSNR", 1.0, 1e-3, 6)
    lam = vp.lambda_(t)
    torch.testing.assert_close(lam[1:] - lam[:-1], (lam[1] - lam[0]).expand(6), rtol=1e-9, atol=0)
    assert float(t[0]) == pytest.approx(1.0) and float(t[-1]) == pytest.approx(1e-3)
    q = S.dpm_solver_timesteps(vp, "time_quadratic", 1.0, 1e-3, 4)
    torch.testing.assert_close(q.sqrt(), torch.linspace(1.0, 1e-3**0.5, 5, dtype=F64), rtol=1e-14, atol=0)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: S.edm_sigmas(1), "num_steps must be an int >= 2, got 1"),
        (lambda: S.edm_sigmas(2.5), "num_steps must be an int >= 2, got 2.5"),
        (lambda: S.edm_sigmas(10, sigma_min=-1.0), "sigma_min must be a finite float > 0, got -1.0"),
        (lambda: S.edm_sigmas(10, sigma_min=90.0), "sigma_min must be < sigma_max"),
        (lambda: S.edm_sigmas(10, rho=0), "rho must be a finite float > 0, got 0.0"),
        (
            lambda: S.discretize("foo", 10, 0.002, 80),
            "discretization must be one of 'vp', 've', 'iddpm', 'edm', got 'foo'",
        ),
        (lambda: S.EDMAblationFamily("cosine", "none"), "schedule must be one of 'vp', 've', 'linear', got 'cosine'"),
        (lambda: S.dpm_solver_timesteps(S.VP(), "uniform", 1.0, 1e-3, 3), "skip_type must be one of"),
        (lambda: S.network_sigma_range("ncsn"), "kind must be one of 'edm', 'vp', 've', 'iddpm', got 'ncsn'"),
    ],
)
def test_errors_name_the_argument(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value)
