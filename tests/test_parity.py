# SPDX-License-Identifier: Apache-2.0
"""CPU vs CUDA on identical inputs (GPU machines only; skipped automatically elsewhere)."""
import pytest
import torch
from helpers import assert_f32_accuracy, naive_float32_denoiser

import diffrepro as dr
from diffrepro.reference import empirical_denoiser_reference, nn_search_reference

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("sigma", [0.002, 0.5, 80.0])
@pytest.mark.parametrize("Q", [1, 16, 300])
def test_denoiser_cuda_matches_oracle_and_cpu(sigma, Q):
    y = torch.rand(1000, 96) * 2 - 1
    x = y[torch.randint(0, 1000, (Q,))] + sigma * torch.randn(Q, 96)
    out = dr.empirical_denoiser(x.cuda(), y.cuda(), sigma).cpu()
    oracle = empirical_denoiser_reference(x, y, sigma)
    assert_f32_accuracy(out, oracle, naive_float32_denoiser(x, y, sigma))
    u = (y * 127.5 + 127.5).round().to(torch.uint8)
    assert torch.equal(dr.empirical_denoiser(x.cuda(), u.cuda(), sigma),
                       dr.empirical_denoiser(x.cuda(), (u.float() / 127.5 - 1).cuda(), sigma))


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_search_cuda_matches_oracle(metric):
    q = torch.nn.functional.normalize(torch.randn(500, 64), dim=1)
    r = torch.nn.functional.normalize(torch.randn(3000, 64), dim=1)
    v, i = dr.nn_search(q.cuda(), r.cuda(), 5, metric=metric)
    rv, _ = nn_search_reference(q, r, 5, metric)
    assert torch.allclose(v.cpu().double(), rv, atol=1e-5)
    vc, ic = dr.nn_search(q, r, 5, metric=metric)
    assert (ic == i.cpu()).float().mean() > 0.999
