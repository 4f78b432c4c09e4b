# SPDX-License-Identifier: Apache-2.0
"""The GPU benchmark's device-independent parts: datasheet peaks by device name, the table format,
and the clear skip without a GPU (real subprocess)."""
import subprocess
import sys

import pytest
import torch

from diffrepro import gpu_bench


@pytest.mark.parametrize("name,fp32,tbps", [
    ("NVIDIA H100 80GB HBM3", 67.0, 3.35), ("NVIDIA H100 PCIe", 51.0, 2.0), ("NVIDIA H200", 67.0, 4.8),
    ("NVIDIA A100-SXM4-80GB", 19.5, 2.0), ("NVIDIA GeForce RTX 4090", 82.6, 1.008),
])
def test_device_peaks(name, fp32, tbps):
    p = gpu_bench.device_peaks(name)
    assert p["fp32"] == fp32 and p["tbps"] == tbps
    assert gpu_bench.device_peaks("Tesla K80") is None


def test_format_table_ratios_and_errors():
    peaks = gpu_bench.device_peaks("NVIDIA H100 80GB HBM3")
    case = "empirical_denoiser Q=256 N=50000 D=3072"
    flops = 4 * 256 * 50_000 * 3072
    rows = [gpu_bench._row(case, "diffrepro blas fp32", [0.004, 0.005, 0.006], flops, peaks),
            gpu_bench._row(case, "torch chunked GEMM + online LSE", [0.010], flops, peaks),
            gpu_bench._row(case, "torch SDPA bf16 (inexact)", [0.001], flops, peaks, exact=False),
            gpu_bench._row(case, "faiss-gpu IndexFlatIP", [], flops, peaks, error="faiss-gpu not importable")]
    assert rows[0]["tflops"] == pytest.approx(flops / 0.005 / 1e12)
    assert rows[0]["fp32_peak_fraction"] == pytest.approx(flops / 0.005 / 1e12 / 67.0)
    text = gpu_bench.format_table(dict(device="NVIDIA H100 80GB HBM3", peaks_tflops=peaks, rows=rows))
    lines = text.splitlines()
    # Ratios are against the best *exact* peer (the inexact bf16 SDPA is not a yardstick).
    assert lines[2].rstrip().endswith("0.50x") and lines[3].rstrip().endswith("1.00x")
    assert "(faiss-gpu not importable)" in lines[5]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_skips_clearly_without_a_gpu():
    p = subprocess.run([sys.executable, "-m", "diffrepro.gpu_bench"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0
    assert p.stdout.startswith("diffrepro gpu_bench: skipped: no CUDA device visible to torch")
    assert p.stdout.rstrip().endswith("nothing was run on a GPU")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_bench_cli_device_cuda_skips_clearly_without_a_gpu():
    p = subprocess.run([sys.executable, "-m", "diffrepro", "bench", "--device", "cuda"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("diffrepro bench: skipped: no CUDA device visible to torch")
