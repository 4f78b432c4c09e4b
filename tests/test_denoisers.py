# SPDX-License-Identifier: Apache-2.0
# diffrepro.denoisers against float64 oracles written here: the Gaussian (Wiener) denoiser and its
# closed-form trajectories, the empirical denoiser (class restriction, memmap streaming), linear
# models, and the network adapters (callables, diffusers-style DDPM nets, EDM pickles).
import math
import pickle
import sys

import numpy as np
import pytest
import torch
from helpers import assert_f32_accuracy, naive_float32_denoiser

from diffrepro import data
from diffrepro import denoisers as dn


def _edm_grid(n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM ρ-grid of n levels with 0 appended (Karras et al. 2022, eq. 5), float64."""
    i = torch.arange(n, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho)))
    return torch.cat([t ** rho, torch.zeros(1, dtype=torch.float64)])


def _naive_empirical_f64(x, y, sigma, s):
    """Softmax-weighted mean from materialised differences, float64 (the empirical optimal denoiser)."""
    x = x.double().reshape(x.shape[0], -1) / s.reshape(-1, 1)
    y = y.double().reshape(y.shape[0], -1)
    logits = -((x[:, None, :] - y[None]) ** 2).sum(-1) / (2 * sigma.reshape(-1, 1) ** 2)
    return torch.softmax(logits, 1) @ y


@pytest.fixture(scope="module")
def crops(request):
    """Real CIFAR-10 8x8 centre crops (uint8 [2000, 3, 8, 8]): real covariance spectrum, d=192."""
    images = request.getfixturevalue("cifar_subset")
    return np.ascontiguousarray(images[:2000, :, 12:20, 12:20])


# --- Gaussian denoiser ----------------------------------------------------------------------------

def test_gaussian_matches_dense_oracle_on_real_images(crops):
    g = dn.GaussianDenoiser.from_data(crops, chunk_rows=300)
    y = torch.from_numpy(crops).double().reshape(len(crops), -1) / 127.5 - 1
    mu = y.mean(0)
    cov = (y - mu).T @ (y - mu) / len(y)
    torch.testing.assert_close(g.mu, mu, rtol=0, atol=1e-12)
    torch.testing.assert_close((g.U * g.lam) @ g.U.T, cov, rtol=0, atol=1e-12)
    assert bool((g.lam[:-1] >= g.lam[1:]).all()) and g.n == 2000 and g.img_resolution == 8
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    eye = torch.eye(mu.numel(), dtype=torch.float64)
    for sigma in (0.002, 0.1, 1.0, 80.0):
        # Oracle by a linear solve, not an eigendecomposition: D = μ + Σ(Σ+σ²I)⁻¹(x−μ).
        # (Σ and Σ+σ²I commute, so the row form is (x−μ)ᵀ (Σ+σ²I)⁻¹ Σ.)
        want = mu + (x.reshape(6, -1) - mu) @ torch.linalg.solve(cov + sigma ** 2 * eye, cov)
        got = g(x, sigma)
        assert got.dtype == torch.float64 and got.shape == x.shape
        assert (got.reshape(6, -1) - want).abs().max() <= 1e-10
    assert g(x.float(), 1.0).dtype == torch.float32


def _dense_eigh_oracle(images, rank=None):
    """Gaussian denoiser from the dense d×d covariance and ``torch.linalg.eigh`` (any N).

    N centred rows span at most N − 1 directions, so λ_k for k ≥ N − 1 is exactly 0; eigh
    returns ±1e-16-sized noise there, which at σ = 0.002 is a gain of ~1e-10, so it is zeroed.
    """
    n = len(images)
    y = torch.from_numpy(images).double().reshape(n, -1) / 127.5 - 1
    mu = y.mean(0)
    cov = (y - mu).T @ (y - mu) / n
    lam, U = torch.linalg.eigh(cov)
    lam = lam.flip(0).clamp_min(0)
    lam[n - 1:] = 0
    return dn.GaussianDenoiser(mu, lam, U.flip(1), rank=rank, shape=images.shape[1:]), cov


@pytest.mark.parametrize("source", ["random", "crops"])
def test_gram_path_equals_dense_covariance_eigh(crops, source):
    # N < d: from_data takes the eigenpairs from the N×N Gram matrix and completes the basis.
    rng = np.random.default_rng(3)
    images = (rng.integers(0, 256, (50, 3, 8, 8), dtype=np.uint8) if source == "random"
              else crops[:100])  # real spectrum: many small eigenvalues
    n, d = len(images), 192
    g = dn.GaussianDenoiser.from_data(images, chunk_rows=16)
    oracle, cov = _dense_eigh_oracle(images)
    assert g.lam.shape == (d,) and g.U.shape == (d, d) and g.n == n
    assert bool((g.lam >= 0).all()) and bool((g.lam[:-1] >= g.lam[1:]).all())
    assert bool((g.lam[n - 1:] == 0).all())  # rank <= N - 1 after centring
    torch.testing.assert_close(g.U.T @ g.U, torch.eye(d, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(g.lam, oracle.lam, rtol=0, atol=1e-12)
    torch.testing.assert_close((g.U * g.lam) @ g.U.T, cov, rtol=0, atol=1e-12)
    torch.testing.assert_close(g.mu, oracle.mu, rtol=0, atol=1e-14)
    pivot = g.U.abs().argmax(0)
    assert bool((g.U[pivot, torch.arange(d)] > 0).all())  # same sign convention as eigh path
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    for sigma in (0.002, 0.1, 1.0, 80.0):
        assert (g(x, sigma) - oracle(x, sigma)).abs().max() <= 1e-10
    for rank in (None, 10):
        fast = dn.GaussianDenoiser(g.mu, g.lam, g.U, rank=rank, shape=(3, 8, 8))
        slow = oracle if rank is None else _dense_eigh_oracle(images, rank)[0]
        for solver in ("euler", "heun", "exact"):
            for sigmas in (_edm_grid(18), _edm_grid(10)[:-3]):
                samples, denoised = fast.trajectory(x, sigmas, solver=solver,
                                                    return_denoised=True)
                want, want_d = slow.trajectory(x, sigmas, solver=solver, return_denoised=True)
                assert (samples - want).abs().max() <= 1e-10
                assert (denoised - want_d).abs().max() <= 1e-10


def test_gram_path_degenerate_sets():
    # N = 1: Σ = 0, every direction has λ = 0 and D = μ; N = 2: rank 1.
    rng = np.random.default_rng(0)
    for n in (1, 2):
        images = rng.integers(0, 256, (n, 1, 4, 4), dtype=np.uint8)
        g = dn.GaussianDenoiser.from_data(images)
        oracle, _ = _dense_eigh_oracle(images)
        torch.testing.assert_close(g.U.T @ g.U, torch.eye(16, dtype=torch.float64), rtol=0,
                                   atol=1e-13)
        assert int((g.lam > 0).sum()) == n - 1
        x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
        assert (g(x, 0.5) - oracle(x, 0.5)).abs().max() <= 1e-12


def test_covariance_path_unchanged_when_n_at_least_d(crops):
    # N >= d (N = d included): chunked covariance and eigh, bit for bit.
    for images in (crops, crops[:192]):
        g = dn.GaussianDenoiser.from_data(images, chunk_rows=300)
        mu, cov, n = dn.gaussian_statistics(images, chunk_rows=300)
        lam, U = torch.linalg.eigh(cov)
        lam, U = lam.flip(0).clamp_min(0), U.flip(1)
        U = U * torch.sign(U[U.abs().argmax(0), torch.arange(U.shape[1])])
        assert g.n == n == len(images)
        assert torch.equal(g.mu, mu) and torch.equal(g.lam, lam) and torch.equal(g.U, U)


def test_eps_and_score_forms(crops):
    g = dn.GaussianDenoiser.from_data(crops)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([0.3, 1.0, 2.0, 5.0], dtype=torch.float64)
    s = torch.tensor([0.5, 1.0, 0.9, 0.2], dtype=torch.float64)
    sb, sigb = s.reshape(-1, 1, 1, 1), sigma.reshape(-1, 1, 1, 1)
    d = g(x / sb, sigma)
    torch.testing.assert_close(g.x0(x, sigma, s), d, rtol=0, atol=1e-14)
    torch.testing.assert_close(g.eps(x, sigma, s), (x - sb * d) / (sb * sigb), rtol=0, atol=1e-12)
    torch.testing.assert_close(g.score(x, sigma, s), -g.eps(x, sigma, s) / (sb * sigb),
                               rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="sigma must be positive"):
        g(x, 0.0)
    with pytest.raises(ValueError, match="x must be a float tensor of shape \\[B, 3, 8, 8\\]"):
        g(x[:, :1], 1.0)


def _step_by_step(den, latents, sigmas, solver):
    """EDM Algorithm 2 with churn 0 (Heun correction only when σ_{i+1} > 0), float64."""
    x = latents.double() * sigmas[0]
    outs = []
    for i in range(len(sigmas) - 1):
        t0, t1 = sigmas[i], sigmas[i + 1]
        d0 = den(x, t0)
        outs.append(d0)
        slope = (x - d0) / t0
        x_next = x + (t1 - t0) * slope
        if solver == "heun" and t1 > 0:
            x_next = x + (t1 - t0) * 0.5 * (slope + (x_next - den(x_next, t1)) / t1)
        x = x_next
    return x, torch.stack(outs)


@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize("rank", [None, 20])
def test_closed_form_trajectory_equals_step_by_step(crops, solver, rank):
    g = dn.GaussianDenoiser.from_data(crops, rank=rank)
    latents = torch.randn(5, 3, 8, 8)
    for sigmas in (_edm_grid(10), _edm_grid(18)[:-3]):  # ends at 0, and a grid stopping early
        samples, denoised = g.trajectory(latents, sigmas, solver=solver, return_denoised=True)
        want, want_d = _step_by_step(g, latents, sigmas, solver)
        assert (samples - want).abs().max() <= 1e-10
        assert (denoised - want_d).abs().max() <= 1e-10
        assert samples.dtype == torch.float64 and denoised.shape == (len(sigmas) - 1, 5, 3, 8, 8)


def test_exact_trajectory_and_spec_factors():
    # One direction per eigenvalue (U = I): the factors can be read off directly.
    lam = torch.tensor([100.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    g = dn.GaussianDenoiser(torch.zeros(4), lam, torch.eye(4), shape=(1, 2, 2))
    grid = _edm_grid(10)
    assert abs(g.step_factors(grid, "euler").prod(0)[0].item() - 0.101) < 5e-4  # Euler-10 factor for lambda = 100
    exact = g.step_factors(grid, "exact").prod(0)
    assert abs(exact[0].item() - math.sqrt(100 / (100 + 80 ** 2))) < 1e-15  # ≈ 0.124
    latents = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    for stop in (4, 10):  # exact solution at an intermediate σ and at σ = 0
        x = g.trajectory(latents, grid[:stop + 1], solver="exact")
        sig = grid[stop]
        want = latents.reshape(3, 4) * 80 * torch.sqrt((lam + sig ** 2) / (lam + 80 ** 2))
        assert (x.reshape(3, 4) - want).abs().max() <= 1e-12
    with pytest.raises(ValueError, match="solver must be"):
        g.trajectory(latents, grid, solver="rk4")
    with pytest.raises(ValueError, match="strictly decreasing"):
        g.trajectory(latents, torch.tensor([1.0, 2.0, 0.0]))


def test_rank_r_maps_discarded_directions_to_mean(crops):
    full = dn.GaussianDenoiser.from_data(crops)
    r = 7
    low = dn.GaussianDenoiser(full.mu, full.lam, full.U, rank=r, shape=(3, 8, 8))
    sigma = 0.5
    gains = full.lam / (full.lam + sigma ** 2)
    for k, gain in ((0, gains[0]), (r - 1, gains[r - 1]), (r, 0.0), (150, 0.0)):
        x = (full.mu + 3 * full.U[:, k]).reshape(1, 3, 8, 8)
        want = full.mu + 3 * gain * full.U[:, k]
        assert (low(x, sigma).reshape(-1) - want).abs().max() <= 1e-12
    with pytest.raises(ValueError, match="rank must be"):
        dn.GaussianDenoiser(full.mu, full.lam, full.U, rank=0)


def test_gaussian_save_load_and_linear_form(crops, tmp_path):
    g = dn.GaussianDenoiser.from_data(crops)
    g.save(tmp_path / "stats.npz")
    with np.load(tmp_path / "stats.npz") as z:
        assert {"mu", "lam", "U", "N"} <= set(z.keys()) and int(z["N"]) == 2000
    h = dn.GaussianDenoiser.load(tmp_path / "stats.npz", rank=10)
    assert h.rank == 10 and h.img_channels == 3 and torch.equal(h.U, g.U)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    lin = g.linear(0.7)
    assert (lin(x, 0.7) - g(x, 0.7)).abs().max() <= 1e-12
    with pytest.raises(ValueError, match="sigma=.*has no linear model"):
        lin(x, 0.8)


# --- Empirical denoiser ---------------------------------------------------------------------------

def _queries(train_u8, n, seed):
    gen = torch.Generator().manual_seed(seed)
    y = torch.from_numpy(train_u8[:n]).double() / 127.5 - 1
    sigma = torch.tensor([0.02, 0.2, 1.0, 10.0][:n], dtype=torch.float64).repeat(2)[:n]
    return y + sigma.reshape(-1, 1, 1, 1) * torch.randn(y.shape, generator=gen, dtype=torch.float64), sigma


def test_empirical_matches_naive_float64_on_real_images(cifar_subset):
    train = cifar_subset[:300]
    x, sigma = _queries(cifar_subset[1000:], 4, seed=1)
    x = torch.cat([x, _queries(train[5:], 4, seed=2)[0]])  # memorised regime: near train rows
    sigma = torch.cat([sigma, sigma])
    s = torch.linspace(0.5, 1.0, 8, dtype=torch.float64)
    xs = x * s.reshape(-1, 1, 1, 1)
    oracle = _naive_empirical_f64(xs, torch.from_numpy(train).double() / 127.5 - 1, sigma, s)
    exact = dn.EmpiricalDenoiser(train, dtype=torch.float64)
    got = exact.x0(xs, sigma, s)
    assert got.dtype == torch.float64
    assert (got.reshape(8, -1) - oracle).abs().max() <= 1e-10
    sb, sigb = s.reshape(-1, 1, 1, 1), sigma.reshape(-1, 1, 1, 1)
    want_eps = (xs - sb * oracle.reshape(xs.shape)) / (sb * sigb)
    assert (exact.eps(xs, sigma, s) - want_eps).abs().max() <= 1e-8
    fast = dn.EmpiricalDenoiser(train)  # float32 speed path, uint8 rows
    naive = naive_float32_denoiser(x, torch.from_numpy(train).float() / 127.5 - 1, sigma)
    assert_f32_accuracy(fast(x, sigma), oracle, naive)


def test_empirical_accepts_float_train_and_dataset():
    u8 = np.random.default_rng(0).integers(0, 256, (20, 1, 4, 4), dtype=np.uint8)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    a = dn.EmpiricalDenoiser(u8, dtype=torch.float64)(x, 0.3)
    b = dn.EmpiricalDenoiser(torch.from_numpy(u8).double() / 127.5 - 1, dtype=torch.float64)(x, 0.3)
    c = dn.EmpiricalDenoiser(data.Dataset(u8, None, None, "mem"), dtype=torch.float64)(x, 0.3)
    assert (a - b).abs().max() <= 1e-10 and torch.equal(a, c)
    with pytest.raises(TypeError, match="dtype must be"):
        dn.EmpiricalDenoiser(u8, dtype=torch.float16)
    with pytest.raises(ValueError, match="unconditional"):
        dn.EmpiricalDenoiser(u8)(x, 0.3, class_labels=[0, 0, 0])


def test_class_restriction_uses_only_that_class(cifar_subset):
    train = cifar_subset[:120]
    labels = np.arange(120) % 3
    # prune=0: bitwise equality needs the dense path (a pruned second call at the same x may
    # skip rows below 1e-12 of the largest weight).
    den = dn.EmpiricalDenoiser(train, labels=labels, dtype=torch.float64, prune=0)
    x, _ = _queries(cifar_subset[2000:], 4, seed=3)
    classes = torch.tensor([2, 0, 2, 1])
    got = den(x, 0.5, class_labels=classes)
    onehot = torch.nn.functional.one_hot(classes, 3)
    assert torch.equal(den(x, 0.5, class_labels=onehot), got)
    for i, k in enumerate(classes.tolist()):
        alone = dn.EmpiricalDenoiser(train[labels == k], dtype=torch.float64)(x[i:i + 1], 0.5)
        assert (got[i:i + 1] - alone).abs().max() <= 1e-10
    idx, _ = den.nearest(x, 1e-3, class_labels=classes)
    assert all(labels[i] == k for i, k in zip(idx.tolist(), classes.tolist()))
    with pytest.raises(ValueError, match="one-hot"):
        den(x, 0.5, class_labels=onehot * 2)
    with pytest.raises(ValueError, match=r"integers in \[0, 3\)"):
        den(x, 0.5, class_labels=[0, 1, 2, 3])


def test_memmap_streaming_equals_in_memory(cifar_subset, tmp_path, monkeypatch):
    train, labels = cifar_subset[:200], np.arange(200) % 4
    np.save(tmp_path / "train.npy", train)
    mm = np.load(tmp_path / "train.npy", mmap_mode="r")
    x, sigma = _queries(cifar_subset[3000:], 4, seed=4)
    resident = dn.EmpiricalDenoiser(train, labels=labels, dtype=torch.float64)
    monkeypatch.setattr(dn.empirical, "_RESIDENT_LIMIT_BYTES", 1000)  # force streaming of the memmap
    streamed = dn.EmpiricalDenoiser(mm, labels=labels, dtype=torch.float64, chunk_rows=37)
    assert streamed._memmap and streamed.chunk_rows == 37
    auto = dn.EmpiricalDenoiser(mm, dtype=torch.float64)
    assert auto._memmap and auto.chunk_rows >= 200
    classes = torch.tensor([3, 1, 1, 0])
    for cl in (None, classes):
        assert (streamed(x, sigma, class_labels=cl) - resident(x, sigma, class_labels=cl)) \
            .abs().max() <= 1e-10
    assert (auto(x, sigma) - resident(x, sigma)).abs().max() <= 1e-10
    for cl in (None, classes):
        i_s, n_s = streamed.nearest(x, sigma, class_labels=cl)
        i_r, n_r = resident.nearest(x, sigma, class_labels=cl)
        assert torch.equal(i_s, i_r) and (n_s - n_r).abs().max() <= 1e-9 * n_r.max()
    chunked = dn.EmpiricalDenoiser(train, dtype=torch.float64, chunk_rows=64)
    assert (chunked(x, sigma) - resident(x, sigma)).abs().max() <= 1e-10


def test_nearest_diagnostics(cifar_subset):
    train = cifar_subset[:100]
    den = dn.EmpiricalDenoiser(train)
    x = torch.from_numpy(train[[7, 42]]).double() / 127.5 - 1 + 1e-4
    idx, n_eff = den.nearest(x, 1e-3)
    assert idx.tolist() == [7, 42] and torch.allclose(n_eff, torch.ones(2, dtype=torch.float64))
    _, n_eff = den.nearest(x, 1e4)
    assert bool((n_eff > 99.0).all())


# --- Linear denoisers -----------------------------------------------------------------------------

def test_linear_denoiser_set_lookup_and_files(tmp_path):
    gen = torch.Generator().manual_seed(5)
    d = 12
    models = [dn.LinearDenoiser(torch.randn(d, d, generator=gen), torch.randn(d, generator=gen),
                                sig, shape=(3, 2, 2), mode="lstsq", M=1000 + i)
              for i, sig in enumerate((80.0, 1.5017, 0.002))]
    family = dn.LinearDenoiserSet(models)
    x = torch.randn(3, 3, 2, 2, dtype=torch.float64, generator=gen)
    sigma = torch.tensor([0.002, 80.0 * (1 + 5e-7), 1.5017], dtype=torch.float64)
    got = family(x, sigma)
    for i, m in zip(range(3), (2, 0, 1)):
        want = models[m].W @ x[i].reshape(-1) + models[m].b
        assert (got[i].reshape(-1) - want).abs().max() <= 1e-12
    with pytest.raises(ValueError, match="sigma=.*has no linear model"):
        family(x, 1.6)
    family.save(tmp_path / "set.npz")
    back = dn.LinearDenoiserSet.load(tmp_path / "set.npz")
    assert back.sigmas.tolist() == [80.0, 1.5017, 0.002] and back[2].M == 1002
    assert back[0].mode == "lstsq" and torch.equal(back(x, sigma), got)
    models[1].save(tmp_path / "one.npz")
    with np.load(tmp_path / "one.npz") as z:
        assert z["W_eff"].shape == (d, d) and float(z["sigma"]) == 1.5017
    one = dn.LinearDenoiser.load(tmp_path / "one.npz")
    assert torch.equal(one.W, models[1].W) and one.sigma == 1.5017
    free = dn.LinearDenoiser(torch.eye(d), torch.zeros(d), shape=(3, 2, 2))
    assert torch.equal(free(x, 3.0), x)
    with pytest.raises(ValueError, match="LinearDenoiserSet.load"):
        dn.LinearDenoiser.load(tmp_path / "set.npz")


# --- Adapters -------------------------------------------------------------------------------------

class _TinyPrecond(torch.nn.Module):
    """An EDM-like network: x0 = x * (1 - 1/(1+σ²)) + label bias, computed in float32."""

    img_channels, img_resolution, label_dim = 1, 4, 2
    sigma_min, sigma_max = 0.002, 80.0

    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.tensor([0.0, 1.0]))

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma).round()

    def forward(self, x, sigma, class_labels=None):
        x, sigma = x.to(torch.float32), sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        out = x * (1 - 1 / (1 + sigma ** 2))
        if class_labels is not None:
            out = out + (class_labels.float() @ self.bias).reshape(-1, 1, 1, 1)
        return out


def test_as_denoiser_wraps_modules_and_callables():
    net = _TinyPrecond()
    den = dn.as_denoiser(net)
    assert (den.img_channels, den.img_resolution, den.label_dim) == (1, 4, 2)
    assert den.sigma_max == 80.0 and float(den.round_sigma(2.4)) == 2.0
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    out = den(x, 1.0, class_labels=torch.tensor([[0, 1], [1, 0]]))
    assert out.dtype == torch.float64
    assert torch.allclose(out, x * 0.5 + torch.tensor([1.0, 0.0]).reshape(2, 1, 1, 1).double())
    assert dn.as_denoiser(den) is den
    fn = dn.as_denoiser(lambda x, sigma: x / 2, img_channels=1, img_resolution=4)
    assert torch.equal(fn(x, 3.0), x / 2)
    assert torch.equal(fn.eps(x, 2.0), (x - x / 2) / 2)
    with pytest.raises(TypeError, match="img_channels"):
        dn.as_denoiser(lambda x, sigma: x)
    with pytest.raises(TypeError, match="callable"):
        dn.as_denoiser(3)


def _ddpm_abar(m=1000):
    return np.cumprod(1 - np.linspace(1e-4, 0.02, m))


class _OracleUnet(torch.nn.Module):
    """Returns the exact eps or v for known (x0, ε): a perfect network, to check conversions."""

    def __init__(self, x0, eps, kind):
        super().__init__()
        self.x0, self.eps, self.kind, self.seen = x0, eps, kind, []
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x_t, t):
        self.seen.append((x_t, t))
        return self.eps if self.kind == "epsilon" else self.v

    def set_v(self, alpha, sigma_vp):
        self.v = alpha * self.eps - sigma_vp * self.x0


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_diffusers_adapter_conversions(kind):
    abar = _ddpm_abar()
    train_sigmas = np.sqrt((1 - abar) / abar)
    n = 500
    sigma = float(train_sigmas[n])
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    eps = torch.randn(2, 3, 4, 4)
    unet = _OracleUnet(x0, eps, kind)
    alpha = 1 / math.sqrt(1 + sigma ** 2)
    unet.set_v(alpha, sigma * alpha)
    cfg = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
               prediction_type=kind)
    den = dn.DiffusersDenoiser(unet, cfg, img_channels=3, img_resolution=4)
    xt = x0 + sigma * eps  # unscaled EDM variable
    assert (den(xt, sigma) - x0).abs().max() <= 1e-5
    x_in, t_in = unet.seen[-1]
    assert abs(float(t_in[0]) - n) < 1e-3 and torch.allclose(x_in, xt / math.sqrt(1 + sigma ** 2))
    assert den.sigma_min == pytest.approx(train_sigmas[0]) and den.sigma_max == pytest.approx(
        train_sigmas[-1])
    mid = math.sqrt(train_sigmas[n] * train_sigmas[n + 1])
    t = float(den.timestep(mid)[0])
    assert n < t < n + 1
    snap = dn.DiffusersDenoiser(unet, cfg, img_channels=3, img_resolution=4, timesteps="snap")
    assert snap.timestep(torch.tensor([sigma * 1.0001])).tolist() == [n]
    assert float(snap.round_sigma(torch.tensor(sigma * 1.0001))) == pytest.approx(sigma)


def test_diffusers_adapter_with_real_unet_and_scheduler():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    den = dn.DiffusersDenoiser(unet, sched)
    abar = sched.alphas_cumprod.double().numpy()
    # diffusers keeps β and ᾱ in float32 (a 1000-term float32 cumprod; σ_n at small n loses
    # digits), diffrepro works in float64: compare ᾱ at float32-cumprod accuracy.
    np.testing.assert_allclose(1 / (1 + den.train_sigmas ** 2), abar, rtol=1e-4)
    assert (den.img_channels, den.img_resolution) == (3, 8)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    sigma = float(den.train_sigmas[300])
    out = den(x, sigma)
    alpha = 1 / math.sqrt(1 + sigma ** 2)
    with torch.no_grad():
        eps = unet((x * alpha).float(), torch.tensor([300.0, 300.0])).sample.double()
    assert out.dtype == torch.float64 and (out - (x - sigma * eps)).abs().max() <= 1e-4


_FAKE_NETWORKS = '''
import torch

class FakePrecond(torch.nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.img_channels, self.img_resolution, self.label_dim = 3, 4, 0
        self.sigma_min, self.sigma_max = 0.0, float("inf")
        self.scale = torch.nn.Parameter(torch.tensor(scale))

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None):
        return (x.to(torch.float32) * self.scale).to(x.dtype)
'''


def test_load_edm_pickle_with_a_fake_checkout(tmp_path, monkeypatch):
    root = tmp_path / "edm"
    for pkg in ("dnnlib", "torch_utils", "training"):
        (root / pkg).mkdir(parents=True)
        (root / pkg / "__init__.py").write_text("")
    (root / "training" / "networks.py").write_text(_FAKE_NETWORKS)
    monkeypatch.setattr(sys, "path", [str(root)] + sys.path)
    from training.networks import FakePrecond  # the fake checkout's module, as EDM pickles it

    with open(tmp_path / "net.pkl", "wb") as f:
        pickle.dump({"ema": FakePrecond(0.25), "augment_pipe": None}, f)
    for name in ("training", "training.networks"):
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "path", sys.path[1:])  # load_edm_pickle must add the root itself
    den = dn.load_edm_pickle(tmp_path / "net.pkl", root)
    assert str(root) in sys.path and den.img_resolution == 4
    assert not any(p.requires_grad for p in den.fn.parameters())
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    assert torch.allclose(den(x, 1.0), x * 0.25)
    for name in ("training", "training.networks"):
        monkeypatch.delitem(sys.modules, name, raising=False)

    monkeypatch.delenv("EDM_ROOT", raising=False)
    with pytest.raises(ValueError, match="EDM_ROOT"):
        dn.load_edm_pickle(tmp_path / "net.pkl")
    with pytest.raises(FileNotFoundError, match="no dnnlib/"):
        dn.load_edm_pickle(tmp_path / "net.pkl", tmp_path)
    with open(tmp_path / "other.pkl", "wb") as f:
        pickle.dump({"net": 1}, f)
    with pytest.raises(ValueError, match="no 'ema' entry"):
        dn.load_edm_pickle(tmp_path / "other.pkl", root)
