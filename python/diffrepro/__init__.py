# SPDX-License-Identifier: Apache-2.0
"""diffrepro: empirical optimal denoisers, theoretical generations and SSCD reproducibility
scores for research on memorisation and generalisation in diffusion models.

The kernels are at the top level (``dr.empirical_denoiser``, ``dr.nn_search``, ...); the layers
above them are sub-modules, loaded on first use so that ``import diffrepro`` and the command
line start fast:

- ``dr.denoisers``: empirical, Gaussian and linear denoisers, network adapters;
- ``dr.samplers`` and ``dr.schedules``: deterministic samplers, noise families and time grids;
- ``dr.noise``: per-seed initial noise (EDM's convention), noise banks;
- ``dr.metrics``: RP, MAE, GL, linearity and the other measures;
- ``dr.generation``: theoretical generations written in EDM's layout, resumably;
  ``dr.distributed``: several processes (``torchrun``), parts and sharded training sets for it;
- ``dr.flow``: flow matching (velocity networks as denoisers); ``dr.inverse``: inverse problems;
- ``dr.sweeps``: linearity and linear distillation over noise levels;
- ``dr.sscd``, ``dr.data``, ``dr.plots``, ``dr.distill``, ``dr.reference``, ``dr.benchmarks``.
"""

from __future__ import annotations

import importlib

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("diffrepro")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

_KERNELS = {
    "DenoiserState": "ops", "TopKState": "ops", "empirical_denoiser": "ops",
    "empirical_denoiser_partial": "ops", "finalize": "ops", "merge_states": "ops", "merge_topk": "ops",
    "nn_search": "ops", "nn_search_partial": "ops",
    "BackendUnavailableError": "_backend", "build_info": "_backend",
}
_SUBMODULES = {
    "benchmarks", "data", "denoisers", "distill", "distributed", "errors", "flow", "generation", "inverse",
    "metrics", "noise", "ops", "plots", "reference", "samplers", "schedules", "sscd", "sweeps",
}

__all__ = sorted(_KERNELS) + sorted(_SUBMODULES) + ["__version__"]


def __getattr__(name: str):
    if name in _KERNELS:
        value = getattr(importlib.import_module(f".{_KERNELS[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'diffrepro' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
