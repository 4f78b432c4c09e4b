# SPDX-License-Identifier: Apache-2.0
"""Multi-process costs on this machine, side by side in one run:

* ``--shard-train`` with 2 gloo processes: one denoiser call (each process's partial softmax
  state over half the rows, then the all-reduces and the finalisation) against the partial
  kernel alone; the difference is the all-reduce overhead, reported as a fraction of the call.
  One process over all rows with as many kernel threads as the two processes together is the
  reference row.
* ``generate`` end to end, 2 processes (``torchrun``'s environment, 1 kernel thread each) vs 1
  process (2 kernel threads), torch's own thread pool at 1 in both: the job's seconds from the
  manifest (start-up excluded; the wall time with start-up is in the note).

Sizes (``DIFFREPRO_BENCH_SIZES``): ``small`` Q=64 queries over 4,096 synthetic rows, and 64 seeds
over 1,024 real CIFAR rows; ``paper`` Q=256 over 50,000 rows, and 256 seeds over all 5,170.
"""
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import numpy as np
import pytest
import torch.multiprocessing as mp

from diffrepro import benchmarks, distributed, empirical_denoiser, empirical_denoiser_partial

SIGMA = 1.0
ROUNDS = 5
GEN = {"small": {"seeds": 64, "rows": 1024, "batch": 32, "rounds": 3},
       "paper": {"seeds": 256, "rows": None, "batch": 64, "rounds": 3}}


def _size_name(bench_sizes) -> str:
    return next(k for k, v in benchmarks.SIZES.items() if v is bench_sizes)


def _call_worker(rank, world, store, n, d, q, rounds, queue):
    ctx = distributed.init(init_method=f"file://{store}", rank=rank, world_size=world, timeout=300)
    train = benchmarks.synthetic_train(n, d).reshape(n, 3, 32, 32)
    lo, hi = distributed.shard_bounds(n, world, rank)
    # Dense (prune=0): the same call repeated at one point would be pruned from the second time on,
    # and this measures the state merge against the partial kernel it wraps.
    den = distributed.ShardedEmpiricalDenoiser(train[lo:hi], lo, ctx, prune=0)
    x = benchmarks.noisy_queries(train.reshape(n, d), q, SIGMA)
    den(x.reshape(q, 3, 32, 32), SIGMA)  # warm-up
    full, part = [], []
    for _ in range(rounds):
        ctx.barrier()
        t = time.perf_counter()
        den(x.reshape(q, 3, 32, 32), SIGMA)
        full.append(time.perf_counter() - t)
        t = time.perf_counter()
        empirical_denoiser_partial(x, train[lo:hi].reshape(hi - lo, d), SIGMA, row_offset=lo)
        part.append(time.perf_counter() - t)
    timings = ctx.all_gather_object((full, part))
    if rank == 0:
        queue.put(timings)
    ctx.close()


def bench_shard_train_allreduce_overhead(record, bench_sizes, tmp_path, monkeypatch):
    n, d, q = bench_sizes["den_n"], bench_sizes["den_d"], bench_sizes["den_q"][1]
    monkeypatch.setenv("DIFFREPRO_NUM_THREADS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as torchrun sets it: no idle torch pool spinning
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = mp.start_processes(_call_worker, args=(2, tmp_path / "store", n, d, q, ROUNDS, queue), nprocs=2,
                               join=False, start_method="spawn")
    timings = queue.get(timeout=600)
    while not procs.join(timeout=600):
        pass
    # A call ends when the slower rank's state has arrived: per round, the slower rank's times.
    full = [max(t[0][i] for t in timings) for i in range(ROUNDS)]
    part = [max(t[1][i] for t in timings) for i in range(ROUNDS)]
    overhead = [f - p for f, p in zip(full, part)]
    fraction = statistics.median(overhead) / statistics.median(full)
    train = benchmarks.synthetic_train(n, d)
    x = benchmarks.noisy_queries(train, q, SIGMA)
    monkeypatch.setenv("DIFFREPRO_NUM_THREADS", "2")
    empirical_denoiser(x, train, SIGMA)
    one = []
    for _ in range(ROUNDS):
        t = time.perf_counter()
        empirical_denoiser(x, train, SIGMA)
        one.append(time.perf_counter() - t)
    flops = benchmarks.denoiser_flops(q, n, d)
    case = f"denoiser call, --shard-train Q={q} N={n} D={d}"
    record(case, "2 gloo processes (N/2 rows each)", full, flops,
           note=f"all-reduce overhead {fraction:.1%} of the call (median {statistics.median(overhead) * 1e3:.2f} ms)")
    record(case, "partial kernel only (N/2 rows, slower rank)", part, flops)
    record(case, "1 process, 2 kernel threads", one, flops)
    assert 0 <= fraction < 1


def _generate(world: int, outdir, train, sizes) -> tuple[float, float]:
    """(job seconds from the manifest, wall seconds with start-up) of one fresh run."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "-m", "diffrepro", "generate", "--train", str(train), "--seeds",
            f"0-{sizes['seeds'] - 1}", "--batch", str(sizes["batch"]), "--outdir", str(outdir), "--no-progress"]
    threads = str(max(1, 2 // world))  # kernel threads; torch's own pool stays at 1 (torchrun's default)
    t = time.perf_counter()
    procs = [subprocess.Popen(args, env={**os.environ, "DIFFREPRO_NUM_THREADS": threads, "OMP_NUM_THREADS": "1",
                                         "RANK": str(r),
                                         "WORLD_SIZE": str(world), "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1",
                                         "MASTER_PORT": str(port)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for r in range(world)]
    for p in procs:
        _, err = p.communicate(timeout=3600)
        assert p.returncode == 0, err[-2000:]
    wall = time.perf_counter() - t
    return json.loads((outdir / "manifest.json").read_text())["timing"]["seconds"], wall


@pytest.mark.parametrize("world", [1, 2])
def bench_generate_processes(record, bench_sizes, real_cifar, tmp_path, world):
    sizes = GEN[_size_name(bench_sizes)]
    train = tmp_path / "train.npz"
    np.savez(train, images=real_cifar[:sizes["rows"]].numpy())
    rows = len(real_cifar[:sizes["rows"]])
    runs = [_generate(world, tmp_path / f"out{i}", train, sizes) for i in range(sizes["rounds"])]
    flops = 35 * benchmarks.denoiser_flops(sizes["seeds"], rows, 3072)
    case = f"generate Heun-18 K={sizes['seeds']} N={rows}, 2 cores (job seconds)"
    walls = [w for _, w in runs]
    record(case, f"{world} process{'es' if world > 1 else ''}, {2 // world} kernel thread{'s' * (world == 1)} each",
           [s for s, _ in runs], flops, note=f"wall with start-up median {statistics.median(walls):.2f} s")
