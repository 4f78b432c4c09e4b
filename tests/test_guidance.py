# SPDX-License-Identifier: Apache-2.0
"""Classifier-free guidance with the empirical and Gaussian denoisers against float64 oracles."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffrepro import data, samplers
from diffrepro.denoisers import (
    ClassConditionalDenoiser,
    EmpiricalDenoiser,
    GaussianDenoiser,
    GuidedDenoiser,
    guidance_commitment,
)
from diffrepro.reference import empirical_denoiser_reference

F64 = torch.float64


@pytest.fixture(scope="module")
def labelled():
    """The first 200 embedded CIFAR-10 images average-pooled to 3×8×8 (float64) and their labels."""
    ds = data.default_dataset()
    return F.avg_pool2d(data.decode(torch.from_numpy(ds.images[:200])), 4), np.asarray(ds.labels[:200])


def _noise(b, seed=0, scale=1.0):
    return scale * torch.randn(b, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _wiener(rows, x, sigma):
    """Dense oracle of the Gaussian denoiser: μ + Σ (Σ + σ² I)⁻¹ (x − μ) by a linear solve."""
    y = rows.reshape(len(rows), -1)
    mu = y.mean(0)
    cov = (y - mu).T @ (y - mu) / len(y)
    q = x.reshape(len(x), -1) - mu
    return (mu + torch.linalg.solve(cov + sigma**2 * torch.eye(len(mu), dtype=F64), q.T).T @ cov).reshape(x.shape)


@pytest.mark.parametrize("w", [-0.5, 0.3, 2.5])
def test_empirical_guidance_against_oracle(labelled, w):
    train, labels = labelled
    den = GuidedDenoiser.empirical(train, labels, guidance=w, dtype=F64)
    x, classes, sigma = _noise(4, 1, 2.0), torch.tensor([3, 3, 7, 0]), torch.tensor([0.3, 1.0, 2.0, 8.0], dtype=F64)
    out = den(x, sigma, classes)
    for i, c in enumerate(classes.tolist()):
        u = empirical_denoiser_reference(x[i:i + 1], train, sigma[i])
        cond = empirical_denoiser_reference(x[i:i + 1], train[labels == c], sigma[i])
        torch.testing.assert_close(out[i].reshape(1, -1), u + w * (cond - u), rtol=1e-10, atol=1e-10)


def test_gaussian_guidance_against_dense_wiener(labelled):
    train, labels = labelled
    den = GuidedDenoiser.gaussian(train, labels, guidance=3.0)
    x, classes = _noise(3, 2, 1.5), torch.tensor([1, 5, 5])
    for sigma in (0.1, 1.0, 10.0):
        out = den(x, sigma, classes)
        u = _wiener(train, x, sigma)
        for i, c in enumerate(classes.tolist()):
            cond = _wiener(train[labels == c], x[i:i + 1], sigma)
            torch.testing.assert_close(out[i:i + 1], u[i:i + 1] + 3.0 * (cond - u[i:i + 1]), rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("kind", ["empirical", "gaussian"])
def test_weights_zero_and_one_are_the_unconditional_and_conditional_paths(labelled, kind):
    train, labels = labelled
    if kind == "empirical":
        uncond = cond = EmpiricalDenoiser(train, labels=labels, dtype=F64)
        guided = GuidedDenoiser(cond)
    else:
        uncond, cond = GaussianDenoiser.from_data(train), ClassConditionalDenoiser.gaussian(train, labels)
        guided = GuidedDenoiser(cond, uncond)
    eps, classes = _noise(3, 3), torch.tensor([2, 4, 4])
    kw = {"sampler": "heun", "steps": 8}
    plain = samplers.edm_sampler(uncond, eps, num_steps=8, solver="heun")  # step by step, as the guided run
    assert torch.equal(samplers.sample(guided.with_guidance(0.0), eps, classes, **kw), plain)
    assert torch.equal(samplers.sample(guided.with_guidance(1.0), eps, classes, **kw),
                       samplers.sample(cond, eps, classes, **kw))


def test_guided_jacobian_products(labelled):
    """jvp/vjp of D_w against autograd of the dense float64 references."""
    train, labels = labelled
    w, c, sigma = 2.0, 6, 0.7
    den = GuidedDenoiser.empirical(train, labels, guidance=w, dtype=F64)
    x, v = _noise(2, 4, 1.2), _noise(2, 5)

    def oracle(z):
        u = empirical_denoiser_reference(z, train, sigma)
        return (u + w * (empirical_denoiser_reference(z, train[labels == c], sigma) - u)).reshape(z.shape)

    ref_jvp = torch.autograd.functional.jvp(oracle, x, v)[1]
    ref_vjp = torch.autograd.functional.vjp(oracle, x, v)[1]
    torch.testing.assert_close(den.jvp(x, sigma, v, torch.tensor([c, c])), ref_jvp, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(den.vjp(x, sigma, v, torch.tensor([c, c])), ref_vjp, rtol=1e-9, atol=1e-11)


def test_commitment_report(labelled):
    """Per seed, the nearest training image with w = 0, 1 and 3; the conditional empirical sampler
    memorises images of the requested class."""
    train, labels = labelled
    small_u8 = data.quantize(train).numpy()  # the search set: the pooled images as pixels
    den = GuidedDenoiser.empirical(train, labels, guidance=3.0, dtype=F64)
    eps, classes = _noise(4, 6), torch.tensor([0, 1, 8, 9])
    rep = guidance_commitment(den, eps, classes, small_u8, sampler="euler", steps=18)
    assert rep["weights"] == [0.0, 1.0, 3.0] and rep["nearest"].shape == (3, 4)
    rows = data.decode(torch.from_numpy(small_u8)).reshape(200, -1)
    for k in range(3):
        d2 = ((rep["samples"][k].reshape(4, 1, -1) - rows[None]) ** 2).sum(-1)
        assert torch.equal(rep["nearest"][k], d2.argmin(1))
        torch.testing.assert_close(rep["nearest_sqdist"][k], d2.min(1).values, rtol=1e-12, atol=1e-12)
    assert (labels[rep["nearest"][1].numpy()] == classes.numpy()).all()


def test_guidance_errors(labelled):
    train, labels = labelled
    den = GuidedDenoiser.empirical(train, labels, guidance=2.0, dtype=F64)
    with pytest.raises(ValueError, match="class_labels are required"):
        den(_noise(1), 1.0)
    with pytest.raises(ValueError, match="label_dim"):
        GuidedDenoiser(GaussianDenoiser.from_data(train))
    with pytest.raises(ValueError, match="labels are required"):
        GuidedDenoiser.empirical(train)
    for bad in (float("nan"), float("inf"), 1e308, -1.5e6):
        with pytest.raises(ValueError, match=r"^guidance must be a finite number in \[-1e\+06, 1e\+06\], got "):
            GuidedDenoiser(den.cond, guidance=bad)
    for bad in ("2", True, None):
        with pytest.raises(TypeError, match=r"^guidance must be a real number, got "):
            GuidedDenoiser(den.cond, guidance=bad)
    with pytest.raises(ValueError, match="got 1e\\+308"):
        den.with_guidance(1e308)
    assert GuidedDenoiser(den.cond, guidance=-1e6).guidance == -1e6
