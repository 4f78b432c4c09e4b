# SPDX-License-Identifier: Apache-2.0
"""Peers and workloads for the kernel benchmarks, shared by ``bench/`` (pytest-benchmark) and
``diffrepro bench`` (the same table on a user's machine).

Peers are what a researcher would otherwise run:

* ``sdpa``: torch ``scaled_dot_product_attention`` on 4-D inputs ``[1, 1, Q, D + 1]``; the
  appended column makes ``q . k`` the logit ``(x . y - |y|^2 / 2) / sigma^2``.
* ``torch_chunked``: chunked torch GEMMs with an online log-sum-exp (the best plain-torch form).
* ``paper1``: paper 1's algorithm (two passes of float64 broadcast differences over batches of
  64 training images, 64 queries per call; rows decoded and the normaliser accumulated in
  float32, as its ``generate.py`` does), timed on a subset and extrapolated linearly in Q*N.
* ``faiss``: ``IndexFlatIP`` / ``IndexFlatL2`` (k-NN), in this process as the machine runs it and
  in a subprocess with ``OPENBLAS_CORETYPE`` set to the best core for this CPU (read at load).
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import _backend, ops
from .reference import p1_two_pass_denoiser

SIZES = {
    # name: (denoiser Qs, denoiser N, search Q, search Ns, search D)
    "small": dict(den_q=(16, 64), den_n=4096, den_d=3072, nn_q=500, nn_n=(5000,), nn_d=512, ks=(1, 10)),
    "paper": dict(den_q=(16, 256), den_n=50_000, den_d=3072, nn_q=10_000, nn_n=(50_000, 200_000), nn_d=512, ks=(1, 10)),
}


def sizes(name: str | None = None) -> dict:
    name = name or os.environ.get("DIFFREPRO_BENCH_SIZES", "small")
    if name not in SIZES:
        raise ValueError(f"DIFFREPRO_BENCH_SIZES must be one of {sorted(SIZES)}, got {name!r}")
    return SIZES[name]


# The FMA loop runs this long per timed round (after a short calibration), the best of
# _PEAK_ROUNDS rounds per width, rounds interleaved across widths so that a burst of load from
# elsewhere hits all widths alike.
_PEAK_ROUND_SECONDS = 0.08
_PEAK_ROUNDS = 3
# The streaming read covers at least this many bytes and twice the L3 the OS reports.
_BANDWIDTH_MIN_BYTES = 512 << 20


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _l3_bytes() -> int | None:
    """The largest cache the OS reports for cpu0 (a VM may report a virtual size), or None."""
    sizes = []
    for path in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size")):
        text = path.read_text().strip()
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * unit)
        except ValueError:
            continue
    return max(sizes, default=None)


def _available_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 1 << 31


def _fma_iterations(width: int, workers: int) -> int:
    """Loop rounds that take about _PEAK_ROUND_SECONDS at this width (from a short trial)."""
    iterations = 20_000
    while True:
        seconds, _, _ = _backend.cpu.fma_loop(width, iterations, workers)
        if seconds >= 0.01:
            return max(1, int(iterations * _PEAK_ROUND_SECONDS / seconds))
        iterations *= 4


@functools.cache
def machine_peak(workers: int | None = None) -> dict:
    """This machine's measured limits, once per process (about two seconds), for the "% of peak"
    columns of ``diffrepro bench``.

    Returns:
        dict with ``cpu_model``; ``workers`` (threads, as the kernels use); ``fma_gflops``
        {vector width in bits: float32 GFLOP/s} for each width this CPU runs, from a register-only
        loop of independent fused multiply-adds on every worker (best of a few rounds);
        ``peak_gflops``, the largest of them (wall clock: what the kernels' wall-clock rows
        are compared with); ``fma_gflops_cpu_time``, the same flops per second of the workers'
        own CPU time (all workers' cores at full rate: far above the wall-clock figure when
        other processes share the cores, equal on an idle machine); ``read_gbs``, GB/s of a streaming read over
        ``read_buffer_bytes`` on every worker (best pass); ``l3_bytes`` as the OS reports it
        (None if unknown: the read is from DRAM only when the buffer is well above the real L3).
    """
    cpu = _backend.cpu
    workers = ops._workers(workers)
    widths = list(cpu.fma_widths())
    iterations = {w: _fma_iterations(w, workers) for w in widths}
    best = {w: 0.0 for w in widths}
    per_cpu = {w: 0.0 for w in widths}
    for _ in range(_PEAK_ROUNDS):
        for w in widths:
            seconds, flops, cpu_seconds = cpu.fma_loop(w, iterations[w], workers)
            best[w] = max(best[w], flops / seconds / 1e9)
            if cpu_seconds > 0:
                per_cpu[w] = max(per_cpu[w], flops / cpu_seconds / 1e9)
    l3 = _l3_bytes()
    buffer = max(_BANDWIDTH_MIN_BYTES, 2 * (l3 or 0))
    buffer = min(buffer, _available_bytes() // 4) // 64 * 64
    read_seconds = cpu.read_bandwidth_seconds(buffer, 3, workers)
    return dict(
        cpu_model=_cpu_model(),
        workers=workers,
        fma_gflops=best,
        peak_gflops=max(best.values(), default=float("nan")),
        fma_gflops_cpu_time=per_cpu,
        read_gbs=buffer / read_seconds / 1e9,
        read_buffer_bytes=buffer,
        l3_bytes=l3,
    )


def format_peak(peak: dict) -> str:
    """The peak lines printed above the benchmark table."""
    widths = ", ".join(f"{w}-bit {g:.1f}" for w, g in sorted(peak["fma_gflops"].items()))
    by_cpu = ", ".join(f"{w}-bit {g:.1f}" for w, g in sorted(peak["fma_gflops_cpu_time"].items()))
    l3 = f"{peak['l3_bytes'] / 2**20:.0f} MiB" if peak["l3_bytes"] else "unknown"
    shared = max(peak["fma_gflops_cpu_time"].values(), default=0) > 1.25 * peak["peak_gflops"]
    return "\n".join([
        f"machine: {peak['cpu_model']}, {peak['workers']} worker threads",
        f"FMA peak (float32, register-only loop, all workers): {widths} GFLOP/s; "
        f"peak {peak['peak_gflops']:.1f} GFLOP/s",
        f"  per second of the workers' own CPU time: {by_cpu} GFLOP/s"
        + (" (other processes share the cores: wall-clock figures are low)" if shared else ""),
        f"streaming read: {peak['read_gbs']:.1f} GB/s over {peak['read_buffer_bytes'] / 2**20:.0f} MiB "
        f"(L3 reported: {l3})",
    ])


def denoiser_flops(Q: int, N: int, D: int) -> float:
    """Two GEMMs of 2*Q*N*D flops each."""
    return 4.0 * Q * N * D


def search_flops(Q: int, N: int, D: int) -> float:
    return 2.0 * Q * N * D


def synthetic_train(N: int, D: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(N, D, generator=g) * 2 - 1


def noisy_queries(train: torch.Tensor, Q: int, sigma: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, train.shape[0], (Q,), generator=g)
    return train[idx].float() + sigma * torch.randn(Q, train.shape[1], generator=g)


def sdpa_denoiser(x: torch.Tensor, train: torch.Tensor, sigma: float, train_norm2=None) -> torch.Tensor:
    """Peer: one fused attention call. train_norm2 may be precomputed (as a fair peer would)."""
    if train_norm2 is None:
        train_norm2 = train.square().sum(1)
    q = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], 1)[None, None]
    k = torch.cat([train, -0.5 * train_norm2[:, None]], 1)[None, None]
    v = train[None, None]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=1.0 / sigma**2)[0, 0]


def torch_chunked_denoiser(
    x: torch.Tensor, train: torch.Tensor, sigma: float, chunk: int = 4096, train_norm2=None
) -> torch.Tensor:
    """Peer: chunked GEMM logits with an online log-sum-exp, all in torch."""
    if train_norm2 is None:
        train_norm2 = train.square().sum(1)
    inv = 1.0 / sigma**2
    m = torch.full((x.shape[0], 1), -float("inf"), device=x.device)
    z = torch.zeros(x.shape[0], 1, device=x.device)
    acc = torch.zeros_like(x)
    for a in range(0, train.shape[0], chunk):
        y = train[a : a + chunk]
        logits = (x @ y.T - 0.5 * train_norm2[a : a + chunk]) * inv
        m_new = torch.maximum(m, logits.max(1, keepdim=True).values)
        r = torch.exp(m - m_new)
        p = torch.exp(logits - m_new)
        z = z * r + p.sum(1, keepdim=True)
        acc = acc * r + p @ y
        m = m_new
    return acc / z


def paper1_seconds(x: torch.Tensor, train: torch.Tensor, sigma: float, n_subset: int) -> tuple[float, float]:
    """Times paper 1's algorithm on 64 queries x n_subset rows; returns (measured seconds,
    seconds extrapolated to x.shape[0] queries x train.shape[0] rows)."""
    xs = x[:64].double()
    sub = train[:n_subset]

    def batches():
        for a in range(0, sub.shape[0], 64):
            yield sub[a : a + 64]

    t = time.perf_counter()
    p1_two_pass_denoiser(xs, batches, sigma)
    dt = time.perf_counter() - t
    scale = (x.shape[0] / xs.shape[0]) * (train.shape[0] / n_subset)
    return dt, dt * scale


_FAISS_SCRIPT = r"""
import json, sys, time
import numpy as np
import faiss
Q, N, D, k, metric, rounds, seed = json.loads(sys.argv[1])
rng = np.random.default_rng(seed)
q = rng.standard_normal((Q, D), dtype=np.float32); q /= np.linalg.norm(q, axis=1, keepdims=True)
r = rng.standard_normal((N, D), dtype=np.float32); r /= np.linalg.norm(r, axis=1, keepdims=True)
index = faiss.IndexFlatIP(D) if metric == "ip" else faiss.IndexFlatL2(D)
index.add(r)
index.search(q[:64], k)
times = []
for _ in range(rounds):
    t = time.perf_counter(); index.search(q, k); times.append(time.perf_counter() - t)
print(json.dumps(times))
"""


def search_workload(Q: int, N: int, D: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((Q, D), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    r = rng.standard_normal((N, D), dtype=np.float32)
    r /= np.linalg.norm(r, axis=1, keepdims=True)
    return q, r


def best_openblas_coretype() -> str:
    from ._backend import blas_coretype_choice

    return blas_coretype_choice() or "Haswell"


def faiss_subprocess_times(
    Q: int, N: int, D: int, k: int, metric: str = "ip", rounds: int = 5, coretype: str | None = None, seed: int = 0
) -> list[float]:
    """faiss search times measured in a fresh process with OPENBLAS_CORETYPE=coretype
    (None: the environment as it is). Same workload as ``search_workload(Q, N, D, seed)``."""
    env = dict(os.environ)
    if coretype is not None:
        env["OPENBLAS_CORETYPE"] = coretype
    out = subprocess.run(
        [sys.executable, "-c", _FAISS_SCRIPT, json.dumps([Q, N, D, k, metric, rounds, seed])],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def time_rounds(fn, rounds: int = 5, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``rounds`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def timing_row(case: str, impl: str, times: list[float], flops: float, **extra) -> dict:
    """One table row: the median, the spread (min and max) and the number of rounds."""
    t = statistics.median(times) if times else float("nan")
    return dict(
        case=case,
        impl=impl,
        seconds=t,
        min=min(times, default=t),
        max=max(times, default=t),
        rounds=len(times),
        gflops=flops / t / 1e9,
        **extra,
    )


def run_table(size_name: str | None = None, rounds: int = 5, include_paper1: bool = True) -> list[dict]:
    """The benchmark table of ``diffrepro bench``: one row per (op, size, implementation)."""
    sz = sizes(size_name)
    rows = []
    D = sz["den_d"]
    train = synthetic_train(sz["den_n"], D)
    norm2 = train.square().sum(1)
    sigma = 1.0
    for Q in sz["den_q"]:
        x = noisy_queries(train, Q, sigma)
        flops = denoiser_flops(Q, train.shape[0], D)
        nbytes = train.numel() * train.element_size()
        case = f"empirical_denoiser Q={Q} N={train.shape[0]} D={D}"
        impls = {
            "diffrepro": lambda: ops.empirical_denoiser(x, train, sigma),
            "torch sdpa": lambda: sdpa_denoiser(x, train, sigma, norm2),
            "torch chunked": lambda: torch_chunked_denoiser(x, train, sigma, train_norm2=norm2),
        }
        for name, fn in impls.items():
            rows.append(timing_row(case, name, time_rounds(fn, rounds), flops, bytes=nbytes))
        if include_paper1:
            _, t = paper1_seconds(x, train, sigma, n_subset=512)
            rows.append(timing_row(case, "paper 1 (extrapolated)", [t], flops, bytes=nbytes))
    for N in sz["nn_n"]:
        q, r = search_workload(sz["nn_q"], N, sz["nn_d"])
        for k in sz["ks"]:
            case = f"nn_search Q={sz['nn_q']} N={N} D={sz['nn_d']} k={k}"
            flops = search_flops(sz["nn_q"], N, sz["nn_d"])
            rows.append(timing_row(case, "diffrepro", time_rounds(lambda: ops.nn_search(q, r, k), rounds), flops,
                                   bytes=r.nbytes))
            for label, core in (
                ("faiss (default env)", None),
                (f"faiss (OPENBLAS_CORETYPE={best_openblas_coretype()})", best_openblas_coretype()),
            ):
                rows.append(faiss_row(case, label, sz["nn_q"], N, sz["nn_d"], k, rounds, core, flops,
                                      bytes=r.nbytes))
    return rows


def faiss_row(case: str, label: str, Q: int, N: int, D: int, k: int, rounds: int, coretype: str | None,
              flops: float, **extra) -> dict:
    """The timing row of faiss on this search, or a row saying why it was skipped (``skipped``)."""
    try:
        return timing_row(case, label, faiss_subprocess_times(Q, N, D, k, rounds=rounds, coretype=coretype), flops,
                          **extra)
    except subprocess.CalledProcessError as exc:
        last = (exc.stderr or "").strip().splitlines()[-1:] or [f"exit status {exc.returncode}"]
        why = ("faiss is not installed (pip install faiss-cpu)" if "No module named 'faiss'" in last[0]
               else f"the faiss process failed: {last[0][:160]}")
    except (OSError, ValueError) as exc:  # no interpreter, or output that is not the times
        why = f"the faiss process failed: {exc}"[:200]
    return timing_row(case, label, [], flops, skipped=why)


def format_table(rows: list[dict], peak: dict | None = None) -> str:
    """Median seconds with their spread (min–max over the rounds), GFLOP/s, and each peer's time
    over diffrepro's (the speed-up). With ``peak`` (:func:`machine_peak`): each row's GFLOP/s as a
    percentage of the FMA peak and, where the row records the bytes of rows it streams, its
    read rate as a percentage of the measured streaming-read bandwidth."""
    extra = f" {'% FMA peak':>10} {'% read BW':>9}" if peak else ""
    lines = [
        f"{'case':<48} {'implementation':<36} {'median s':>10} {'min-max s':>19} {'rounds':>6} "
        f"{'GFLOP/s':>9} {'diffrepro speed-up':>18}{extra}"
    ]
    by_case: dict[str, list[dict]] = {}
    for r in rows:
        by_case.setdefault(r["case"], []).append(r)
    for case, rs in by_case.items():
        ours = next((r["seconds"] for r in rs if r["impl"] == "diffrepro"), float("nan"))
        for r in rs:
            if r.get("skipped") or r.get("error"):  # nothing was timed: say why instead of printing nan
                lines.append(f"{case:<48} {r['impl']:<36} skipped: {r.get('skipped') or r.get('error')}")
                continue
            ratio = r["seconds"] / ours if r["impl"] != "diffrepro" else 1.0
            spread = f"{r.get('min', r['seconds']):.4f}-{r.get('max', r['seconds']):.4f}"
            line = (f"{case:<48} {r['impl']:<36} {r['seconds']:>10.4f} {spread:>19} {r.get('rounds', 1):>6} "
                    f"{r['gflops']:>9.1f} {ratio:>17.2f}x")
            if peak:
                bw = (f"{100 * r['bytes'] / r['seconds'] / 1e9 / peak['read_gbs']:>8.0f}%"
                      if r.get("bytes") else f"{'-':>9}")
                line += f" {100 * r['gflops'] / peak['peak_gflops']:>9.0f}% {bw}"
            lines.append(line)
    return "\n".join(lines)
