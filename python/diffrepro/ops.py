# SPDX-License-Identifier: Apache-2.0
"""The kernels' public API: validate, pick the backend from the device (once, here), allocate
outputs with torch, pass raw pointers.

Two ops, each in a one-shot and a streaming form:

* ``empirical_denoiser`` / ``empirical_denoiser_partial`` + ``merge_states`` + ``finalize``
* ``nn_search`` / ``nn_search_partial`` + ``merge_topk``

The streaming forms process a training (reference) set in chunks, e.g. a memory-mapped uint8
``.npy`` larger than RAM, or shards held by different processes; their states merge
associatively and commutatively.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from . import _backend, _gpu_dispatch
from ._validate import ROW_TYPES, as_rows, check_finite, check_int, per_query, same_device, to_tensor

__all__ = [
    "DenoiserState",
    "TopKState",
    "empirical_denoiser",
    "empirical_denoiser_partial",
    "merge_states",
    "finalize",
    "nn_search",
    "nn_search_partial",
    "merge_topk",
]

_FLOATS = (torch.float32, torch.float64)
# Rows sampled to pick the centring vector: enough to remove a common offset, cheap to read.
_CENTER_SAMPLE = 256


def _workers(override: int | None) -> int:
    if override is not None:
        return check_int("_workers", override, 1)
    env = os.environ.get("DIFFREPRO_NUM_THREADS")
    if env:
        try:
            value = int(env)
        except ValueError:
            value = 0
        if value < 1:
            raise ValueError(f"DIFFREPRO_NUM_THREADS: got {env!r}, expected an integer >= 1 (worker threads)")
        return value
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def _host(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a numpy view. Small per-call steps on the CPU path run in numpy, which is
    single-threaded: torch would wake its OpenMP pool, whose spinning threads then compete with
    the kernel's own workers (measured: 2x slower sampling on a loaded 2-core machine)."""
    return t.detach().numpy()


class _Knobs(NamedTuple):
    """Private tuning/testing knobs of the ops (never needed for correct results)."""

    tile: int | None = None  # CPU: rows per tile
    workers: int | None = None  # CPU: threads
    config: int = -1  # CUDA / emulator: tile configuration (-1: automatic)
    splits: int = 0  # CUDA / emulator: row splits across blocks (0: automatic)
    emulate: bool = False  # run the CUDA kernels on host tensors (diffrepro._cuda_emu)


Rows = tuple[tuple[int, int], ...]


@dataclass
class DenoiserState:
    """Streaming softmax state of the empirical denoiser over the rows seen so far.

    Attributes:
        max_logit: [Q] float64, max_i l_i with l_i = -||x/s - y_i||^2 / (2 sigma^2) + lw_i
            (lw_i: the row's log-weight, 0 without ``log_weights``).
        sum_exp: [Q] float64, sum_i exp(l_i - max_logit).
        sum_exp_sq: [Q] float64, sum_i exp(l_i - max_logit)^2.
        weighted_sum: [Q, D] (x's dtype), sum_i exp(l_i - max_logit) y_i.
        nearest_index: [Q] int64, global index of the nearest row (lowest index wins ties);
            with log-weights the row of largest weight (largest l_i, see ``nearest_key``).
        nearest_sqdist: [Q] float64, ||x/s - y_nearest||^2 recomputed in float64.
        max_logit_lo: [Q] float64 or None, low part of the max logit (the exact value is
            max_logit + max_logit_lo): keeps merges exact when ||x/s||^2 / sigma^2 is huge.
        sigma, s: [Q] float64 or None, the noise levels and scales the state was computed at.
        query_fingerprint: [Q] float64 or None, a cheap fingerprint of the queries x.
        rows: the global row ranges [start, stop) covered, or None if unknown.
        The last five let ``merge_states`` refuse states that do not belong together.
        nearest_key: [Q] float64 or None (no log-weights): the nearest row's ranking key
            ||x/s - y||^2 / (2 sigma^2) - lw (smaller wins, then the lower index), +inf for none.
    """

    max_logit: torch.Tensor
    sum_exp: torch.Tensor
    sum_exp_sq: torch.Tensor
    weighted_sum: torch.Tensor
    nearest_index: torch.Tensor
    nearest_sqdist: torch.Tensor
    max_logit_lo: torch.Tensor | None = None
    sigma: torch.Tensor | None = None
    s: torch.Tensor | None = None
    query_fingerprint: torch.Tensor | None = None
    rows: Rows | None = None
    nearest_key: torch.Tensor | None = None


@dataclass
class TopKState:
    """Top-k of each query over the references seen so far, best first.

    Attributes:
        values: [Q, k] float32 inner products (metric "ip") or squared distances ("l2", computed
            in float64 and rounded once); padding is -inf ("ip") or +inf ("l2").
        indices: [Q, k] int64 global reference indices, -1 for padding.
        metric: "ip" or "l2".
        query_fingerprint: [Q] float64 or None, a cheap fingerprint of the queries.
        rows: the global reference ranges [start, stop) covered, or None if unknown.
    """

    values: torch.Tensor
    indices: torch.Tensor
    metric: str
    query_fingerprint: torch.Tensor | None = None
    rows: Rows | None = None


def _fingerprint(q2: torch.Tensor) -> torch.Tensor:
    """[Q] float64 projections of the query rows on a fixed pseudo-random vector in [0.5, 1.5)
    (the same for every call with this D): O(Q D), and different queries give different values."""
    w = torch.rand(q2.shape[1], generator=torch.Generator().manual_seed(q2.shape[1]), dtype=torch.float64) + 0.5
    if q2.device.type == "cpu":
        # einsum casts in small buffers and runs on this thread: no Q x D float64 copy, and no
        # numpy BLAS threads left spinning against the kernel's workers (a matmul here cost 10x).
        return torch.from_numpy(np.einsum("ij,j->i", _host(q2), w.numpy()))
    return q2.double() @ w.to(q2.device)


def _covered(row_offset: int, n: int) -> Rows:
    return ((int(row_offset), int(row_offset) + n),) if n else ()


def _union(a: Rows | None, b: Rows | None, what: str) -> Rows | None:
    """Union of two sets of disjoint row ranges; overlapping ranges are refused."""
    if a is None or b is None:
        return None
    for lo, hi in a:
        for lo2, hi2 in b:
            if max(lo, lo2) < min(hi, hi2):
                raise ValueError(
                    f"cannot merge {what} that both cover rows [{max(lo, lo2)}, {min(hi, hi2)}) "
                    f"(ranges {list(a)} and {list(b)}): the same chunk twice, or a chunk whose "
                    "row_offset was forgotten"
                )
    merged: list[list[int]] = []
    for lo, hi in sorted(a + b):
        if merged and merged[-1][1] == lo:
            merged[-1][1] = hi
        else:
            merged.append([lo, hi])
    return tuple((lo, hi) for lo, hi in merged)


def _check_same_queries(what: str, a, b) -> None:
    fa, fb = a.query_fingerprint, b.query_fingerprint
    if fa is None or fb is None:
        return
    bad = ((fa - fb).abs() > 1e-9 * (fa.abs() + fb.abs())).nonzero()
    if len(bad):
        q = int(bad[0, 0])
        raise ValueError(
            f"cannot merge {what} of different queries: the query fingerprints differ at query {q} "
            f"({float(fa[q]):.9g} vs {float(fb[q]):.9g}); merge only chunks searched with the same x"
        )


def _check_same_scalar(name: str, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
    if a is None or b is None or torch.equal(a, b):
        return
    q = int((a != b).nonzero()[0, 0])
    raise ValueError(
        f"cannot merge denoiser states computed at different {name}: {float(a[q]):.9g} vs "
        f"{float(b[q]):.9g} (query {q})"
    )


def _prepare_denoiser(x, train, sigma, s):
    xt, from_numpy = to_tensor("x", x, _FLOATS)
    tt, _ = to_tensor("train", train, (xt.dtype, torch.uint8, torch.float16))
    device = same_device(x=xt, train=tt)
    x2 = as_rows("x", xt)
    y2 = as_rows("train", tt)
    if y2.shape[1] != x2.shape[1]:
        raise ValueError(
            f"train rows must have D = {x2.shape[1]} features like x (shape {list(xt.shape)}), "
            f"got train of shape {list(tt.shape)}"
        )
    check_finite("x", x2)
    Q = x2.shape[0]
    sig = per_query("sigma", sigma, Q, device)
    scale = per_query("s", s, Q, device)
    # x~ = x / s: the denoiser acts on the unscaled variable (x = s x~ in Karras et al. 2022, EDM).
    if bool((scale == 1).all()):
        xs = x2
    elif device.type == "cpu":
        xs = torch.from_numpy(_host(x2) / _host(scale.to(x2.dtype))[:, None])
    else:
        xs = (x2 / scale.to(x2.dtype)[:, None]).contiguous()
    return xt, from_numpy, x2, xs, y2, sig, scale


def _log_weights(log_weights, n: int, device) -> torch.Tensor | None:
    """``log_weights`` as a contiguous float64 ``[n]`` tensor on ``device`` (None stays None):
    finite or -inf (row excluded); NaN and +inf are refused."""
    if log_weights is None:
        return None
    lw, _ = to_tensor("log_weights", log_weights, _FLOATS)
    if lw.shape != (n,):
        raise ValueError(f"log_weights must have shape [{n}] (one per training row), got {list(lw.shape)}")
    lw = lw.to(device=device, dtype=torch.float64).contiguous()
    bad = torch.isnan(lw) | (lw == float("inf"))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"log_weights must be finite or -inf (row excluded), got {float(lw[i])} at row {i}")
    return lw


def _nearest_key(state: DenoiserState, lw: torch.Tensor, inv_sigma2: torch.Tensor, row_offset: int) -> torch.Tensor:
    """The ranking key of each query's nearest row, the formula of the kernels'
    nearest_rank_key (csrc/include/diffrepro/logits.h): ``0.5 d2 / sigma^2 - lw`` (+inf: none)."""
    found = state.nearest_index >= 0
    local = torch.where(found, state.nearest_index - int(row_offset), 0)
    key = 0.5 * state.nearest_sqdist * inv_sigma2 - lw[local]
    return torch.where(found, key, float("inf"))


def _center(y2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Mean of an evenly strided sample of rows: removes a large common offset before the
    products (the logits and L2 distances are invariant to a shift of x and y by the same
    vector). Computed on the host in float64 from rows decoded exactly as the kernels decode
    them (uint8: u / 127.5 - 1 in the compute dtype), so uint8 and pre-decoded rows give the
    same centre. Decoded in place: one temporary, not four (each fresh page faults)."""
    step = max(1, y2.shape[0] // _CENTER_SAMPLE)
    sample = _host(y2[::step][:_CENTER_SAMPLE].cpu())
    ftype = np.float32 if dtype == torch.float32 else np.float64
    rows = sample.astype(ftype)
    if sample.dtype == np.uint8:
        np.divide(rows, ftype(127.5), out=rows)
        np.subtract(rows, ftype(1), out=rows)
    center = rows.mean(0, dtype=np.float64).astype(ftype)
    return torch.from_numpy(center).to(y2.device)


def row_center(train_chunk, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The centring vector ``empirical_denoiser_partial`` computes for these rows (``[D]``, in
    ``dtype``): a caller that calls it again and again on the same rows computes it once and
    passes it as ``_row_center``."""
    tt, _ = to_tensor("train_chunk", train_chunk, (torch.float32, torch.float64, torch.uint8, torch.float16))
    return _center(as_rows("train_chunk", tt), dtype)


def _given_center(center, y2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The kernel reads D values of the compute dtype at center's address: anything else would
    be read as wrong numbers, so it is refused."""
    if center is None:
        return _center(y2, dtype)
    if not isinstance(center, torch.Tensor) or center.shape != (y2.shape[1],) or center.dtype != dtype \
            or center.device != y2.device or not center.is_contiguous():
        got = f"{center.dtype} {list(center.shape)} on {center.device}" if isinstance(center, torch.Tensor) \
            else type(center).__name__
        raise ValueError(f"_row_center must be a contiguous {dtype} [{y2.shape[1]}] tensor on {y2.device} "
                         f"(from row_center), got {got}")
    return center


def _empty_state(Q: int, D: int, dtype, device, fill: bool = True) -> DenoiserState:
    """A state that has seen no rows; fill=False leaves it uninitialised for a kernel to write."""
    f64 = dict(dtype=torch.float64, device=device)

    def make(shape, value, **kw):
        return torch.full(shape, value, **kw) if fill else torch.empty(shape, **kw)

    return DenoiserState(
        max_logit=make((Q,), -float("inf"), **f64),
        sum_exp=make((Q,), 0.0, **f64),
        sum_exp_sq=make((Q,), 0.0, **f64),
        weighted_sum=make((Q, D), 0.0, dtype=dtype, device=device),
        nearest_index=make((Q,), -1, dtype=torch.int64, device=device),
        nearest_sqdist=make((Q,), float("inf"), **f64),
        max_logit_lo=make((Q,), 0.0, **f64),
    )


def _empty_weighted(Q: int, D: int, dtype, device, lw) -> DenoiserState:
    state = _empty_state(Q, D, dtype, device)
    if lw is not None:
        state.nearest_key = torch.full((Q,), float("inf"), dtype=torch.float64, device=device)
    return state


def _workspace(module, op: str, sizes: tuple, knobs: _Knobs, device) -> torch.Tensor:
    nbytes = getattr(module, f"{op}_workspace_bytes")(*sizes, config=knobs.config, splits=knobs.splits)
    return torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device=device)


def _launch(op: str, args: dict, sizes: tuple, device, knobs: _Knobs) -> None:
    """Runs `op` on the backend of `device` (or on the CUDA emulator), with one argument dict for all."""
    if knobs.emulate:
        if device.type != "cpu":
            raise ValueError(f"_emulate=True runs the CUDA kernels on host tensors, got tensors on {device}")
        emu = _backend.emu_module()
        ws = _workspace(emu, op, sizes, knobs, device)
        getattr(emu, op)(args, ws.data_ptr(), config=knobs.config, splits=knobs.splits)
    elif device.type == "cpu":
        getattr(_backend.cpu, op)(args, tile_rows=int(knobs.tile or 0), workers=_workers(knobs.workers))
    elif device.type == "cuda":
        cuda = _backend.cuda_module()
        ws = _workspace(cuda, op, sizes, knobs, device)
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device).cuda_stream
            getattr(cuda, op)(args, ws.data_ptr(), stream, config=knobs.config, splits=knobs.splits)
    else:
        raise ValueError(f"tensors must be on a cpu or cuda device, got {device}")


def _gpu_engine_choice(device, knobs: _Knobs) -> bool:
    """CUDA calls choose between the fused kernels and the BLAS engine (diffrepro._engine), unless
    a tile configuration or split count is forced (those knobs address the fused kernels)."""
    return device.type == "cuda" and not knobs.emulate and knobs.config < 0 and knobs.splits == 0


def _denoiser_state(xs, y2, sig, row_offset, knobs: _Knobs, lw: torch.Tensor | None = None,
                    center=None) -> DenoiserState:
    Q, D = xs.shape
    N = y2.shape[0]
    if Q == 0 or N == 0:
        return _empty_weighted(Q, D, xs.dtype, xs.device, lw)
    state = _empty_state(Q, D, xs.dtype, xs.device, fill=False)  # the kernels write every field
    center = _given_center(center, y2, xs.dtype)
    inv_sigma2 = sig.pow(-2)
    args = dict(
        f64=xs.dtype == torch.float64, x=xs.data_ptr(), y=y2.data_ptr(), y_type=ROW_TYPES[y2.dtype],
        Q=Q, N=N, D=D, center=center.data_ptr(), inv_sigma2=inv_sigma2.data_ptr(), row_offset=int(row_offset),
        max_logit=state.max_logit.data_ptr(), max_logit_lo=state.max_logit_lo.data_ptr(),
        sum_exp=state.sum_exp.data_ptr(), sum_exp_sq=state.sum_exp_sq.data_ptr(),
        weighted_sum=state.weighted_sum.data_ptr(), nearest_index=state.nearest_index.data_ptr(),
        nearest_sqdist=state.nearest_sqdist.data_ptr(), log_weights=0 if lw is None else lw.data_ptr(),
    )
    # Weighted calls run the fused kernels (the BLAS engine's epilogue has no log-weights).
    if lw is None and _gpu_engine_choice(xs.device, knobs):
        fields = _gpu_dispatch.empirical_denoiser(
            xs, y2, inv_sigma2, center, int(row_offset),
            lambda n: _launch("empirical_denoiser", {**args, "N": n}, (Q, n, D), xs.device, knobs))
        if fields is not None:  # the BLAS engine ran
            state = DenoiserState(**fields)
    else:
        _launch("empirical_denoiser", args, (Q, N, D), xs.device, knobs)
    _check_state_finite(state, xs, y2)
    if lw is not None:
        state.nearest_key = _nearest_key(state, lw, inv_sigma2, row_offset)
    return state


def _check_state_finite(state: DenoiserState, xs: torch.Tensor, y2: torch.Tensor) -> None:
    """One clear error for a kernel state poisoned by NaN/Inf (finite x assumed)."""
    if not bool(torch.isfinite(state.sum_exp).all()):
        # A NaN/Inf training value poisons every weight; name it without a pass over train
        # on the common path.
        check_finite("train", y2)
        raise ValueError(
            f"x and train are finite but their squared distances overflow {xs.dtype} "
            f"(largest |x| = {float(xs.abs().max()):.3g}, largest |train| = "
            f"{float(_decode_abs_max(y2)):.3g}); rescale the data or use float64"
        )


def check_some_weight(lw: torch.Tensor | None) -> None:
    """At least one row of finite log-weight (a softmax over no row has no value)."""
    if lw is not None and not bool((lw > -float("inf")).any()):
        raise ValueError(f"log_weights are -inf for all {lw.numel()} rows: no row has a finite weight")


def _decode_abs_max(y2: torch.Tensor) -> float:
    return 1.0 if y2.dtype == torch.uint8 else float(y2.abs().max())


def empirical_denoiser_partial(x, train_chunk, sigma, *, s=1.0, row_offset: int = 0, log_weights=None,
                               _tile: int | None = None, _workers: int | None = None, _config: int = -1,
                               _splits: int = 0, _emulate: bool = False, _row_center=None) -> DenoiserState:
    """Softmax state of the empirical denoiser over one chunk of training rows.

    Args:
        x: [Q, D] or [Q, C, H, W] float32/float64 queries (torch or numpy).
        train_chunk: [n, D] or [n, C, H, W] rows of x's dtype or float16, or uint8 pixels decoded
            as u / 127.5 - 1; numpy arrays and np.memmap are used without a copy.
        sigma: positive float or [Q] noise levels. s: positive float or [Q] signal scales.
        row_offset: global index of the chunk's first row (for ``nearest_index``).
        log_weights: optional ``[n]`` float log-weights of the chunk's rows (see
            ``empirical_denoiser``); a chunk whose rows all have -inf contributes nothing.
        _row_center: ``row_center(train_chunk, x's dtype)``, computed once by a caller that
            passes the same rows again and again (None: computed here).

    Returns:
        DenoiserState; combine chunks with ``merge_states`` and read it with ``finalize``. The
        state records sigma, s, a fingerprint of x and the rows [row_offset, row_offset + n),
        so that a wrong merge is refused.
    """
    _, _, x2, xs, y2, sig, scale = _prepare_denoiser(x, train_chunk, sigma, s)
    check_int("row_offset", row_offset, 0)
    lw = _log_weights(log_weights, y2.shape[0], xs.device)
    state = _denoiser_state(xs, y2, sig, row_offset, _Knobs(_tile, _workers, _config, _splits, _emulate), lw,
                            _row_center)
    state.sigma, state.s = sig, scale
    state.query_fingerprint = _fingerprint(x2)
    state.rows = _covered(row_offset, y2.shape[0])
    return state


def _max_pair(a: DenoiserState) -> tuple[torch.Tensor, torch.Tensor]:
    lo = a.max_logit_lo if a.max_logit_lo is not None else torch.zeros_like(a.max_logit)
    return a.max_logit, lo


def merge_states(a: DenoiserState, b: DenoiserState) -> DenoiserState:
    """Merges two chunk states of the same queries (associative and commutative).

    Raises:
        ValueError: the states differ in shape, dtype, sigma, s or queries, or cover a common
            row (the same chunk twice, or a forgotten ``row_offset``).
    """
    if a.weighted_sum.shape != b.weighted_sum.shape or a.weighted_sum.dtype != b.weighted_sum.dtype:
        raise ValueError(
            f"states must cover the same queries, got weighted_sum {a.weighted_sum.dtype} "
            f"{list(a.weighted_sum.shape)} and {b.weighted_sum.dtype} {list(b.weighted_sum.shape)}"
        )
    _check_same_scalar("sigma", a.sigma, b.sigma)
    _check_same_scalar("s", a.s, b.s)
    _check_same_queries("denoiser states", a, b)
    rows = _union(a.rows, b.rows, "denoiser states")
    if (a.nearest_key is None) != (b.nearest_key is None):
        raise ValueError("cannot merge a denoiser state computed with log_weights and one without")
    # The max logit is the pair hi + lo (|lo| <= ulp(hi) / 2), so (hi, lo) order is value order
    # and hi differences are exact where they matter (Sterbenz): the merge never rounds away
    # the digits of a huge ||x||^2 / 2 sigma^2.
    (a_hi, a_lo), (b_hi, b_lo) = _max_pair(a), _max_pair(b)
    take = (b_hi > a_hi) | ((b_hi == a_hi) & (b_lo > a_lo))
    m_hi, m_lo = torch.where(take, b_hi, a_hi), torch.where(take, b_lo, a_lo)
    # exp(-inf - m) is 0, but -inf - (-inf) is NaN: an empty state contributes nothing.
    fa = torch.where(a_hi == -float("inf"), 0.0, torch.exp((a_hi - m_hi) + (a_lo - m_lo)))
    fb = torch.where(b_hi == -float("inf"), 0.0, torch.exp((b_hi - m_hi) + (b_lo - m_lo)))
    ws = a.weighted_sum.double() * fa[:, None] + b.weighted_sum.double() * fb[:, None]
    # Nearest: the smaller key (the distance, or with log-weights the kernels' rank key), then
    # the lower index.
    key_a = a.nearest_sqdist if a.nearest_key is None else a.nearest_key
    key_b = b.nearest_sqdist if b.nearest_key is None else b.nearest_key
    take_b = (b.nearest_index >= 0) & (
        (a.nearest_index < 0)
        | (key_b < key_a)
        | ((key_b == key_a) & (b.nearest_index < a.nearest_index))
    )
    return DenoiserState(
        max_logit=m_hi,
        sum_exp=a.sum_exp * fa + b.sum_exp * fb,
        sum_exp_sq=a.sum_exp_sq * fa * fa + b.sum_exp_sq * fb * fb,
        weighted_sum=ws.to(a.weighted_sum.dtype),
        nearest_index=torch.where(take_b, b.nearest_index, a.nearest_index),
        nearest_sqdist=torch.where(take_b, b.nearest_sqdist, a.nearest_sqdist),
        max_logit_lo=m_lo,
        sigma=a.sigma if b.sigma is not None else None,
        s=a.s if b.s is not None else None,
        query_fingerprint=a.query_fingerprint if b.query_fingerprint is not None else None,
        rows=rows,
        nearest_key=None if a.nearest_key is None else torch.where(take_b, key_b, key_a),
    )


def finalize(state: DenoiserState) -> tuple[torch.Tensor, dict]:
    """Denoised output and diagnostics of a state.

    Returns:
        (out [Q, D] in the state's dtype, info) with info["log_normalizer"] [Q] float64
        (logsumexp_i l_i, including the ||x||^2 term), info["nearest_index"] [Q] int64,
        info["nearest_sqdist"] [Q] float64 and info["n_eff"] [Q] float64 = 1 / sum_i w_i^2.
        With log-weights, l_i includes them, the nearest row is the one of largest weight, and
        info["nearest_key"] [Q] float64 is its key ||x/s - y||^2 / (2 sigma^2) - lw.
    """
    if bool((state.max_logit == -float("inf")).any()):
        raise ValueError("state has queries that saw no training rows (or only rows of log-weight -inf); "
                         "merge a chunk with a row of finite weight first")
    ws, z = state.weighted_sum, state.sum_exp
    if ws.device.type == "cpu":
        # Divided in float64 and rounded once to ws's dtype, through the ufunc's small buffers
        # rather than two Q x D temporaries.
        out = torch.from_numpy(np.divide(_host(ws), _host(z)[:, None], out=np.empty_like(_host(ws)),
                                         dtype=np.float64, casting="unsafe"))
    else:
        out = (ws.double() / z[:, None]).to(ws.dtype)
    hi, lo = _max_pair(state)
    info = {
        "log_normalizer": hi + (lo + torch.log(state.sum_exp)),
        "nearest_index": state.nearest_index,
        "nearest_sqdist": state.nearest_sqdist,
        "n_eff": state.sum_exp.square() / state.sum_exp_sq,
    }
    if state.nearest_key is not None:
        info["nearest_key"] = state.nearest_key
    return out, info


def empirical_denoiser(x, train, sigma, *, s=1.0, log_weights=None, _tile: int | None = None,
                       _workers: int | None = None, _config: int = -1, _splits: int = 0, _emulate: bool = False):
    """Empirical optimal denoiser D(x; sigma) = sum_i softmax_i(-||x/s - y_i||^2 / 2 sigma^2) y_i.

    One streaming pass over the training rows (online softmax), never a Q x N matrix.

    Args:
        x: [Q, D] or [Q, C, H, W], float32 (speed path) or float64 (reference path); a torch
            tensor or a numpy array (numpy in, numpy out).
        train: [N, D] or [N, C, H, W] of x's dtype or float16 (decoded exactly inside the
            kernel), or uint8 pixels decoded inside the kernel as
            ``u.to(dtype) / 127.5 - 1`` (bitwise equal to passing the decoded floats); np.memmap ok.
            A non-contiguous tensor is copied once.
        sigma: positive float or [Q] tensor. s: positive float or [Q] tensor (x~ = x / s).
        log_weights: optional [N] float32/float64 per-row log-weights lw_i (torch or numpy):
            the weights become exp(-||x/s - y_i||^2 / 2 sigma^2 + lw_i), i.e. the empirical
            distribution sum_i exp(lw_i) delta_{y_i} (duplicate counts: log(count); the exact
            posterior of a linear-Gaussian measurement, diffrepro.inverse). -inf excludes a row;
            NaN and +inf are refused, and at least one row must have a finite log-weight.

    Returns:
        The denoised rows with x's shape and dtype.

    Raises:
        TypeError: wrong container or dtype. ValueError: shapes, D mismatch, sigma/s <= 0,
        NaN/Inf inputs, inputs requiring grad, mixed devices.
        BackendUnavailableError: CUDA tensors without a usable CUDA build.
    """
    xt, from_numpy, x2, xs, y2, sig, _ = _prepare_denoiser(x, train, sigma, s)
    if y2.shape[0] == 0:
        raise ValueError(f"train must have at least one row, got shape {list(y2.shape)}")
    lw = _log_weights(log_weights, y2.shape[0], xs.device)
    check_some_weight(lw)
    if x2.shape[0] == 0:
        out = torch.empty_like(x2)
    else:
        knobs = _Knobs(_tile, _workers, _config, _splits, _emulate)
        out, _ = finalize(_denoiser_state(xs, y2, sig, 0, knobs, lw))
    out = out.reshape(xt.shape)
    return out.numpy() if from_numpy else out


# ---------------------------------------------------------------------------------------------
# Nearest-neighbour search

_METRICS = ("ip", "l2")


def _prepare_search(queries, refs, k, metric):
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    k = check_int("k", k, 1)
    qt, from_numpy = to_tensor("queries", queries, (torch.float32,))
    rt, _ = to_tensor("refs", refs, (torch.float32, torch.float16, torch.uint8))
    same_device(queries=qt, refs=rt)
    q2 = as_rows("queries", qt)
    r2 = as_rows("refs", rt)
    if r2.shape[1] != q2.shape[1]:
        raise ValueError(
            f"refs rows must have D = {q2.shape[1]} features like queries (shape {list(qt.shape)}), "
            f"got refs of shape {list(rt.shape)}"
        )
    check_finite("queries", q2)
    check_finite("refs", r2)
    return q2, r2, k, from_numpy


def _search_state(q2, r2, k, metric, row_offset, knobs: _Knobs) -> TopKState:
    Q, D = q2.shape
    N = r2.shape[0]
    pad = -float("inf") if metric == "ip" else float("inf")
    values = torch.full((Q, k), pad, dtype=torch.float32, device=q2.device)
    indices = torch.full((Q, k), -1, dtype=torch.int64, device=q2.device)
    if Q and N:
        on_gpu_kernels = knobs.emulate or q2.device.type == "cuda"
        if on_gpu_kernels:
            max_k = (_backend.emu_module() if knobs.emulate else _backend.cuda_module()).max_k
            if k > max_k:
                raise ValueError(f"k must be <= {max_k} for the CUDA kernels, got k = {k}")
        # L2 on the CPU runs on rows centred like the denoiser's (the CUDA kernels sum (q - r)^2
        # directly and need no centre).
        center = _center(r2, torch.float32) if metric == "l2" and not on_gpu_kernels else None
        args = dict(
            queries=q2.data_ptr(), refs=r2.data_ptr(), refs_type=ROW_TYPES[r2.dtype], Q=Q, N=N, D=D, k=k,
            inner_product=metric == "ip", center=0 if center is None else center.data_ptr(),
            row_offset=int(row_offset), values=values.data_ptr(), indices=indices.data_ptr(),
        )
        if _gpu_engine_choice(q2.device, knobs):
            found = _gpu_dispatch.nn_search(
                q2, r2, k, metric, int(row_offset),
                lambda n: _launch("nn_search", {**args, "N": n}, (Q, n, D, k), q2.device, knobs))
            if found is not None:  # the BLAS engine ran
                values, indices = found
        else:
            _launch("nn_search", args, (Q, N, D, k), q2.device, knobs)
    return TopKState(values, indices, metric, _fingerprint(q2), _covered(row_offset, N))


def nn_search_partial(queries, refs_chunk, k: int, *, metric: str = "ip", row_offset: int = 0,
                      _tile: int | None = None, _workers: int | None = None, _config: int = -1,
                      _splits: int = 0, _emulate: bool = False) -> TopKState:
    """Top-k state of each query over one chunk of references (see ``nn_search``).

    Chunks with fewer than k rows are padded with -inf ("ip") / +inf ("l2") and index -1.
    Combine chunks with ``merge_topk``; the state records a fingerprint of the queries and the
    rows [row_offset, row_offset + n), so that a wrong merge is refused.
    """
    q2, r2, k, _ = _prepare_search(queries, refs_chunk, k, metric)
    check_int("row_offset", row_offset, 0)
    return _search_state(q2, r2, k, metric, row_offset, _Knobs(_tile, _workers, _config, _splits, _emulate))


def merge_topk(a: TopKState, b: TopKState) -> TopKState:
    """Merges two top-k states of the same queries (associative; ties -> lower index).

    Raises:
        ValueError: the states differ in metric, k or queries, or cover a common reference row
            (the same chunk twice, or a forgotten ``row_offset``).
    """
    if a.metric != b.metric:
        raise ValueError(f"cannot merge top-k states of different metrics, got {a.metric!r} and {b.metric!r}")
    if a.values.shape[1] != b.values.shape[1]:
        raise ValueError(
            f"cannot merge top-k states of different k, got k = {a.values.shape[1]} and {b.values.shape[1]}"
        )
    if a.values.shape[0] != b.values.shape[0]:
        raise ValueError(
            f"cannot merge top-k states of different queries, got Q = {a.values.shape[0]} and {b.values.shape[0]}"
        )
    _check_same_queries("top-k states", a, b)
    rows = _union(a.rows, b.rows, "top-k states")
    k = a.values.shape[1]
    values = torch.cat([a.values, b.values], 1)
    indices = torch.cat([a.indices, b.indices], 1)
    # Lexicographic (score, index) order by two stable sorts; padding (-1) goes last.
    key_index = torch.where(indices < 0, torch.iinfo(torch.int64).max, indices)
    order = torch.sort(key_index, dim=1, stable=True).indices
    values, indices = values.gather(1, order), indices.gather(1, order)
    order = torch.sort(values, dim=1, descending=a.metric == "ip", stable=True).indices[:, :k]
    fingerprint = a.query_fingerprint if b.query_fingerprint is not None else None
    return TopKState(values.gather(1, order), indices.gather(1, order), a.metric, fingerprint, rows)


def nn_search(queries, refs, k: int = 1, *, metric: str = "ip", _tile: int | None = None,
              _workers: int | None = None, _config: int = -1, _splits: int = 0, _emulate: bool = False):
    """k nearest references of each query.

    Args:
        queries: [Q, D] (or [Q, C, H, W]) float32, torch or numpy.
        refs: [N, D] (or images) float32, float16, or uint8 pixels decoded as u / 127.5 - 1
            (then queries must be in that scale); np.memmap ok.
        k: 1 <= k <= N.
        metric: "ip" (largest inner product: cosine for L2-normalised rows such as SSCD
            descriptors) or "l2" (smallest squared Euclidean distance). L2 candidates are
            found on rows centred like the denoiser's (a common offset costs no accuracy) and
            their distances recomputed in float64, then rounded once to float32.

    Returns:
        (values [Q, k] float32, indices [Q, k] int64), best first, ties to the lowest index;
        numpy arrays if queries was numpy.
    """
    q2, r2, k, from_numpy = _prepare_search(queries, refs, k, metric)
    if k > r2.shape[0]:
        raise ValueError(f"k must be <= the number of refs N = {r2.shape[0]}, got k = {k}")
    st = _search_state(q2, r2, k, metric, 0, _Knobs(_tile, _workers, _config, _splits, _emulate))
    if from_numpy:
        return st.values.numpy(), st.indices.numpy()
    return st.values, st.indices
