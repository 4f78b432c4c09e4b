# SPDX-License-Identifier: Apache-2.0
"""Exact posterior denoisers of linear inverse problems (likelihood="exact"): the empirical
prior's posterior is the training set reweighted by exp(-||y - A y_i||^2 / 2 s_y^2), the Gaussian
prior's is Gaussian. Oracles: brute-force float64 softmax with the operator as an explicit matrix,
the dense Gaussian conditioning formulas."""

import json
import math
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_f32_accuracy

from diffrepro import data, inverse, samplers
from diffrepro.denoisers import CallableDenoiser, EmpiricalDenoiser, GaussianDenoiser
from diffrepro.reference import empirical_denoiser_reference

F64 = torch.float64


@pytest.fixture(scope="module")
def small():
    """200 real CIFAR-10 images average-pooled to 3×8×8, as uint8 pixels and float64."""
    ds = data.default_dataset()
    pooled = F.avg_pool2d(data.decode(torch.from_numpy(ds.images[:200])), 4)
    u8 = data.quantize(pooled).numpy()
    return u8, data.decode(torch.from_numpy(u8))


def _matrix(op, d=192):
    """The operator as an explicit [m, d] matrix (its columns: A applied to the unit images)."""
    return op(torch.eye(d, dtype=F64).reshape(d, 3, 8, 8)).reshape(d, -1).T


def _bruteforce(train, a, y, s_y, x, sigma):
    """Σ_i softmax_i(−‖x̃ − y_i‖²/2σ² − ‖y − A y_i‖²/2s_y²) y_i, all differences materialised."""
    rows = train.reshape(len(train), -1)
    d2 = ((x.reshape(len(x), 1, -1) - rows[None]) ** 2).sum(-1)
    r2 = ((y.reshape(1, -1) - rows @ a.T) ** 2).sum(-1)
    return torch.softmax(-d2 / (2 * sigma**2) - r2[None] / (2 * s_y**2), 1) @ rows


def _noise(b, seed, scale=1.0):
    return scale * torch.randn(b, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("task,s_y", [("sr2", 0.1), ("inpaint-random", 0.05), ("deblur", 0.2)])
def test_exact_empirical_posterior_against_bruteforce(small, task, s_y):
    u8, train = small
    op = inverse.make_operator(task, 8, seed=1)
    a = _matrix(op)
    y = op(train[150:151]) + s_y * _noise(1, 3)[..., :op(train[:1]).shape[-2], :op(train[:1]).shape[-1]]
    x = train[[150, 20, 60]] + _noise(3, 4, 0.6)
    for dtype in (F64, torch.float32):
        post = inverse.PosteriorDenoiser(EmpiricalDenoiser(u8, dtype=dtype), op, y, noise_std=s_y)
        assert post.likelihood == "exact"
        for sigma in (0.05, 0.5, 3.0):
            ref = _bruteforce(train, a, y, s_y, x, sigma)
            got = post(x.to(dtype), sigma).double().reshape(ref.shape)
            if dtype == F64:
                assert (got - ref).abs().max() <= 1e-10, sigma
            else:  # the float32 kernel: the project's tolerance rule against naive float32 torch
                rows = train.reshape(200, -1).float()
                lw = -((y.reshape(1, -1) - rows.double() @ a.T) ** 2).sum(-1) / (2 * s_y**2)
                logits = -torch.cdist(x.reshape(3, -1).float(), rows) ** 2 / (2 * sigma**2) + lw.float()
                assert_f32_accuracy(got, ref, torch.softmax(logits, 1) @ rows)


def test_exact_empirical_noise_free_limit(small):
    """s_y = 0: only the rows that fit y best keep weight (exact duplicates both keep it)."""
    u8, train = small
    op = inverse.make_operator("inpaint-box", 8)
    x = _noise(3, 5, 2.0)
    # The target is a training image: the posterior is that image, whatever x and σ.
    post = inverse.PosteriorDenoiser(EmpiricalDenoiser(u8, dtype=F64), op, op(train[17:18]), noise_std=0.0)
    for sigma in (0.01, 1.0, 80.0):
        assert (post(x, sigma) - train[17:18]).abs().max() <= 1e-12
    # A duplicate of the target at row 200: the posterior is the softmax over rows 17 and 200.
    dup = np.concatenate([u8, u8[17:18]])
    post = inverse.PosteriorDenoiser(EmpiricalDenoiser(dup, dtype=F64), op, op(train[17:18]), noise_std=0.0)
    lw = torch.full((201,), -math.inf, dtype=F64)
    lw[[17, 200]] = 0.0
    ref = empirical_denoiser_reference(x, dup, 1.0, log_weights=lw)
    assert (post(x, 1.0).reshape(ref.shape) - ref).abs().max() <= 1e-12
    # A target outside the training set: the rows of smallest residual ‖y − A y_i‖² (oracle: argmin).
    outside = train[199:200] + 0.01
    post = inverse.PosteriorDenoiser(EmpiricalDenoiser(u8[:150], dtype=F64), op, op(outside), noise_std=0.0)
    a = _matrix(op)
    best = ((op(outside).reshape(1, -1) - train[:150].reshape(150, -1) @ a.T) ** 2).sum(-1).argmin()
    assert (post(x, 0.3) - train[best]).abs().max() <= 1e-12


def test_exact_empirical_pruned_equals_dense_along_a_solve(small):
    u8, train = small
    op = inverse.make_operator("sr2", 8)
    y = op(train[40:41]) + 0.02 * _noise(1, 6)[..., :4, :4]
    eps = _noise(4, 7)
    runs = [samplers.sample(inverse.PosteriorDenoiser(EmpiricalDenoiser(u8, dtype=F64, prune=p), op, y,
                                                      noise_std=0.02), eps, steps=10) for p in (1e-12, 0)]
    assert (runs[0] - runs[1]).abs().max() <= 1e-10


def _gaussian_conditional(train, a, y, s_y):
    """N(μ_y, Σ_y) of x0 ~ N(μ, Σ) given y = A x0 + s_y n, dense (s_y > 0)."""
    rows = train.reshape(len(train), -1)
    mu, cov = rows.mean(0), torch.from_numpy(np.cov(rows.numpy(), rowvar=False, bias=True))
    gain = torch.linalg.solve(a @ cov @ a.T + s_y**2 * torch.eye(len(a), dtype=F64), a @ cov).T
    return mu + gain @ (y.reshape(-1) - a @ mu), cov - gain @ a @ cov


@pytest.mark.parametrize("task", ["deblur", "sr4"])
def test_exact_gaussian_posterior_against_closed_form(small, task):
    """E[x0 | x̃, y] = μ_y + Σ_y (Σ_y + σ² I)⁻¹ (x̃ − μ_y) with the dense conditional."""
    _, train = small
    gauss = GaussianDenoiser.from_data(train)
    op, s_y = inverse.make_operator(task, 8), 0.05
    y = op(train[7:8])
    post = inverse.PosteriorDenoiser(gauss, op, y, noise_std=s_y)
    assert post.likelihood == "exact"
    mu_y, cov_y = _gaussian_conditional(train, _matrix(op), y, s_y)
    x = _noise(2, 12) + train[7:8]
    for sigma in (0.02, 0.3, 5.0):
        ref = mu_y + (x.reshape(2, -1) - mu_y) @ torch.linalg.solve(cov_y + sigma**2 * torch.eye(192, dtype=F64),
                                                                     cov_y).T
        err = (post(x, sigma).reshape(2, -1) - ref).abs().max()
        assert err <= 1e-10, (sigma, float(err))


def test_exact_gaussian_noise_free(small):
    """s_y = 0, box inpainting: the observed pixels are y, the missing ones the Gaussian
    conditional's denoiser (Σ_c = Σ_uu − Σ_uo Σ_oo⁺ Σ_ou)."""
    _, train = small
    gauss = GaussianDenoiser.from_data(train)
    op = inverse.make_operator("inpaint-box", 8)
    y = op(train[9:10])
    post = inverse.PosteriorDenoiser(gauss, op, y, noise_std=0.0)
    rows = train.reshape(200, -1)
    mu, cov = rows.mean(0), torch.from_numpy(np.cov(rows.numpy(), rowvar=False, bias=True))
    o = op.mask.expand(3, 8, 8).reshape(-1).bool()
    u = ~o
    k = cov[u][:, o] @ torch.linalg.pinv(cov[o][:, o], hermitian=True, rtol=1e-12)
    mu_c = mu[u] + k @ (y.reshape(-1)[o] - mu[o])
    cov_c = cov[u][:, u] - k @ cov[o][:, u]
    x = _noise(2, 13) + train[9:10]
    sigma = 0.4
    got = post(x, sigma).reshape(2, -1)
    assert (got[:, o] - y.reshape(-1)[o]).abs().max() <= 1e-8
    ref = mu_c + (x.reshape(2, -1)[:, u] - mu_c) @ torch.linalg.solve(
        cov_c + sigma**2 * torch.eye(int(u.sum()), dtype=F64), cov_c).T
    assert (got[:, u] - ref).abs().max() <= 1e-8


def test_exact_likelihood_defaults_and_refusals(small):
    u8, train = small
    op = inverse.make_operator("sr2", 8)
    y = op(train[:1])
    net = CallableDenoiser(lambda x, s: x, img_channels=3, img_resolution=8)
    assert inverse.PosteriorDenoiser(net, op, y).likelihood == "moment"
    with pytest.raises(ValueError, match="likelihood 'exact' needs an EmpiricalDenoiser or GaussianDenoiser"):
        inverse.PosteriorDenoiser(net, op, y, likelihood="exact")
    with pytest.raises(ValueError, match="conditions on one measurement"):
        inverse.PosteriorDenoiser(EmpiricalDenoiser(u8), op, op(train[:2]))
    post = inverse.PosteriorDenoiser(EmpiricalDenoiser(u8), op, y, noise_std=0.0)
    assert post.describe() == {"likelihood": "exact", "operator": {"name": "sr2", "factor": 2}, "noise_std": 0.0}


def _run(*args):
    return subprocess.run([sys.executable, "-m", "diffrepro", "inverse", *map(str, args)], capture_output=True,
                          text=True, timeout=600)


def test_cli_exact_noise_free_returns_the_training_image(tmp_path):
    """diffrepro inverse with the default (exact) likelihood and a noise-free measurement of a
    training image: every seed's PNG is that image, exactly."""
    out = tmp_path / "inv"
    run = _run("--task", "inpaint-random", "--outdir", out, "--max-train", 60, "--target-index", 11,
               "--seeds", "0-3", "--steps", 5, "--noise-std", 0, "--no-progress")
    assert run.returncode == 0, run.stderr
    target = data.default_dataset().images[11]
    for s in range(4):
        with PIL.Image.open(out / f"{s:06d}.png") as img:
            assert np.array_equal(np.asarray(img.convert("RGB")).transpose(2, 0, 1), target)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["denoiser"]["inverse"]["likelihood"] == "exact"
