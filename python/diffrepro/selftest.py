# SPDX-License-Identifier: Apache-2.0
"""``diffrepro selftest``: every engine of a device, on small real-data shapes and on the papers'
sizes, against the float64 oracle under the tolerance rule; one pass/fail row per check.

Engines per device:

* ``cuda``: the fused kernels (as ``ops`` runs them, and with each production tile
  configuration), the BLAS engine with the float32 product and with 3xTF32 on tensor
  cores (torch epilogue; and with the CUDA epilogue kernels when ``diffrepro._cuda`` binds
  them), and 3xBF16 (reported, never failed: it is inexact by design, see docs/cuda.md);
* ``cpu``: the CPU path of ``ops`` and the BLAS engine on CPU tensors (split products emulated).

Checks: the empirical denoiser's output (paper 1, eq. 3) within ``min(2 err(naive float32 torch)
+ 1e-6, 1e-4)`` of the float64 oracle (1e-4 flat for data with a +100 offset, where naive float32
fails), its nearest row by the argmax rule, and ``nn_search``'s top-k values and first index.
Small shapes use real CIFAR-10 rows (the embedded sample) and the dense oracles of
:mod:`diffrepro.reference`; the papers' sizes (Q = 256, N = 50,000, D = 3,072; Q = 10,000,
N = 200,000, D = 512) use synthetic rows and, as oracle, the BLAS engine on float64 tensors
(float64 GEMMs, no fused code), which the small table checks against the dense oracle itself.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from . import _blas_engine, _engine, _gpu_dispatch, benchmarks, ops, reference

__all__ = ["Row", "run", "format_table", "failed", "as_json"]

SIGMAS = (0.002, 0.2, 1.0, 80.0)
OFFSET = 100.0


@dataclass
class Row:
    op: str
    engine: str
    shape: str
    case: str
    error: float | None
    bound: float | None
    status: str  # "pass", "FAIL", "info" (inexact by design, never fails) or "error" (raised)
    note: str = ""
    seconds: float = 0.0


def failed(rows: list[Row]) -> bool:
    return any(r.status in ("FAIL", "error") for r in rows)


# ------------------------------------------------------------------------------------------------
# Engines: each returns (output, nearest_index) for the denoiser, (values, indices) for search.
# ------------------------------------------------------------------------------------------------
def _state_out(state: ops.DenoiserState):
    out, info = ops.finalize(state)
    return out, info["nearest_index"]


def _ops_denoiser(engine: str | None):
    def run(x, y, sigma):
        ctx = _engine.forced(engine) if engine else contextlib.nullcontext()
        with ctx:
            return _state_out(ops.empirical_denoiser_partial(x, y, sigma))

    return run


def _blas_denoiser(product: str, kernels: bool = False):
    def run(x, y, sigma):
        inv = torch.full((x.shape[0],), float(sigma) ** -2, dtype=torch.float64, device=x.device)
        center = ops._center(y, x.dtype)
        k = _gpu_dispatch.epilogue_kernels(x.device) if kernels else None
        return _state_out(ops.DenoiserState(**_blas_engine.denoiser_state(x, y, inv, center, product=product,
                                                                          kernels=k)))

    return run


def _fused_config_denoiser(config: int):
    """The fused kernels with one tile configuration (0: 32x32, 1: 16x64)."""

    def run(x, y, sigma):
        with _engine.forced("fused"):
            return _state_out(ops.empirical_denoiser_partial(x, y, sigma, _config=config))

    return run


def _ops_search(engine: str | None):
    def run(q, r, k, metric):
        ctx = _engine.forced(engine) if engine else contextlib.nullcontext()
        with ctx:
            return ops.nn_search(q, r, k, metric=metric)

    return run


def _blas_search(product: str, kernels: bool = False):
    def run(q, r, k, metric):
        kern = _gpu_dispatch.epilogue_kernels(q.device) if kernels else None
        return _blas_engine.search_state(q, r, k, metric, product=product, kernels=kern)

    return run


def _engines(device: str):
    """(denoiser engines, search engines, engines whose error is informational)."""
    den: dict[str, Callable] = {}
    srch: dict[str, Callable] = {}
    if device == "cuda":
        den["fused"] = _ops_denoiser("fused")
        den["fused config=0 (32x32)"] = _fused_config_denoiser(0)
        den["fused config=1 (16x64)"] = _fused_config_denoiser(1)
        srch["fused"] = _ops_search("fused")
    else:
        den["cpu"] = _ops_denoiser(None)
        srch["cpu"] = _ops_search(None)
    for product in ("fp32", "3xtf32", "3xbf16"):
        den[f"blas {product}"] = _blas_denoiser(product)
        srch[f"blas {product}"] = _blas_search(product)
    if device == "cuda" and _gpu_dispatch.epilogue_kernels(torch.device("cuda")) is not None:
        den["blas fp32 + epilogue kernels"] = _blas_denoiser("fp32", kernels=True)
        srch["blas fp32 + epilogue kernels"] = _blas_search("fp32", kernels=True)
    return den, srch, {"blas 3xbf16"}


# ------------------------------------------------------------------------------------------------
# Checks
# ------------------------------------------------------------------------------------------------
def _timed(fn, device):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t = time.perf_counter()
    res = fn()
    sync()
    return res, time.perf_counter() - t


def _check(rows, op, engine, shape, case, info_only, device, fn, judge):
    try:
        res, dt = _timed(fn, device)
        err, bound, ok, note = judge(res)
    except Exception as exc:  # a selftest reports every failure as a row; the traceback is not the point
        rows.append(Row(op, engine, shape, case, None, None, "error", f"{type(exc).__name__}: {exc}"[:160]))
        return
    status = "info" if info_only else ("pass" if ok else "FAIL")
    rows.append(Row(op, engine, shape, case, err, bound, status, note, dt))


def _denoiser_judge(oracle, naive, nearest_d2, flat_bound=None):
    """Output vs oracle under the tolerance rule; nearest row by the argmax rule (tol 1e-4)."""
    err_naive = float((naive.double().cpu() - oracle).abs().max())
    bound = flat_bound if flat_bound is not None else min(2 * err_naive + 1e-6, 1e-4)

    def judge(res):
        out, idx = res
        err = float((out.double().cpu() - oracle).abs().max())
        best = nearest_d2.min(1).values
        chosen = nearest_d2.gather(1, idx.cpu()[:, None])[:, 0]
        near_ok = bool(((chosen - best).abs() <= 1e-4).all())
        return err, bound, err <= bound and near_ok, "" if near_ok else "nearest row off by > 1e-4"

    return judge


def _search_judge(ref_v, naive_v, score_of):
    """Values vs oracle under the tolerance rule; the first index by the argmax rule, with
    ``score_of(first_indices)`` the float64 score of each query's returned first row."""
    err_naive = float((naive_v.double().cpu() - ref_v).abs().max())
    bound = min(2 * err_naive + 1e-6, 1e-4)

    def judge(res):
        v, i = res
        err = float((v.double().cpu() - ref_v).abs().max())
        ok1 = bool(((score_of(i[:, 0]).cpu() - ref_v[:, 0]).abs() <= 1e-4).all())
        return err, bound, err <= bound and ok1, "" if ok1 else "first index off by > 1e-4"

    return judge


def _exact_scores(q, r, largest):
    """score_of for _search_judge: float64 inner products or squared distances of chosen rows."""
    def score_of(idx):
        rows = r[idx.to(r.device)].double()
        qq = q.double()
        return (qq * rows).sum(1) if largest else (qq - rows).square().sum(1)

    return score_of


def _real_rows():
    from .data import default_dataset

    imgs = torch.from_numpy(default_dataset().images)
    return imgs.reshape(len(imgs), -1)


def _oracle_denoiser(x, y, sigma):
    """float64 dense oracle, one query at a time (bounded memory), plus the squared distances."""
    out = torch.cat([reference.empirical_denoiser_reference(x[i:i + 1], y, sigma) for i in range(len(x))])
    d2 = torch.cat([((x[i:i + 1].double() - y.double()) ** 2).sum(1, keepdim=True).T for i in range(len(x))])
    return out, d2


def _small(device, rows, progress):
    den, srch, info = _engines(device)
    u8 = _real_rows()
    train_u8 = u8[:400]
    y = train_u8.float() / 127.5 - 1
    g = torch.Generator().manual_seed(0)
    clean = torch.cat([y[[0, 133, 266, 399]], u8[400:404].float() / 127.5 - 1])
    shape = "Q=8 N=400 D=3072"
    for sigma in SIGMAS:
        x = clean + sigma * torch.randn(clean.shape, generator=g)
        oracle, d2 = _oracle_denoiser(x, y, sigma)
        judge = _denoiser_judge(oracle, benchmarks.torch_chunked_denoiser(x, y, sigma), d2)
        for rows_kind, yy in (("uint8 rows", train_u8), ("float32 rows", y)):
            case = f"CIFAR sigma={sigma:g} {rows_kind}"
            progress(f"empirical_denoiser {case}")
            for name, fn in den.items():
                xd, yd = x.to(device), yy.to(device)
                _check(rows, "empirical_denoiser", name, shape, case, name in info, device,
                       lambda fn=fn, xd=xd, yd=yd: fn(xd, yd, sigma), judge)
    # A large common offset: naive float32 fails, every engine must still meet 1e-4.
    x = clean + OFFSET + 0.5 * torch.randn(clean.shape, generator=g)
    yo = y + OFFSET
    oracle, d2 = _oracle_denoiser(x, yo, 0.5)
    judge = _denoiser_judge(oracle, oracle, d2, flat_bound=1e-4)
    for name, fn in den.items():
        xd, yd = x.to(device), yo.to(device)
        _check(rows, "empirical_denoiser", name, shape, "CIFAR +100 offset sigma=0.5", name in info, device,
               lambda fn=fn, xd=xd, yd=yd: fn(xd, yd, 0.5), judge)
    # nn_search as copy detection uses it: unit-norm 512-d descriptors (here real rows' first 512
    # pixels, L2-normalised), queries = noisy, renormalised rows.
    r = torch.nn.functional.normalize(y[:, :512], dim=1)
    q = torch.nn.functional.normalize(r[::25][:16] + 0.05 * torch.randn(16, 512, generator=g), dim=1)
    for metric in ("ip", "l2"):
        largest = metric == "ip"
        ref_v, _ = reference.nn_search_reference(q, r, 10, metric)
        naive_scores = q @ r.T if largest else ((q[:, None, :] - r[None]) ** 2).sum(-1)
        for k in (1, 10):
            judge = _search_judge(ref_v[:, :k], naive_scores.topk(k, 1, largest=largest).values,
                                  _exact_scores(q, r, largest))
            case = f"CIFAR {metric} k={k}"
            progress(f"nn_search {case}")
            for name, fn in srch.items():
                _check(rows, "nn_search", name, "Q=16 N=400 D=512", case, name in info, device,
                       lambda fn=fn, k=k, metric=metric: fn(q.to(device), r.to(device), k, metric), judge)


def _paper(device, rows, progress):
    """Papers' sizes; oracle: the BLAS engine on float64 tensors of the same device."""
    den, srch, info = _engines(device)
    _paper_denoiser(device, rows, progress, den, info)
    _paper_search(device, rows, progress, srch, info)


def _paper_denoiser(device, rows, progress, den, info):
    train = benchmarks.synthetic_train(50_000, 3072).to(device)
    for Q in (16, 256):
        for sigma in (0.05, 1.0):
            x = benchmarks.noisy_queries(train.cpu(), Q, sigma).to(device)
            progress(f"empirical_denoiser paper size Q={Q} sigma={sigma:g}: float64 oracle")
            oracle64 = _blas_denoiser("fp32")(x.double(), train.double(), sigma)[0].cpu()
            naive = benchmarks.torch_chunked_denoiser(x, train, sigma)
            d2 = (torch.cdist(x.double(), train.double()) ** 2).cpu()  # [Q, 50,000]: the nearest-row check
            judge = _denoiser_judge(oracle64, naive, d2)
            for name, fn in den.items():
                _check(rows, "empirical_denoiser", name, f"Q={Q} N=50000 D=3072", f"uniform sigma={sigma:g}",
                       name in info, device, lambda fn=fn: fn(x, train, sigma), judge)


def _paper_search(device, rows, progress, srch, info):
    q, r = (torch.from_numpy(a).to(device) for a in benchmarks.search_workload(10_000, 200_000, 512))
    for metric in ("ip", "l2"):
        largest = metric == "ip"
        progress(f"nn_search paper size {metric}: float64 oracle")
        ref_v, _ = _blas_engine.search_state(q.double(), r.double(), 10, metric)  # float64 GEMMs
        judge = _search_judge(ref_v.double().cpu(), _naive_search(q, r, 10, largest), _exact_scores(q, r, largest))
        for name, fn in srch.items():
            _check(rows, "nn_search", name, "Q=10000 N=200000 D=512", f"gaussian unit rows {metric} k=10",
                   name in info, device, lambda fn=fn, metric=metric: fn(q, r, 10, metric), judge)


def _naive_search(q, r, k, largest, chunk=8192):
    """Plain float32 torch: scores chunk by chunk, topk of the concatenated chunk winners."""
    vals = []
    for a in range(0, r.shape[0], chunk):
        rr = r[a:a + chunk]
        s = q @ rr.T if largest else torch.cdist(q, rr) ** 2
        vals.append(s.topk(min(k, s.shape[1]), 1, largest=largest).values)
    return torch.cat(vals, 1).topk(k, 1, largest=largest).values


def run(device: str = "cuda", sizes: str = "small", progress: Callable[[str], None] = lambda s: None) -> list[Row]:
    """Runs the table. ``sizes``: "small", "paper" or "all". For ``device="cuda"`` check
    ``_gpu_dispatch.cuda_skip_reason()`` first."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device: got {device!r}, expected 'cpu' or 'cuda'")
    if sizes not in ("small", "paper", "all"):
        raise ValueError(f"sizes: got {sizes!r}, expected 'small', 'paper' or 'all'")
    rows: list[Row] = []
    if sizes in ("small", "all"):
        _small(device, rows, progress)
    if sizes in ("paper", "all"):
        _paper(device, rows, progress)
    return rows


def format_table(rows: list[Row]) -> str:
    head = f"{'op':<19} {'engine':<23} {'shape':<23} {'case':<32} {'max error':>10} {'bound':>9} {'s':>7}  result"
    lines = [head]
    for r in rows:
        err = f"{r.error:.2e}" if r.error is not None else "-"
        bound = f"{r.bound:.2e}" if r.bound is not None else "-"
        result = r.status + (f" ({r.note})" if r.note else "")
        lines.append(f"{r.op:<19} {r.engine:<23} {r.shape:<23} {r.case:<32} {err:>10} {bound:>9} {r.seconds:>7.3f}  "
                     f"{result}")
    n_fail = sum(r.status in ("FAIL", "error") for r in rows)
    lines.append(f"{len(rows)} checks: {sum(r.status == 'pass' for r in rows)} passed, {n_fail} failed, "
                 f"{sum(r.status == 'info' for r in rows)} informational (3xBF16: inexact by design)")
    return "\n".join(lines)


def as_json(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]
