# SPDX-License-Identifier: Apache-2.0
"""``diffrepro selftest`` as a user runs it (real subprocesses): skipped without a GPU, the CPU
table passes, and a wrong engine makes it fail with exit status 1."""
import json
import subprocess
import sys

import pytest
import torch


def run(*args, code=None):
    head = [sys.executable, "-m", "diffrepro", "selftest"] if code is None else [sys.executable, "-c", code]
    cmd = head + list(args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible: the table runs instead")
def test_cuda_without_a_gpu_says_skipped_and_exits_0(tmp_path):
    p = run("--device", "cuda", "--json", str(tmp_path / "st.json"))
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("diffrepro selftest: skipped: no CUDA device visible to torch")
    assert "nothing was run on a GPU" in p.stdout
    rec = json.loads((tmp_path / "st.json").read_text())
    assert rec["status"] == "skipped" and "build_info" in rec


def test_default_device_is_the_one_present():
    """Without --device: the CUDA engines where torch sees a GPU, else the CPU table (it said "skipped")."""
    p = run("--sizes", "small")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "skipped" not in p.stdout and "0 failed" in p.stdout
    ops = ("empirical_denoiser", "nn_search")
    engines = {line.split()[1] for line in p.stdout.splitlines() if line.startswith(ops)}
    assert ("cpu" in engines) != torch.cuda.is_available(), engines


def test_cpu_table_passes(tmp_path):
    p = run("--device", "cpu", "--json", str(tmp_path / "st.json"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "0 failed" in p.stdout
    rec = json.loads((tmp_path / "st.json").read_text())
    assert rec["status"] == "passed" and rec["sizes"] == "small"
    engines = {r["engine"] for r in rec["rows"]}
    assert engines == {"cpu", "blas fp32", "blas 3xtf32", "blas 3xbf16"}
    assert {r["op"] for r in rec["rows"]} == {"empirical_denoiser", "nn_search"}
    assert all(r["status"] == "pass" for r in rec["rows"] if r["engine"] != "blas 3xbf16")
    assert all(r["status"] == "info" for r in rec["rows"] if r["engine"] == "blas 3xbf16")


FAULTY = """
import sys, torch
from diffrepro import selftest
from diffrepro.cli import main
selftest.SIGMAS = (1.0,)
real = selftest._blas_denoiser
def faulty(product):
    fn = real(product)
    def run(x, y, sigma):
        out, idx = fn(x, y, sigma)
        return out + 1e-3, idx  # an engine off by 1e-3
    return run
selftest._blas_denoiser = faulty
real_engines = selftest._engines
def engines(device):  # two engines suffice here (keeps the test short)
    den, srch, info = real_engines(device)
    keep = ("cpu", "blas fp32")
    return {k: den[k] for k in keep}, {k: srch[k] for k in keep}, info
selftest._engines = engines
sys.exit(main(["selftest"] + sys.argv[1:]))
"""


def test_a_wrong_engine_fails_the_table():
    p = run("--device", "cpu", code=FAULTY)
    assert p.returncode == 1, p.stdout + p.stderr
    fails = [line for line in p.stdout.splitlines() if line.rstrip().endswith("FAIL")]
    assert fails and all("blas fp32" in f for f in fails)
    assert "empirical_denoiser  cpu" in p.stdout and " failed" in p.stdout.splitlines()[-1]


def test_bad_arguments():
    p = run("--device", "tpu")
    assert p.returncode == 2 and "invalid choice: 'tpu'" in p.stderr
