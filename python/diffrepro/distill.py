# SPDX-License-Identifier: Apache-2.0
"""Linear distillation of a denoiser at one noise level (Li, Dai, Qu 2024, §3.1 eqs. 8–9, App. C).

``min_{W,b} E_x ‖W x + b − D(x; σ)‖²`` over inputs ``x = y + σ ε``. The default solves it in
closed form from float64 sufficient statistics; ``mode="adam"`` reproduces P2's optimiser
(``train_linear_model.py``) for its convergence curves (Fig. 4).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from .data import decode
from .denoisers import LinearDenoiser

__all__ = ["LR_TABLE", "distill_linear", "noisy_batches"]

#: P2's Adam learning rate per σ (FFHQ EDM-VP), keyed by ``round(σ, 4)`` as the reference folders are.
LR_TABLE = {80.0: 5e-5, 42.4152: 5e-5, 21.1087: 5e-5, 9.7232: 5e-5, 4.0661: 5e-5,
            1.5017: 5e-4, 0.47: 5e-4, 0.1166: 5e-3, 0.0204: 5e-2, 0.002: 5e-2}

Teacher = Callable[[torch.Tensor, float], torch.Tensor]


def noisy_batches(y: np.ndarray | torch.Tensor, sigma: float, *, batch_size: int = 256, epochs: int = 1,
                  seed: int = 0, device: str | torch.device = "cpu") -> Iterator[torch.Tensor]:
    """Inputs ``x = y + σ ε`` in P2's order: per epoch the rows of y in order (``shuffle=False``,
    the last batch partial), fresh noise per batch from one generator seeded once.

    Args:
        y: clean held-out images [N, ...], uint8 (decoded ``u/127.5 − 1``) or float in [-1, 1].
        sigma: noise standard deviation.
        batch_size: rows per batch.
        epochs: passes over y.
        seed: seed of the noise generator.
        device: device of the yielded batches.

    Yields:
        float32 [B, ...] noisy inputs.
    """
    if batch_size < 1 or epochs < 0:
        raise ValueError(f"batch_size must be >= 1 and epochs >= 0, got {batch_size} and {epochs}")
    y = torch.as_tensor(y)
    gen = torch.Generator(device=device).manual_seed(seed)
    for _ in range(epochs):
        for start in range(0, len(y), batch_size):
            yb = y[start:start + batch_size].to(device)
            yb = decode(yb, torch.float32) if yb.dtype == torch.uint8 else yb.float()
            yield yb + sigma * torch.randn(yb.shape, generator=gen, device=device)


def _batches(inputs, M: int | None, batch_size: int) -> Iterator[torch.Tensor]:
    """Input batches from a callable ``n -> x``, one array of all inputs, or an iterable of batches,
    stopping after M rows when M is given."""
    if callable(inputs):
        if M is None:
            raise ValueError("M must be given when inputs is a callable n -> x batch")
        done = 0
        while done < M:
            x = torch.as_tensor(inputs(min(batch_size, M - done)))
            if len(x) == 0:
                raise ValueError("inputs(n) returned an empty batch")
            yield x[:M - done]
            done += len(x[:M - done])
        return
    if isinstance(inputs, (np.ndarray, torch.Tensor)):
        rows = inputs
        inputs = (rows[s:s + batch_size] for s in range(0, len(rows), batch_size))
    done = 0
    for x in inputs:
        if M is not None and done >= M:
            return
        x = torch.as_tensor(x)
        x = x if M is None else x[:M - done]
        yield x
        done += len(x)


def _targets(teacher: Teacher, x: torch.Tensor, sigma: float) -> torch.Tensor:
    with torch.no_grad():
        t = torch.as_tensor(teacher(x, sigma))
    if t.shape != x.shape:
        raise ValueError(f"teacher(x, sigma) must return x's shape {tuple(x.shape)}, got {tuple(t.shape)}")
    return t.reshape(len(t), -1)


def distill_linear(teacher: Teacher, inputs: Callable[[int], torch.Tensor] | Iterable | torch.Tensor | np.ndarray,
                   sigma: float, *, M: int | None = None, ridge: float = 0.0, mode: str = "lstsq",
                   batch_size: int = 256, lr: float | None = None,
                   callback: Callable[[int, LinearDenoiser, float], None] | None = None,
                   callback_every: int = 1) -> LinearDenoiser:
    """Best affine approximation ``D_L(x) = W x + b`` of ``teacher(·, σ)`` on the given inputs.

    ``mode="lstsq"`` (default) accumulates float64 sums of the inputs and targets, shifted by
    the first batch's means to limit cancellation, with chunked GEMMs, and solves
    ``W (C_xx + ridge·I) = C_Dx``, ``b = D̄ − W x̄`` by Cholesky. This is the normal-equation
    solution ``[W b] = R G⁻¹`` with ``G = Σ x̂x̂ᵀ``, ``R = Σ D(x) x̂ᵀ``, ``x̂ = [x; 1]``, after
    eliminating the bias. It needs M > d + 1 pairs (M >= 20 d recommended). For the exact
    posterior mean of a distribution q on inputs ``y + σε, y ~ q`` the solution is q's Wiener
    filter ``Σ_q(Σ_q + σ²I)⁻¹`` (P2 Thm 1).

    ``mode="adam"`` is P2's procedure: ``nn.Linear(d, d)`` with zero-initialised W_p and b, the
    forward pass ``W_p (x/√d) + b`` (so ``W = W_p/√d``), ``nn.MSELoss``, Adam with PyTorch
    defaults, one step per input batch; pass ``noisy_batches(y, σ, epochs=100)`` as inputs to
    reproduce the reference schedule. It need not reach the least-squares optimum.

    Args:
        teacher: ``D(x, sigma)`` mapping x [B, ...] to [B, ...]; called under ``torch.no_grad``.
        inputs: noisy inputs: a callable ``n -> x [n, ...]`` (needs M), an array/tensor
            [M, ...] of all inputs, or an iterable of batches (e.g. :func:`noisy_batches`).
        sigma: noise level passed to the teacher.
        M: number of pairs to use (default: all of ``inputs``).
        ridge: ``lstsq`` only: penalty ``ridge·‖W‖_F²`` added to the mean squared error.
        mode: ``"lstsq"`` or ``"adam"``.
        batch_size: rows per teacher call when ``inputs`` is a callable or one array.
        lr: ``adam`` learning rate; default ``LR_TABLE[round(sigma, 4)]``.
        callback: ``adam`` only: called as ``callback(step, model, loss)`` every
            ``callback_every`` steps, with the current :class:`LinearDenoiser` and the mean
            training loss over those steps (e.g. once per epoch for P2's Fig. 4 curves).
        callback_every: steps between callbacks.

    Returns:
        :class:`~diffrepro.denoisers.LinearDenoiser` with float64 ``W`` [d, d] (effective
        weight) and ``b`` [d] on the inputs' device, ``sigma``, ``mode`` and ``M`` (pairs used).
        Its image shape is the inputs' [C, H, W] (flat inputs: inferred from d).

    Raises:
        ValueError: for an unknown mode, too few pairs (M <= d + 1), singular input covariance
            (use ``ridge > 0``), a σ missing from ``LR_TABLE`` without ``lr``, or a teacher
            output of the wrong shape.
    """
    if mode not in ("lstsq", "adam"):
        raise ValueError(f"mode must be 'lstsq' or 'adam', got {mode!r}")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches = _batches(inputs, M, batch_size)
    if mode == "lstsq":
        return _lstsq(teacher, batches, float(sigma), M, ridge)
    if lr is None:
        if round(float(sigma), 4) not in LR_TABLE:
            raise ValueError(f"lr must be given for sigma={sigma}: not in LR_TABLE {sorted(LR_TABLE)}")
        lr = LR_TABLE[round(float(sigma), 4)]
    return _adam(teacher, batches, float(sigma), lr, callback, callback_every)


def _linear(w: torch.Tensor, b: torch.Tensor, sigma: float, mode: str, m: int, x: torch.Tensor) -> LinearDenoiser:
    shape = tuple(x.shape[1:]) if x.ndim == 4 else None
    return LinearDenoiser(w, b, sigma, shape=shape, mode=mode, M=m, device=w.device)


def _lstsq(teacher: Teacher, batches: Iterator[torch.Tensor], sigma: float, M: int | None,
           ridge: float) -> LinearDenoiser:
    m = 0
    for x in batches:
        t = _targets(teacher, x, sigma).to(torch.float64)
        xf = x.reshape(len(x), -1).to(torch.float64)
        if m == 0:
            d = xf.shape[1]
            if M is not None and M <= d + 1:
                raise ValueError(f"M must be > d + 1 = {d + 1} for a unique least-squares fit, got M={M}")
            shift_x, shift_t = xf.mean(0), t.mean(0)
            s_xx = torch.zeros(d, d, dtype=torch.float64, device=xf.device)
            s_tx = torch.zeros(d, d, dtype=torch.float64, device=xf.device)
            s_x = torch.zeros(d, dtype=torch.float64, device=xf.device)
            s_t = torch.zeros(d, dtype=torch.float64, device=xf.device)
        xc, tc = xf - shift_x, t - shift_t
        s_xx.addmm_(xc.T, xc)
        s_tx.addmm_(tc.T, xc)
        s_x += xc.sum(0)
        s_t += tc.sum(0)
        m += len(x)
    if m == 0 or m <= d + 1:
        raise ValueError(f"M must be > d + 1 for a unique least-squares fit, got M={m} pairs"
                         + (f" with d={d}" if m else ""))
    mean_x, mean_t = s_x / m, s_t / m
    c_xx = s_xx / m - torch.outer(mean_x, mean_x)
    c_tx = s_tx / m - torch.outer(mean_t, mean_x)
    c_xx.diagonal().add_(ridge)
    chol, info = torch.linalg.cholesky_ex(c_xx)
    if info.item() != 0:
        raise ValueError(f"the input covariance is singular (Cholesky failed at column {info.item()}) "
                         f"with M={m}, d={d}, ridge={ridge}; use more pairs or ridge > 0")
    w = torch.cholesky_solve(c_tx.T.contiguous(), chol).T   # W C_xx = C_tx, C_xx symmetric
    b = (shift_t + mean_t) - w @ (shift_x + mean_x)
    return _linear(w.contiguous(), b, sigma, "lstsq", m, x)


def _adam(teacher: Teacher, batches: Iterator[torch.Tensor], sigma: float, lr: float,
          callback: Callable[[int, LinearDenoiser, float], None] | None, callback_every: int) -> LinearDenoiser:
    model = opt = None
    losses, m = [], 0
    for step, x in enumerate(batches, start=1):
        t = _targets(teacher, x, sigma).to(torch.float32)
        xf = x.reshape(len(x), -1).to(torch.float32)
        if model is None:
            d = xf.shape[1]
            model = torch.nn.Linear(d, d, device=xf.device)
            torch.nn.init.zeros_(model.weight)
            torch.nn.init.zeros_(model.bias)
            opt = torch.optim.Adam(model.parameters(), lr=lr)
            scale = 1.0 / math.sqrt(d)
        loss = torch.nn.functional.mse_loss(model(xf * scale), t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        m += len(x)
        if callback is not None and step % callback_every == 0:
            callback(step, _adam_model(model, scale, sigma, m, x), torch.stack(losses).mean().item())
            losses.clear()
    if model is None:
        raise ValueError("inputs yielded no batches")
    return _adam_model(model, scale, sigma, m, x)


def _adam_model(model: torch.nn.Linear, scale: float, sigma: float, m: int, x: torch.Tensor) -> LinearDenoiser:
    w = model.weight.detach().to(torch.float64) * scale   # effective weight W_p / √d
    return _linear(w, model.bias.detach().to(torch.float64).clone(), sigma, "adam", m, x)
