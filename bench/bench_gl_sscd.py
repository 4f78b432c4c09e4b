# SPDX-License-Identifier: Apache-2.0
"""GL via SSCD (Zhang et al. 2024, §3): ``metrics.gl_sscd`` streaming a memory-mapped
``.npy`` of training descriptors, against faiss and paper 1's own scorer.

Workload: Q generated descriptors against N training descriptors, D = 512, L2-normalised
random rows (a tenth of the generations are noisy copies of training rows, so some count as
memorised). Sizes (``DIFFREPRO_BENCH_SIZES``): ``small`` Q=500, N in (5,000, 20,000) (the CI
smoke test; the memory check runs on the larger N only); ``paper`` Q=10,000, N in (50,000,
1,000,000). The training descriptors are written once per session into a temporary folder, in
chunks (the 1M x 512 float32 file is 2 GB), and read back through ``np.load(mmap_mode="r")``.

Implementations:

* ``diffrepro``: ``metrics.gl_sscd(gen, memmap, tau=0.6)`` in this process, end to end: the
  chunked reads of the memmap, the per-chunk float32 L2 normalisation, ``nn_search_partial`` /
  ``merge_topk`` and the float64 recomputation of each winner's cosine.
* ``faiss (subprocess, OPENBLAS_CORETYPE=...)``: ``IndexFlatIP.search(k=1)`` on the same shapes,
  in a fresh process with OpenBLAS set to the best core type for this CPU
  (``benchmarks.faiss_subprocess_times``; its rows are generated in RAM, so faiss is timed
  without file reads or normalisation: its best case).
* ``paper 1 numpy broadcast (extrapolated)``: P1's ``mscore``: per chunk of 128 generated
  descriptors, the ``(128, N, D)`` float32 product ``gen[:, None, :] * train[None]``, then
  ``.sum(-1)``, then ``max > tau``. At full size each temporary is 128·N·D·4 bytes (13 GB at
  N=50k, 262 GB at N=1M), so it is timed on one chunk against ``P1_SUBSET`` training rows
  (a 0.5 GB temporary) and extrapolated linearly by ``(Q/128)·(N/P1_SUBSET)``; that is
  generous to it, since the full-size temporaries would not fit in memory.

Memory (``bench_gl_sscd_memory``): the requirement is on *anonymous* memory (heap, not the
mapped file, whose resident pages count in plain RSS and in ``VmHWM``). ``metrics.gl_sscd``
runs in a child process that first loads its inputs (the generated descriptors, the memmap
header), reports ``RssAnon`` and waits; the parent then reads ``/proc/<child>/status`` every
``POLL_S`` seconds from its own thread while the child computes, and records the largest
``RssAnon`` seen minus the baseline. Polling from another process does not depend on the
child's GIL or threads. It is a sampled peak: an allocation that lives for less than one
polling interval can be missed (the per-chunk buffers live for a whole kernel call, i.e.
tens of milliseconds or more). The growth must stay under 1 GiB; it is asserted, and shown
in the ratio table as the implementation label of the subprocess timing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from diffrepro import benchmarks, metrics

ROUNDS = 3
TAU = 0.6
D = 512
SIZES = {"small": {"Q": 500, "Ns": (5_000, 20_000)}, "paper": {"Q": 10_000, "Ns": (50_000, 1_000_000)}}
P1_CHUNK = 128  # generated descriptors per broadcast product in P1's mscore
P1_SUBSET = 1_000  # training rows the P1 scorer is timed on (128 x 1000 x 512 x 4 B = 0.26 GB)
WRITE_ROWS = 65_536  # rows generated and written per chunk
POLL_S = 0.001
GIB = 1 << 30


def _sizes():
    name = os.environ.get("DIFFREPRO_BENCH_SIZES", "small")
    if name not in SIZES:
        raise ValueError(f"DIFFREPRO_BENCH_SIZES must be one of {sorted(SIZES)}, got {name!r}")
    return SIZES[name]


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _write_train(path: Path, N: int, seed: int) -> None:
    """[N, D] float32 unit rows written chunk by chunk into a .npy (never all in RAM)."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(N, D))
    for i, start in enumerate(range(0, N, WRITE_ROWS)):
        rows = min(WRITE_ROWS, N - start)
        out[start : start + rows] = _unit(np.random.default_rng([seed, i]).standard_normal((rows, D), dtype=np.float32))
    out.flush()
    del out


def _gen(train: np.ndarray, Q: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    gen = rng.standard_normal((Q, D), dtype=np.float32)
    copies = Q // 10
    idx = np.sort(rng.choice(len(train), copies, replace=False))
    gen[:copies] = np.asarray(train[idx]) + 0.03 * rng.standard_normal((copies, D), dtype=np.float32)
    return _unit(gen)


@pytest.fixture(scope="session")
def gl_files():
    """{N: (gen path, train .npy path)} in a temporary folder removed at the end of the session."""
    sz = _sizes()
    with tempfile.TemporaryDirectory(prefix="diffrepro-bench-gl-") as tmp:
        files = {}
        for i, N in enumerate(sz["Ns"]):
            train_path = Path(tmp) / f"train_{N}x{D}.npy"
            _write_train(train_path, N, seed=i)
            gen_path = Path(tmp) / f"gen_{sz['Q']}x{D}_{N}.npy"
            np.save(gen_path, _gen(np.load(train_path, mmap_mode="r"), sz["Q"], seed=100 + i))
            files[N] = (gen_path, train_path)
        yield files


@pytest.fixture(params=[0, 1])
def workload(request, gl_files):
    N = _sizes()["Ns"][request.param]
    gen_path, train_path = gl_files[N]
    return np.load(gen_path), np.load(train_path, mmap_mode="r"), gen_path, train_path


def _case(Q, N):
    return f"gl_sscd Q={Q} N={N} D={D} (memmap)"


def _rounds(request):
    if request.config.getoption("benchmark_disable"):
        return 1
    return 1 if os.environ.get("DIFFREPRO_BENCH_SIZES") == "paper" else ROUNDS


def bench_gl_sscd_diffrepro(benchmark, record, workload, request):
    gen, train, _, _ = workload
    rounds = _rounds(request)
    res = benchmark.pedantic(
        lambda: metrics.gl_sscd(gen, train, tau=TAU), rounds=rounds, warmup_rounds=0 if rounds == 1 else 1
    )
    if res is not None:
        assert 0.0 <= res["gl"] <= 0.95  # a tenth of the generations are near-copies
    record(_case(len(gen), len(train)), "diffrepro", benchmark, benchmarks.search_flops(len(gen), len(train), D))


def bench_gl_sscd_faiss_best(record, workload, request):
    """faiss IndexFlatIP (k=1), fresh process with OPENBLAS_CORETYPE = the best core type."""
    pytest.importorskip("faiss")
    gen, train, _, _ = workload
    core = benchmarks.best_openblas_coretype()
    times = benchmarks.faiss_subprocess_times(
        len(gen), len(train), D, 1, metric="ip", rounds=_rounds(request), coretype=core
    )
    if not request.config.getoption("benchmark_disable"):
        record(
            _case(len(gen), len(train)),
            f"faiss (subprocess, OPENBLAS_CORETYPE={core})",
            times,
            benchmarks.search_flops(len(gen), len(train), D),
        )


def p1_mscore_chunk(gen_chunk: np.ndarray, train: np.ndarray, tau: float) -> int:
    """Paper 1's scorer on one chunk: the (B, N, D) float32 broadcast product, .sum(-1), max > tau."""
    sims = (gen_chunk[:, None, :] * train[None, :, :]).sum(-1)
    return int((sims.max(axis=1) > tau).sum())


def bench_gl_sscd_paper1(record, workload, request):
    gen, train, _, _ = workload
    sub = np.ascontiguousarray(train[:P1_SUBSET])
    chunk = gen[:P1_CHUNK]
    times = []
    for _ in range(max(3, _rounds(request))):  # one chunk is ~0.1 s but noisy: take a median of >= 3
        t = time.perf_counter()
        p1_mscore_chunk(chunk, sub, TAU)
        times.append(time.perf_counter() - t)
    scale = (len(gen) / P1_CHUNK) * (len(train) / P1_SUBSET)
    if not request.config.getoption("benchmark_disable"):
        record(
            _case(len(gen), len(train)),
            "paper 1 numpy broadcast (extrapolated)",
            [t * scale for t in times],
            benchmarks.search_flops(len(gen), len(train), D),
            note=f"timed on {P1_CHUNK} x {P1_SUBSET}, scaled by {scale:.0f}",
        )


_CHILD = r"""
import json, sys, time
import numpy as np
from diffrepro import metrics

def rss_anon():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
gen_path, train_path, tau = sys.argv[1], sys.argv[2], float(sys.argv[3])
gen = np.load(gen_path)
train = np.load(train_path, mmap_mode="r")
print(json.dumps({"baseline": rss_anon()}), flush=True)
sys.stdin.readline()
t = time.perf_counter()
res = metrics.gl_sscd(gen, train, tau=tau)
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "gl": res["gl"], "after": rss_anon()}), flush=True)
"""


def _status_bytes(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def measure_rss_anon(gen_path: Path, train_path: Path, tau: float = TAU) -> dict:
    """Run gl_sscd in a child process; poll its RssAnon from this process (see module doc)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(gen_path), str(train_path), str(tau)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        baseline = json.loads(proc.stdout.readline())["baseline"]
        peak, samples, stop = [baseline], [0], threading.Event()

        def poll():
            while not stop.is_set():
                value = _status_bytes(proc.pid, "RssAnon")
                if value is None:
                    return
                peak[0] = max(peak[0], value)
                samples[0] += 1
                time.sleep(POLL_S)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        stop.set()
        poller.join()
        if not line:
            raise RuntimeError(f"gl_sscd child failed with status {proc.wait()}")
        done = json.loads(line)
    finally:
        if proc.poll() is None:
            proc.stdin.close()
            proc.wait(timeout=60)
    return {"baseline": baseline, "peak": peak[0], "growth": peak[0] - baseline, "samples": samples[0], **done}


def bench_gl_sscd_memory(record, workload, request):
    gen, train, gen_path, train_path = workload
    if os.environ.get("DIFFREPRO_BENCH_SIZES", "small") == "small" and len(train) != max(_sizes()["Ns"]):
        pytest.skip("small sizes: the memory check runs on the larger N only")
    mem = measure_rss_anon(gen_path, train_path)
    growth_mb = mem["growth"] / 2**20
    assert mem["samples"] > 0
    assert mem["growth"] <= GIB, f"peak RssAnon grew by {growth_mb:.0f} MB > 1 GiB above the inputs"
    if not request.config.getoption("benchmark_disable"):
        record(
            _case(len(gen), len(train)),
            f"diffrepro (subprocess; peak RssAnon +{growth_mb:.0f} MB)",
            [mem["seconds"]],
            benchmarks.search_flops(len(gen), len(train), D),
            note=f"baseline RssAnon {mem['baseline'] / 2**20:.0f} MB, {mem['samples']} samples",
        )
