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

import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from . import ops
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
        case = f"empirical_denoiser Q={Q} N={train.shape[0]} D={D}"
        impls = {
            "diffrepro": lambda: ops.empirical_denoiser(x, train, sigma),
            "torch sdpa": lambda: sdpa_denoiser(x, train, sigma, norm2),
            "torch chunked": lambda: torch_chunked_denoiser(x, train, sigma, train_norm2=norm2),
        }
        for name, fn in impls.items():
            rows.append(timing_row(case, name, time_rounds(fn, rounds), flops))
        if include_paper1:
            _, t = paper1_seconds(x, train, sigma, n_subset=512)
            rows.append(timing_row(case, "paper 1 (extrapolated)", [t], flops))
    for N in sz["nn_n"]:
        q, r = search_workload(sz["nn_q"], N, sz["nn_d"])
        for k in sz["ks"]:
            case = f"nn_search Q={sz['nn_q']} N={N} D={sz['nn_d']} k={k}"
            flops = search_flops(sz["nn_q"], N, sz["nn_d"])
            rows.append(timing_row(case, "diffrepro", time_rounds(lambda: ops.nn_search(q, r, k), rounds), flops))
            for label, core in (
                ("faiss (default env)", None),
                (f"faiss (OPENBLAS_CORETYPE={best_openblas_coretype()})", best_openblas_coretype()),
            ):
                rows.append(faiss_row(case, label, sz["nn_q"], N, sz["nn_d"], k, rounds, core, flops))
    return rows


def faiss_row(case: str, label: str, Q: int, N: int, D: int, k: int, rounds: int, coretype: str | None,
              flops: float) -> dict:
    """The timing row of faiss on this search, or a row saying why it was skipped (``skipped``)."""
    try:
        return timing_row(case, label, faiss_subprocess_times(Q, N, D, k, rounds=rounds, coretype=coretype), flops)
    except subprocess.CalledProcessError as exc:
        last = (exc.stderr or "").strip().splitlines()[-1:] or [f"exit status {exc.returncode}"]
        why = ("faiss is not installed (pip install faiss-cpu)" if "No module named 'faiss'" in last[0]
               else f"the faiss process failed: {last[0][:160]}")
    except (OSError, ValueError) as exc:  # no interpreter, or output that is not the times
        why = f"the faiss process failed: {exc}"[:200]
    return timing_row(case, label, [], flops, skipped=why)


def format_table(rows: list[dict]) -> str:
    """Median seconds with their spread (min–max over the rounds), GFLOP/s, and each peer's time
    over diffrepro's (the speed-up)."""
    lines = [
        f"{'case':<48} {'implementation':<36} {'median s':>10} {'min-max s':>19} {'rounds':>6} "
        f"{'GFLOP/s':>9} {'diffrepro speed-up':>18}"
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
            lines.append(
                f"{case:<48} {r['impl']:<36} {r['seconds']:>10.4f} {spread:>19} {r.get('rounds', 1):>6} "
                f"{r['gflops']:>9.1f} {ratio:>17.2f}x"
            )
    return "\n".join(lines)
