# SPDX-License-Identifier: Apache-2.0
"""GPU benchmark table: each diffrepro engine against the torch paths a researcher would use, and
faiss-gpu when importable, with TFLOP/s and the fraction of the device's fp32 and tensor-core
peaks (vendor datasheet numbers below: dense, no sparsity; they are not measured here).

Rows per workload (the papers' sizes; see :data:`SIZES`):

* ``diffrepro fused`` / ``diffrepro blas fp32`` / ``diffrepro blas 3xtf32``: the engines, forced
  one at a time (:func:`diffrepro._engine.forced`), and ``diffrepro auto`` (what a user gets);
* ``diffrepro blas 3xbf16 (inexact)``: fails the tolerance rule at small sigma, shown for speed;
* ``torch chunked GEMM + online LSE`` (fp32), ``torch SDPA fp32`` and ``torch SDPA bf16
  (inexact)`` for the denoiser; ``torch chunked GEMM + topk`` and ``faiss-gpu IndexFlatIP`` for
  the search.

Run ``python -m diffrepro.gpu_bench --sizes paper --json out.json`` (or bench/bench_cuda.py).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

from . import _blas_engine, _engine, _gpu_dispatch, benchmarks, data, ops

__all__ = ["PEAKS", "device_peaks", "SIZES", "run_table", "format_table"]

# name fragment -> TFLOP/s (fp32 CUDA cores, TF32 tensor cores, BF16 tensor cores, fp64 vector),
# memory TB/s. First match wins, so specific names come first. NVIDIA datasheets, dense rates.
PEAKS = [
    ("H200", dict(fp32=67.0, tf32=495.0, bf16=989.0, fp64=34.0, tbps=4.8)),
    ("H100 PCIe", dict(fp32=51.0, tf32=378.0, bf16=756.0, fp64=26.0, tbps=2.0)),
    ("H100", dict(fp32=67.0, tf32=495.0, bf16=989.0, fp64=34.0, tbps=3.35)),
    ("A100", dict(fp32=19.5, tf32=156.0, bf16=312.0, fp64=9.7, tbps=2.0)),
    ("L40S", dict(fp32=91.6, tf32=183.0, bf16=362.0, fp64=1.4, tbps=0.864)),
    ("RTX 4090", dict(fp32=82.6, tf32=82.6, bf16=165.0, fp64=1.3, tbps=1.008)),
    ("RTX 3090", dict(fp32=35.6, tf32=35.6, bf16=71.0, fp64=0.56, tbps=0.936)),
]

SIZES = {
    "small": dict(den=[(16, 8192, 3072), (256, 8192, 3072)], nn=[(1000, 50_000, 512)], ks=(1, 10)),
    "paper": dict(den=[(16, 50_000, 3072), (256, 50_000, 3072)],
                  nn=[(10_000, 200_000, 512), (10_000, 1_000_000, 512)], ks=(1, 10)),
}


def device_peaks(name: str) -> dict | None:
    """Datasheet peaks of a device name as torch reports it (None: not in the table)."""
    return next((p for frag, p in PEAKS if frag in name), None)


def _time(fn: Callable[[], object], rounds: int) -> list[float]:
    def synced():
        fn()
        torch.cuda.synchronize()

    return benchmarks.time_rounds(synced, rounds=rounds, warmup=1)


def _row(case, impl, times, flops, peaks, exact=True, error=None):
    t = statistics.median(times) if times else float("nan")
    tflops = flops / t / 1e12 if times else float("nan")
    row = dict(case=case, impl=impl, seconds=t, min=min(times, default=t), max=max(times, default=t),
               rounds=len(times), tflops=tflops, exact=exact, error=error)
    if peaks:
        row.update(fp32_peak_fraction=tflops / peaks["fp32"], tf32_peak_fraction=tflops / peaks["tf32"])
    return row


def _engine_fn(engine: str, fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        with _engine.forced(engine):
            return fn()

    return run


def _attempt(rows, case, impl, fn, flops, peaks, rounds, exact=True):
    try:
        rows.append(_row(case, impl, _time(fn, rounds), flops, peaks, exact))
    except Exception as exc:  # a peer that cannot run here (memory, missing kernel) is a row, not an abort
        rows.append(_row(case, impl, [], flops, peaks, exact, error=f"{type(exc).__name__}: {exc}"[:200]))


def _blas_denoise(x, y, sigma, product, kernels=None):
    inv = torch.full((x.shape[0],), sigma**-2.0, dtype=torch.float64, device=x.device)
    return _blas_engine.denoiser_state(x, y, inv, ops._center(y, x.dtype), product=product, kernels=kernels)


def _denoiser_rows(rows, Q, N, D, peaks, rounds):
    dev = "cuda"
    train = benchmarks.synthetic_train(N, D).to(dev)
    norm2 = train.square().sum(1)
    sigma = 1.0
    x = benchmarks.noisy_queries(train.cpu(), Q, sigma).to(dev)
    flops = benchmarks.denoiser_flops(Q, N, D)
    case = f"empirical_denoiser Q={Q} N={N} D={D}"
    impls = {
        "diffrepro auto": (lambda: ops.empirical_denoiser(x, train, sigma), True),
        "diffrepro fused": (_engine_fn("fused", lambda: ops.empirical_denoiser(x, train, sigma)), True),
        "diffrepro blas fp32": (lambda: _blas_denoise(x, train, sigma, "fp32"), True),
        "diffrepro blas 3xtf32": (lambda: _blas_denoise(x, train, sigma, "3xtf32"), True),
        "diffrepro blas 3xbf16 (inexact)": (lambda: _blas_denoise(x, train, sigma, "3xbf16"), False),
        "torch chunked GEMM + online LSE": (
            lambda: benchmarks.torch_chunked_denoiser(x, train, sigma, chunk=8192, train_norm2=norm2), True),
        "torch SDPA fp32": (lambda: benchmarks.sdpa_denoiser(x, train, sigma, norm2), True),
        "torch SDPA bf16 (inexact)": (
            lambda: benchmarks.sdpa_denoiser(x.bfloat16(), train.bfloat16(), sigma, norm2.bfloat16()), False),
    }
    kernels = _gpu_dispatch.epilogue_kernels(x.device)
    if kernels is not None:
        impls["diffrepro blas fp32 + epilogue kernels"] = (
            lambda: _blas_denoise(x, train, sigma, "fp32", kernels), True)
    for name, (fn, exact) in impls.items():
        _attempt(rows, case, name, fn, flops, peaks, rounds, exact)


def _torch_search(q, r, k, chunk=65536):
    """Plain torch: chunk scores by one GEMM, topk per chunk, topk of the winners."""
    vals, idx = [], []
    for a in range(0, r.shape[0], chunk):
        v, i = (q @ r[a:a + chunk].T).topk(k, 1)
        vals.append(v)
        idx.append(i + a)
    v, j = torch.cat(vals, 1).topk(k, 1)
    return v, torch.cat(idx, 1).gather(1, j)


def _faiss_gpu(r):
    try:
        import faiss
        res = faiss.StandardGpuResources()
    except (ImportError, AttributeError):
        return None
    index = faiss.GpuIndexFlatIP(res, r.shape[1])
    index.add(r.cpu().numpy())
    return index


def _search_rows(rows, Q, N, D, ks, peaks, rounds):
    q, r = (torch.from_numpy(a).cuda() for a in benchmarks.search_workload(Q, N, D))
    flops = benchmarks.search_flops(Q, N, D)
    index = _faiss_gpu(r)
    for k in ks:
        case = f"nn_search Q={Q} N={N} D={D} k={k}"
        impls = {
            "diffrepro auto": lambda: ops.nn_search(q, r, k),
            "diffrepro fused": _engine_fn("fused", lambda: ops.nn_search(q, r, k)),
            "diffrepro blas fp32": lambda: _blas_engine.search_state(q, r, k, "ip"),
            "diffrepro blas 3xtf32": lambda: _blas_engine.search_state(q, r, k, "ip", product="3xtf32"),
            "torch chunked GEMM + topk": lambda: _torch_search(q, r, k),
        }
        kernels = _gpu_dispatch.epilogue_kernels(q.device)
        if kernels is not None:
            impls["diffrepro blas fp32 + epilogue kernels"] = lambda: _blas_engine.search_state(q, r, k, "ip",
                                                                                                kernels=kernels)
        for name, fn in impls.items():
            _attempt(rows, case, name, fn, flops, peaks, rounds)
        if index is not None:
            qn = q.cpu().numpy()
            _attempt(rows, case, "faiss-gpu IndexFlatIP (host queries)", lambda: index.search(qn, k), flops, peaks,
                     rounds)
        else:
            rows.append(_row(case, "faiss-gpu IndexFlatIP", [], flops, peaks, error="faiss-gpu not importable"))


def run_table(sizes: str = "paper", rounds: int = 5) -> dict:
    """The table on the current CUDA device; raises RuntimeError without one."""
    reason = _gpu_dispatch.cuda_skip_reason()
    if reason:
        raise RuntimeError(reason)
    if sizes not in SIZES:
        raise ValueError(f"sizes: got {sizes!r}, expected one of {', '.join(SIZES)}")
    name = torch.cuda.get_device_name()
    peaks = device_peaks(name)
    rows: list[dict] = []
    sz = SIZES[sizes]
    for Q, N, D in sz["den"]:
        _denoiser_rows(rows, Q, N, D, peaks, rounds)
        torch.cuda.empty_cache()
    for Q, N, D in sz["nn"]:
        _search_rows(rows, Q, N, D, sz["ks"], peaks, rounds)
        torch.cuda.empty_cache()
    return dict(device=name, peaks_tflops=peaks, sizes=sizes, rows=rows, engines=_engine.report())


def format_table(table: dict) -> str:
    """Median seconds, spread, TFLOP/s, fractions of the fp32 / TF32 peaks, and each row's time
    over the best exact torch/faiss peer of its case (> 1: slower than that peer)."""
    lines = [f"device: {table['device']}; datasheet peaks (TFLOP/s): {table['peaks_tflops'] or 'not in the table'}",
             f"{'case':<44} {'implementation':<36} {'median s':>9} {'min-max s':>17} {'TFLOP/s':>8} "
             f"{'fp32 pk':>7} {'TF32 pk':>7} {'vs best peer':>12}"]
    by_case: dict[str, list[dict]] = {}
    for r in table["rows"]:
        by_case.setdefault(r["case"], []).append(r)
    for case, rs in by_case.items():
        peers = [r["seconds"] for r in rs if not r["impl"].startswith("diffrepro") and r["exact"] and not r["error"]]
        best = min(peers, default=float("nan"))
        for r in rs:
            if r["error"]:
                lines.append(f"{case:<44} {r['impl']:<36} {'-':>9} {'':>17} {'':>8} {'':>7} {'':>7} {'':>12}  "
                             f"({r['error']})")
                continue
            fp = f"{r['fp32_peak_fraction']:.0%}" if "fp32_peak_fraction" in r else "-"
            tf = f"{r['tf32_peak_fraction']:.0%}" if "tf32_peak_fraction" in r else "-"
            lines.append(f"{case:<44} {r['impl']:<36} {r['seconds']:>9.4f} {r['min']:>8.4f}-{r['max']:<8.4f} "
                         f"{r['tflops']:>8.1f} {fp:>7} {tf:>7} {r['seconds'] / best:>11.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffrepro.gpu_bench", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", choices=sorted(SIZES), default="paper")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", help="also write the table here")
    a = p.parse_args(argv)
    reason = _gpu_dispatch.cuda_skip_reason()
    if reason:
        print(f"diffrepro gpu_bench: skipped: {reason}")
        return 0
    t = time.perf_counter()
    table = run_table(a.sizes, a.rounds)
    table["wall_seconds"] = time.perf_counter() - t
    print(format_table(table))
    if a.json:
        data.atomic_write_json(a.json, table, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
