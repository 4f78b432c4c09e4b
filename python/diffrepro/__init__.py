# SPDX-License-Identifier: Apache-2.0
"""diffrepro: empirical optimal denoisers, theoretical generations and SSCD reproducibility
scores for research on memorisation and generalisation in diffusion models."""
from ._backend import BackendUnavailableError, build_info
from .ops import (
    DenoiserState,
    TopKState,
    empirical_denoiser,
    empirical_denoiser_partial,
    finalize,
    merge_states,
    merge_topk,
    nn_search,
    nn_search_partial,
)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "DenoiserState",
    "TopKState",
    "build_info",
    "empirical_denoiser",
    "empirical_denoiser_partial",
    "finalize",
    "merge_states",
    "merge_topk",
    "nn_search",
    "nn_search_partial",
    "__version__",
]
