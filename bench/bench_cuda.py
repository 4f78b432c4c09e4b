# SPDX-License-Identifier: Apache-2.0
"""GPU table (diffrepro.gpu_bench): each engine vs torch chunked GEMM + online LSE, torch SDPA
(fp32; bf16 labelled inexact) and faiss-gpu, with TFLOP/s and fractions of the device's peaks.
Sizes from DIFFREPRO_BENCH_SIZES (small | paper). Skipped without a CUDA device."""
import json
from pathlib import Path

import pytest
import torch

from diffrepro import benchmarks, gpu_bench

if not torch.cuda.is_available():
    pytest.skip(f"bench_cuda: no CUDA device visible to torch (torch {torch.__version__}, CUDA build "
                f"{torch.version.cuda or 'none'}): nothing to measure", allow_module_level=True)


def bench_cuda_table(request):
    smoke = request.config.getoption("benchmark_disable")
    size = "small" if smoke else next(n for n, s in benchmarks.SIZES.items() if s == benchmarks.sizes())
    table = gpu_bench.run_table(size, rounds=1 if smoke else 5)
    print("\n" + gpu_bench.format_table(table))
    out = Path(".benchmarks")
    out.mkdir(exist_ok=True)
    (out / "cuda.json").write_text(json.dumps(table, indent=1, default=str))
    assert not [r for r in table["rows"] if r["impl"].startswith("diffrepro") and r["error"]]
