# SPDX-License-Identifier: Apache-2.0
"""Dense float64 oracles (small sizes only): tests, benchmarks and debugging compare against
these. They are written the plain way on purpose: elementwise differences, no GEMM tricks."""
from __future__ import annotations

import torch


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t)
    t = t.reshape(t.shape[0], -1)
    return t.double() / 127.5 - 1 if t.dtype == torch.uint8 else t.double()


def _plus_log_weights(logits: torch.Tensor, log_weights) -> torch.Tensor:
    if log_weights is None:
        return logits
    return logits + torch.as_tensor(log_weights, dtype=torch.float64).reshape(1, -1)


def empirical_denoiser_reference(x, train, sigma, s=1.0, log_weights=None) -> torch.Tensor:
    """float64 softmax-weighted mean from materialised differences ||x/s - y_i||^2.

    Returns [Q, D] float64. sigma and s: floats or [Q]. log_weights: optional [N] added to the
    logits (-inf: row excluded).
    """
    x = _rows(x)
    y = _rows(train)
    sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
    s = torch.as_tensor(s, dtype=torch.float64).reshape(-1, 1)
    xt = x / s
    d2 = ((xt[:, None, :] - y[None, :, :]) ** 2).sum(-1)  # [Q, N]
    logits = _plus_log_weights(-d2 / (2 * sigma**2), log_weights)
    w = torch.softmax(logits, dim=1)
    return w @ y


def empirical_denoiser_info_reference(x, train, sigma, s=1.0, log_weights=None) -> dict:
    """float64 log-normaliser, n_eff and nearest index/sqdist (lowest index on ties). With
    log_weights the "nearest" row is the one of largest logit (largest weight)."""
    x = _rows(x)
    y = _rows(train)
    sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
    s = torch.as_tensor(s, dtype=torch.float64).reshape(-1, 1)
    d2 = ((x[:, None, :] / s[:, :, None] - y[None, :, :]) ** 2).sum(-1)
    logits = _plus_log_weights(-d2 / (2 * sigma**2), log_weights)
    w = torch.softmax(logits, dim=1)
    key = d2 if log_weights is None else -logits
    nearest = (key == key.min(1).values[:, None]).to(torch.int64).argmax(1)  # first minimum
    return {
        "log_normalizer": torch.logsumexp(logits, 1),
        "n_eff": 1.0 / (w**2).sum(1),
        "nearest_index": nearest,
        "nearest_sqdist": d2.gather(1, nearest[:, None])[:, 0],
    }


def nn_search_reference(queries, refs, k=1, metric="ip"):
    """float64 brute force. Returns (values [Q, k] float64, indices [Q, k]); ties -> lower index."""
    q = _rows(queries)
    r = _rows(refs)
    if metric == "ip":
        scores = q @ r.T
        key = -scores
    else:
        scores = ((q[:, None, :] - r[None, :, :]) ** 2).sum(-1)
        key = scores
    # Stable sort keeps the lower index first among equal keys.
    order = torch.sort(key, dim=1, stable=True).indices[:, :k]
    return scores.gather(1, order), order


def p1_two_pass_denoiser(x, train_batches, sigma) -> torch.Tensor:
    """Paper 1's optimal-denoiser algorithm (``optimal_solver`` in its ``edm/generate.py``),
    re-implemented as a benchmark peer: two float64 passes over the training batches with
    materialised broadcast differences (B_x, B_y, D), a running max in pass 1 and exp-sums in
    pass 2. As there, the rows are decoded in float32 (``u / 127.5 - 1``, then promoted by the
    float64 queries) and the normaliser Z is accumulated in float32."""
    x = torch.as_tensor(x).double().reshape(x.shape[0], -1)
    std = float(sigma)

    def rows(yb):
        yb = torch.as_tensor(yb)
        yb = yb.reshape(yb.shape[0], -1)
        return (yb.float() / 127.5 - 1 if yb.dtype == torch.uint8 else yb.float()).double()

    m = torch.full((x.shape[0],), -float("inf"), dtype=torch.float64)
    for yb in train_batches():
        y = rows(yb)
        d = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
        m = torch.maximum(m, (-d / std**2 / 2).max(1).values)
    z = torch.zeros(x.shape[0], dtype=torch.float32)
    a = torch.zeros_like(x)
    for yb in train_batches():
        y = rows(yb)
        d = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
        p = torch.exp(-d / std**2 / 2 - m[:, None])
        z += p.sum(1).float()
        a += p @ y
    return a / z[:, None].double()
