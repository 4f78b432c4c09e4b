# SPDX-License-Identifier: Apache-2.0
"""empirical_denoiser vs torch SDPA, chunked torch GEMM + online LSE, and paper 1's algorithm
(two float64 broadcast passes, timed on a subset and extrapolated)."""
import pytest

from diffrepro import benchmarks, ops

ROUNDS = 5
SIGMA = 1.0


def _sets(bench_sizes, real_cifar):
    train = benchmarks.synthetic_train(bench_sizes["den_n"], bench_sizes["den_d"])
    real = real_cifar.reshape(real_cifar.shape[0], -1)  # uint8, decoded in the kernel
    return {"synthetic": train, "cifar-real": real}


@pytest.fixture(scope="module")
def workloads(bench_sizes, real_cifar):
    out = {}
    for name, train in _sets(bench_sizes, real_cifar).items():
        decoded = train.float() / 127.5 - 1 if name == "cifar-real" else train
        out[name] = (train, decoded, decoded.square().sum(1))
    return out


@pytest.mark.parametrize("dataset", ["synthetic", "cifar-real"])
@pytest.mark.parametrize("impl", ["diffrepro", "torch sdpa", "torch chunked"])
@pytest.mark.parametrize("qi", [0, 1])
def bench_empirical_denoiser(benchmark, record, bench_sizes, workloads, dataset, impl, qi):
    Q = bench_sizes["den_q"][qi]
    train, decoded, norm2 = workloads[dataset]
    x = benchmarks.noisy_queries(decoded, Q, SIGMA)
    fn = {
        "diffrepro": lambda: ops.empirical_denoiser(x, train, SIGMA),
        "torch sdpa": lambda: benchmarks.sdpa_denoiser(x, decoded, SIGMA, norm2),
        "torch chunked": lambda: benchmarks.torch_chunked_denoiser(x, decoded, SIGMA, train_norm2=norm2),
    }[impl]
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=1)
    case = f"empirical_denoiser {dataset} Q={Q} N={train.shape[0]} D={train.shape[1]}"
    record(case, impl, benchmark, benchmarks.denoiser_flops(Q, *train.shape))


@pytest.mark.parametrize("qi", [0, 1])
def bench_empirical_denoiser_paper1(benchmark, record, bench_sizes, workloads, qi):
    """Paper 1's two-pass algorithm (float64 differences; rows decoded and the normaliser summed in
    float32, as its generate.py does): too slow at full size, so 64 queries x 512 rows are
    timed and the time is scaled by Q*N (the algorithm is linear in both)."""
    Q = bench_sizes["den_q"][qi]
    train, decoded, _ = workloads["synthetic"]
    x = benchmarks.noisy_queries(decoded, max(Q, 64), SIGMA)
    times = []
    benchmark.pedantic(lambda: times.append(benchmarks.paper1_seconds(x, decoded, SIGMA, 512)[1]),
                       rounds=ROUNDS, warmup_rounds=0)
    if times:
        scale = Q / x.shape[0]
        record(f"empirical_denoiser synthetic Q={Q} N={train.shape[0]} D={train.shape[1]}",
               "paper 1 (extrapolated from 64x512)", [t * scale for t in times],
               benchmarks.denoiser_flops(Q, *train.shape))
