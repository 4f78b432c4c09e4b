# SPDX-License-Identifier: Apache-2.0
"""The machine's measured limits (``diffrepro bench --peak``): the FMA loop per vector width, the
streaming read, and the table's percentage columns."""
import json
import math
import os
import subprocess
import sys

from diffrepro import _backend, benchmarks

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFREPRO_NUM_THREADS": "1"}
FMA_CHAINS = 12  # independent accumulators of the loop (csrc/cpu/machine_peak.h)


def test_fma_loop_counts_two_flops_per_lane_of_every_fused_multiply_add():
    for width in _backend.cpu.fma_widths():
        seconds, flops, cpu_seconds = _backend.cpu.fma_loop(width, 1000, 2)
        assert flops == 2 * (width // 32) * FMA_CHAINS * 1000 * 2
        assert seconds > 0 and cpu_seconds > 0


def test_a_width_the_cpu_cannot_run_is_reported_not_timed():
    seconds, flops, _ = _backend.cpu.fma_loop(64, 1000, 1)  # no 64-bit FMA loop exists
    assert seconds < 0 and flops == 0


def test_machine_peak_is_positive_cached_and_ordered_by_width():
    peak = benchmarks.machine_peak(1)
    assert benchmarks.machine_peak(1) is peak  # measured once per process
    widths = sorted(peak["fma_gflops"])
    if os.uname().machine == "x86_64":
        assert widths and set(widths) <= {128, 256, 512}
    for key in ("fma_gflops", "fma_gflops_cpu_time"):
        assert all(math.isfinite(g) and g > 0 for g in peak[key].values()), peak
    assert peak["peak_gflops"] == max(peak["fma_gflops"].values())
    assert peak["read_gbs"] > 0 and peak["read_buffer_bytes"] > 0
    # A core's own rate (CPU time, robust to other processes): doubling the width at most
    # doubles the flops of an instruction, and no CPU runs its wider FMA at well under the
    # narrower one's flop rate.
    rate = peak["fma_gflops_cpu_time"]
    for narrow, wide in zip(widths, widths[1:]):
        assert 0.7 * rate[narrow] <= rate[wide] <= 2.6 * rate[narrow], rate


def test_table_rows_as_percentages_of_the_peak_and_of_the_read_bandwidth():
    peak = {"peak_gflops": 200.0, "read_gbs": 10.0}
    rows = [{"case": "c", "impl": "diffrepro", "seconds": 0.5, "min": 0.5, "max": 0.5, "rounds": 1,
             "gflops": 150.0, "bytes": 2e9},
            {"case": "c", "impl": "peer", "seconds": 1.0, "min": 1.0, "max": 1.0, "rounds": 1, "gflops": 75.0}]
    header, ours, peer = benchmarks.format_table(rows, peak).splitlines()
    assert header.split()[-6:] == ["%", "FMA", "peak", "%", "read", "BW"]
    assert ours.split()[-3:] == ["1.00x", "75%", "40%"]  # 150 / 200; 2 GB in 0.5 s of 10 GB/s
    assert peer.split()[-3:] == ["2.00x", "38%", "-"]  # 75 / 200 (rounded); no bytes recorded


def test_bench_peak_cli_prints_the_peak_and_writes_strict_json(tmp_path):
    out = tmp_path / "peak.json"
    proc = subprocess.run([sys.executable, "-m", "diffrepro", "bench", "--peak", "--json", str(out)],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("machine: ") and "1 worker threads" in lines[0]
    assert "FMA peak (float32" in lines[1] and "GFLOP/s" in lines[1]
    assert any(line.startswith("streaming read: ") and "GB/s" in line for line in lines)
    assert "median s" not in proc.stdout  # --peak prints no kernel table

    def no_constants(name):
        raise AssertionError(f"non-strict JSON constant {name}")

    peak = json.loads(out.read_text(), parse_constant=no_constants)["peak"]
    assert peak["peak_gflops"] > 0 and peak["workers"] == 1
    assert set(peak["fma_gflops"]) <= {"128", "256", "512"}


def test_bench_peak_refuses_to_overwrite_its_json(tmp_path):
    out = tmp_path / "peak.json"
    out.write_text("{}")
    proc = subprocess.run([sys.executable, "-m", "diffrepro", "bench", "--peak", "--json", str(out)],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 2 and "--json" in proc.stderr and out.read_text() == "{}"
