# SPDX-License-Identifier: Apache-2.0
"""Theoretical generation (``diffrepro.generate``) over the real CIFAR-10 subset, Heun 18 (NFE 35):

* end-to-end seconds of :func:`diffrepro.generation.generate` (sampling, PNG and npz writes);
* sampler + Python overhead relative to the time inside the denoiser calls (target <= 5%);
* generate end to end over (denoiser calls x the microbenchmark time of one call of the same
  shape), measured side by side in each round (target <= 1.15), and where the rest goes;
* paper 1's pipeline on the same 64 seeds: per evaluation it re-reads the training set twice
  through PNG decodes and runs two float64 broadcast passes; timed for one evaluation on a
  subset of the training rows and extrapolated linearly to all rows and 35 evaluations.

Sizes (``DIFFREPRO_BENCH_SIZES``): ``small`` 128 samples over 1,024 rows (paper-1 peer timed on
128 rows); ``paper`` 1,000 samples over all 5,170 rows (peer timed on 512 rows).
"""
import io
import time

import numpy as np
import PIL.Image
import pytest
import torch

from diffrepro import benchmarks, generation, noise, ops, samplers
from diffrepro.denoisers import EmpiricalDenoiser
from diffrepro.reference import p1_two_pass_denoiser

STEPS = 18
NFE = samplers.nfe("heun", STEPS)
P1_SEEDS = 64  # paper 1's batch: 64 queries per denoiser call
SIZES = {"small": {"samples": 128, "rows": 1024, "p1_rows": 128, "rounds": 3, "ratio_samples": 256},
         "paper": {"samples": 1000, "rows": None, "p1_rows": 512, "rounds": 1, "ratio_samples": 512}}


@pytest.fixture(scope="module")
def sizes(bench_sizes):
    name = next(k for k, v in benchmarks.SIZES.items() if v is bench_sizes)
    return SIZES[name]


@pytest.fixture(scope="module")
def train(real_cifar, sizes):
    return real_cifar[:sizes["rows"]].numpy()


def _flops(samples: int, train: np.ndarray) -> float:
    return NFE * benchmarks.denoiser_flops(samples, len(train), train[0].size)


def _fresh_run(tmp_path_factory, den, seeds, runs: list):
    """pytest-benchmark setup: a new output folder per round, so nothing is resumed."""
    def setup():
        return (den, seeds, tmp_path_factory.mktemp("gen")), {"steps": STEPS, "progress": False}

    def run(*args, **kwargs):
        runs.append(generation.generate(*args, **kwargs))

    return setup, run


def bench_generate_heun18(benchmark, record, tmp_path_factory, sizes, train):
    """(a) seconds for the samples over the training rows, and (b) the sampler's overhead."""
    k = sizes["samples"]
    den, runs = EmpiricalDenoiser(train), []
    setup, run = _fresh_run(tmp_path_factory, den, f"0-{k - 1}", runs)
    benchmark.pedantic(run, setup=setup, rounds=sizes["rounds"], warmup_rounds=0)
    case = f"generate Heun-18 K={k} N={len(train)} (end to end)"
    record(case, "diffrepro", benchmark, _flops(k, train))

    timing = min(runs, key=lambda m: m["timing"]["seconds"])["timing"]
    overhead = timing["sampler_overhead_fraction"]
    benchmark.extra_info.update(sampler_overhead_fraction=overhead, target="<= 0.05",
                                seconds_target="<= 10 s for K=1000, N=5170 on 2 cores")
    case = f"sampler overhead K={k} N={len(train)} (ratio = kernel/sampler)"
    record(case, "diffrepro", [timing["sampling_seconds"]], _flops(k, train),
           note=f"sampler + Python overhead {overhead:.1%} of the sampling time (target <= 5%)")
    record(case, "denoiser calls only", [timing["denoiser_seconds"]], _flops(k, train))


def _png_rows(train: np.ndarray) -> list[bytes]:
    """The training images as PNG files (``compress_level=0``, as EDM's dataset_tool writes)."""
    out = []
    for image in train:
        buf = io.BytesIO()
        PIL.Image.fromarray(image.transpose(1, 2, 0)).save(buf, format="png", compress_level=0)
        out.append(buf.getvalue())
    return out


def _p1_evaluation(x: torch.Tensor, pngs: list[bytes], sigma: float) -> float:
    """Seconds of one paper-1 denoiser call: each of its two passes decodes every PNG again
    (batches of 64, as its DataLoader) and materialises float64 (64, 64, d) differences."""
    def batches():
        for a in range(0, len(pngs), 64):
            yield torch.from_numpy(np.stack([
                np.asarray(PIL.Image.open(io.BytesIO(b)).convert("RGB")).transpose(2, 0, 1)
                for b in pngs[a:a + 64]]))

    start = time.perf_counter()
    p1_two_pass_denoiser(x, batches, sigma)
    return time.perf_counter() - start


def bench_generate_vs_paper1(benchmark, record, tmp_path_factory, sizes, train):
    """(c) the same 64 seeds, Heun 18: diffrepro end to end vs paper 1 (extrapolated)."""
    den, runs = EmpiricalDenoiser(train), []
    setup, run = _fresh_run(tmp_path_factory, den, f"0-{P1_SEEDS - 1}", runs)
    benchmark.pedantic(run, setup=setup, rounds=sizes["rounds"], warmup_rounds=0)
    case = f"generate Heun-18 K={P1_SEEDS} N={len(train)}"
    record(case, "diffrepro", benchmark, _flops(P1_SEEDS, train))

    sub = sizes["p1_rows"]
    pngs = _png_rows(train[:sub])
    lat, _ = noise.seed_latents(range(P1_SEEDS), train.shape[1:])
    x = lat.double() * 80.0  # the first evaluation's state; the cost does not depend on σ
    scale = NFE * len(train) / sub
    seconds = [_p1_evaluation(x, pngs, 80.0) * scale for _ in range(sizes["rounds"])]
    record(case, f"paper 1 (extrapolated: 1 eval x {sub} rows)", seconds,
           _flops(P1_SEEDS, train), note=f"measured {min(seconds) / scale:.3f} s per eval on "
                                          f"{sub} rows, x{scale:.0f}")


def _one_call_seconds(rows: torch.Tensor, q: int, sigma: float, repeats: int = 2) -> tuple[float, float]:
    """Fastest wall-clock and process-CPU seconds of ``ops.empirical_denoiser`` on q queries
    y + σ n (y: decoded rows, as a sampler's state at σ; a call's cost depends on σ: below σ ~ 0.1
    the second product goes sparse). CPU seconds count every thread: on shared cores they show
    work, not waiting."""
    g = torch.Generator().manual_seed(q)
    x = rows[:q].float() / 127.5 - 1 + sigma * torch.randn(q, rows.shape[1], generator=g)
    ops.empirical_denoiser(x, rows, sigma)
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        ops.empirical_denoiser(x, rows, sigma)
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return min(wall), min(cpu)


def _heun_call_sigmas() -> list[float]:
    """σ of each denoiser call of Heun-18 on EDM's grid: t_i, then t_{i+1} while t_{i+1} > 0."""
    t = samplers.edm_grid(STEPS).tolist()
    return [s for i in range(STEPS) for s in ([t[i], t[i + 1]] if t[i + 1] > 0 else [t[i]])]


def generate_vs_kernel_calls(train: np.ndarray, samples: int, rounds: int, outdir) -> dict:
    """Per round, side by side: ``generate`` (Heun-18, dense, batches of 256) end to end, then each
    call's shape and σ timed alone; returns per-round seconds (wall clock, and process CPU time for
    the ``*_cpu`` keys) and their ratios. ``outdir()`` gives a fresh folder."""
    den = EmpiricalDenoiser(train, prune=0)
    den.fingerprint()  # the one-off hash of the rows is not part of a call
    rows = torch.from_numpy(train.reshape(len(train), -1))
    keys = ("generate", "kernel_calls", "denoiser", "sampling", "ratio",
            "generate_cpu", "kernel_calls_cpu", "ratio_cpu")
    out = {k: [] for k in keys}
    sigmas = _heun_call_sigmas()
    for _ in range(rounds):
        start, start_cpu = time.perf_counter(), time.process_time()
        timing = generation.generate(den, f"0-{samples - 1}", outdir(), steps=STEPS, progress=False)["timing"]
        out["generate"].append(time.perf_counter() - start)
        out["generate_cpu"].append(time.process_time() - start_cpu)
        assert timing["denoiser_calls"] % len(sigmas) == 0, timing
        # EDM's split: ceil(S / 256) batches of near-equal sizes, each making the calls of `sigmas`
        batches = [len(b) for b in np.array_split(np.arange(samples), -(-samples // 256))]
        one = {(q, s): _one_call_seconds(rows, q, s) for q in set(batches) for s in set(sigmas)}
        out["kernel_calls"].append(sum(one[q, s][0] for q in batches for s in sigmas))
        out["kernel_calls_cpu"].append(sum(one[q, s][1] for q in batches for s in sigmas))
        out["denoiser"].append(timing["denoiser_seconds"])
        out["sampling"].append(timing["sampling_seconds"])
        out["ratio"].append(out["generate"][-1] / out["kernel_calls"][-1])
        out["ratio_cpu"].append(out["generate_cpu"][-1] / out["kernel_calls_cpu"][-1])
    out["calls"] = len(batches) * len(sigmas)
    return out


def bench_generate_vs_kernel_calls(request, record, tmp_path_factory, sizes, train):
    """(d) dense generate end to end over its kernel calls at microbenchmark speed (<= 1.15)."""
    smoke = request.config.getoption("benchmark_disable")
    k = sizes["ratio_samples"]
    m = generate_vs_kernel_calls(train, k, 1 if smoke else 3, lambda: tmp_path_factory.mktemp("gen"))
    r = sorted(m["ratio"])
    case = f"generate Heun-18 K={k} N={len(train)} --prune 0 vs its {m['calls']} kernel calls"
    note = (f"generate / (calls x one call alone) = {r[len(r) // 2]:.2f} (min {r[0]:.2f}, max {r[-1]:.2f}, "
            f"{len(r)} rounds; target <= 1.15)")
    flops = _flops(k, train)
    record(case, "diffrepro", m["generate"], flops, note=note)
    record(case, "kernel calls at microbenchmark speed", m["kernel_calls"], flops)
    record(case, "inside the denoiser calls (as called)", m["denoiser"], flops)
    print(note)


if __name__ == "__main__":  # python bench/bench_generate.py [samples] [rows] [rounds]
    import os
    import sys
    import tempfile
    from pathlib import Path

    args = [int(a) for a in sys.argv[1:]] + [512, 0, 3][len(sys.argv) - 1:]
    data = Path(os.environ.get("DIFFREPRO_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    images = np.load(data / "cifar10-train-subset.npz")["images"]
    images = images[:args[1]] if args[1] else images
    with tempfile.TemporaryDirectory() as d:
        m = generate_vs_kernel_calls(images, args[0], args[2], lambda: tempfile.mkdtemp(dir=d))
    for key in ("generate", "kernel_calls", "denoiser", "sampling", "ratio",
                "generate_cpu", "kernel_calls_cpu", "ratio_cpu"):
        v = sorted(m[key])
        rounds = [round(t, 3) for t in m[key]]
        print(f"{key:>13}: median {v[len(v) // 2]:.3f}  min {v[0]:.3f}  max {v[-1]:.3f}  {rounds}")
    print("calls", m["calls"])
