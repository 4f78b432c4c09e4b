# SPDX-License-Identifier: Apache-2.0
"""Runs one op on a GPU with the engine :mod:`diffrepro._engine` picks: the fused kernels (a
callable supplied by ``ops``, which owns their arguments and outputs) or the BLAS engine
(:mod:`diffrepro._blas_engine`).

The probe of an ``auto`` choice is the call itself cut to its first ``probe_rows`` rows: the
rows are contiguous, so the fused kernels probe by being launched with a smaller N on the same
pointers and outputs (the full call overwrites them afterwards), and the BLAS engine on the row
prefix. A probe costs about :data:`PROBE_FLOPS` per engine, ~1 ms at 50 TFLOP/s.

On CUDA the BLAS engine runs its epilogue with diffrepro's CUDA kernels when ``diffrepro._cuda``
binds them (:func:`epilogue_kernels`), else as torch operations. Written against tensors (no
CUDA call except the synchronisation and the stream handle), so the dispatch logic is tested on
CPU tensors with a fake clock.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from . import _backend, _blas_engine, _engine

__all__ = ["PROBE_FLOPS", "probe_rows", "device_label", "cuda_skip_reason", "epilogue_kernels", "empirical_denoiser",
           "nn_search"]

# Product flops of one probe call per engine.
PROBE_FLOPS = 5e10
# Largest k of the chunk_topk kernel (kBlasTopkMaxK); above it the torch selection runs.
_KERNEL_MAX_K = 128
# A probe covers at least this many rows (or all of them): enough tiles for every split of the
# fused plan and a few BLAS chunks.
_MIN_PROBE_ROWS = 4096


def probe_rows(N: int, flops_per_row: float) -> int:
    """Rows of a probe: about PROBE_FLOPS of products, at least 4,096 rows, at most N."""
    return int(min(N, max(_MIN_PROBE_ROWS, PROBE_FLOPS // max(flops_per_row, 1.0))))


def device_label(device: torch.device) -> str:
    """``cuda:0 NVIDIA H100 80GB HBM3``: the cache is per device (index and model)."""
    if device.type != "cuda":
        return str(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} {torch.cuda.get_device_name(index)}"


def cuda_skip_reason() -> str | None:
    """Why nothing can run on a GPU here (None when torch sees a CUDA device)."""
    if torch.cuda.is_available():
        return None
    return (f"no CUDA device visible to torch (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda or 'none'}); nothing was run on a GPU")


def epilogue_kernels(device: torch.device) -> _blas_engine.EpilogueKernels | None:
    """The CUDA epilogue kernels on the current stream when diffrepro._cuda binds them; None
    (the BLAS engine's torch epilogue) on other devices or builds without them."""
    if device.type != "cuda":
        return None
    try:
        module = _backend.cuda_module()
    except _backend.BackendUnavailableError:
        return None
    if not hasattr(module, "blas_softmax_chunk"):
        return None
    return _blas_engine.EpilogueKernels(module, torch.cuda.current_stream(device).cuda_stream)


def _sync(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def empirical_denoiser(xs, y2, inv_sigma2, center, row_offset: int, fused: Callable[[int], None],
                       chooser: _engine.EngineChooser | None = None) -> dict | None:
    """Runs the denoiser's state computation on the chosen engine.

    Args:
        xs, y2, inv_sigma2, center, row_offset: as ``_blas_engine.denoiser_state``.
        fused: ``fused(n)`` launches the fused kernels on the first n rows of y2, writing ops'
            preallocated state (n = N is the real call).
        chooser: the engine chooser (default: the process-wide one).

    Returns:
        The state's fields when the BLAS engine ran, None when the fused kernels wrote them.
    """
    chooser = chooser or _engine._CHOOSER
    Q, D = xs.shape
    N = y2.shape[0]
    product = _engine.product_setting()
    key = _engine.ShapeClass.of("empirical_denoiser", device_label(xs.device), xs.dtype, y2.dtype, Q, N, D)
    p = probe_rows(N, 4.0 * Q * D)

    kernels = epilogue_kernels(xs.device)

    def blas(rows):
        return _blas_engine.denoiser_state(xs, rows, inv_sigma2, center, row_offset, product=product, kernels=kernels)

    engine = chooser.choose(key, {"fused": lambda: fused(p), "blas": lambda: blas(y2[:p])}, _sync(xs.device))
    if engine == "fused":
        fused(N)
        return None
    return blas(y2)


def nn_search(q2, r2, k: int, metric: str, row_offset: int, fused: Callable[[int], None],
              chooser: _engine.EngineChooser | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Runs the search on the chosen engine: ``fused(n)`` as for :func:`empirical_denoiser`.

    Returns:
        (values, indices) when the BLAS engine ran, None when the fused kernels wrote ops' outputs.
    """
    chooser = chooser or _engine._CHOOSER
    Q, D = q2.shape
    N = r2.shape[0]
    product = _engine.product_setting()
    key = _engine.ShapeClass.of("nn_search", device_label(q2.device), q2.dtype, r2.dtype, Q, N, D, k=k, metric=metric)
    p = probe_rows(N, 2.0 * Q * D)

    kernels = epilogue_kernels(q2.device) if k <= _KERNEL_MAX_K else None

    def blas(rows):
        return _blas_engine.search_state(q2, rows, k, metric, row_offset, product=product, kernels=kernels)

    engine = chooser.choose(key, {"fused": lambda: fused(p), "blas": lambda: blas(r2[:p])}, _sync(q2.device))
    if engine == "fused":
        fused(N)
        return None
    return blas(r2)
