# SPDX-License-Identifier: Apache-2.0
"""What a dry run says a job will cost: this machine's measured rates and durations in h/min/s.

Each rate is measured once per process on a tiny calibrated kernel of the kind the job runs (a
few tens of milliseconds): the empirical denoiser's kernel, a float64 GEMM (Gaussian model calls,
its covariance, linear fits) and a float64 ``eigh`` (the Gaussian fit's eigendecomposition), so
every command's estimate rests on the same numbers and a dry run answers in about a second.
"""

from __future__ import annotations

import functools
import math
import statistics
import time

import torch

from . import ops

__all__ = ["denoiser_rate", "eigh_rate", "format_duration", "gaussian_fit_flops", "gaussian_fit_seconds", "gemm_rate"]

# eigh of an n x n symmetric matrix: about 9 n^3 flops (tridiagonal reduction 4/3 n^3, eigenvectors).
EIGH_FLOPS_PER_N3 = 9.0
# Each probe: one untimed warm-up call, then this many timed calls; the median resists a call slowed
# (or a cache warmed) by something else on the machine.
_PROBE_CALLS = 3


def format_duration(seconds: float) -> str:
    """``0.4 s``, ``42 s``, ``3 min 12 s``, ``324 h 19 min``: never raw large seconds."""
    if not math.isfinite(seconds) or seconds < 0:
        return "unknown"
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _flop_rate(fn, flops: float, device: torch.device) -> float:
    """flops / the median seconds of ``_PROBE_CALLS`` calls of ``fn()`` after a warm-up call."""

    def timed() -> float:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    timed()  # warm-up: thread pools, kernel selection, lazy loading
    return flops / statistics.median(timed() for _ in range(_PROBE_CALLS))


@functools.lru_cache(maxsize=None)
def denoiser_rate(d: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> float:
    """FLOP/s of the empirical denoiser's kernel (4 Q N d flops per call: two products) on 64
    queries against 2,048 uint8 rows of dimension ``d``."""
    gen = torch.Generator().manual_seed(0)
    dev = torch.device(device)
    rows = torch.randint(0, 256, (2048, d), generator=gen, dtype=torch.uint8).to(dev)
    x = torch.randn(64, d, generator=gen, dtype=torch.float64).to(device=dev, dtype=dtype)
    return _flop_rate(lambda: ops.empirical_denoiser(x, rows, 1.0), 4.0 * 64 * 2048 * d, dev)


@functools.lru_cache(maxsize=None)
def gemm_rate(device: str = "cpu") -> float:
    """FLOP/s of a float64 GEMM ``[256, 1024] x [1024, 1024]``."""
    gen = torch.Generator().manual_seed(0)
    dev = torch.device(device)
    a = torch.randn(256, 1024, generator=gen, dtype=torch.float64).to(dev)
    b = torch.randn(1024, 1024, generator=gen, dtype=torch.float64).to(dev)
    return _flop_rate(lambda: a @ b, 2.0 * 256 * 1024 * 1024, dev)


@functools.lru_cache(maxsize=None)
def eigh_rate(device: str = "cpu") -> float:
    """FLOP/s of ``torch.linalg.eigh`` on a 256 x 256 float64 SPD matrix (larger ones run at least
    as fast per flop, so estimates built on it lean long)."""
    gen = torch.Generator().manual_seed(0)
    dev = torch.device(device)
    a = torch.randn(256, 256, generator=gen, dtype=torch.float64)
    spd = (a @ a.T + 256 * torch.eye(256, dtype=torch.float64)).to(dev)
    return _flop_rate(lambda: torch.linalg.eigh(spd), EIGH_FLOPS_PER_N3 * 256 ** 3, dev)


def gaussian_fit_flops(n: int, d: int) -> tuple[float, float]:
    """``(GEMM flops, eigh flops)`` of :meth:`GaussianDenoiser.from_data` on ``n`` rows of dimension
    ``d``: the d x d covariance and its eigh when n >= d, else the n x n Gram matrix, its eigh and
    the back-projection of its eigenvectors."""
    if n >= d:
        return 2.0 * n * d * d, EIGH_FLOPS_PER_N3 * d ** 3
    return 4.0 * n * n * d, EIGH_FLOPS_PER_N3 * n ** 3


def gaussian_fit_seconds(n: int, d: int, device: str = "cpu") -> float:
    gemm, eigh = gaussian_fit_flops(n, d)
    return gemm / gemm_rate(device) + eigh / eigh_rate(device)
