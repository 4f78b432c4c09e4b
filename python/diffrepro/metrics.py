# SPDX-License-Identifier: Apache-2.0
"""Reproducibility, memorisation and linearity metrics of P1 (Zhang et al., ICML 2024) and P2 (Li, Dai,
Qu, NeurIPS 2024).

Every function returns a dict. Proportions carry ``count`` (successes), ``n`` (trials) and
``ci95``, the 95% Wilson score interval (Wilson 1927). Thresholds are strict: a similarity
counts when ``> tau``, an MAE when ``< thresh``. Similarities are cosines computed in float64
as ``<a, b> / (|a| |b|)`` (defensive renormalisation: SSCD rows are unit-norm only to ~1e-7);
nearest-neighbour searches run in the diffrepro kernels and the winner's score is then recomputed
exactly in float64. Descriptor rows without a direction (NaN, infinite or all zero) are refused.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import atomic_save_npz, decode
from .data import quantize as _quantize
from .noise import noise_plane, slerp
from .ops import merge_topk, nn_search_partial
from .sscd import Features, load_features

__all__ = [
    "bad_descriptor_rows",
    "gl_nn",
    "gl_sscd",
    "hyperplane_map",
    "linearity_score",
    "mae_score",
    "memorisation_summary",
    "nearest_reference",
    "rp",
    "rp_between",
    "rp_cond",
    "rp_manifold",
    "score_error",
    "similarity_matrix",
    "sv_alignment",
    "weight_nmse",
    "wilson_interval",
]

_Z95 = 1.959963984540054  # two-sided 95% standard-normal quantile
_CANDIDATES = 8  # float32 nearest-row candidates per query, ranked exactly in float64
FeaturesLike = Features | tuple | str | os.PathLike
ArrayLike = np.ndarray | torch.Tensor


# ----------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------
def wilson_interval(k: int, n: int, *, z: float = _Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion.

    ``(p̂ + z²/2n ± z·sqrt(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n)`` with ``p̂ = k/n``.

    Args:
        k: number of successes, ``0 <= k <= n``.
        n: number of trials, ``n >= 1``.
        z: standard-normal quantile (default: 95% two-sided).

    Returns:
        ``(low, high)`` in [0, 1]; exactly 0 at ``k = 0`` and exactly 1 at ``k = n``, where the
        formula's two terms cancel (in floating point they leave ~1e-16).

    Raises:
        ValueError: if ``n < 1`` or ``k`` is outside ``[0, n]``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1 for a proportion, got {n}")
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, n={n}], got {k}")
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n)) / denom
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


def _proportion(name: str, hits: np.ndarray, **extra: Any) -> dict[str, Any]:
    """Dict with ``name`` = mean of the boolean ``hits``, its count, n and Wilson interval."""
    hits = np.asarray(hits, dtype=bool).ravel()
    k, n = int(hits.sum()), hits.size
    return {name: k / n, "count": k, "n": n, "ci95": wilson_interval(k, n), **extra}


def _as_numpy(x: ArrayLike) -> np.ndarray:
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def bad_descriptor_rows(x: np.ndarray) -> tuple[np.ndarray, str]:
    """Rows of ``[N, D]`` descriptors on which a cosine is undefined, and why.

    A row with a NaN or an infinity, or of norm 0 (all zero), has no direction: counting it as
    "not reproduced" or "not memorised" would be a silent wrong result.

    Returns:
        ``(rows int64 [k] ascending, reason of the first)``; ``k = 0`` and ``""`` when all are fine.
    """
    x = np.asarray(x)
    sq = np.einsum("nd,nd->n", x, x, dtype=np.float64)  # float64: no copy, no underflow of float32 rows
    bad = np.flatnonzero(~np.isfinite(sq) | (sq == 0))
    if not len(bad):
        return bad, ""
    row = x[bad[0]]
    why = ("NaN or infinite" if not np.isfinite(row).all() else
           "all zero (norm 0)" if sq[bad[0]] == 0 else "of a norm that overflows float64")
    return bad, why


def _check_descriptors(x: np.ndarray, name: str, ids: np.ndarray | None = None, offset: int = 0) -> None:
    """Raise ValueError naming the first row of ``x`` (global row ``offset + i``) with no direction."""
    bad, why = bad_descriptor_rows(x)
    if len(bad):
        which = f"row {offset + bad[0]}" + (f" (id {ids[bad[0]]})" if ids is not None else "")
        raise ValueError(f"{name}: {which} is {why} ({len(bad)} such rows); expected finite, non-zero descriptors")


def _as_features(x: FeaturesLike, name: str) -> Features:
    """Accept a :class:`Features`, a ``(features, ids)`` pair or a feature-file path."""
    if isinstance(x, (str, os.PathLike)):
        x = load_features(x)
    elif isinstance(x, tuple) and not isinstance(x, Features):
        if len(x) != 2:
            raise ValueError(f"{name} must be Features, (features, ids) or a path, got a tuple of length {len(x)}")
        x = Features(_as_numpy(x[0]), np.asarray(x[1]), {})
    elif not isinstance(x, Features):
        raise TypeError(f"{name} must be Features, (features, ids) or a path, got {type(x).__name__}")
    feats = _as_numpy(x.features)
    if feats.ndim != 2:
        raise ValueError(f"{name}.features must have shape [N, D], got {feats.shape}")
    if x.ids is None:
        raise ValueError(f"{name} has no ids (legacy feature file); pass (features, ids) to pair explicitly")
    ids = np.asarray(x.ids)
    if ids.shape != (len(feats),):
        raise ValueError(f"{name}.ids must have shape [{len(feats)}], got {ids.shape}")
    if len(np.unique(ids)) != len(ids):
        raise ValueError(f"{name}.ids must be unique, got repeated ids")
    _check_descriptors(feats, name, ids)
    return Features(feats, ids, x.meta)


def _missing(have: np.ndarray, want: np.ndarray) -> str:
    miss = np.setdiff1d(want, have)
    shown = ", ".join(map(str, miss[:10])) + (f", ... ({len(miss)} in all)" if len(miss) > 10 else "")
    return f"[{shown}]"


def _pair_by_id(a: Features, b: Features, name_a: str, name_b: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices ``(ia, ib)`` pairing equal ids, and the ids, in ascending id order.

    Raises:
        ValueError: naming the missing ids if the two id sets differ.
    """
    if a.ids.dtype.kind != b.ids.dtype.kind and {a.ids.dtype.kind, b.ids.dtype.kind} != {"i", "u"}:
        raise ValueError(f"{name_a}.ids ({a.ids.dtype}) and {name_b}.ids ({b.ids.dtype}) are of different kinds")
    common, ia, ib = np.intersect1d(a.ids, b.ids, assume_unique=True, return_indices=True)
    if len(common) != len(a.ids) or len(common) != len(b.ids):
        raise ValueError(
            f"{name_a} and {name_b} must hold the same ids: {name_b} lacks {_missing(b.ids, a.ids)}, "
            f"{name_a} lacks {_missing(a.ids, b.ids)}")
    return ia, ib, common


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine ``<a,b>/(|a||b|)`` in float64 over the last axis (broadcasting)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / np.sqrt((a * a).sum(-1) * (b * b).sum(-1))


def _paired_cosine(a: Features, b: Features, name_a: str, name_b: str) -> tuple[np.ndarray, np.ndarray]:
    """Cosine of rows with equal ids; returns ``(sim [S], ids [S])``."""
    if a.features.shape[1] != b.features.shape[1]:
        raise ValueError(f"{name_a} has D={a.features.shape[1]} but {name_b} has D={b.features.shape[1]}")
    ia, ib, ids = _pair_by_id(a, b, name_a, name_b)
    return _cosine(a.features[ia], b.features[ib]), ids


def _shards(refs: Any) -> list[tuple[str, Any]]:
    """Reference rows as ``(name, 2-D-able array)`` pairs: one array, a ``.npy``/``.npz`` path, or a
    list; the name (the file, or ``refs[k]``) is what errors about the rows quote."""
    items = list(refs) if isinstance(refs, (list, tuple)) else [refs]
    out = []
    for k, item in enumerate(items):
        name = f"reference shard {k}" if len(items) > 1 else "reference set"
        if isinstance(item, (str, os.PathLike)):
            path = Path(item)
            name = repr(os.fspath(path))
            item = load_features(path).features if path.suffix == ".npz" else np.load(path, mmap_mode="r")
        elif getattr(item, "filename", None):  # an np.memmap
            name = repr(os.fspath(item.filename))
        out.append((name, item))
    return out


def _local_chunks(named: list, chunk_rows: int):
    """``(name, rows, row within the shard, row within the concatenation)`` of the concatenated shards, at
    most ``chunk_rows`` rows at a time."""
    start = 0
    for name, shard in named:
        for row in range(0, len(shard), chunk_rows):
            yield name, shard[row:row + chunk_rows], row, start + row
        start += len(shard)


def _search_candidates(queries: np.ndarray, named: list, base: int, metric: str, chunk_rows: int) -> np.ndarray:
    """Global indices int64 [Q, k] of the ``_CANDIDATES`` best rows per query among the concatenated
    shards (global row ``base + i`` for row ``i``), -1 for padding.

    The kernel searches each chunk (``nn_search_partial``, float32; ``"ip"`` on L2-normalised
    copies of the rows) and the chunks are merged with ``merge_topk``. Each chunk is checked as it
    streams (cheap next to the search): NaN or infinite rows, and for ``"ip"`` all-zero rows, raise
    ValueError naming the shard and its row (the global row when ``base`` > 0).
    """
    best = None
    for name, chunk, row, g in _local_chunks(named, chunk_rows):
        chunk = chunk.reshape(len(chunk), -1)
        if chunk.shape[1] != queries.shape[1]:
            raise ValueError(f"reference rows have D={chunk.shape[1]}, queries have D={queries.shape[1]}")
        where = row if base == 0 else base + g  # a rank's slice names the global row
        if metric == "ip":
            _check_descriptors(chunk, name, offset=where)
            chunk = _unit_rows(chunk)
        elif chunk.dtype.kind == "f" and not np.isfinite(chunk).all():
            bad = int(np.flatnonzero(~np.isfinite(chunk).all(axis=1))[0])
            raise ValueError(f"{name}: row {where + bad} is NaN or infinite; expected finite values")
        state = nn_search_partial(queries, chunk, _CANDIDATES, metric=metric, row_offset=base + g)
        best = state if best is None else merge_topk(best, state)
    if best is None:
        return np.full((len(queries), _CANDIDATES), -1, dtype=np.int64)
    return np.asarray(best.indices, dtype=np.int64)


def _pick(score: np.ndarray, index: np.ndarray, metric: str) -> np.ndarray:
    """Column of the best of each row of ``[Q, m]`` candidates: the largest score (``"ip"``) or the
    smallest (``"l2"``), ties to the lowest index; index -1 is padding."""
    key = np.where(index < 0, -np.inf, score if metric == "ip" else -score)
    top = key.max(axis=1, keepdims=True)
    return np.where((key == top) & (index >= 0), index, np.iinfo(np.int64).max).argmin(axis=1)


def _exact_best(q64: np.ndarray, cand: np.ndarray, arrays: list, base: int, metric: str):
    """The best of each query's candidates by the exact float64 score, ties to the lowest index.

    Scores: the cosine ``<q, r> / (|q| |r|)`` (``"ip"``) or the Euclidean distance ``|q - r|``
    (``"l2"``) of the float64 query and the candidate row (uint8 rows decoded ``u/127.5 − 1``).
    Each score depends on its query and row only, whatever the batch, chunk or process.

    Returns:
        ``(score float64 [Q], index int64 [Q], |row| float64 [Q])``; index -1 where there was no row.
    """
    q, k = cand.shape
    d = q64.shape[1]
    score, index, norm = np.full(q, np.nan), np.full(q, -1, np.int64), np.full(q, np.nan)
    block = max(1, (1 << 23) // (k * d))  # queries per pass: the [block, k, D] float64 temporaries stay ~64 MB
    for a in range(0, q, block):
        c = cand[a:a + block]
        valid = c >= 0
        if not valid.any():
            continue
        uniq, inv = np.unique(c[valid], return_inverse=True)
        rows = _rows(arrays, uniq - base)
        r = np.broadcast_to(rows[0], c.shape + (d,)).copy()  # padding: any real row (masked by index -1)
        r[valid] = rows[inv]
        x = q64[a:a + block, None, :]
        s = _cosine(x, r) if metric == "ip" else np.sqrt(((x - r) ** 2).sum(-1))
        col = _pick(s, c, metric)
        take = np.arange(len(c))
        score[a:a + block], index[a:a + block] = s[take, col], c[take, col]
        norm[a:a + block] = np.sqrt((r[take, col] ** 2).sum(-1))
    return score, index, norm


def _job(context):
    """``(rank, world size, all_gather(obj) -> list)`` of a :class:`diffrepro.distributed.Context` (or
    anything with its ``rank``, ``world_size`` and ``all_gather_object``), an initialised
    ``torch.distributed`` process group, or None (one process)."""
    if context is None:
        return 0, 1, lambda obj: [obj]
    if hasattr(context, "all_gather_object"):
        return context.rank, context.world_size, lambda obj: context.all_gather_object(obj, "nearest-row merge")
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"context must be None, a diffrepro.distributed.Context or a process group of an "
                         f"initialised torch.distributed, got {type(context).__name__} without torch.distributed")
    rank, world = dist.get_rank(context), dist.get_world_size(context)
    if rank < 0:
        raise ValueError("context: this process is not in the process group; call it on the group's ranks only")

    def gather(obj):
        out = [None] * world
        dist.all_gather_object(out, obj, group=context)
        return out

    return rank, world, gather


def nearest_reference(queries: ArrayLike, refs: Any, *, metric: str = "ip", context=None, row_offset: int = 0,
                      chunk_rows: int = 16384) -> dict[str, Any]:
    """Nearest reference row of each query, exact in float64, in one process or over reference rows
    spread across the ranks of a ``torch.distributed`` job.

    The kernels keep the best ``_CANDIDATES`` (8) rows of each query in float32
    (``nn_search_partial`` streamed ``chunk_rows`` rows at a time, merged with ``merge_topk``);
    the candidates are then ranked by their exact float64 score, the cosine ``<q, r> / (|q| |r|)``
    (``"ip"``: P1's SSCD similarity) or the Euclidean distance ``|q − r|`` (``"l2"``: P2's
    nearest neighbour), ties to the lowest global index. The result therefore does not depend on
    the chunking, the kernel threads or the number of processes: indices and scores are bitwise the
    same for every split (barring 8 rows within float32 rounding of the winner).

    Sharded: with a ``context`` of K ranks each rank passes only its rows, global rows
    ``[row_offset, row_offset + n)`` (e.g. ``lo, hi = diffrepro.distributed.shard_bounds(N, K,
    rank)`` and ``refs[lo:hi]`` of a memory-mapped file: only those rows are read); the ranks'
    slices must tile ``[0, N)``. Each rank ranks its own candidates in float64 and one all-gather
    merges the ranks' winners by the same rule; every rank returns the same result. It is a
    collective: call it on every rank with the same queries (checked).

    Args:
        queries: float ``[Q, D]`` (or ``[Q, C, H, W]``): descriptors (``"ip"``, compared by cosine:
            any norm) or images in [-1, 1] (``"l2"``).
        refs: this rank's ``[n, D]`` or ``[n, C, H, W]`` rows: an array or ``np.memmap``, a ``.npy``
            path (memory-mapped), a ``.npz`` feature file, or a list of these (concatenated in
            order); float32/float16, or uint8 pixels decoded ``u/127.5 − 1`` (``"l2"``).
        metric: ``"ip"`` (largest cosine) or ``"l2"`` (smallest distance).
        context: None (one process), a :class:`diffrepro.distributed.Context` or a process group.
        row_offset: global index of this rank's first row.
        chunk_rows: reference rows per kernel call (bounds host memory for memmaps).

    Returns:
        ``{"index" int64 [Q] (global row), "score" float64 [Q] (cosine or distance), "ref_norm"
        float64 [Q] (|nearest row|), "n_refs"}``.

    Raises:
        ValueError: a bad row (named), slices that do not tile ``[0, N)`` or different queries on
            different ranks, on every rank alike.
        RunError: a rank was lost (named, within the context's timeout).
    """
    if metric not in ("ip", "l2"):
        raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if isinstance(row_offset, bool) or int(row_offset) != row_offset or row_offset < 0:
        raise ValueError(f"row_offset must be a non-negative integer, got {row_offset!r}")
    q64 = np.asarray(_as_numpy(queries), dtype=np.float64)
    q64 = q64.reshape(len(q64), -1)
    if metric == "ip":
        _check_descriptors(q64, "queries")
    elif not np.isfinite(q64).all():
        raise ValueError(f"queries: row {int(np.flatnonzero(~np.isfinite(q64).all(axis=1))[0])} is NaN or infinite")
    _, _, gather = _job(context)
    named = _shards(refs)
    base, n = int(row_offset), sum(len(a) for _, a in named)
    try:  # a bad row on one rank is raised on every rank (none waits for it)
        search = _unit_rows(q64) if metric == "ip" else q64.astype(np.float32)
        cand = _search_candidates(search, named, base, metric, chunk_rows)
        local = _exact_best(q64, cand, [a for _, a in named], base, metric)
    except ValueError as exc:
        local = str(exc)
    digest = hashlib.sha256(np.ascontiguousarray(q64).tobytes()).hexdigest()
    parts = gather({"rows": (base, base + n), "queries": digest, "best": local})
    errors = [p["best"] for p in parts if isinstance(p["best"], str)]
    if errors:
        raise ValueError(errors[0])
    if len({p["queries"] for p in parts}) > 1:
        raise ValueError("queries differ across ranks: every rank must pass the same queries")
    n_refs = _check_tiling([p["rows"] for p in parts])
    if n_refs == 0:
        raise ValueError("the reference set must hold at least one row, got N=0")
    score, index, norm = (np.stack([p["best"][i] for p in parts], axis=1) for i in range(3))
    col, take = _pick(score, index, metric), np.arange(len(q64))
    return {"index": index[take, col], "score": score[take, col], "ref_norm": norm[take, col], "n_refs": n_refs}


def _check_tiling(ranges: list[tuple[int, int]]) -> int:
    """The number of rows N when the ranks' ``[lo, hi)`` slices tile ``[0, N)``; else ValueError."""
    end = 0
    for lo, hi in sorted(r for r in ranges if r[1] > r[0]):
        if lo != end:
            what = f"rows [{end}, {lo}) are in no rank's slice" if lo > end else f"rows [{lo}, {end}) are in two slices"
            raise ValueError(f"row_offset: the ranks' slices {sorted(ranges)} must tile [0, N): {what} (each rank "
                             "passes its own rows and their row_offset)")
        end = hi
    return end


def _decode(rows: np.ndarray) -> np.ndarray:
    """Rows as float64; uint8 images are decoded ``u/127.5 − 1`` (the kernels' convention)."""
    rows = np.asarray(rows)
    return decode(rows) if rows.dtype == np.uint8 else rows.astype(np.float64)


def _rows(shards: list, index: np.ndarray) -> np.ndarray:
    """Global rows ``index`` [Q] of the concatenated shards, flattened and decoded: float64 [Q, D]."""
    starts = np.cumsum([0] + [len(s) for s in shards])
    out = None
    for s, shard in enumerate(shards):
        sel = (index >= starts[s]) & (index < starts[s + 1])
        if sel.any():
            rows = _decode(np.asarray(shard[index[sel] - starts[s]]).reshape(int(sel.sum()), -1))
            out = np.empty((len(index), rows.shape[1])) if out is None else out
            out[sel] = rows
    return out


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """float32 copy of [N, D] rows scaled to unit L2 norm (norms accumulated in float64)."""
    x = np.asarray(x, dtype=np.float32)
    inv = 1.0 / np.sqrt(np.einsum("nd,nd->n", x, x, dtype=np.float64))
    return x * inv.astype(np.float32)[:, None]


# ----------------------------------------------------------------------------------------------
# P1 image-level scores: RP, MAE score, GL (Zhang et al. 2024)
# ----------------------------------------------------------------------------------------------
def rp(a: FeaturesLike, b: FeaturesLike, *, tau: float = 0.6) -> dict[str, Any]:
    """Reproducibility score: fraction of same-seed pairs with SSCD similarity ``> tau``.

    Args:
        a: descriptors of model A's generations (Features, ``(features [S, D], ids [S])`` or a
            feature file); rows are paired with ``b`` by id, not by order.
        b: descriptors of model B's generations, with the same id set.
        tau: threshold (0.6 for CIFAR, 0.4 for ImageNet-64 and Stable Diffusion).

    Returns:
        ``{"rp", "count", "n", "ci95", "tau", "ids" [S], "sim" [S] float64}`` in ascending id order.

    Raises:
        ValueError: if the id sets differ (naming the missing ids) or D differs.
    """
    sim, ids = _paired_cosine(_as_features(a, "a"), _as_features(b, "b"), "a", "b")
    return _proportion("rp", sim > tau, tau=tau, ids=ids, sim=sim)


def _as_uint8_images(x: ArrayLike, name: str) -> np.ndarray:
    arr = _as_numpy(x)
    if arr.dtype != np.uint8:
        raise TypeError(f"{name} must be uint8 quantised images [S, C, H, W], got dtype {arr.dtype}")
    if arr.ndim < 2:
        raise ValueError(f"{name} must have shape [S, ...], got {arr.shape}")
    return arr


def mae_score(q1: ArrayLike, q2: ArrayLike, *, thresh: float = 15.0,
              ids1: Sequence | None = None, ids2: Sequence | None = None) -> dict[str, Any]:
    """MAE score: fraction of pairs whose mean absolute pixel difference on [0, 255] is ``< thresh``.

    Args:
        q1: uint8 [S, C, H, W] quantised generations of model 1.
        q2: uint8 [S, C, H, W] quantised generations of model 2.
        thresh: strict threshold on the per-pair MAE.
        ids1: optional [S] ids of ``q1``; with ``ids2`` the pairs are matched by id, otherwise
            by row.
        ids2: optional [S] ids of ``q2``.

    Returns:
        ``{"mae_score", "count", "n", "ci95", "thresh", "mae" [S] float64}``.

    Raises:
        TypeError: if the images are not uint8.
        ValueError: on a shape mismatch or differing id sets.
    """
    a, b = _as_uint8_images(q1, "q1"), _as_uint8_images(q2, "q2")
    if (ids1 is None) != (ids2 is None):
        raise ValueError("ids1 and ids2 must be given together")
    if ids1 is not None:
        ia, ib, _ = _pair_by_id(Features(a, np.asarray(ids1), {}), Features(b, np.asarray(ids2), {}), "q1", "q2")
        a, b = a[ia], b[ib]
    if a.shape != b.shape:
        raise ValueError(f"q1 and q2 must have the same shape, got {a.shape} and {b.shape}")
    # Signed arithmetic (uint8 subtraction would wrap); the int64 sum is exact.
    diff = np.abs(a.reshape(len(a), -1).astype(np.int16) - b.reshape(len(b), -1).astype(np.int16))
    mae = diff.sum(axis=1, dtype=np.int64) / diff.shape[1]
    return _proportion("mae_score", mae < thresh, thresh=thresh, mae=mae)


def gl_sscd(gen_features: FeaturesLike | ArrayLike, train_features: Any, *, tau: float = 0.6,
            chunk_rows: int = 16384, context=None, row_offset: int = 0) -> dict[str, Any]:
    """P1's generalisation score: ``GL = 1 − mean_j 1[max_i M_SSCD(x_j, y_i) > tau]``.

    The nearest training descriptor of each generation is found by :func:`nearest_reference`
    (``metric="ip"``): float32 candidates from the kernels, ranked by their exact float64 cosine,
    ties to the lowest index; identical for every chunking and number of processes.

    Args:
        gen_features: [Q, D] descriptors of the generations (array, Features or feature file).
        train_features: [N, D] training descriptors of any size: an array or ``np.memmap``, a
            ``.npy`` path (memory-mapped), a ``.npz`` feature file, or a list of these (shards
            concatenated in order).
        tau: threshold (strict ``>``).
        chunk_rows: training rows per kernel call.
        context: None (one process), or the :class:`diffrepro.distributed.Context` (or process
            group) of a job whose ranks each pass a slice of the training descriptors and merge
            their winners (a collective; see :func:`nearest_reference`). Every rank returns the result.
        row_offset: global index of the first row of ``train_features`` (this rank's slice).

    Returns:
        ``{"gl", "gl_ci95", "memorised_fraction", "memorised_ci95", "count" (memorised), "n",
        "tau", "max_sim" [Q] float64, "nn_index" [Q] int64}``; the intervals are 95% Wilson
        intervals. Zhang et al.'s ``mscore`` prints ``gl`` but returns ``memorised_fraction``.
    """
    if isinstance(gen_features, (str, os.PathLike)):
        gen_features = load_features(gen_features)
    gen = _as_numpy(gen_features.features if isinstance(gen_features, Features) else gen_features)
    if gen.ndim != 2 or len(gen) == 0:
        raise ValueError(f"gen_features must have shape [Q, D] with Q >= 1, got {gen.shape}")
    _check_descriptors(gen, "gen_features")
    nearest = nearest_reference(gen, train_features, metric="ip", context=context, row_offset=row_offset,
                                chunk_rows=chunk_rows)
    max_sim, index = nearest["score"], nearest["index"]
    out = _proportion("memorised_fraction", max_sim > tau, tau=tau, max_sim=max_sim, nn_index=index)
    lo, hi = out["memorised_ci95"] = out.pop("ci95")
    return {"gl": 1.0 - out["memorised_fraction"], "gl_ci95": (1.0 - hi, 1.0 - lo), **out}


def gl_nn(gen: ArrayLike, train: Any, *, normalize: str = "x", quantize: bool = False,
          chunk_rows: int = 16384, context=None, row_offset: int = 0) -> dict[str, Any]:
    """P2's nearest-neighbour generalisation score (eq. 14, reconstructed from its description).

    ``GL_nn = mean_k ‖x_k − NN(x_k)‖₂ / ‖x_k‖₂`` with ``NN`` the training image nearest in
    per-pixel Euclidean distance on [-1, 1] images, found by :func:`nearest_reference`
    (``metric="l2"``: float32 candidates from the kernels ranked by their exact float64 distance,
    ties to the lowest index; identical for every chunking and number of processes).

    Args:
        gen: float [K, C, H, W] or [K, d] generations in [-1, 1].
        train: training images, [N, C, H, W] or [N, d], float32/float16 in [-1, 1] or uint8
            (decoded ``u/127.5 − 1``); an array, memmap, ``.npy`` path or a list of them.
        normalize: ``"x"`` (divide by ‖x_k‖, default), ``"nn"`` (by ‖NN(x_k)‖) or ``"none"``.
        quantize: quantise the generations first (EDM's uint8 rule, :func:`diffrepro.data.quantize`), as
            saved PNGs would be.
        chunk_rows: training rows per kernel call.
        context: None, or a job's :class:`diffrepro.distributed.Context` (or process group): each
            rank passes a slice of ``train`` (see :func:`gl_sscd`); every rank returns the result.
        row_offset: global index of the first row of ``train`` (this rank's slice).

    Returns:
        ``{"gl_nn", "n", "std", "ci95" (normal approximation of the mean), "normalize", "ratio" [K],
        "dist" [K], "nn_index" [K]}``.
    """
    if normalize not in ("x", "none", "nn"):
        raise ValueError(f"normalize must be 'x', 'none' or 'nn', got {normalize!r}")
    x = _as_numpy(gen)
    if quantize:
        x = _decode(_as_numpy(_quantize(x)))
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    if len(x) == 0:
        raise ValueError("gen must hold at least one image, got K=0")
    if not np.isfinite(x).all():
        raise ValueError(f"gen: row {int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])} is NaN or infinite; "
                         "expected finite images in [-1, 1]")
    nearest = nearest_reference(x, train, metric="l2", context=context, row_offset=row_offset, chunk_rows=chunk_rows)
    dist, index = nearest["score"], nearest["index"]
    denom = {"x": np.linalg.norm(x, axis=1), "nn": nearest["ref_norm"], "none": 1.0}[normalize]
    ratio = dist / denom
    mean, std = float(ratio.mean()), float(ratio.std(ddof=1)) if len(ratio) > 1 else 0.0
    half = _Z95 * std / math.sqrt(len(ratio))
    return {"gl_nn": mean, "n": len(ratio), "std": std, "ci95": (mean - half, mean + half), "normalize": normalize,
            "ratio": ratio, "dist": dist, "nn_index": index}


def memorisation_summary(gen_a: ArrayLike, gen_b: ArrayLike, train: ArrayLike) -> dict[str, Any]:
    """How two sets of generations of the same seeds (e.g. Heun and Euler) relate to the
    training set: exact copies and the nearest training image.

    Args:
        gen_a: float ``[K, C, H, W]`` generations in [-1, 1].
        gen_b: float ``[K, C, H, W]`` generations of the same seeds, in the same order.
        train: uint8 ``[N, C, H, W]`` training images.

    Returns:
        ``"memorised_a"``, ``"memorised_b"``: proportions (``fraction``, ``count``, ``n``,
        ``ci95``) of quantised generations byte-equal to a training image; ``"nearest_a"``,
        ``"nearest_b"``: int64 ``[K]`` nearest training image (L2, ties to the lowest index);
        ``"agreement"``: proportion of seeds whose two generations have the same nearest image.
    """
    train = np.asarray(train)
    if train.dtype != np.uint8:
        raise TypeError(f"train must be uint8 images [N, C, H, W], got dtype {train.dtype}")
    flat = train.reshape(len(train), -1)
    rows = {bytes(r) for r in flat}
    out: dict[str, Any] = {}
    for key, gen in (("a", gen_a), ("b", gen_b)):
        gen = np.asarray(_as_numpy(gen), dtype=np.float64)
        q = _as_numpy(_quantize(gen)).reshape(len(gen), -1)
        out[f"memorised_{key}"] = _proportion("fraction", np.array([bytes(r) in rows for r in q]))
        out[f"nearest_{key}"] = nearest_reference(gen, flat, metric="l2")["index"]
    if len(out["nearest_a"]) != len(out["nearest_b"]):
        raise ValueError(f"gen_a and gen_b must hold the same seeds, got {len(out['nearest_a'])} and "
                         f"{len(out['nearest_b'])} generations")
    out["agreement"] = _proportion("fraction", out["nearest_a"] == out["nearest_b"])
    return out


def rp_cond(a_by_class: Mapping[Any, FeaturesLike], b_by_class: Mapping[Any, FeaturesLike], *,
            tau: float = 0.6) -> dict[str, Any]:
    """Conditional RP: same noise j and same class c for two conditional models (P1).

    Args:
        a_by_class: class label -> model A's descriptors of that class's generations.
        b_by_class: class label -> model B's descriptors, same labels and same ids per class.
        tau: threshold (strict ``>``).

    Returns:
        ``{"rp_cond", "count", "n", "ci95", "tau", "per_class": {label: rp}}``, pooled over all
        (j, c) pairs.
    """
    if set(a_by_class) != set(b_by_class):
        raise ValueError(f"a_by_class and b_by_class must have the same classes, got "
                         f"{sorted(a_by_class, key=str)} and {sorted(b_by_class, key=str)}")
    hits, per_class = [], {}
    for c in sorted(a_by_class, key=str):
        sim, _ = _paired_cosine(_as_features(a_by_class[c], f"a_by_class[{c!r}]"),
                                _as_features(b_by_class[c], f"b_by_class[{c!r}]"),
                                f"a_by_class[{c!r}]", f"b_by_class[{c!r}]")
        hits.append(sim > tau)
        per_class[c] = float(hits[-1].mean())
    if not hits:
        raise ValueError("a_by_class must hold at least one class, got none")
    return _proportion("rp_cond", np.concatenate(hits), tau=tau, per_class=per_class)


def rp_between(uncond: FeaturesLike, cond_by_class: Mapping[Any, FeaturesLike], *,
               tau: float = 0.6) -> dict[str, Any]:
    """RP between an unconditional model and a conditional one: ``max_c`` similarity per noise.

    Args:
        uncond: descriptors of the unconditional generations, ids = seeds j.
        cond_by_class: class label -> descriptors of the conditional generations with the same
            seeds.
        tau: threshold (strict ``>``).

    Returns:
        ``{"rp_between", "count", "n", "ci95", "tau", "ids" [S], "max_sim" [S],
        "best_class" [S]}`` (``best_class``: the first label, in sorted order, attaining the max).
    """
    if not cond_by_class:
        raise ValueError("cond_by_class must hold at least one class, got none")
    u = _as_features(uncond, "uncond")
    labels = sorted(cond_by_class, key=str)
    sims = []
    for c in labels:
        sim, ids = _paired_cosine(u, _as_features(cond_by_class[c], f"cond_by_class[{c!r}]"),
                                  "uncond", f"cond_by_class[{c!r}]")
        sims.append(sim)
    sims = np.stack(sims)
    best = sims.argmax(axis=0)
    max_sim = sims.max(axis=0)
    return _proportion("rp_between", max_sim > tau, tau=tau, ids=ids, max_sim=max_sim,
                       best_class=np.array(labels, dtype=object)[best])


def rp_manifold(gen_a: Callable[[ArrayLike], ArrayLike], gen_b: Callable[[ArrayLike], ArrayLike],
                eps0: ArrayLike, eps1: ArrayLike, *, features_fn: Callable[[ArrayLike], ArrayLike],
                alphas: Sequence[float] | None = None, tau: float = 0.6) -> dict[str, Any]:
    """RP along slerp paths between noise pairs (P1 App. A.3; :func:`diffrepro.noise.slerp`).

    For each alpha, ``eps = slerp(eps0, eps1; alpha)`` (``diffrepro.noise.slerp``; lerp where
    sin θ < 1e-6) and the score counts ``M_SSCD(f(gen_a(eps)), f(gen_b(eps))) > tau``.

    Args:
        gen_a: model A, initial noise [P, C, H, W] -> images [P, ...].
        gen_b: model B, same signature.
        eps0: [P, C, H, W] first noise of each pair.
        eps1: [P, C, H, W] second noise of each pair.
        features_fn: images -> [P, D] descriptors (e.g. an :class:`SSCDExtractor` applied to
            quantised images).
        alphas: interpolation points; default ``linspace(0, 1, 100)``.
        tau: threshold (strict ``>``).

    Returns:
        ``{"rp_manifold", "count", "n", "ci95", "tau", "alpha" [A], "rp_per_alpha" [A],
        "sim" [A, P]}``.
    """
    alphas = np.linspace(0.0, 1.0, 100) if alphas is None else np.asarray(alphas, dtype=np.float64)
    e0, e1 = torch.as_tensor(eps0), torch.as_tensor(eps1)
    if e0.shape != e1.shape or e0.ndim < 2:
        raise ValueError(f"eps0 and eps1 must have the same shape [P, C, H, W], got {tuple(e0.shape)} and "
                         f"{tuple(e1.shape)}")
    sims = []
    for alpha in alphas:
        eps = slerp(e0, e1, float(alpha), batched=True)
        sims.append(_cosine(_as_numpy(features_fn(gen_a(eps))), _as_numpy(features_fn(gen_b(eps)))))
    sims = np.stack(sims)
    return _proportion("rp_manifold", sims > tau, tau=tau, alpha=alphas,
                       rp_per_alpha=(sims > tau).mean(axis=1), sim=sims)


def similarity_matrix(items: Sequence[Any], metric: str = "rp", *, names: Sequence[str] | None = None,
                      tau: float = 0.6, thresh: float = 15.0) -> dict[str, Any]:
    """Pairwise RP or MAE-score matrix over several models (P1 Fig. 3, Figs. 14/15).

    Args:
        items: per model, descriptors (``metric="rp"``: anything :func:`rp` accepts) or uint8
            images (``metric="mae"``: an array paired by row, or ``(images, ids)``).
        metric: ``"rp"`` or ``"mae"``.
        names: model names (default ``"0", "1", ...``).
        tau: RP threshold.
        thresh: MAE threshold.

    Returns:
        ``{"matrix" [M, M], "count" [M, M], "n" [M, M], "ci95" [M, M, 2], "names", "metric"}``.
        Symmetric; the diagonal is defined as 1 (not computed), with count = n = 0 and
        ci95 = (1, 1).
    """
    if metric not in ("rp", "mae"):
        raise ValueError(f"metric must be 'rp' or 'mae', got {metric!r}")
    m = len(items)
    names = [str(i) for i in range(m)] if names is None else list(names)
    if len(names) != m:
        raise ValueError(f"names must have {m} entries to match items, got {len(names)}")

    if metric == "rp":  # load feature files once, not once per pair
        items = [_as_features(x, f"items[{i}]") for i, x in enumerate(items)]

    def score(i: int, j: int) -> dict[str, Any]:
        if metric == "rp":
            return rp(items[i], items[j], tau=tau)
        (qi, idi), (qj, idj) = ((x if isinstance(x, tuple) else (x, None)) for x in (items[i], items[j]))
        return mae_score(qi, qj, thresh=thresh, ids1=idi, ids2=idj)

    matrix = np.eye(m)
    count = np.zeros((m, m), dtype=np.int64)
    n = np.zeros((m, m), dtype=np.int64)
    ci = np.ones((m, m, 2))
    for i in range(m):
        for j in range(i + 1, m):
            res = score(i, j)
            key = "rp" if metric == "rp" else "mae_score"
            matrix[i, j] = matrix[j, i] = res[key]
            count[i, j] = count[j, i] = res["count"]
            n[i, j] = n[j, i] = res["n"]
            ci[i, j] = ci[j, i] = res["ci95"]
    return {"matrix": matrix, "count": count, "n": n, "ci95": ci, "names": names, "metric": metric}


# ----------------------------------------------------------------------------------------------
# P2 linearity, score error and weight comparison (Li, Dai, Qu eqs. 8–12)
# ----------------------------------------------------------------------------------------------
def _flat64(x: ArrayLike) -> torch.Tensor:
    """[B, ...] -> float64 [B, d] tensor on the input's device."""
    t = torch.as_tensor(x)
    return t.to(torch.float64).reshape(t.shape[0], -1)


def linearity_score(f: Callable[[ArrayLike], ArrayLike], x1: ArrayLike, x2: ArrayLike, *,
                    a_values: Sequence[float] = (0.99, 0.8675, 0.745, 0.6225, 0.5),
                    abs_cos: bool = False, nmse_squared: bool = False) -> dict[str, Any]:
    """P2's linearity scores of ``f = D(·; σ)`` (eqs. 11–12).

    With ``α = sqrt(a)``, ``β = sqrt(1 − a)`` (so α² + β² = 1) and ``t = α f(x1) + β f(x2)``:
    cosine ``<f(αx1 + βx2), t> / (‖f(αx1+βx2)‖ ‖t‖)`` and NMSE ``‖f(αx1+βx2) − t‖ / ‖t‖``,
    each per pair, then averaged. ``f(x1)`` and ``f(x2)`` are evaluated once.

    Args:
        f: callable [P, ...] -> [P, ...] (numpy or torch).
        x1: [P, ...] first inputs (e.g. ``y + σ ε``).
        x2: [P, ...] second inputs.
        a_values: values of a = α² (the reference notebook's ``alpha``).
        abs_cos: take |cos| (the paper's possible reading; the code has no abs).
        nmse_squared: square the ratio (the paper's literal "mean square"; the code does not).

    Returns:
        ``{"a" [A], "alpha" [A], "beta" [A], "cos" [A], "nmse" [A], "cos_per_sample" [A, P],
        "nmse_per_sample" [A, P], "n": P}``.
    """
    if tuple(x1.shape) != tuple(x2.shape):
        raise ValueError(f"x1 and x2 must have the same shape, got {tuple(x1.shape)} and {tuple(x2.shape)}")
    a = np.asarray(a_values, dtype=np.float64)
    if np.any((a < 0) | (a > 1)):
        raise ValueError(f"a_values must lie in [0, 1], got {a.tolist()}")
    f1, f2 = _flat64(f(x1)), _flat64(f(x2))
    cos_all, nmse_all = [], []
    for av in a:
        alpha, beta = math.sqrt(av), math.sqrt(1.0 - av)
        out = _flat64(f(alpha * x1 + beta * x2))
        target = alpha * f1 + beta * f2
        cos = (out * target).sum(1) / (out.norm(dim=1) * target.norm(dim=1))
        ratio = (out - target).norm(dim=1) / target.norm(dim=1)
        cos_all.append((cos.abs() if abs_cos else cos).cpu().numpy())
        nmse_all.append((ratio ** 2 if nmse_squared else ratio).cpu().numpy())
    cos_all, nmse_all = np.stack(cos_all), np.stack(nmse_all)
    return {"a": a, "alpha": np.sqrt(a), "beta": np.sqrt(1.0 - a), "cos": cos_all.mean(axis=1),
            "nmse": nmse_all.mean(axis=1), "cos_per_sample": cos_all, "nmse_per_sample": nmse_all,
            "n": cos_all.shape[1]}


def score_error(D1: Callable, D2: Callable, x: ArrayLike, sigma: float, *,
                batch_size: int | None = None) -> dict[str, Any]:
    """Score-field approximation error between two denoisers (P2 eq. 10).

    ``rmse = mean_x sqrt((1/d) ‖D1(x;σ) − D2(x;σ)‖²)`` in [-1, 1] units (0.05 ≈ 6.4/255), and
    the App. G variant ``nmse = mean_x ‖D1 − D2‖² / ‖D2‖²``.

    Args:
        D1: denoiser callable ``D(x, sigma)``.
        D2: denoiser callable ``D(x, sigma)``.
        x: [B, ...] noisy inputs ``y + σ ε``.
        sigma: noise level passed to both denoisers.
        batch_size: call the denoisers on at most this many inputs at a time.

    Returns:
        ``{"rmse", "nmse", "rmse_per_sample" [B], "nmse_per_sample" [B], "n", "sigma"}``.
    """
    step = len(x) if batch_size is None else int(batch_size)
    if step < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rmse, nmse = [], []
    for start in range(0, len(x), step):
        xb = x[start:start + step]
        d1, d2 = _flat64(D1(xb, sigma)), _flat64(D2(xb, sigma))
        sq = ((d1 - d2) ** 2).sum(1)
        rmse.append((sq / d1.shape[1]).sqrt().cpu().numpy())
        nmse.append((sq / (d2 ** 2).sum(1)).cpu().numpy())
    if not rmse:
        raise ValueError("x must hold at least one input, got B=0")
    rmse, nmse = np.concatenate(rmse), np.concatenate(nmse)
    return {"rmse": float(rmse.mean()), "nmse": float(nmse.mean()), "rmse_per_sample": rmse,
            "nmse_per_sample": nmse, "n": len(rmse), "sigma": float(sigma)}


def _matrix64(w: ArrayLike, name: str) -> torch.Tensor:
    t = torch.as_tensor(w).to(torch.float64)
    if t.ndim != 2:
        raise ValueError(f"{name} must be a matrix [d, d], got shape {tuple(t.shape)}")
    return t


def weight_nmse(W_L: ArrayLike, W_G: ArrayLike, squared: bool = True) -> dict[str, Any]:
    """Relative distance of two weight matrices, ``‖W_L − W_G‖_F² / ‖W_G‖_F²`` (P2: distilled vs Gaussian).

    Args:
        W_L: [d, d] effective distilled weight (the parameter divided by √d; see distill).
        W_G: [d, d] Gaussian (Wiener) weight.
        squared: squared Frobenius ratio (default; P2 does not say which) or the plain ratio of norms.

    Returns:
        ``{"nmse", "squared"}``.
    """
    wl, wg = _matrix64(W_L, "W_L"), _matrix64(W_G, "W_G")
    if wl.shape != wg.shape:
        raise ValueError(f"W_L and W_G must have the same shape, got {tuple(wl.shape)} and {tuple(wg.shape)}")
    ratio = (torch.linalg.matrix_norm(wl - wg) / torch.linalg.matrix_norm(wg)).item()
    return {"nmse": ratio ** 2 if squared else ratio, "squared": squared}


def sv_alignment(W_L: ArrayLike, U: ArrayLike, K: int = 100, *, lam: ArrayLike | None = None) -> dict[str, Any]:
    """Alignment of W_L's left singular vectors with the data covariance eigenvectors (P2).

    Args:
        W_L: [d, d] effective distilled weight.
        U: [d, d'] orthonormal eigenvectors of Σ as columns, in descending eigenvalue order
            (or any order when ``lam`` is given).
        K: number of leading vectors compared (clipped to the available count).
        lam: optional [d'] eigenvalues; ``U``'s columns are then sorted by descending ``lam``.

    Returns:
        ``{"alignment" [K]: |<u_k^L, u_k>|, "overlap" [K]: ‖U_L[:, :k]ᵀ U[:, :k]‖_F² / k,
        "principal_angles" [K] radians ascending (between the two K-dim subspaces),
        "singular_values" [K] of W_L, "K"}``.
    """
    wl, u = _matrix64(W_L, "W_L"), _matrix64(U, "U")
    if u.shape[0] != wl.shape[0]:
        raise ValueError(f"U must have {wl.shape[0]} rows to match W_L, got {u.shape[0]}")
    if lam is not None:
        u = u[:, torch.argsort(torch.as_tensor(lam).to(torch.float64).cpu(), descending=True).to(u.device)]
    k = min(int(K), u.shape[1], wl.shape[1])
    if k < 1:
        raise ValueError(f"K must be >= 1, got {K}")
    u_l, s_l, _ = torch.linalg.svd(wl)
    cross = u_l[:, :k].T @ u[:, :k]                      # [K, K]
    overlap = (cross ** 2).cumsum(0).cumsum(1).diagonal() / torch.arange(1, k + 1, dtype=torch.float64)
    cosines = torch.linalg.svdvals(cross).clamp(0.0, 1.0)
    return {"alignment": cross.diagonal().abs().cpu().numpy(), "overlap": overlap.cpu().numpy(),
            "principal_angles": torch.arccos(cosines).cpu().numpy(), "singular_values": s_l[:k].cpu().numpy(),
            "K": k}


# ----------------------------------------------------------------------------------------------
# Noise-hyperplane map (P1 Fig. 4)
# ----------------------------------------------------------------------------------------------
def hyperplane_map(generate_fn: Callable[[ArrayLike], ArrayLike], features_fn: Callable[[ArrayLike], ArrayLike],
                   e1: ArrayLike, e2: ArrayLike, e3: ArrayLike, n: int = 100, *, lo: float = -0.1,
                   hi: float = 1.1, renormalize: bool = False, batch_size: int = 1000,
                   path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Which anchor each point of a noise plane reproduces (P1 Fig. 4).

    The plane is ``ε(α, β) = ε1 + α(ε2 − ε1) + β(ε3 − ε1)`` (``diffrepro.noise.noise_plane``),
    α, β in ``linspace(lo, hi, n)``. Anchors ``x_k = G(ε_k)``; each plane point gets
    ``label = argmax_k M_SSCD(x_k, G(ε(α, β)))`` (ties to the lowest k) and ``sim = max_k``.

    Args:
        generate_fn: noise [B, C, H, W] -> images [B, ...].
        features_fn: images -> [B, D] descriptors.
        e1: [C, H, W] anchor noise 1 (α = β = 0).
        e2: [C, H, W] anchor noise 2 (α = 1, β = 0).
        e3: [C, H, W] anchor noise 3 (α = 0, β = 1).
        n: grid points per axis.
        lo: grid start.
        hi: grid end.
        renormalize: rescale plane noises to the anchors' mean norm; P1 does not.
        batch_size: plane noises generated per call.
        path: if given, save ``alpha``, ``beta``, ``label``, ``sim`` there as ``.npz``.

    Returns:
        ``{"alpha" [n], "beta" [n], "label" [n, n] int64, "sim" [n, n] float64}``, where
        ``[i, j]`` is the point ``(alpha[i], beta[j])``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    anchors = torch.stack([torch.as_tensor(e) for e in (e1, e2, e3)])
    anchor_feats = _as_numpy(features_fn(generate_fn(anchors)))            # [3, D]
    grid = np.linspace(lo, hi, n)
    plane = noise_plane(*anchors, grid, grid, renormalize=renormalize).reshape(n * n, *anchors.shape[1:])
    sims = []
    for start in range(0, len(plane), batch_size):
        feats = _as_numpy(features_fn(generate_fn(plane[start:start + batch_size])))
        sims.append(_cosine(feats[:, None, :], anchor_feats[None, :, :]))  # [B, 3]
    sims = np.concatenate(sims)
    out = {"alpha": grid, "beta": grid, "label": sims.argmax(axis=1).reshape(n, n).astype(np.int64),
           "sim": sims.max(axis=1).reshape(n, n)}
    if path is not None:
        atomic_save_npz(path, **out)
    return out
