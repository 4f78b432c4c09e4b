# SPDX-License-Identifier: Apache-2.0
"""Benchmark fixtures: sizes from DIFFREPRO_BENCH_SIZES (small | paper), a results registry and
the ratio table printed at the end of the run (and saved to .benchmarks/ratios.json)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import diffrepro
from diffrepro import benchmarks

RESULTS: list[dict] = []


@pytest.fixture(scope="session")
def bench_sizes():
    return benchmarks.sizes()


@pytest.fixture
def record(request):
    """record(case, impl, seconds_list_or_benchmark, flops, note='')"""

    def _record(case, impl, timing, flops, note=""):
        if request.config.getoption("benchmark_disable"):  # smoke run: nothing was timed
            return
        if isinstance(timing, list):
            RESULTS.append(benchmarks.timing_row(case, impl, timing, flops, note=note))
            return
        stats = timing.stats.stats  # pytest-benchmark fixture after pedantic()
        timing.extra_info.update(
            case=case, impl=impl, gflops=flops / stats.median / 1e9, build_info=str(diffrepro.build_info())
        )
        RESULTS.append(
            dict(
                case=case,
                impl=impl,
                seconds=stats.median,
                min=stats.min,
                max=stats.max,
                rounds=stats.rounds,
                gflops=flops / stats.median / 1e9,
                note=note,
            )
        )

    return _record


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    terminalreporter.write_line("")
    terminalreporter.write_line(
        f"diffrepro ratio table ({diffrepro.build_info()['gemm_engine']}, "
        f"{os.cpu_count()} CPUs, sizes={os.environ.get('DIFFREPRO_BENCH_SIZES', 'small')})"
    )
    peak = benchmarks.machine_peak()
    terminalreporter.write_line(benchmarks.format_peak(peak))
    terminalreporter.write_line(benchmarks.format_table(RESULTS, peak))
    out = Path(".benchmarks")
    out.mkdir(exist_ok=True)
    (out / "ratios.json").write_text(json.dumps(RESULTS, indent=1))


@pytest.fixture(scope="session")
def real_cifar():
    path = (
        Path(os.environ.get("DIFFREPRO_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
        / "cifar10-train-subset.npz"
    )
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"real CIFAR-10 sample not found at {path}")
        pytest.skip(f"real CIFAR-10 sample not found at {path}")
    with np.load(path) as f:
        return torch.from_numpy(f["images"])
