# SPDX-License-Identifier: Apache-2.0
"""Which GPU engine runs an op: the fused kernels or the BLAS engine (see docs/cuda.md).

Each op has two CUDA engines that compute the same quantities under the same tolerance rule:

* ``fused``: diffrepro's own tile kernels (products, online softmax / top-k in one pass);
* ``blas``: the products on cuBLAS through ``torch.matmul`` in row chunks, with the float64
  online-softmax merge, nearest row and top-k merge around them (:mod:`diffrepro._blas_engine`).

Neither wins everywhere: at Q = 256, D = 3,072 the products are ~99 % of the work and a tuned GEMM
beats small-tile fused kernels, while at small Q or small D the fused kernels avoid writing a
``Q x chunk`` score matrix. ``DIFFREPRO_CUDA_ENGINE`` chooses:

* ``fused`` or ``blas``: always that engine;
* ``auto`` (the default): at the first call of a *shape class* on a device, both engines run on
  a probe of the call (its first ``probe_rows`` rows, a few milliseconds), the faster one is
  cached in memory for that (device, shape class) and used from then on. The cache lives as long
  as the process; nothing is written to disk.

A shape class rounds Q, N and D up to powers of two (and k for ``nn_search``), so a sampler that
calls the denoiser with the same batch at 18 noise levels measures once. The engine that ran
last for each op is reported by :func:`report` (for ``build_info()`` and run manifests):
results of the two engines differ in the last bits, so a bit-reproducible rerun pins the engine
that the manifest names.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = [
    "ENGINES",
    "ENV_VAR",
    "PRODUCT_ENV_VAR",
    "product_setting",
    "ShapeClass",
    "EngineChooser",
    "engine_override",
    "forced",
    "choose",
    "report",
]

ENGINES = ("fused", "blas")
ENV_VAR = "DIFFREPRO_CUDA_ENGINE"
_CHOICES = ("auto",) + ENGINES
# The BLAS engine's products: fp32 (default) or the opt-in split-precision tensor-core products.
PRODUCT_ENV_VAR = "DIFFREPRO_CUDA_PRODUCT"
_PRODUCTS = ("fp32", "3xtf32", "3xbf16")


def engine_override(env: Mapping[str, str] | None = None) -> str:
    """The engine setting: ``auto`` (unset or empty), ``fused`` or ``blas``.

    Raises:
        ValueError: any other value, named with what was expected.
    """
    env = os.environ if env is None else env
    value = env.get(ENV_VAR, "").strip().lower() or "auto"
    if value not in _CHOICES:
        raise ValueError(f"{ENV_VAR}: got {env.get(ENV_VAR)!r}, expected one of {', '.join(_CHOICES)}")
    return value


def product_setting(env: Mapping[str, str] | None = None) -> str:
    """The BLAS engine's product: ``fp32`` (unset or empty), ``3xtf32`` or ``3xbf16`` (inexact at
    small sigma, see docs/cuda.md).

    Raises:
        ValueError: any other value, named with what was expected.
    """
    env = os.environ if env is None else env
    value = env.get(PRODUCT_ENV_VAR, "").strip().lower() or "fp32"
    if value not in _PRODUCTS:
        raise ValueError(f"{PRODUCT_ENV_VAR}: got {env.get(PRODUCT_ENV_VAR)!r}, expected one of {', '.join(_PRODUCTS)}")
    return value


def _pow2(n: int) -> int:
    """n rounded up to a power of two (0 and 1 stay as they are)."""
    return n if n <= 1 else 1 << math.ceil(math.log2(n))


@dataclass(frozen=True)
class ShapeClass:
    """The key of one cached choice: op, device, dtypes and power-of-two size buckets."""

    op: str          # "empirical_denoiser" or "nn_search"
    device: str      # e.g. "cuda:0 NVIDIA H100 80GB HBM3"
    dtype: str       # query / compute dtype
    rows_dtype: str  # storage type of the training / reference rows
    q: int
    n: int
    d: int
    k: int = 0       # nn_search only
    metric: str = ""

    @classmethod
    def of(cls, op: str, device: str, dtype, rows_dtype, Q: int, N: int, D: int, k: int = 0,
           metric: str = "") -> ShapeClass:
        return cls(op, device, str(dtype), str(rows_dtype), _pow2(Q), _pow2(N), _pow2(D), _pow2(k), metric)

    def __str__(self) -> str:
        extra = f" k<={self.k} {self.metric}" if self.op == "nn_search" else ""
        return (f"{self.op} on {self.device} {self.dtype}/{self.rows_dtype} "
                f"Q<={self.q} N<={self.n} D<={self.d}{extra}")


class EngineChooser:
    """Times the candidate engines once per shape class and remembers the faster one.

    Args:
        timer: seconds as a float (``time.perf_counter``; tests pass a fake clock).
        env: where ``DIFFREPRO_CUDA_ENGINE`` is read (``os.environ``).
        repeats: timed calls per engine (the minimum counts) after one untimed warm-up call,
            which absorbs allocation and first-launch costs.
    """

    def __init__(self, timer: Callable[[], float] = time.perf_counter, env: Mapping[str, str] | None = None,
                 repeats: int = 2):
        self._timer = timer
        self._env = env
        self._repeats = repeats
        self._lock = threading.Lock()
        self._cache: dict[ShapeClass, str] = {}
        self.timings: dict[ShapeClass, dict[str, float]] = {}
        self.last: dict[str, dict] = {}
        self._forced: str | None = None

    def choose(self, key: ShapeClass, probes: Mapping[str, Callable[[], object]],
               sync: Callable[[], None] = lambda: None) -> str:
        """The engine for ``key``: the forced or configured one, else the cached or measured one.

        Args:
            key: the call's shape class.
            probes: engine name -> a callable running that engine on a probe of the call (only
                called when the choice has to be measured); names from :data:`ENGINES`.
            sync: waits for queued device work (``torch.cuda.synchronize``) so that the timer
                sees finished kernels.
        """
        setting = self._forced or engine_override(self._env)
        if setting != "auto":
            return self._record(key, setting, "forced" if self._forced else f"{ENV_VAR}={setting}")
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None:
            return self._record(key, cached, "auto (cached)")
        unknown = sorted(set(probes) - set(ENGINES))
        if unknown or not probes:
            raise ValueError(f"probes: got engines {sorted(probes)}, expected a non-empty subset of {ENGINES}")
        times = {name: self._time(fn, sync) for name, fn in probes.items()}
        # Fastest wins; an exact tie goes to the first engine of ENGINES (deterministic).
        best = min(times, key=lambda name: (times[name], ENGINES.index(name)))
        with self._lock:
            self._cache.setdefault(key, best)
            self.timings[key] = times
            best = self._cache[key]
        return self._record(key, best, "auto (measured)")

    def _time(self, fn: Callable[[], object], sync: Callable[[], None]) -> float:
        fn()
        sync()
        best = math.inf
        for _ in range(self._repeats):
            t0 = self._timer()
            fn()
            sync()
            best = min(best, self._timer() - t0)
        return best

    def _record(self, key: ShapeClass, engine: str, how: str) -> str:
        self.last[key.op] = {"engine": engine, "how": how, "shape_class": str(key)}
        return engine

    @contextlib.contextmanager
    def forced(self, engine: str):
        """Runs the block with ``engine`` for every op (selftest and bench), whatever the setting."""
        if engine not in ENGINES:
            raise ValueError(f"engine: got {engine!r}, expected one of {', '.join(ENGINES)}")
        saved, self._forced = self._forced, engine
        try:
            yield
        finally:
            self._forced = saved

    def report(self) -> dict:
        """The setting, the cached choices with their probe times, and the engine each op ran last."""
        def read(fn):
            try:
                return fn(self._env)
            except ValueError as exc:
                return f"invalid ({exc})"

        return {
            "setting": read(engine_override),
            "blas_product": read(product_setting),
            "last": dict(self.last),
            "choices": {str(k): {"engine": v, "probe_seconds": self.timings.get(k)} for k, v in self._cache.items()},
        }

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()
            self.timings.clear()
        self.last.clear()


_CHOOSER = EngineChooser()


def choose(key: ShapeClass, probes: Mapping[str, Callable[[], object]], sync: Callable[[], None] = lambda: None) -> str:
    """:meth:`EngineChooser.choose` on the process-wide chooser."""
    return _CHOOSER.choose(key, probes, sync)


def forced(engine: str):
    """:meth:`EngineChooser.forced` on the process-wide chooser."""
    return _CHOOSER.forced(engine)


def report() -> dict:
    """:meth:`EngineChooser.report` on the process-wide chooser."""
    return _CHOOSER.report()
