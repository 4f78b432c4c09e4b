# SPDX-License-Identifier: Apache-2.0
"""Denoisers ``D(x, sigma, class_labels=None)`` that behave like EDM networks.

Every denoiser takes ``x`` as a float ``[B, C, H, W]`` tensor of the *unscaled* variable
``x̃ = x/s`` (the EDM convention; the samplers' float64 state) and ``sigma`` as a scalar or a
``[B]`` tensor, and returns the x0-prediction ``D(x̃; σ)`` in ``x``'s dtype and device. Like
EDM networks they carry ``img_channels``, ``img_resolution``, ``label_dim``, ``sigma_min``,
``sigma_max`` and ``round_sigma``. For other families (VP, VE, DDPM) use the methods
``x0``/``eps``/``score``, which take the scaled state ``x = s·x̃`` and the signal scale ``s``
(Karras et al. 2022, eq. 4): ``eps = (x − s·D(x/s;σ))/(s·σ)`` and ``score = (s·D(x/s;σ) − x)/(s²σ²)``.

- :mod:`.empirical`: the empirical (multi-delta) optimal denoiser, a softmax-weighted mean of the
  training images (Zhang et al. 2024; Li, Dai, Qu 2024, eq. 5).
- :mod:`.gaussian`: the Gaussian (Wiener) denoiser of the training mean and covariance, with
  closed-form trajectories (Li, Dai, Qu 2024, eq. 6).
- :mod:`.linear`: affine denoisers per σ (linear distillation).
- :mod:`.local`: local (patch) denoisers: PSPC patch sets, LS/ELS machines, PCA locality.
- :mod:`.guidance`: classifier-free guidance and per-class models (Ho & Salimans 2022).
- :mod:`.jacobian`: exact Jacobian products of the empirical denoiser (``jvp``/``vjp``).
- :mod:`.adapters`: callables, diffusers models and EDM pickles behind the same interface.
"""

from .adapters import CallableDenoiser, DiffusersDenoiser, as_denoiser, load_edm_pickle
from .base import Denoiser, TimedDenoiser, wiener_gain
from .empirical import EmpiricalDenoiser
from .gaussian import GaussianDenoiser, gaussian_statistics
from .guidance import ClassConditionalDenoiser, GuidedDenoiser, guidance_commitment
from .linear import LinearDenoiser, LinearDenoiserSet
from .local import FlexPatchSetDenoiser, LocalScoreDenoiser, PatchSetDenoiser, PCALocalityDenoiser, StepSchedule

__all__ = [
    "CallableDenoiser",
    "ClassConditionalDenoiser",
    "Denoiser",
    "DiffusersDenoiser",
    "EmpiricalDenoiser",
    "FlexPatchSetDenoiser",
    "GaussianDenoiser",
    "GuidedDenoiser",
    "LinearDenoiser",
    "LinearDenoiserSet",
    "LocalScoreDenoiser",
    "PCALocalityDenoiser",
    "PatchSetDenoiser",
    "StepSchedule",
    "TimedDenoiser",
    "as_denoiser",
    "gaussian_statistics",
    "guidance_commitment",
    "load_edm_pickle",
    "wiener_gain",
]
