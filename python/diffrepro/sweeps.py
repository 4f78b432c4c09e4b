# SPDX-License-Identifier: Apache-2.0
"""Sweeps over noise levels: the linearity of a denoiser and its linear distillation, per σ
(Li, Dai, Qu 2024, §3.1: eqs. 8–9 and 11–12, App. A and C).

Both take a denoiser ``D(x, sigma)`` (any object of :mod:`diffrepro.denoisers`) and clean
held-out images, and return plain dicts of numpy arrays; ``diffrepro linearity`` and
``diffrepro distill`` are thin commands over them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import data, metrics
from .denoisers import Denoiser, GaussianDenoiser, LinearDenoiserSet
from .distill import LR_TABLE, distill_linear, noisy_batches
from .schedules import edm_sigmas

__all__ = ["P2_A_VALUES", "distill_sweep", "linearity_sweep", "p2_sigmas"]

#: The five values of a = α² of Li, Dai, Qu's linearity notebook (β² = 1 − a).
P2_A_VALUES = (0.99, 0.8675, 0.745, 0.6225, 0.5)


def _own_indices(n: int, context) -> list[int]:
    """The σ indices this process evaluates: all of them alone, every K-th under K processes."""
    if context is None or context.world_size == 1:
        return list(range(n))
    return list(range(context.rank, n, context.world_size))


def _gathered(own: dict, context, what: str) -> dict:
    """Every process's ``{σ index: result}`` merged, on every process."""
    if context is None or context.world_size == 1:
        return own
    merged = {}
    for part in context.all_gather_object(own, what=what):
        merged.update(part)
    return merged


def p2_sigmas() -> np.ndarray:
    """The ten noise levels of Li, Dai, Qu (the EDM ρ-grid with 10 steps on [0.002, 80])."""
    return edm_sigmas(10, 0.002, 80.0, 7.0).numpy()


def _clean(images, device) -> torch.Tensor:
    """Held-out images as float64 ``[N, C, H, W]`` in [-1, 1] on ``device``."""
    t = images if torch.is_tensor(images) else torch.from_numpy(np.array(images))  # a copy: memmaps are read-only
    t = data.decode(t) if t.dtype == torch.uint8 else t.to(torch.float64)
    return t.to(device)


def linearity_sweep(denoiser: Denoiser, images, sigmas: Sequence[float], *, pairs: int = 100,
                    a_values: Sequence[float] = P2_A_VALUES, inputs: str = "noisy", abs_cos: bool = False,
                    nmse_squared: bool = False, seed: int = 0, device="cpu", progress: bool = True,
                    context=None) -> dict:
    """Linearity scores of ``D(·; σ)`` for every σ (eqs. 11–12).

    Pairs are ``x1 = y_i + σ ε_i`` from ``images[0:P]`` and ``x2 = y_{P+i} + σ ε'_i`` from
    ``images[P:2P]``; the noise is drawn once on the CPU (``seed``) and reused across σ (the
    notebook's "noisy images" variant). ``inputs="pure"`` uses ``σ ε`` with fresh noise per σ.

    Args:
        denoiser: ``D(x, sigma)``.
        images: ``[>= 2P, C, H, W]`` uint8 or float in [-1, 1].
        sigmas: noise levels.
        pairs: P.
        a_values: values of a = α².
        inputs: ``"noisy"`` or ``"pure"``.
        abs_cos: take |cos| (one reading of the paper; its code has no abs).
        nmse_squared: square the relative L2 error (the paper's wording; its code does not).
        seed: seed of the CPU noise generator.
        device: where the inputs live.
        progress: show a progress bar over σ.
        context: a :class:`diffrepro.distributed.Context` of several processes: process r evaluates
            the σ of indices r, r + K, ... and every process returns the whole result (identical
            to one process's: every σ is an independent computation on the same noise).

    Returns:
        ``{"sigma" [S], "a" [A], "alpha", "beta", "cos" [S, A], "nmse" [S, A], "main_a",
        "cos_main" [S], "nmse_main" [S], "pairs", "inputs"}``; ``main_a`` is the a closest to 0.5.
    """
    if inputs not in ("noisy", "pure"):
        raise ValueError(f"inputs must be 'noisy' or 'pure', got {inputs!r}")
    if pairs < 1:
        raise ValueError(f"pairs must be >= 1, got {pairs}")
    y = _clean(images, device)
    if len(y) < 2 * pairs:
        raise ValueError(f"images: {pairs} pairs need {2 * pairs} images, got {len(y)}")
    y = y[:2 * pairs]
    sigmas = np.asarray(sigmas, dtype=np.float64)
    a_values = np.asarray(a_values, dtype=np.float64)
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn((2, *y.shape), generator=gen, dtype=torch.float64).to(device)
    mine = _own_indices(len(sigmas), context)
    scores = {}
    for i, sigma in enumerate(tqdm(sigmas, desc="linearity", unit="σ", disable=not progress)):
        if inputs == "pure":  # drawn on every process, so each σ sees the noise of one process
            eps = torch.randn((2, *y.shape), generator=gen, dtype=torch.float64).to(device)
            x1, x2 = sigma * eps[0, :pairs], sigma * eps[1, pairs:]
        else:
            x1, x2 = y[:pairs] + sigma * eps[0, :pairs], y[pairs:] + sigma * eps[1, pairs:]
        if i in mine:
            res = metrics.linearity_score(lambda x, s=float(sigma): denoiser(x, s), x1, x2, a_values=a_values,
                                          abs_cos=abs_cos, nmse_squared=nmse_squared)
            scores[i] = (res["cos"], res["nmse"])
    scores = _gathered(scores, context, "linearity scores")
    cos = np.stack([scores[i][0] for i in range(len(sigmas))])
    nmse = np.stack([scores[i][1] for i in range(len(sigmas))])
    main = int(np.argmin(np.abs(a_values - 0.5)))
    return {"sigma": sigmas, "a": a_values, "alpha": np.sqrt(a_values), "beta": np.sqrt(1 - a_values),
            "cos": cos, "nmse": nmse, "main_a": float(a_values[main]), "cos_main": cos[:, main],
            "nmse_main": nmse[:, main], "pairs": pairs, "inputs": inputs, "abs_cos": abs_cos,
            "nmse_squared": nmse_squared, "seed": seed}


def distill_sweep(teacher: Denoiser, images, sigmas: Sequence[float], *, reference: GaussianDenoiser,
                  M: int | None = None, mode: str = "lstsq", ridge: float = 0.0, epochs: int = 100,
                  lr: float | None = None, batch_size: int = 256, seed: int = 0, device="cpu",
                  progress: bool = True, context=None) -> tuple[LinearDenoiserSet, dict]:
    """Linear distillation of ``teacher`` at every σ (eqs. 8–9), compared with the Wiener
    weights of ``reference``.

    Args:
        teacher: ``D(x, sigma)``.
        images: clean held-out images ``[N, C, H, W]``, uint8 or float in [-1, 1]; the inputs are
            ``x = y + σ ε`` (:func:`diffrepro.distill.noisy_batches`).
        sigmas: noise levels.
        reference: the Gaussian denoiser whose Wiener weights the fits are compared with.
        M: inputs per σ for least squares (default 20·d; needs M > d + 1).
        mode: ``"lstsq"`` (closed form) or ``"adam"`` (the paper's optimiser).
        ridge: least-squares ridge penalty.
        epochs: Adam passes over the images.
        lr: Adam learning rate (default: the paper's table, which covers only its ten σ).
        batch_size: inputs per batch.
        seed: seed of the noise generator.
        device: where the inputs live.
        progress: show a progress bar over σ.
        context: a :class:`diffrepro.distributed.Context` of several processes: process r fits the σ
            of indices r, r + K, ... and every process returns the whole result (identical to one
            process's: each σ is fitted on its own noise stream, seeded by ``seed``).

    Returns:
        ``(models, result)``: the fitted :class:`LinearDenoiserSet` and ``{"sigma" [S],
        "weight_nmse" [S] (‖W_L − W_G‖²_F / ‖W_G‖²_F), "weight_rel_fro" [S] (the same, not
        squared), "bias_rel_err" [S], "M", "mode", "ridge"}``.
    """
    if mode not in ("lstsq", "adam"):
        raise ValueError(f"mode must be 'lstsq' or 'adam', got {mode!r}")
    y = _clean(images, device)
    d = y[0].numel()
    M = 20 * d if M is None else int(M)
    if mode == "lstsq" and M <= d + 1:
        raise ValueError(f"M: least squares needs M > d + 1 = {d + 1} inputs, got {M}")
    sigmas = np.asarray(sigmas, dtype=np.float64)
    if mode == "adam" and lr is None:
        unknown = [s for s in sigmas if round(float(s), 4) not in LR_TABLE]
        if unknown:
            raise ValueError(f"lr: required for sigma={unknown[0]:g}, which is not one of the paper's levels "
                             f"{sorted(LR_TABLE)}")

    def target(x, sigma):
        return teacher(x.to(device=device, dtype=torch.float64), sigma)

    fits = {}
    mine = _own_indices(len(sigmas), context)
    for i in tqdm(mine, desc=f"distill ({mode})", unit="σ", disable=not progress):
        sigma = float(sigmas[i])
        if mode == "lstsq":
            batches = noisy_batches(y, sigma, batch_size=batch_size, epochs=-(-M // len(y)), seed=seed,
                                    device=device)
            model = distill_linear(target, batches, sigma, M=M, ridge=ridge, mode="lstsq")
        else:
            batches = noisy_batches(y, sigma, batch_size=batch_size, epochs=epochs, seed=seed, device=device)
            model = distill_linear(target, batches, sigma, mode="adam",
                                   lr=lr if lr is not None else LR_TABLE[round(sigma, 4)])
        wiener = reference.linear(sigma)
        b_ref = wiener.b.to(model.b)
        fits[i] = (model, metrics.weight_nmse(model.W, wiener.W, squared=True)["nmse"],
                   metrics.weight_nmse(model.W, wiener.W, squared=False)["nmse"],
                   float(torch.linalg.norm(model.b - b_ref) / torch.linalg.norm(b_ref).clamp_min(1e-300)))
    fits = _gathered(fits, context, "distilled models")
    models, nmse, rel, bias = (list(column) for column in zip(*(fits[i] for i in range(len(sigmas)))))
    result = {"sigma": sigmas, "weight_nmse": np.array(nmse), "weight_rel_fro": np.array(rel),
              "bias_rel_err": np.array(bias), "M": M if mode == "lstsq" else models[0].M, "mode": mode,
              "ridge": ridge, "seed": seed}
    return LinearDenoiserSet(models), result
