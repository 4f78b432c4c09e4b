# SPDX-License-Identifier: Apache-2.0
"""Exact Jacobian products of the empirical optimal denoiser, never forming a ``d × d`` matrix.

The empirical denoiser of rows ``y_1..y_N`` is ``D(x̃;σ) = Σ_i w_i y_i`` with
``w = softmax(l)``, ``l_i = −‖x̃ − y_i‖²/(2σ²)`` (Zhang et al. 2024, Thm 1; Li, Dai, Qu 2024,
eq. 5). Since ``∂l_i/∂x̃ = (y_i − x̃)/σ²`` and ``∂w_i/∂x̃ = w_i (y_i − D)/σ²``,

    ∂D/∂x̃ = Σ_i w_i y_i (y_i − D)ᵀ / σ² = Cov_w(y) / σ²,

the weighted covariance of the training rows divided by σ² (the second-order Tweedie identity
``Cov[x0 | x̃] = σ² ∂E[x0 | x̃]/∂x̃``). The Jacobian is symmetric, so the vector–Jacobian and
Jacobian–vector products are the same ``Cov_w(y) v / σ²``.

One pass over the rows in chunks computes, with an online softmax (running maximum ``m``, every
accumulator rescaled by ``exp(m_old − m_new)``), the four sums

    W = Σ e_i,   M = Σ e_i y_i,   B = Σ e_i s_i,   A = Σ e_i s_i y_i,

with ``e_i = exp(l_i − m)`` and ``s_i = (y_i − x̃)·v``; then ``D = M/W`` and

    Cov_w(y) v = A/W − D · B/W

(exact for any shift of ``s``: shifting by ``x̃·v`` keeps the two terms of the difference small).
Per chunk this costs four GEMMs (``x̃ Yᵀ``, ``v Yᵀ``, ``e Y`` and ``(e∘s) Y``) in float64 and
``[Q, chunk]`` memory: the "one extra product pass" over the training set.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .gaussian import _float64_chunks

__all__ = ["empirical_jvp"]

# Logit block size: queries × rows per GEMM block (float64, 8 bytes each: 32 MiB per block array).
_BLOCK_ELEMENTS = 1 << 22


def empirical_jvp(chunks: Iterable, x: torch.Tensor, sigma: torch.Tensor,
                  v: torch.Tensor, log_weights: Iterable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``D(x̃;σ)`` and ``(∂D/∂x̃) v = Cov_w(y) v / σ²`` of the empirical denoiser, in float64.

    Args:
        chunks: iterable of training-row blocks (uint8 pixels decoded as ``u/127.5 − 1``, or
            floats; numpy or torch; ``[n, ...]`` with ``d`` features per row), together the rows
            ``y_1..y_N`` of the softmax.
        x: ``[Q, d]`` unscaled queries ``x̃``.
        sigma: ``[Q]`` noise levels (> 0).
        v: ``[Q, d]`` tangent (or cotangent: the Jacobian is symmetric) vectors.
        log_weights: optional iterable of float64 ``[n]`` per-row log-weights, one per chunk
            (``l_i`` gains ``lw_i``; -inf excludes a row). The formula is unchanged: a constant
            per row does not depend on ``x̃``.

    Returns:
        ``(D [Q, d], Jv [Q, d])`` float64 on x's device.

    Raises:
        ValueError: ``chunks`` holds no rows.
    """
    x, v = x.to(torch.float64), v.to(torch.float64)
    q, d = x.shape
    inv_var = sigma.to(device=x.device, dtype=torch.float64).pow(-2)[:, None]
    m = torch.full((q, 1), -torch.inf, dtype=torch.float64, device=x.device)
    w_sum = torch.zeros(q, 1, dtype=torch.float64, device=x.device)
    b_sum = torch.zeros_like(w_sum)
    m_sum = torch.zeros(q, d, dtype=torch.float64, device=x.device)
    a_sum = torch.zeros_like(m_sum)
    xv = (x * v).sum(1, keepdim=True)
    step = max(1, _BLOCK_ELEMENTS // max(q, 1))
    weights = iter(log_weights) if log_weights is not None else None
    for chunk in chunks:
        lw = None if weights is None else torch.as_tensor(next(weights), dtype=torch.float64).to(x.device)
        start = 0
        for y in _float64_chunks(chunk, x.device, step):
            # l_i + ‖x̃‖²/(2σ²): the dropped term is the same for every row of a query.
            logits = (x @ y.T - 0.5 * (y * y).sum(1)) * inv_var
            if lw is not None:
                logits = logits + lw[start:start + len(y)]
                start += len(y)
            m_new = torch.maximum(m, logits.max(1, keepdim=True).values)
            # exp(m - m_new) is 0 on the first block (m = −inf); a block of rows that are all
            # excluded (log-weight −inf) leaves m_new = −inf, where -inf - (-inf) would be NaN.
            safe = torch.where(m_new == -torch.inf, 0.0, m_new)
            rescale = torch.exp(m - safe)
            e = torch.exp(logits - safe)
            es = e * (v @ y.T - xv)
            w_sum = w_sum * rescale + e.sum(1, keepdim=True)
            b_sum = b_sum * rescale + es.sum(1, keepdim=True)
            m_sum = m_sum * rescale + e @ y
            a_sum = a_sum * rescale + es @ y
            m = m_new
    if not bool(torch.isfinite(m).all()):
        raise ValueError("chunks must hold at least one training row")
    den = m_sum / w_sum
    return den, (a_sum / w_sum - den * (b_sum / w_sum)) * inv_var
