# SPDX-License-Identifier: Apache-2.0
"""build_info() contract and the CUDA module's import without a GPU."""
import importlib
import os

import pytest

import diffrepro


def test_build_info_contract():
    info = diffrepro.build_info()
    for key in ("version", "cuda_built", "cuda_loaded", "cuda_error", "cuda_runtime_version",
                "cuda_archs", "cpu_isa", "gemm_engine"):
        assert key in info
    assert info["version"] == diffrepro.__version__
    assert info["cpu_isa"] in ("avx512", "avx2", "generic")
    assert "scipy-openblas32" in info["gemm_engine"]
    if not info["cuda_loaded"]:
        assert info["cuda_error"]


def test_blas_core_is_chosen_by_diffrepro_not_by_the_environment():
    """OPENBLAS_CORETYPE set for other libraries must not change diffrepro's choice; it is
    restored for them after diffrepro has loaded its private BLAS."""
    import subprocess
    import sys

    code = ("import os, diffrepro; i = diffrepro.build_info(); "
            "print(i['gemm_engine']); print(os.environ.get('OPENBLAS_CORETYPE'))")
    env = dict(os.environ, OPENBLAS_CORETYPE="Prescott")
    env.pop("DIFFREPRO_OPENBLAS_CORETYPE", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split("\n")
    assert "Prescott" not in out[0]
    assert out[1] == "Prescott"
    # The documented override is honoured: OpenBLAS serves the old Prescott request with its
    # baseline (Katmai) kernels, so the core differs from the automatic choice.
    env["DIFFREPRO_OPENBLAS_CORETYPE"] = "Prescott"
    forced = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert forced.split("\n")[0] != out[0]


def test_cuda_module_imports_without_gpu():
    if os.environ.get("DIFFREPRO_EXPECT_CUDA") != "1":
        pytest.skip("set DIFFREPRO_EXPECT_CUDA=1 (CI does) to require the CUDA build")
    info = diffrepro.build_info()
    assert info["cuda_built"], info
    cuda = importlib.import_module("diffrepro._cuda")
    rt = cuda.runtime_info()
    assert isinstance(rt["device_count"], int)
    assert info["cuda_loaded"], info


# ------------------------------------------------------------------------------------------------
# DIFFREPRO_CUDA=AUTO compiles CUDA only where a GPU is visible (configure level: seconds, no build)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cmake():
    import shutil

    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not on PATH")
    return cmake


def _path_without_nvidia_smi(*first: str) -> str:
    """PATH with ``first`` in front and no folder that holds an nvidia-smi: a machine without a GPU."""
    keep = [d for d in os.environ.get("PATH", "").split(os.pathsep)
            if d and not os.path.exists(os.path.join(d, "nvidia-smi"))]
    return os.pathsep.join([*first, *keep])


def _gpu_probe(env) -> str:
    import subprocess

    proc = subprocess.run([_cmake(), "-P", os.path.join(ROOT, "cmake", "gpu_visible.cmake")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def test_gpu_probe_sees_a_gpu_only_where_nvidia_smi_lists_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    assert "gpu_visible=FALSE (nvidia-smi was not found)" in _gpu_probe({**env, "PATH": _path_without_nvidia_smi()})
    # A stand-in for the driver's tool (this machine may have none), printing what nvidia-smi -L prints.
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    for listing, visible in (("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)", "TRUE"),
                             ("No devices were found", "FALSE")):
        fake.write_text(f"#!/bin/sh\necho '{listing}'\n")
        fake.chmod(0o755)
        path = _path_without_nvidia_smi(str(fake.parent))
        assert f"gpu_visible={visible}" in _gpu_probe({**env, "PATH": path})
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100'\n")
    hidden = _gpu_probe({**env, "PATH": path, "CUDA_VISIBLE_DEVICES": "-1"})
    assert "gpu_visible=FALSE (CUDA_VISIBLE_DEVICES='-1' hides every GPU)" in hidden


def test_auto_configure_skips_cuda_without_a_gpu_even_with_nvcc(tmp_path):
    """`pip install .` on a machine without a GPU must not spend minutes compiling CUDA: the default
    DIFFREPRO_CUDA=AUTO configures the CPU module only, even with nvcc on PATH."""
    import subprocess
    import sys

    try:
        import pybind11
    except ImportError:
        pytest.skip("pybind11 (a test extra) is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("DIFFREPRO_CUDA", "CUDA_VISIBLE_DEVICES")}
    env["PATH"] = _path_without_nvidia_smi("/usr/local/cuda/bin")  # nvcc, where the toolkit is installed
    proc = subprocess.run([_cmake(), "-S", ROOT, "-B", str(tmp_path / "build"), "-DDIFFREPRO_CUDA=AUTO",
                           "-DSKBUILD_PROJECT_VERSION=0.0.0", f"-DPython_EXECUTABLE={sys.executable}",
                           f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no GPU visible (nvidia-smi was not found): building the CPU module only" in proc.stdout
    assert "building _cuda" not in proc.stdout
    cache = (tmp_path / "build" / "CMakeCache.txt").read_text()
    assert "CMAKE_CUDA_COMPILER:" not in cache


def test_make_demo_installs_the_plots_extra(tmp_path):
    """`make demo` shows plots: its build installs matplotlib (the plots extra), so the demo does not
    warn that they were skipped (make -n: the commands, nothing run)."""
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("make is not on PATH")
    proc = subprocess.run(["make", "-n", "-B", f"VENV={tmp_path / 'venv'}", "demo"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    installs = [line for line in proc.stdout.splitlines() if "pip install" in line and "$(" not in line]
    assert any(line.rstrip().endswith('".[plots]"') for line in installs), installs
