# SPDX-License-Identifier: Apache-2.0
"""Linear distillation: exact recovery of affine teachers, P2 Thm 1 (Wiener filter), Adam parity."""
import math

import numpy as np
import pytest
import torch

from diffrepro.denoisers import LinearDenoiser
from diffrepro.distill import LR_TABLE, distill_linear, noisy_batches

D = 3 * 4 * 4


def affine_teacher(seed=0, d=D):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    c = torch.randn(d, generator=g, dtype=torch.float64)

    def teacher(x, sigma):
        return (x.reshape(len(x), -1).double() @ A.T + c).reshape(x.shape)

    return teacher, A, c


def clean_images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1


def test_affine_teacher_is_recovered_exactly_from_every_input_form():
    teacher, A, c = affine_teacher()
    y = clean_images(200)
    g = torch.Generator().manual_seed(1)
    draw = lambda n: y[torch.randint(0, 200, (n,), generator=g)] + 0.3 * torch.randn(n, 3, 4, 4, generator=g,
                                                                                      dtype=torch.float64)
    fits = [
        distill_linear(teacher, draw, 0.3, M=1000, batch_size=128),
        distill_linear(teacher, y + 0.3 * torch.randn_like(y), 0.3, batch_size=64),
        distill_linear(teacher, noisy_batches(y, 0.3, epochs=3, batch_size=64), 0.3, M=500),
    ]
    assert [f.M for f in fits] == [1000, 200, 500]
    for fit in fits:
        assert fit.mode == "lstsq" and fit.W.dtype == torch.float64
        assert (fit.W - A).abs().max().item() <= 1e-8
        assert (fit.b - c).abs().max().item() <= 1e-8


def test_uint8_and_offset_inputs_keep_the_accuracy():
    # A large common offset is where uncentred normal equations lose digits.
    teacher, A, c = affine_teacher(seed=2)
    y = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (300, 3, 4, 4), dtype=np.uint8))
    fit = distill_linear(teacher, noisy_batches(y, 0.05, epochs=2), 0.05)
    assert fit.M == 600 and (fit.W - A).abs().max().item() <= 1e-8 and (fit.b - c).abs().max().item() <= 1e-8
    off = distill_linear(teacher, clean_images(400) + 50.0, 0.1)
    assert (off.W - A).abs().max().item() <= 1e-8 and (off.b - c).abs().max().item() <= 1e-8


def test_too_few_pairs_singular_inputs_and_ridge():
    teacher, _, _ = affine_teacher()
    with pytest.raises(ValueError, match=r"M must be > d \+ 1 = 49.*got M=49"):
        distill_linear(teacher, lambda n: torch.randn(n, 3, 4, 4), 1.0, M=49)
    with pytest.raises(ValueError, match=r"M must be > d \+ 1.*got M=20 pairs with d=48"):
        distill_linear(teacher, torch.randn(20, 3, 4, 4), 1.0)
    with pytest.raises(ValueError, match="M must be given"):
        distill_linear(teacher, lambda n: torch.randn(n, 3, 4, 4), 1.0)
    flat = torch.randn(500, 3, 4, 4, dtype=torch.float64)
    flat[:, 0] = 0.25  # one channel constant: rank-deficient input covariance
    with pytest.raises(ValueError, match="singular.*ridge > 0"):
        distill_linear(teacher, flat, 1.0)
    fit = distill_linear(teacher, flat, 1.0, ridge=1e-3)
    assert torch.isfinite(fit.W).all()
    free = torch.randn(500, 3, 4, 4, dtype=torch.float64)
    shrunk = distill_linear(teacher, free, 1.0, ridge=10.0).W.norm()
    assert shrunk < distill_linear(teacher, free, 1.0).W.norm()
    with pytest.raises(ValueError, match="mode must be"):
        distill_linear(teacher, free, 1.0, mode="sgd")
    with pytest.raises(ValueError, match=r"must return x's shape \(16, 3, 4, 4\)"):
        distill_linear(lambda x, s: x[:, :1], free[:16], 1.0)


def test_distilling_the_empirical_denoiser_approaches_the_wiener_filter(cifar_subset):
    """Li, Dai, Qu 2024, Thm 1: for D_M of a training set on its own noisy inputs the least-squares
    solution is W_G = Σ(Σ + σ²I)⁻¹, b = (I − W_G)μ. The estimate's relative Frobenius error is a
    sampling error ~ c/√M; c ≈ 8 was measured over seeds here, and the test allows 12/√M."""
    n, sigma = 64, 0.5
    y = torch.from_numpy(cifar_subset[:n]).double().div(127.5).sub(1)
    y = y.reshape(n, 3, 4, 8, 4, 8).mean((3, 5))               # 8x8 average pooling -> [n, 3, 4, 4]
    Y = y.reshape(n, -1)

    def empirical(x, s):  # exact posterior mean of the uniform distribution on Y, float64
        logits = -torch.cdist(x.reshape(len(x), -1).double(), Y) ** 2 / (2 * s * s)
        return (torch.softmax(logits, 1) @ Y).reshape(x.shape)

    mu = Y.mean(0)
    cov = (Y - mu).T @ (Y - mu) / n
    W_G = cov @ torch.linalg.inv(cov + sigma**2 * torch.eye(D, dtype=torch.float64))
    b_G = (torch.eye(D, dtype=torch.float64) - W_G) @ mu
    errs = []
    for epochs in (16, 256):
        fit = distill_linear(empirical, noisy_batches(y, sigma, epochs=epochs, batch_size=256), sigma)
        errs.append(((fit.W - W_G).norm() / W_G.norm()).item())
        assert errs[-1] <= 12 / math.sqrt(fit.M), (fit.M, errs)
        assert ((fit.b - b_G).norm() / b_G.norm()).item() <= 12 / math.sqrt(fit.M)
    assert errs[1] <= 0.4 * errs[0]  # 16x the pairs: expected ratio 1/4


def test_adam_mode_reproduces_the_reference_parametrisation():
    d = 3 * 2 * 2
    teacher, A, c = affine_teacher(seed=3, d=d)
    y = torch.rand(512, 3, 2, 2, dtype=torch.float64) * 2 - 1
    seen = []
    fit = distill_linear(teacher, noisy_batches(y, 0.5, epochs=30, batch_size=64), 0.5, mode="adam", lr=5e-2,
                         callback=lambda step, model, loss: seen.append((step, model.W.clone(), loss)),
                         callback_every=80)
    assert isinstance(fit, LinearDenoiser) and fit.mode == "adam" and fit.M == 30 * 512
    assert [s for s, _, _ in seen] == [80, 160, 240]
    torch.testing.assert_close(seen[-1][1], fit.W)
    assert seen[-1][2] < 1e-3 * seen[0][2]
    assert (fit.W - A).abs().max().item() < 1e-3 and (fit.b - c).abs().max().item() < 1e-3
    # One Adam step from zero moves every parameter by ~lr; the effective weight is that / √d.
    one = distill_linear(teacher, noisy_batches(y, 0.5, batch_size=256), 0.5, mode="adam", lr=1e-3, M=256)
    np.testing.assert_allclose(one.W.abs().numpy(), 1e-3 / math.sqrt(d), rtol=1e-3)
    with pytest.raises(ValueError, match="lr must be given for sigma=0.3"):
        distill_linear(teacher, y, 0.3, mode="adam")
    assert LR_TABLE[round(0.11660578, 4)] == 5e-3


def test_noisy_batches_order_and_returned_denoiser(tmp_path):
    y = torch.arange(10, dtype=torch.float64).reshape(10, 1)
    batches = list(noisy_batches(y, 0.0, batch_size=4, epochs=2))
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]
    torch.testing.assert_close(torch.cat(batches[:3]), y.float())
    a = list(noisy_batches(y, 1.0, batch_size=4, seed=5))
    torch.testing.assert_close(torch.cat(a), torch.cat(list(noisy_batches(y, 1.0, batch_size=4, seed=5))))
    teacher, _, _ = affine_teacher()
    fit = distill_linear(teacher, clean_images(300), 0.7)
    x = clean_images(5, seed=9)
    torch.testing.assert_close(fit(x, 0.7), teacher(x, 0.7))
    fit.save(tmp_path / "lin.npz")
    back = LinearDenoiser.load(tmp_path / "lin.npz")
    assert (back.sigma, back.mode, back.M) == (0.7, "lstsq", 300)
    torch.testing.assert_close(back.W, fit.W)
