# SPDX-License-Identifier: Apache-2.0
"""nn_search vs faiss IndexFlatIP: in this process as the machine runs it by default, and in a
subprocess with OPENBLAS_CORETYPE set to the best core for this CPU (read when OpenBLAS loads)."""
import pytest

from diffrepro import benchmarks, ops

ROUNDS = 5


@pytest.fixture(scope="module", params=[0, 1])
def workload(request, bench_sizes):
    ns = bench_sizes["nn_n"]
    if request.param >= len(ns):
        pytest.skip("size not in this DIFFREPRO_BENCH_SIZES set")
    N = ns[request.param]
    q, r = benchmarks.search_workload(bench_sizes["nn_q"], N, bench_sizes["nn_d"])
    return q, r


@pytest.mark.parametrize("k", [1, 10])
def bench_nn_search_diffrepro(benchmark, record, workload, k):
    q, r = workload
    benchmark.pedantic(lambda: ops.nn_search(q, r, k), rounds=ROUNDS, warmup_rounds=1)
    record(_case(q, r, k), "diffrepro", benchmark, benchmarks.search_flops(q.shape[0], *r.shape))


@pytest.mark.parametrize("k", [1, 10])
def bench_nn_search_faiss_default(benchmark, record, workload, k):
    faiss = pytest.importorskip("faiss")
    q, r = workload
    index = faiss.IndexFlatIP(r.shape[1])
    index.add(r)
    benchmark.pedantic(lambda: index.search(q, k), rounds=ROUNDS, warmup_rounds=1)
    record(_case(q, r, k), "faiss (default env, in process)", benchmark, benchmarks.search_flops(q.shape[0], *r.shape))


@pytest.mark.parametrize("k", [1, 10])
def bench_nn_search_faiss_best(record, workload, k, request):
    """A different OPENBLAS_CORETYPE needs a fresh process: its own timings are recorded."""
    pytest.importorskip("faiss")
    q, r = workload
    core = benchmarks.best_openblas_coretype()
    rounds = 1 if request.config.getoption("benchmark_disable") else ROUNDS
    times = benchmarks.faiss_subprocess_times(q.shape[0], r.shape[0], r.shape[1], k, rounds=rounds, coretype=core)
    record(_case(q, r, k), f"faiss (subprocess, OPENBLAS_CORETYPE={core})", times,
           benchmarks.search_flops(q.shape[0], *r.shape))


def _case(q, r, k):
    return f"nn_search Q={q.shape[0]} N={r.shape[0]} D={r.shape[1]} k={k}"
