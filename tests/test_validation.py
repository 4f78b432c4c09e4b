# SPDX-License-Identifier: Apache-2.0
"""Every rejected input names the argument, what it got and what was expected."""
import numpy as np
import pytest
import torch

import diffrepro as dr


def test_denoiser_rejects_bad_inputs():
    x = torch.rand(3, 8)
    y = torch.rand(10, 8)
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor or numpy.ndarray, got list"):
        dr.empirical_denoiser([[0.0] * 8], y, 1.0)
    with pytest.raises(TypeError, match=r"x must have one of the dtypes float32/float64, got a torch.int64"):
        dr.empirical_denoiser(torch.ones(3, 8, dtype=torch.int64), y, 1.0)
    with pytest.raises(TypeError, match=r"train must have one of the dtypes float32/uint8/float16, "
                                        r"got a torch.float64"):
        dr.empirical_denoiser(x, y.double(), 1.0)
    with pytest.raises(ValueError, match=r"train rows must have D = 8 features like x .* got train of shape \[10, 9\]"):
        dr.empirical_denoiser(x, torch.rand(10, 9), 1.0)
    with pytest.raises(ValueError, match=r"x must have shape \[R, D\] or \[R, C, H, W\], "
                                         r"got a torch.float32 tensor of shape \[8\]"):
        dr.empirical_denoiser(torch.rand(8), y, 1.0)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"sigma must be a positive finite number, got"):
            dr.empirical_denoiser(x, y, bad)
    with pytest.raises(ValueError, match=r"sigma must be a float or have shape \[3\] \(one per query\)"):
        dr.empirical_denoiser(x, y, torch.ones(4))
    with pytest.raises(ValueError, match=r"s must be positive and finite everywhere"):
        dr.empirical_denoiser(x, y, 1.0, s=torch.tensor([1.0, 0.0, 1.0]))
    bad_x = x.clone()
    bad_x[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"x must be finite, got 1 NaN/Inf values"):
        dr.empirical_denoiser(bad_x, y, 1.0)
    bad_y = y.clone()
    bad_y[4, 0] = float("inf")
    with pytest.raises(ValueError, match=r"train must be finite, got 1 NaN/Inf values"):
        dr.empirical_denoiser(x, bad_y, 1.0)
    with pytest.raises(ValueError, match=r"squared distances overflow torch.float32"):
        dr.empirical_denoiser(x, torch.rand(10, 8) * 1e20, 1.0)
    with pytest.raises(ValueError, match=r"train must have at least one row"):
        dr.empirical_denoiser(x, torch.rand(0, 8), 1.0)
    with pytest.raises(ValueError, match=r"x requires grad"):
        dr.empirical_denoiser(x.clone().requires_grad_(), y, 1.0)
    with torch.no_grad():  # allowed when grad mode is off
        dr.empirical_denoiser(x.clone().requires_grad_(), y, 1.0)
    with pytest.raises(ValueError, match=r"row_offset must be an int >= 0, got -1"):
        dr.empirical_denoiser_partial(x, y, 1.0, row_offset=-1)


def test_device_mismatch_and_missing_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the CPU-only path is what is checked here")
    meta = torch.empty(3, 8, device="meta")
    with pytest.raises(ValueError, match=r"all tensors must be on one device, got x on meta, train on cpu"):
        dr.empirical_denoiser(meta, torch.rand(10, 8), 1.0)


def test_search_rejects_bad_inputs():
    q = torch.rand(3, 8)
    r = torch.rand(10, 8)
    with pytest.raises(ValueError, match=r"metric must be one of \('ip', 'l2'\), got 'cos'"):
        dr.nn_search(q, r, metric="cos")
    with pytest.raises(ValueError, match=r"k must be an int >= 1, got 0"):
        dr.nn_search(q, r, 0)
    with pytest.raises(TypeError, match=r"queries must have one of the dtypes float32, got a torch.float64"):
        dr.nn_search(q.double(), r)
    with pytest.raises(TypeError, match=r"refs must have one of the dtypes float32/float16/uint8, got a torch.float64"):
        dr.nn_search(q, r.double())
    bad = r.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"refs must be finite"):
        dr.nn_search(q, bad)
    with pytest.raises(TypeError, match=r"queries must have one of the dtypes float32, got a int64 numpy array"):
        dr.nn_search(np.ones((2, 8), dtype=np.int64), r)


def test_state_merge_rejects_mismatch():
    a = dr.empirical_denoiser_partial(torch.rand(2, 4), torch.rand(5, 4), 1.0)
    b = dr.empirical_denoiser_partial(torch.rand(3, 4), torch.rand(5, 4), 1.0)
    with pytest.raises(ValueError, match=r"states must cover the same queries"):
        dr.merge_states(a, b)


def test_state_merge_refuses_incompatible_states():
    x, y = torch.rand(3, 6), torch.rand(40, 6)
    first = dr.empirical_denoiser_partial(x, y[:20], 0.5)
    rest = dr.empirical_denoiser_partial(x, y[20:], 0.5, row_offset=20)
    assert dr.merge_states(first, rest).rows == ((0, 40),)
    with pytest.raises(ValueError, match=r"^cannot merge denoiser states computed at different sigma: "
                                         r"0\.5 vs 0\.7 \(query 0\)$"):
        dr.merge_states(first, dr.empirical_denoiser_partial(x, y[20:], 0.7, row_offset=20))
    sigmas = torch.tensor([0.5, 0.5, 0.6], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"different sigma: 0\.5 vs 0\.6 \(query 2\)"):
        dr.merge_states(first, dr.empirical_denoiser_partial(x, y[20:], sigmas, row_offset=20))
    with pytest.raises(ValueError, match=r"^cannot merge denoiser states computed at different s: 1 vs 0\.9 "):
        dr.merge_states(first, dr.empirical_denoiser_partial(x, y[20:], 0.5, s=0.9, row_offset=20))
    other = x.clone()
    other[1, 3] += 1e-3
    with pytest.raises(ValueError, match=r"^cannot merge denoiser states of different queries: the query "
                                         r"fingerprints differ at query 1 "):
        dr.merge_states(first, dr.empirical_denoiser_partial(other, y[20:], 0.5, row_offset=20))
    with pytest.raises(ValueError, match=r"^cannot merge denoiser states that both cover rows \[0, 20\) "
                                         r"\(ranges \[\(0, 20\)\] and \[\(0, 20\)\]\): the same chunk twice"):
        dr.merge_states(first, first)
    # A forgotten row_offset: the second chunk claims rows [0, 20) again.
    with pytest.raises(ValueError, match=r"both cover rows \[0, 20\) .* a chunk whose row_offset was forgotten"):
        dr.merge_states(first, dr.empirical_denoiser_partial(x, y[20:], 0.5))
    # Partly overlapping chunks, found after other merges.
    tail = dr.empirical_denoiser_partial(x, y[30:], 0.5, row_offset=30)
    with pytest.raises(ValueError, match=r"both cover rows \[30, 40\)"):
        dr.merge_states(dr.merge_states(first, rest), tail)


def test_topk_merge_refuses_incompatible_states():
    q, r = torch.rand(3, 6), torch.rand(40, 6)
    first = dr.nn_search_partial(q, r[:20], 2)
    rest = dr.nn_search_partial(q, r[20:], 2, row_offset=20)
    assert dr.merge_topk(first, rest).rows == ((0, 40),)
    with pytest.raises(ValueError, match=r"^cannot merge top-k states of different queries: the query "
                                         r"fingerprints differ at query 0 "):
        dr.merge_topk(first, dr.nn_search_partial(q.flip(0), r[20:], 2, row_offset=20))
    with pytest.raises(ValueError, match=r"^cannot merge top-k states of different queries, got Q = 3 and 2$"):
        dr.merge_topk(first, dr.nn_search_partial(q[:2], r[20:], 2, row_offset=20))
    with pytest.raises(ValueError, match=r"^cannot merge top-k states of different k, got k = 2 and 3$"):
        dr.merge_topk(first, dr.nn_search_partial(q, r[20:], 3, row_offset=20))
    with pytest.raises(ValueError, match=r"^cannot merge top-k states of different metrics, got 'ip' and 'l2'$"):
        dr.merge_topk(first, dr.nn_search_partial(q, r[20:], 2, metric="l2", row_offset=20))
    with pytest.raises(ValueError, match=r"^cannot merge top-k states that both cover rows \[0, 20\)"):
        dr.merge_topk(first, dr.nn_search_partial(q, r[20:], 2))  # forgotten row_offset


def test_kernel_argument_struct_is_checked_by_the_bindings():
    # The bindings fill DenoiserArgs / SearchArgs from one dict: a forgotten or extra field is a
    # ValueError naming it, never a null pointer inside a kernel.
    from diffrepro import _backend

    with pytest.raises(ValueError, match=r"^denoiser args is missing the field 'x'$"):
        _backend.cpu.empirical_denoiser({"f64": False})
    with pytest.raises(ValueError, match=r"^search args is missing the field 'queries'$"):
        _backend.cpu.nn_search({})
    fields = dict(queries=0, refs=0, refs_type=0, Q=1, N=1, D=1, k=1, inner_product=True, center=0,
                  row_offset=0, values=0, indices=0)
    with pytest.raises(ValueError, match=r"^search args has 13 fields, expected 12$"):
        _backend.cpu.nn_search({**fields, "typo": 1})
    with pytest.raises(ValueError, match=r"^refs_type must be a RowType code 0\.\.3, got 7$"):
        _backend.cpu.nn_search({**fields, "refs_type": 7})
