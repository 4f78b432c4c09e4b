# SPDX-License-Identifier: Apache-2.0
"""The BLAS engine: both ops with their products on a vendor GEMM (``torch.matmul``: cuBLAS on
the current CUDA stream, or the CPU BLAS), everything around the products in float64.

Device-agnostic torch, so the same code runs (and is tested) on CPU tensors. The training /
reference rows are walked in chunks of ``C`` rows; no ``Q x N`` matrix larger than one chunk
``Q x C`` ever exists. Per chunk of the empirical denoiser (paper 1, eq. 3; the optimal denoiser
``D(x) = sum_i softmax_i(-||x - y_i||^2 / 2 sigma^2) y_i``):

1. ``g = x' y'^T`` on the GEMM, with ``x' = x - c`` and ``y' = y - c`` centred by the same
   vector ``c`` (the logits are invariant to a common shift; centring keeps ``g`` small when the
   data share a large offset);
2. scores ``s = g - ||y'||^2 / 2`` in float64 (the logit is ``l = (s - ||x'||^2 / 2) / sigma^2``),
   the new running max ``s' = max(s_max, max_j s_j)``, weights ``p = exp((s - s') / sigma^2)``,
   and the state rescaled by ``r = exp((s_max - s') / sigma^2)``: ``Z = r Z + sum p``,
   ``Z2 = r^2 Z2 + sum p^2`` (float64); the max logit is formed once at the end, as a float64
   pair hi + lo like the kernels';
3. ``A = r A + p y``: the product on the GEMM (``p`` rounded to the compute dtype, as the fused
   kernels do), the accumulator in float64;
4. the nearest row: float64 distances of the rows whose score is within the product's rounding
   error of the maximum, the nearest winning, the lowest index on a tie
   (:func:`_nearest_candidate`); a later chunk takes over only when strictly nearer.

Steps 2 and 4 (and 3's update) run as torch operations, or, with ``kernels``, as the CUDA
epilogue kernels of ``csrc/cuda/blas_epilogue.cuh`` (12 bytes of traffic per (query, row) pair
instead of ~136; see docs/cuda.md).

``nn_search`` scores a chunk with one GEMM (inner products, or squared distances from the centred
expanded form ``||q'||^2 - 2 q'.r' + ||r'||^2`` combined in float64), keeps each query's top k
with the lowest-index tie rule (torch, or the ``chunk_topk`` kernel), and merges chunk lists
lexicographically (or ``merge_topk``); the final k values are recomputed in float64 (inner
products, or distances from the differences), rounded once and re-sorted, as the kernels do.

The products can run in split precision (:mod:`diffrepro._split`); the logits, sums and merges
stay float64 whatever the product.
"""
from __future__ import annotations

import math

import torch

from ._split import PRODUCTS, UNIT_ROUNDOFF, split_matmul
from ._validate import ROW_TYPES

__all__ = ["DEFAULT_CHUNK_ELEMENTS", "SEARCH_CHUNK_ELEMENTS", "EpilogueKernels", "chunk_rows", "denoiser_state",
           "search_state", "lex_sort", "merge_lists"]

# Elements of one Q x C chunk of the denoiser: its float64 logits take 8 bytes each (64 MiB at
# this size), its product and weights 4 to 8 more; the rest of a GPU's memory is left to the rows.
DEFAULT_CHUNK_ELEMENTS = 1 << 23
# nn_search keeps float32 scores only (256 MiB at this size): larger chunks, fewer launches (at
# Q = 10,000 a chunk of 6,710 rows; 149 chunks for N = 1,000,000).
SEARCH_CHUNK_ELEMENTS = 1 << 26
# A chunk never has fewer rows than this (a GEMM with a handful of columns is latency-bound).
_MIN_CHUNK_ROWS = 64


def chunk_rows(Q: int, N: int, requested: int | None = None, elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """Rows per chunk: ``requested`` if given, else ``elements // Q`` (at least 64), at most N."""
    if requested is not None:
        if int(requested) < 1:
            raise ValueError(f"chunk_rows: got {requested}, expected an integer >= 1")
        rows = int(requested)
    else:
        rows = max(_MIN_CHUNK_ROWS, elements // max(Q, 1))
    return max(1, min(rows, N))


def _decode(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows in the compute dtype; uint8 pixels as ``u.to(dtype) / 127.5 - 1`` (the kernels' rule)."""
    return rows.to(dtype) / 127.5 - 1 if rows.dtype == torch.uint8 else rows.to(dtype)


def _product(product: str):
    if product not in PRODUCTS:
        raise ValueError(f"product: got {product!r}, expected one of {', '.join(PRODUCTS)}")
    return lambda a, b: split_matmul(a, b, product)


class EpilogueKernels:
    """The CUDA epilogue kernels of ``csrc/cuda/blas_epilogue.cuh`` behind tensor arguments.

    ``module`` exposes ``blas_softmax_chunk``, ``blas_scale_accumulate``, ``blas_chunk_topk`` and
    ``blas_merge_topk``, each taking one dict of integer addresses and sizes (the launchers'
    parameters by name, as the ops' dicts) and the stream, and raising on a failed launch:
    diffrepro._cuda (csrc/bindings/blas_epilogue_binding.h), or the emulator's C entry points in
    the tests. ``stream`` is the cudaStream_t of the GEMMs (0 for the emulator).
    """

    def __init__(self, module, stream: int = 0):
        self.module = module
        self.stream = stream

    def softmax_chunk(self, g, y_half, x_half, inv_sigma2, x, rows, unit, chunk_offset, state, scale, p):
        Q, C = g.shape
        args = dict(f64=g.dtype == torch.float64, g=g.data_ptr(), ldg=g.stride(0), Q=Q, C=C,
                    y_half=y_half.data_ptr(), x_half=x_half.data_ptr(), inv_sigma2=inv_sigma2.data_ptr(),
                    x=x.data_ptr(), rows=rows.data_ptr(), rows_type=ROW_TYPES[rows.dtype], D=x.shape[1],
                    unit_roundoff=float(unit), chunk_offset=int(chunk_offset), scale_old=scale.data_ptr(),
                    p=p.data_ptr(), ldp=p.stride(0),
                    **{f: state[f].data_ptr() for f in ("max_score", "sum_exp", "sum_exp_sq", "nearest_sqdist",
                                                        "nearest_index")})
        self.module.blas_softmax_chunk(args, self.stream)

    def scale_accumulate(self, a, scale, acc):
        args = dict(f64=a.dtype == torch.float64, a=a.data_ptr(), lda=a.stride(0), Q=a.shape[0], D=a.shape[1],
                    scale_old=scale.data_ptr(), acc=acc.data_ptr())
        self.module.blas_scale_accumulate(args, self.stream)

    def chunk_topk(self, scores, k, largest, chunk_offset):
        Q, C = scores.shape
        v = torch.empty(Q, k, dtype=torch.float32, device=scores.device)
        i = torch.empty(Q, k, dtype=torch.int64, device=scores.device)
        args = dict(scores=scores.data_ptr(), lds=scores.stride(0), Q=Q, C=C, k=k, largest=largest,
                    chunk_offset=int(chunk_offset), values=v.data_ptr(), indices=i.data_ptr())
        self.module.blas_chunk_topk(args, self.stream)
        return v, i

    def merge_topk(self, va, ia, vb, ib, largest):
        Q, k = va.shape
        v, i = torch.empty_like(va), torch.empty_like(ia)
        args = dict(Q=Q, k=k, largest=largest, run_v=va.data_ptr(), run_i=ia.data_ptr(), chunk_v=vb.data_ptr(),
                    chunk_i=ib.data_ptr(), out_v=v.data_ptr(), out_i=i.data_ptr())
        self.module.blas_merge_topk(args, self.stream)
        return v, i


def denoiser_state(xs: torch.Tensor, y2: torch.Tensor, inv_sigma2: torch.Tensor, center: torch.Tensor,
                   row_offset: int = 0, *, chunk: int | None = None, product: str = "fp32",
                   kernels: EpilogueKernels | None = None) -> dict:
    """The empirical denoiser's streaming state over the rows ``y2`` (the fields of
    ``ops.DenoiserState``, same meaning and dtypes, ``max_logit_lo`` included).

    The running maximum is kept in score units ``s = <x', y'> - |y'|^2 / 2`` (the logit is
    ``l = (s - |x'|^2 / 2) / sigma^2``), so weights ``exp((s - s_max) / sigma^2)`` never see the
    query's norm; it enters once, at the end, where the max logit is formed as the unevaluated
    float64 sum ``max_logit + max_logit_lo`` exactly as the fused and CPU kernels form it
    (csrc/include/diffrepro/logits.h).

    Args:
        xs: [Q, D] float32/float64 queries ``x / s`` (validated, contiguous).
        y2: [N, D] contiguous rows of xs's dtype, float16 or uint8 pixels; N >= 1.
        inv_sigma2: [Q] float64 ``1 / sigma^2``. center: [D] in xs's dtype.
        row_offset: global index of y2's first row. chunk: rows per chunk (default: chunk_rows).
        product: "fp32" (the plain GEMM in xs's dtype), "3xtf32" or "3xbf16" (float32 only).
        kernels: run steps 2, 3's update and 4 with the CUDA epilogue kernels (default: torch).
    """
    mm = _product(product)
    Q, D = xs.shape
    N = y2.shape[0]
    T = xs.dtype
    unit = UNIT_ROUNDOFF["float64" if T == torch.float64 else product]
    f64 = dict(dtype=torch.float64, device=xs.device)
    xc = xs - center
    h_hi, h_lo = _half_sqnorm_dd(xs, center)
    isg = inv_sigma2.to(**f64).contiguous()
    st = dict(max_score=torch.full((Q,), -float("inf"), **f64), sum_exp=torch.zeros(Q, **f64),
              sum_exp_sq=torch.zeros(Q, **f64), nearest_sqdist=torch.full((Q,), float("inf"), **f64),
              nearest_index=torch.full((Q,), -1, dtype=torch.int64, device=xs.device))
    acc = torch.zeros(Q, D, **f64)
    scale = torch.empty(Q, **f64)
    x64 = xs.double()
    step = chunk_rows(Q, N, chunk)
    for a in range(0, N, step):
        rows = y2[a:a + step]
        y = _decode(rows, T)
        yc = y - center
        y_half = 0.5 * yc.double().square().sum(1)
        g = mm(xc, yc.T)
        if kernels is not None:
            p = torch.empty(g.shape, dtype=T, device=xs.device)
            kernels.softmax_chunk(g, y_half, h_hi, isg, xs, rows, unit, row_offset + a, st, scale, p)
            kernels.scale_accumulate(mm(p, y), scale, acc)
            continue
        score = g.double() - y_half
        m = st["max_score"]
        m_new = torch.maximum(m, score.amax(1))
        r = torch.where(m == -float("inf"), 0.0, torch.exp((m - m_new) * isg))
        p = torch.exp((score - m_new[:, None]) * isg[:, None])
        st.update(max_score=m_new, sum_exp=st["sum_exp"] * r + p.sum(1),
                  sum_exp_sq=st["sum_exp_sq"] * r * r + p.square().sum(1))
        acc = acc * r[:, None] + mm(p.to(T), y).double()
        d_c, arg_c = _nearest_candidate(x64, y, score, h_hi, y_half, unit)
        # A later chunk holds higher indices: it takes over only when strictly nearer.
        take = d_c < st["nearest_sqdist"]
        st.update(nearest_index=torch.where(take, arg_c + (row_offset + a), st["nearest_index"]),
                  nearest_sqdist=torch.where(take, d_c, st["nearest_sqdist"]))
    hi, lo = _logit_from_score(st.pop("max_score"), h_hi, h_lo, isg)
    return dict(weighted_sum=acc.to(T), max_logit=hi, max_logit_lo=lo, **st)


# Error-free transformations (Knuth's TwoSum, Dekker's split and product) on float64 tensors:
# the torch twins of csrc/include/diffrepro/logits.h, which the kernels use in C++.
def _two_sum(a, b):
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _two_prod(a, b):
    def split(v):
        c = 134217729.0 * v  # 2^27 + 1
        hi = c - (c - v)
        return hi, v - hi

    p = a * b
    (ah, al), (bh, bl) = split(a), split(b)
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def _half_sqnorm_dd(xs: torch.Tensor, center: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``|x - c|^2 / 2`` per row as hi + lo, from the exact differences (TwoSum), not the ones
    rounded to xs's dtype that the products use (logits.h's half_sqnorm_dd says why): exact
    squares (TwoProd), summed by a pairwise TwoSum tree that keeps every error."""
    dv, de = _two_sum(xs.double(), -center.double())
    s, err = _two_prod(dv, dv)
    err = err + (2 * dv + de) * de
    while s.shape[1] > 1:
        if s.shape[1] % 2:
            s, err = torch.nn.functional.pad(s, (0, 1)), torch.nn.functional.pad(err, (0, 1))
        s, t = _two_sum(s[:, 0::2], s[:, 1::2])
        err = err[:, 0::2] + err[:, 1::2] + t
    return _two_sum(0.5 * s[:, 0], 0.5 * err[:, 0])


def _logit_from_score(g, h_hi, h_lo, isg):
    """``(g - h) / sigma^2`` as hi + lo (logits.h's logit_from_score)."""
    s, e = _two_sum(g, -h_hi)
    p, pe = _two_prod(s, isg)
    return _two_sum(p, pe + (e - h_lo) * isg)


def _nearest_candidate(x64, y, score, x_half, y_half, unit):
    """Each query's nearest row of a chunk: (float64 squared distance, column).

    The GEMM may round two identical rows differently (edge columns take other micro-kernel
    paths), so the largest score alone would not honour the lowest-index rule for exact
    duplicates. Every column whose score lies within ``8 sqrt(D) u |x'| max|y'|`` of the largest
    (eight standard deviations of the product's rounding error) is a candidate; the candidates'
    distances are recomputed in float64 from the rows as decoded, and the nearest wins, the
    lowest column on a tie. Typically one candidate per query."""
    Q, C = score.shape
    delta = 8.0 * math.sqrt(x64.shape[1]) * unit * (2 * x_half).sqrt() * math.sqrt(2 * float(y_half.max()))
    qi, ni = (score >= (score.amax(1) - delta)[:, None]).nonzero(as_tuple=True)
    d = (x64[qi] - y[ni].double()).square().sum(1)
    best = torch.full((Q,), float("inf"), dtype=torch.float64, device=x64.device).scatter_reduce(0, qi, d, "amin")
    win = d == best[qi]
    col = torch.full((Q,), C, dtype=torch.int64, device=x64.device).scatter_reduce(0, qi[win], ni[win], "amin")
    return best, col


def lex_sort(values: torch.Tensor, indices: torch.Tensor, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorts each row of (value, index) pairs best first; equal values by increasing index and
    padding (index -1) after every real entry (two stable sorts: index, then value)."""
    key = torch.where(indices < 0, torch.iinfo(torch.int64).max, indices)
    order = torch.sort(key, dim=1, stable=True).indices
    values, indices = values.gather(1, order), indices.gather(1, order)
    order = torch.sort(values, dim=1, descending=largest, stable=True).indices
    return values.gather(1, order), indices.gather(1, order)


def merge_lists(va, ia, vb, ib, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The best k of two top-k lists per query (ties to the lower index)."""
    v, i = lex_sort(torch.cat([va, vb], 1), torch.cat([ia, ib], 1), largest)
    return v[:, :k], i[:, :k]


def _chunk_topk(scores: torch.Tensor, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's best min(k, C) scores and their column indices, ties to the lowest column.

    ``torch.topk`` picks an arbitrary member of a tie at the k-th place, so the k-th value is
    read from it and the selection is rebuilt: every strictly better entry, then the first
    ``k - #better`` entries equal to the k-th value in column order."""
    kk = min(k, scores.shape[1])
    top = scores.topk(kk, dim=1, largest=largest, sorted=False).values
    kth = (top.amin(1) if largest else top.amax(1))[:, None]
    better = scores > kth if largest else scores < kth
    tie = scores == kth
    take = better | (tie & (tie.cumsum(1) <= kk - better.sum(1, keepdim=True)))
    cols = take.to(torch.uint8).topk(kk, dim=1, sorted=False).indices  # exactly kk ones per row
    return lex_sort(scores.gather(1, cols), cols, largest)


def search_state(q2: torch.Tensor, r2: torch.Tensor, k: int, metric: str, row_offset: int = 0, *,
                 center: torch.Tensor | None = None, chunk: int | None = None, product: str = "fp32",
                 kernels: EpilogueKernels | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each query over the rows ``r2`` (the fields of ``ops.TopKState``).

    Args:
        q2: [Q, D] float32 queries (float64: an all-float64 search, used as an oracle at sizes
            the dense oracle cannot hold). r2: [N, D] float32, float16, uint8 (or float64) rows.
        k: >= 1 (a list longer than N is padded with -inf / +inf and index -1).
        metric: "ip" (largest inner product) or "l2" (smallest squared distance).
        center: [D] centring vector for "l2" (default: the mean of at most 256 evenly strided rows).
        kernels: select and merge with the CUDA epilogue kernels (float32 queries, k <= 128).
    Returns:
        (values [Q, k] in q2's dtype, indices [Q, k] int64), best first, ties to the lowest index.
    """
    if metric not in ("ip", "l2"):
        raise ValueError(f"metric: got {metric!r}, expected 'ip' or 'l2'")
    mm = _product(product)
    largest = metric == "ip"
    Q, N = q2.shape[0], r2.shape[0]
    pad = -float("inf") if largest else float("inf")
    T = q2.dtype
    values = torch.full((Q, k), pad, dtype=T, device=q2.device)
    indices = torch.full((Q, k), -1, dtype=torch.int64, device=q2.device)
    if not largest:
        if center is None:  # the mean of an evenly strided sample of at most 256 rows
            center = _decode(r2[:: max(1, N // 256)][:256], T).double().mean(0).to(T)
        qc = q2 - center
        q_norm = qc.double().square().sum(1)
    step = chunk_rows(Q, N, chunk, SEARCH_CHUNK_ELEMENTS)
    for a in range(0, N, step):
        r = _decode(r2[a:a + step], T)
        if largest:
            scores = mm(q2, r.T)
        else:
            rc = r - center
            scores = (q_norm[:, None] - 2.0 * mm(qc, rc.T).double() + rc.double().square().sum(1)).clamp_min(0).to(T)
        if kernels is not None:
            v, i = kernels.chunk_topk(scores.contiguous(), k, largest, row_offset + a)
            values, indices = kernels.merge_topk(values, indices, v, i, largest)
            continue
        v, i = _chunk_topk(scores, k, largest)
        values, indices = merge_lists(values, indices, v, i + (row_offset + a), k, largest)
    # The k winners' values in float64 (inner products, or distances from the differences), rounded
    # once to q2's dtype and re-sorted: the kernels' topk_refine_f64. O(Q k D).
    found = indices >= 0
    rows = _decode(r2[(indices - row_offset).clamp_min(0)], T).double()
    q64 = q2.double()[:, None, :]
    exact = ((q64 * rows).sum(2) if largest else (q64 - rows).square().sum(2)).to(T)
    return lex_sort(torch.where(found, exact, values), indices, largest)
