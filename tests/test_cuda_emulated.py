# SPDX-License-Identifier: Apache-2.0
"""The CUDA kernels against float64 oracles: under the CPU emulator (diffrepro._cuda_emu) on every
machine, and on the GPU where there is one (the same tests, marked `cuda`).

`_cuda_emu` compiles the very kernel sources nvcc compiles (csrc/cuda/*_kernel.cuh) as host
C++ and runs each CUDA thread of a block as an OS thread, so this file is what proves the CUDA
indexing, tiling, synchronisation and numerics on GPU-less CI. The emulator is slow (one OS thread
per CUDA thread), hence the small shapes; most cases use the one-warp tile configuration 2
(TQ = TN = 8, TK = 4), which reaches every tile edge with few threads, and a few cases run the
production configurations 0 (32x32, 256 threads) and 1 (16x64, 256 threads).
"""

import importlib.util
import os

import numpy as np
import pytest
import torch
from helpers import BACKENDS

from diffrepro import _backend, ops

TINY, LARGE, NARROW = 2, 0, 1  # tile configurations of the kernels (see *_kernel.cuh)
TQ_TINY = TN_TINY = 8
MAX_K = 128


@pytest.fixture(params=["emu", pytest.param("cuda", marks=pytest.mark.cuda)])
def backend(request):
    """The CUDA kernels: emulated on host threads, or on the GPU (overrides conftest's fixture,
    which also offers the CPU kernels)."""
    if request.param == "emu" and importlib.util.find_spec("diffrepro._cuda_emu") is None:
        if os.environ.get("DIFFREPRO_EXPECT_CUDA_EMU") == "1":
            pytest.fail("DIFFREPRO_EXPECT_CUDA_EMU=1 but diffrepro._cuda_emu was not built")
        pytest.skip("diffrepro._cuda_emu not built (configure with DIFFREPRO_CUDA_EMULATOR=ON)")
    return BACKENDS[request.param]


# ------------------------------------------------------------------------------------------------
# Calling the kernels: the public ops with the backend's keyword arguments (_emulate=True for the
# emulator; same validation, centring and argument struct as every backend), results on the host
# ------------------------------------------------------------------------------------------------
def run_denoiser(backend, x, y, inv_sigma2, *, config=-1, splits=0, row_offset=0):
    st = ops.empirical_denoiser_partial(*backend.put(x, y), backend.put(inv_sigma2.rsqrt()), row_offset=row_offset,
                                        _config=config, _splits=splits, **backend.kw)
    return {name: getattr(st, name).cpu() for name in
            ("max_logit", "sum_exp", "sum_exp_sq", "weighted_sum", "nearest_index", "nearest_sqdist")}


def run_nn(backend, queries, refs, k, inner_product, *, config=-1, splits=0, row_offset=0):
    st = ops.nn_search_partial(*backend.put(queries, refs), k, metric="ip" if inner_product else "l2",
                               row_offset=row_offset, _config=config, _splits=splits, **backend.kw)
    return st.values.cpu(), st.indices.cpu()


# ------------------------------------------------------------------------------------------------
# Oracles (float64, dense) and the naive float32 baseline of the tolerance rule
# ------------------------------------------------------------------------------------------------
def decode(y, dtype=torch.float64):
    return y.to(dtype) / 127.5 - 1 if y.dtype == torch.uint8 else y.to(dtype)


def denoiser_summary(max_logit, sum_exp, sum_exp_sq, weighted_sum, inv_sigma2):
    """Data-scale quantities that do not depend on which max the sums are relative to."""
    inv = inv_sigma2.double()
    return dict(
        denoised=weighted_sum.double() / sum_exp.double()[:, None],
        max_sqdist=-2 * max_logit.double() / inv,  # min_i ||x - y_i||^2
        log_norm=-2 * (max_logit.double() + torch.log(sum_exp.double())) / inv,
        neff_frac=sum_exp.double() ** 2 / sum_exp_sq.double(),
    )


def denoiser_naive(x, y, inv_sigma2, dtype):
    xx, yy = x.to(dtype), decode(y, dtype)
    d2 = ((xx[:, None, :] - yy[None, :, :]) ** 2).sum(-1)
    logits = -0.5 * d2 * inv_sigma2.to(dtype)[:, None]
    m = logits.max(1).values
    p = torch.exp(logits - m[:, None])
    summary = denoiser_summary(m, p.sum(1), (p * p).sum(1), p @ yy, inv_sigma2)
    summary["neff_frac"] = summary["neff_frac"] / y.shape[0]
    return summary, d2.double()


def check_denoiser(x, y, inv_sigma2, out, *, row_offset=0, f64=False):
    ref, d2 = denoiser_naive(x.double(), y, inv_sigma2, torch.float64)
    got = denoiser_summary(out["max_logit"], out["sum_exp"], out["sum_exp_sq"],
                           out["weighted_sum"], inv_sigma2)
    got["neff_frac"] = got["neff_frac"] / y.shape[0]
    naive, _ = denoiser_naive(x.float(), y, inv_sigma2, torch.float32)
    for name in ref:
        assert torch.isfinite(got[name]).all(), name
        err = float((got[name] - ref[name]).abs().max())
        if f64:
            assert err <= 1e-10, (name, err)
        else:
            err_naive = float((naive[name].double() - ref[name]).abs().max())
            # Tolerance rule: err(kernel) <= 2 err(naive float32) + 1e-6, and never above 1e-4.
            assert err <= min(2 * err_naive + 1e-6, 1e-4) or err <= 1e-6, (name, err, err_naive)
    # Argmax rule: the returned row is a nearest one (within tolerance); exact when separated.
    idx = out["nearest_index"] - row_offset
    assert ((idx >= 0) & (idx < y.shape[0])).all()
    d2min, arg = d2.min(1)
    top2 = d2.topk(min(2, d2.shape[1]), dim=1, largest=False).values
    gap = top2[:, -1] - top2[:, 0] if d2.shape[1] > 1 else torch.full_like(d2min, np.inf)
    chosen = d2.gather(1, idx[:, None])[:, 0]
    assert ((chosen - d2min).abs() <= 1e-4).all()
    sep = gap > 1e-4
    assert (idx[sep] == arg[sep]).all()
    # nearest_sqdist is recomputed in float64 from the values the kernel used (rows decoded to
    # the query dtype, as on the CPU path), so it is exact up to float64 rounding.
    used = ((x.double()[:, None, :] - decode(y, x.dtype).double()[None, :, :]) ** 2).sum(-1)
    exact = used.gather(1, idx[:, None])[:, 0]
    assert torch.allclose(out["nearest_sqdist"], exact, rtol=1e-12, atol=1e-12)


def nn_oracle(queries, refs, inner_product, dtype=torch.float64):
    q, r = queries.to(dtype), decode(refs, dtype)
    if inner_product:
        return q @ r.T
    return ((q[:, None, :] - r[None, :, :]) ** 2).sum(-1)


def check_nn(queries, refs, k, inner_product, values, indices, *, row_offset=0):
    Q, N = queries.shape[0], refs.shape[0]
    scores = nn_oracle(queries, refs, inner_product)
    kk = min(k, N)
    ref_v = scores.topk(kk, dim=1, largest=inner_product).values
    naive = nn_oracle(queries, refs, inner_product, torch.float32)
    naive_v = naive.topk(kk, dim=1, largest=inner_product).values.double()
    err = float((values[:, :kk].double() - ref_v).abs().max())
    err_naive = float((naive_v - ref_v).abs().max())
    assert err <= min(2 * err_naive + 1e-6, 1e-4) or err <= 1e-6, (err, err_naive)
    idx = indices[:, :kk] - row_offset
    assert ((idx >= 0) & (idx < N)).all()
    # Each returned index carries its score, no index repeats, and where the oracle's ranks are
    # separated by more than the tolerance the index is the oracle's.
    tol = 1e-4
    assert ((scores.gather(1, idx) - values[:, :kk].double()).abs() <= tol).all()
    for q in range(Q):
        assert len(set(idx[q].tolist())) == kk
    ref_i = scores.topk(kk, dim=1, largest=inner_product).indices
    s = ref_v
    left = torch.cat([torch.full((Q, 1), np.inf, dtype=s.dtype), (s[:, 1:] - s[:, :-1]).abs()], 1)
    right = torch.cat([(s[:, 1:] - s[:, :-1]).abs(), torch.full((Q, 1), np.inf, dtype=s.dtype)], 1)
    if kk < N:  # the k-th entry also competes with the (k+1)-th
        nxt = scores.topk(kk + 1, dim=1, largest=inner_product).values[:, -1]
        right[:, -1] = (s[:, -1] - nxt).abs()
    sep = (left > tol) & (right > tol)
    assert (idx[sep] == ref_i[sep]).all()
    # Padding when k > N.
    pad = -np.inf if inner_product else np.inf
    assert (indices[:, kk:] == -1).all()
    assert (values[:, kk:] == pad).all()


def rand(gen, *shape, dtype=torch.float32, lo=-1.0, hi=1.0):
    return (torch.rand(*shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(dtype)


# ------------------------------------------------------------------------------------------------
# Empirical denoiser
# ------------------------------------------------------------------------------------------------
# (Q, N, D, config, splits): tile edges 1, T-1, T, T+1 on Q and N; D not a multiple of TK = 4;
# forced splits (uneven last split) and automatic plans.
DENOISER_GRID = [
    (1, 1, 1, TINY, 0),
    (TQ_TINY - 1, TN_TINY - 1, 3, TINY, 0),
    (TQ_TINY, TN_TINY, 4, TINY, 0),
    (TQ_TINY + 1, TN_TINY + 1, 5, TINY, 0),
    (3, 2 * TN_TINY + 1, 7, TINY, 2),
    (TQ_TINY + 1, 5 * TN_TINY + 3, 6, TINY, 4),
    (2, 40, 9, TINY, 64),  # more splits requested than tiles: clamped to the 6 tiles
    (17, 3, 2, TINY, -1),
    (33, 70, 19, LARGE, 0),
    (16, 129, 5, NARROW, 3),
    (5, 300, 13, -1, 0),  # automatic: narrow tiles, 2 splits
]


@pytest.mark.parametrize("Q,N,D,config,splits", DENOISER_GRID)
def test_denoiser_grid(backend, Q, N, D, config, splits):
    gen = torch.Generator().manual_seed(Q * 1000 + N * 10 + D)
    x, y = rand(gen, Q, D), rand(gen, N, D)
    inv = 1.0 / rand(gen, Q, dtype=torch.float64, lo=0.3, hi=1.5) ** 2
    out = run_denoiser(backend, x, y, inv, config=config, splits=max(splits, 0))
    check_denoiser(x, y, inv, out)


@pytest.mark.parametrize("y_dtype", [torch.uint8, torch.float16])
def test_denoiser_row_types(backend, y_dtype):
    gen = torch.Generator().manual_seed(7)
    Q, N, D = 6, 21, 10
    x = rand(gen, Q, D)
    if y_dtype == torch.uint8:
        y = torch.randint(0, 256, (N, D), generator=gen, dtype=torch.uint8)
    else:
        y = rand(gen, N, D, dtype=y_dtype)
    inv = torch.full((Q,), 3.0, dtype=torch.float64)
    out = run_denoiser(backend, x, y, inv, config=TINY, splits=2)
    check_denoiser(x, y, inv, out)


@pytest.mark.parametrize("y_dtype", [torch.float64, torch.uint8])
def test_denoiser_float64_path(backend, y_dtype):
    gen = torch.Generator().manual_seed(8)
    Q, N, D = 9, 19, 6
    x = rand(gen, Q, D, dtype=torch.float64)
    y = (torch.randint(0, 256, (N, D), generator=gen, dtype=torch.uint8) if y_dtype == torch.uint8
         else rand(gen, N, D, dtype=torch.float64))
    inv = torch.full((Q,), 2.0, dtype=torch.float64)
    out = run_denoiser(backend, x, y, inv, config=TINY, splits=3)
    check_denoiser(x, y, inv, out, f64=True)


def test_denoiser_large_common_offset(backend):
    # +100 on every coordinate: ||y||^2 ~ 1e4 D dwarfs the logit differences in float32 unless
    # the kernel centres before the products. It must still meet 1e-4 on data-scale outputs.
    gen = torch.Generator().manual_seed(9)
    Q, N, D = 5, 26, 12
    x, y = rand(gen, Q, D) + 100, rand(gen, N, D) + 100
    inv = torch.full((Q,), 4.0, dtype=torch.float64)
    out = run_denoiser(backend, x, y, inv, config=TINY, splits=2)
    ref, _ = denoiser_naive(x.double(), y, inv, torch.float64)
    got = denoiser_summary(out["max_logit"], out["sum_exp"], out["sum_exp_sq"],
                           out["weighted_sum"], inv)
    for name in ("denoised", "max_sqdist", "log_norm"):
        assert float((got[name] - ref[name]).abs().max()) <= 1e-4, name
    check_denoiser(x, y, inv, out)


def test_denoiser_wide_logit_spread(backend):
    # sigma = 0.02: logits span far more than 100, so most weights underflow to exactly 0 and
    # whole tiles (and whole splits) can be all-but-empty; no NaN may appear.
    gen = torch.Generator().manual_seed(10)
    Q, N, D = 4, 37, 8
    x, y = rand(gen, Q, D), rand(gen, N, D)
    inv = torch.full((Q,), 1 / 0.02**2, dtype=torch.float64)
    out = run_denoiser(backend, x, y, inv, config=TINY, splits=4)
    lg = -0.5 * ((x.double()[:, None] - y.double()[None]) ** 2).sum(-1) * inv[:, None]
    assert float((lg.max(1).values - lg.min(1).values).min()) > 100
    check_denoiser(x, y, inv, out)


def test_denoiser_ties_lowest_index_and_row_offset(backend):
    gen = torch.Generator().manual_seed(11)
    N, D = 30, 5
    y = rand(gen, N, D)
    # Exact duplicates in different tiles and different splits (8-row tiles, splits of 16).
    y[13] = y[2]
    y[25] = y[2]
    y[20] = y[9]
    x = torch.stack([y[2], y[13], y[25], y[9], y[20]])
    inv = torch.full((5,), 10.0, dtype=torch.float64)
    offset = 1000
    for splits in (1, 2, 4):
        out = run_denoiser(backend, x, y, inv, config=TINY, splits=splits, row_offset=offset)
        assert out["nearest_index"].tolist() == [offset + 2] * 3 + [offset + 9] * 2
        assert torch.equal(out["nearest_sqdist"], torch.zeros(5, dtype=torch.float64))
        check_denoiser(x, y, inv, out, row_offset=offset)


def test_denoiser_chunks_merge_like_one_pass(backend):
    # Partial states of two row chunks (each with its own centre), merged with the online-softmax
    # rule, meet the oracle like the state of the whole set (the contract that lets Python
    # stream datasets larger than memory).
    gen = torch.Generator().manual_seed(12)
    Q, N, D = 7, 23, 6
    x, y = rand(gen, Q, D), rand(gen, N, D)
    sigma = torch.full((Q,), 5.0 ** -0.5, dtype=torch.float64)
    parts = [ops.empirical_denoiser_partial(*backend.put(x, y[a:b], sigma), row_offset=a, _config=TINY, **backend.kw)
             for a, b in [(0, 10), (10, N)]]
    merged = ops.merge_states(parts[1], parts[0])
    out = {name: getattr(merged, name).cpu() for name in
           ("max_logit", "sum_exp", "sum_exp_sq", "weighted_sum", "nearest_index", "nearest_sqdist")}
    check_denoiser(x, y, sigma.pow(-2), out)
    whole = run_denoiser(backend, x, y, sigma.pow(-2), config=TINY)
    assert torch.equal(merged.nearest_index.cpu(), whole["nearest_index"])


@pytest.mark.parametrize("config,splits", [(TINY, 3), (LARGE, 2)])
def test_denoiser_deterministic(backend, config, splits):
    gen = torch.Generator().manual_seed(13)
    Q, N, D = 10, 75, 9
    x, y = rand(gen, Q, D), rand(gen, N, D)
    inv = torch.full((Q,), 2.0, dtype=torch.float64)
    r1 = run_denoiser(backend, x, y, inv, config=config, splits=splits)
    r2 = run_denoiser(backend, x, y, inv, config=config, splits=splits)
    for name in r1:
        assert torch.equal(r1[name], r2[name]), name


def test_denoiser_rejects_bad_arguments(backend):
    x, y = torch.zeros(2, 3), torch.zeros(4, 3)
    inv = torch.ones(2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="invalid argument"):
        run_denoiser(backend, x, y, inv, config=3)  # no such tile configuration
    with pytest.raises(RuntimeError, match="invalid argument"):
        run_denoiser(backend, x, y, inv, splits=65)  # more than kMaxSplits


# ------------------------------------------------------------------------------------------------
# Nearest-neighbour search
# ------------------------------------------------------------------------------------------------
# (Q, N, D, k, config, splits)
NN_GRID = [
    (1, 1, 1, 1, TINY, 0),
    (TQ_TINY - 1, TN_TINY - 1, 3, 3, TINY, 0),
    (TQ_TINY, TN_TINY, 4, 8, TINY, 0),
    (TQ_TINY + 1, TN_TINY + 1, 5, 4, TINY, 2),
    (3, 5, 6, 9, TINY, 0),  # k > N: padding
    (5, 4 * TN_TINY + 1, 7, 12, TINY, 5),
    (4, 50, 3, MAX_K, TINY, 3),  # k = max, k > N
    (33, 70, 19, 5, LARGE, 0),
    (17, 129, 5, 20, NARROW, 2),
    (6, 200, 11, 1, -1, 0),  # automatic plan
    (40, 90, 6, 16, -1, 0),  # automatic plan, large tiles
]


@pytest.mark.parametrize("inner_product", [True, False], ids=["ip", "l2"])
@pytest.mark.parametrize("Q,N,D,k,config,splits", NN_GRID)
def test_nn_grid(backend, Q, N, D, k, config, splits, inner_product):
    gen = torch.Generator().manual_seed(Q * 1000 + N * 10 + D + k)
    q, r = rand(gen, Q, D), rand(gen, N, D)
    v, i = run_nn(backend, q, r, k, inner_product, config=config, splits=splits)
    check_nn(q, r, k, inner_product, v, i)


@pytest.mark.parametrize("inner_product", [True, False], ids=["ip", "l2"])
@pytest.mark.parametrize("r_dtype", [torch.float16, torch.uint8])
def test_nn_row_types(backend, r_dtype, inner_product):
    gen = torch.Generator().manual_seed(21)
    Q, N, D, k = 5, 19, 9, 4
    q = rand(gen, Q, D)
    r = (torch.randint(0, 256, (N, D), generator=gen, dtype=torch.uint8) if r_dtype == torch.uint8
         else rand(gen, N, D, dtype=torch.float16))
    v, i = run_nn(backend, q, r, k, inner_product, config=TINY, splits=2, row_offset=50)
    check_nn(q, r, k, inner_product, v, i, row_offset=50)


@pytest.mark.parametrize("inner_product", [True, False], ids=["ip", "l2"])
def test_nn_ties_lowest_index_first(backend, inner_product):
    gen = torch.Generator().manual_seed(22)
    N, D = 30, 4
    r = rand(gen, N, D, lo=-0.9, hi=0.9)
    r[3] = 1.0  # the unique best for both metrics, then duplicated in later tiles / splits
    r[11] = r[3]
    r[27] = r[3]
    q = r[3:4].clone()
    for splits in (1, 2, 4):
        v, i = run_nn(backend, q, r, 3, inner_product, config=TINY, splits=splits)
        assert i[0].tolist() == [3, 11, 27]  # equal scores: ascending index
        assert v[0, 0] == v[0, 1] == v[0, 2]
    v, i = run_nn(backend, q, r, 3, inner_product, config=LARGE)
    assert i[0].tolist() == [3, 11, 27]


def test_nn_large_offset_l2(backend):
    # Distances are summed as (q - r)^2, so a common offset of 100 costs no accuracy.
    gen = torch.Generator().manual_seed(23)
    q, r = rand(gen, 4, 10) + 100, rand(gen, 25, 10) + 100
    v, i = run_nn(backend, q, r, 5, False, config=TINY, splits=2)
    ref = nn_oracle(q, r, False).topk(5, dim=1, largest=False).values
    assert float((v.double() - ref).abs().max()) <= 1e-4
    check_nn(q, r, 5, False, v, i)


def test_nn_deterministic(backend):
    gen = torch.Generator().manual_seed(24)
    q, r = rand(gen, 11, 7), rand(gen, 60, 7)
    a = run_nn(backend, q, r, 6, True, config=TINY, splits=4)
    b = run_nn(backend, q, r, 6, True, config=TINY, splits=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_nn_rejects_bad_k(backend):
    q, r = torch.zeros(2, 3), torch.zeros(4, 3)
    assert (_backend.emu_module() if backend.name == "emu" else _backend.cuda_module()).max_k == MAX_K
    with pytest.raises(ValueError, match=f"k must be <= {MAX_K} for the CUDA kernels, got k = {MAX_K + 1}"):
        run_nn(backend, q, r, MAX_K + 1, True)
    with pytest.raises(RuntimeError, match="invalid argument"):
        run_nn(backend, q, r, 17, True, config=LARGE)  # configuration 0 keeps lists of at most 16


# ------------------------------------------------------------------------------------------------
# Parity with the CPU backend (same contract: true max logit, uncentred weighted sum, global
# indices, float64 nearest distance from the decoded rows, lowest-index ties)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("y_dtype", [torch.float32, torch.uint8])
def test_parity_with_cpu_backend(backend, y_dtype):
    gen = torch.Generator().manual_seed(31)
    Q, N, D = 6, 45, 11
    x = rand(gen, Q, D)
    y = (torch.randint(0, 256, (N, D), generator=gen, dtype=torch.uint8) if y_dtype == torch.uint8
         else rand(gen, N, D))
    sigma = 0.7
    inv = torch.full((Q,), 1 / sigma**2, dtype=torch.float64)
    cpu = ops.empirical_denoiser_partial(x, y, sigma, row_offset=3)  # the CPU kernels
    got = run_denoiser(backend, x, y, inv, config=TINY, splits=3, row_offset=3)
    assert torch.equal(cpu.nearest_index, got["nearest_index"])
    assert torch.allclose(cpu.nearest_sqdist, got["nearest_sqdist"], rtol=1e-12, atol=1e-12)
    for name in ("max_logit", "sum_exp", "sum_exp_sq", "weighted_sum"):
        assert torch.allclose(getattr(cpu, name).double(), got[name].double(), rtol=0, atol=1e-5), name
    for metric in ("ip", "l2"):
        ref = ops.nn_search_partial(x, y, 5, metric=metric, row_offset=3)
        v, i = run_nn(backend, x, y, 5, metric == "ip", config=TINY, splits=2, row_offset=3)
        assert torch.allclose(ref.values, v, rtol=0, atol=1e-5), metric
        assert torch.equal(ref.indices, i), metric
