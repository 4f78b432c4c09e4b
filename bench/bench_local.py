# SPDX-License-Identifier: Apache-2.0
"""Local analytic denoisers (:mod:`diffrepro.denoisers.local`), Heun 18 theoretical generations
end to end (:func:`diffrepro.generate`, PNGs and npz included) over the real CIFAR-10 subset:

* PSPC-square with the paper's CIFAR-10 schedule 32 x7, 23, 15, 11, 7, 5, 3 x6 (Niedoba et al. 2024);
* LS and ELS with k = 3 (Kamb & Ganguli 2024);
* PCA locality, mask threshold 0.02 (Lukoianov et al. 2025).

Sizes (``DIFFREPRO_BENCH_SIZES``): ``small`` a few seeds over a few hundred rows (minutes on 2
cores); ``paper`` the issue's settings: PSPC and PCA locality 64 seeds over the 5,170 real images,
LS 64 seeds, ELS 16 seeds over the 5,170 (hours on 2 cores: the work is Σ over crops of N·|crop|
per query and evaluation, reported as GFLOP/s of the kernel's two products; LS and PCA
locality: the nominal products of their windows and masks).
"""
import numpy as np
import pytest
import torch

from diffrepro import benchmarks, generation, samplers
from diffrepro.denoisers import LocalScoreDenoiser, PatchSetDenoiser, PCALocalityDenoiser
from diffrepro.denoisers.local import CIFAR_PATCH_SCHEDULE

STEPS = 18
SIZES = {"small": {"pspc": (4, 256), "ls": (4, 256), "els": (1, 32), "pca": (4, 256), "rounds": 1},
         "paper": {"pspc": (64, None), "ls": (64, None), "els": (16, None), "pca": (64, None), "rounds": 1}}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The kernels run on their own workers; torch's pool only serves small steps (as in
    bench_pruning.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sizes(bench_sizes):
    return SIZES[next(k for k, v in benchmarks.SIZES.items() if v is bench_sizes)]


def heun_sigmas() -> list[float]:
    """σ of every Heun-18 evaluation: each step's t_i, and t_{i+1} for the correction (not at 0)."""
    grid = samplers.edm_grid(STEPS).tolist()
    return grid[:-1] + grid[1:-1]


def pspc_flops(n: int, c: int, h: int, p: int) -> float:
    """Per query and evaluation: (H − p + 1)² crops, each 2 products of N·C·p²."""
    return 4.0 * n * c * p * p * (h - p + 1) ** 2


def ls_flops(n: int, c: int, h: int, k: int) -> float:
    """Per query and evaluation: the products of one clipped window per pixel (the model's
    nominal work; the box-sum path does a few elementwise passes over N·C·H·W instead)."""
    d = k // 2
    side = [min(i + d + 1, h) - max(i - d, 0) for i in range(h)]
    return 4.0 * n * c * sum(a * b for a in side for b in side)


def els_flops(n: int, c: int, h: int, k: int) -> float:
    """Per query and evaluation: every pixel's patch against every valid patch of every image."""
    return 4.0 * n * (h - k + 1) ** 2 * c * k * k * h * h


def _generate(benchmark, tmp_path_factory, den, seeds: int, sizes):
    runs = []

    def setup():
        return (den, f"0-{seeds - 1}", tmp_path_factory.mktemp("gen")), {"steps": STEPS, "progress": False}

    def run(*args, **kwargs):
        runs.append(generation.generate(*args, **kwargs))

    benchmark.pedantic(run, setup=setup, rounds=sizes["rounds"], warmup_rounds=0)
    return runs


def bench_pspc_cifar_schedule(benchmark, record, tmp_path_factory, sizes, real_cifar):
    k, n = sizes["pspc"]
    train = real_cifar[:n].numpy()
    den = PatchSetDenoiser(train, list(CIFAR_PATCH_SCHEDULE))
    _generate(benchmark, tmp_path_factory, den, k, sizes)
    c, h = train.shape[1], train.shape[2]
    flops = k * sum(pspc_flops(len(train), c, h, den._schedule.at(s)) for s in heun_sigmas())
    record(f"PSPC CIFAR schedule, Heun-18, K={k} N={len(train)}", "diffrepro", benchmark, flops)


@pytest.mark.parametrize("model", ["ls", "els"])
def bench_local_score_k3(benchmark, record, tmp_path_factory, sizes, real_cifar, model):
    k, n = sizes[model]
    train = real_cifar[:n].numpy()
    den = LocalScoreDenoiser(train, 3, equivariant=model == "els")
    _generate(benchmark, tmp_path_factory, den, k, sizes)
    c, h = train.shape[1], train.shape[2]
    per_eval = (els_flops if model == "els" else ls_flops)(len(train), c, h, 3)
    record(f"{model.upper()} k=3, Heun-18, K={k} N={len(train)}", "diffrepro", benchmark,
           k * per_eval * len(heun_sigmas()))


def bench_pca_locality(benchmark, record, tmp_path_factory, sizes, real_cifar):
    k, n = sizes["pca"]
    train = real_cifar[:n].numpy()
    den = PCALocalityDenoiser(train)
    den._eigenpairs()  # the covariance's eigendecomposition, once per training set, not timed
    _generate(benchmark, tmp_path_factory, den, k, sizes)
    support = [float((den.mask(s) != 0).sum()) for s in heun_sigmas()]  # Σ_m |S_m| per evaluation
    record(f"PCA locality (threshold 0.02), Heun-18, K={k} N={len(train)}", "diffrepro", benchmark,
           k * 4.0 * len(train) * float(np.sum(support)))
