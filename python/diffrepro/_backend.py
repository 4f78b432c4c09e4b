# SPDX-License-Identifier: Apache-2.0
"""Loads the compiled modules: ``_cpu`` eagerly (fatal if missing), ``_cuda`` lazily on first use.

The CPU module links scipy-openblas32. OpenBLAS picks its kernels (its "core") once, when the
library is loaded, from ``OPENBLAS_CORETYPE`` if set. That variable is often set for *other*
libraries (e.g. ``OPENBLAS_CORETYPE=Haswell`` for numpy); diffrepro loads its private BLAS with
its own choice and restores the variable at once, so nothing else in the process changes:

* ``DIFFREPRO_OPENBLAS_CORETYPE`` (e.g. ``Haswell``, ``SkylakeX``) if the user sets it;
* ``SkylakeX`` when the CPU reports AVX-512 F/BW/DQ/VL (the fastest sgemm kernels here);
* otherwise OpenBLAS's own detection.
"""
from __future__ import annotations

import ctypes
import glob
import importlib
import importlib.util
import os
import sys

from . import _engine

__all__ = ["BackendUnavailableError", "cpu", "cuda_module", "emu_module", "build_info", "blas_coretype_choice"]


class BackendUnavailableError(RuntimeError):
    """Raised when an op needs a compiled backend (e.g. CUDA) that this build cannot provide."""


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def blas_coretype_choice() -> str | None:
    """The OpenBLAS core diffrepro asks for (None: let OpenBLAS detect the CPU)."""
    override = os.environ.get("DIFFREPRO_OPENBLAS_CORETYPE")
    if override:
        return override
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= _cpu_flags():
        return "SkylakeX"
    return None


def _preload_openblas() -> str:
    # Locate the package without importing it: its __init__ loads the library at once, before
    # diffrepro could choose the core. (If the process already imported it, its choice stands;
    # build_info() reports the core actually in use.)
    spec = importlib.util.find_spec("scipy_openblas32")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("diffrepro needs the scipy-openblas32 package (pip install scipy-openblas32)")
    libdir = os.path.join(list(spec.submodule_search_locations)[0], "lib")
    candidates = sorted(glob.glob(os.path.join(libdir, "libscipy_openblas*")))
    if not candidates:
        raise ImportError(f"diffrepro: no libscipy_openblas in {libdir}")
    choice = blas_coretype_choice()
    saved = os.environ.get("OPENBLAS_CORETYPE")
    try:
        if choice is None:
            os.environ.pop("OPENBLAS_CORETYPE", None)
        else:
            os.environ["OPENBLAS_CORETYPE"] = choice
        ctypes.CDLL(candidates[0], mode=ctypes.RTLD_GLOBAL)
    finally:
        if saved is None:
            os.environ.pop("OPENBLAS_CORETYPE", None)
        else:
            os.environ["OPENBLAS_CORETYPE"] = saved
    return candidates[0]


_OPENBLAS_PATH = _preload_openblas()
try:
    from . import _cpu as cpu  # noqa: E402
except ImportError as exc:  # pragma: no cover - broken install
    here = os.path.dirname(os.path.abspath(__file__))
    raise ImportError(
        f"diffrepro: cannot import the compiled CPU module diffrepro._cpu from {here}: {exc}. "
        "Reinstall with `pip install .` (see README)."
    ) from exc

_cuda_cache: dict[str, object] = {}


def _load_cuda():
    if "module" in _cuda_cache or "error" in _cuda_cache:
        return
    if importlib.util.find_spec(f"{__package__}._cuda") is None:
        _cuda_cache["error"] = "not built: diffrepro was compiled without a CUDA compiler (DIFFREPRO_CUDA)"
        return
    try:
        _cuda_cache["module"] = importlib.import_module(f"{__package__}._cuda")
    except Exception as exc:  # built but failed to load: keep the real reason
        _cuda_cache["error"] = f"built but failed to load: {type(exc).__name__}: {exc}"


def cuda_module():
    """Returns diffrepro._cuda or raises BackendUnavailableError with build_info()."""
    _load_cuda()
    if "module" not in _cuda_cache:
        raise BackendUnavailableError(
            f"a CUDA tensor was passed, but the CUDA backend is unavailable "
            f"({_cuda_cache['error']}); build_info() = {build_info()}"
        )
    return _cuda_cache["module"]


def emu_module():
    """Returns diffrepro._cuda_emu (the CUDA kernels run by the host-thread emulator; tests only)
    or raises BackendUnavailableError."""
    if importlib.util.find_spec(f"{__package__}._cuda_emu") is None:
        raise BackendUnavailableError(
            "the CUDA emulator is not built: configure with DIFFREPRO_CUDA_EMULATOR=ON (tests only)"
        )
    return importlib.import_module(f"{__package__}._cuda_emu")


def build_info() -> dict:
    """What was built and loaded, and which CPU path runs. Never raises."""
    _load_cuda()
    info = {
        "version": cpu.version,
        "cpu_isa": cpu.cpu_isa(),
        "gemm_engine": f"scipy-openblas32 ({cpu.gemm_core()} core); nn_search: {cpu.search_kernel()}",
        "openblas_path": _OPENBLAS_PATH,
        "openblas_coretype_requested": blas_coretype_choice(),
        "threads": "std::thread workers (DIFFREPRO_NUM_THREADS, default os.cpu_count())",
        "cuda_built": importlib.util.find_spec(f"{__package__}._cuda") is not None,
        "cuda_loaded": "module" in _cuda_cache,
        "cuda_error": _cuda_cache.get("error"),
        "cuda_runtime_version": None,
        "cuda_archs": None,
        "cuda_devices": None,
        # GPU engine setting, cached per-shape choices and the engine each op ran last (docs/cuda.md)
        "cuda_engines": _engine.report(),
        "python": sys.version.split()[0],
    }
    module = _cuda_cache.get("module")
    if module is not None:
        try:
            rt = module.runtime_info()
            info["cuda_runtime_version"] = rt.get("runtime_version")
            info["cuda_archs"] = rt.get("archs")
            info["cuda_devices"] = rt.get("device_count")
            if rt.get("error"):
                info["cuda_error"] = rt.get("error")
            if getattr(module, "version", cpu.version) != cpu.version:
                info["cuda_error"] = f"version mismatch: _cuda {module.version} vs _cpu {cpu.version}"
        except Exception as exc:  # pragma: no cover
            info["cuda_error"] = f"runtime_info failed: {exc}"
    return info
