# SPDX-License-Identifier: Apache-2.0
"""Certified pruning and commitment for the empirical denoiser.

The empirical denoiser ``D(x̃;σ) = Σ_i w_i y_i`` with ``w_i ∝ exp(−‖x̃ − y_i‖²/(2σ²))`` (Zhang et
al. 2024; Li, Dai, Qu 2024, eq. 5) is a softmax, so a row far from the query carries a weight
that underflows long before the end of a trajectory. :class:`PrunedRows` skips such rows, with
a certificate:

* **Bounds.** For every (query, tile of ``tile_rows`` training rows) it keeps a lower bound
  ``L_t`` on ``min_{i∈t} ‖x̃ − y_i‖``. A computed pair gets its exact distance back (minus the
  GEMM's worst-case rounding error); a new call at ``x̃'`` lowers every bound by ``‖x̃' − x̃‖``
  (triangle inequality), so the bounds stay valid whatever comes next: another σ, sampler,
  σ order, a far jump or an unrelated batch of the same size (whose bounds drop to 0).
* **Certificate.** With ``U`` an exact distance to one row (the previous nearest, recomputed in
  float64), tile ``t`` is skipped only if ``L_t² − U² > 2σ² ln(N/ε)``: each of its rows then
  weighs less than ``ε/N`` of that row, so all skipped rows together carry less than ``ε``
  (``prune``) of the largest weight. Each call reports, per query, the certified bound
  ``Σ_skipped n_t exp(−(L_t² − U²)/(2σ²))`` on the skipped mass relative to the largest weight.
* **Commitment.** When the certificate leaves one row ``j`` (every other row, including the
  other rows of its own tile, certified), the query is committed: later calls return ``y_j``
  after an O(D) check ``L_other² − U_j² > 2σ² ln(N/ε)`` with ``U_j = ‖x̃ − y_j‖`` and ``L_other``
  the bound on all other rows, lowered by each move. Along the remaining straight trajectory
  ``x(σ) = y_j + (σ/σ_k)(x_k − y_j)`` (the exact ODE solution for ``D ≡ y_j``) this check can
  never fail: with ``t = σ/σ_k`` and ``c = L_other − U_j > 0`` at ``σ_k``, the margin
  ``c² + 2c t U_j − 2t²σ_k² ln(N/ε)`` is concave in ``t`` and positive at ``t = 0`` and
  ``t = 1``, hence for every smaller σ; so no other row can come back (proof in
  :func:`straight_line_margin`). The O(D) check stays because it is also what keeps the result
  exact when the caller leaves that line.

* **Log-weights.** With per-row log-weights ``lw_i`` (weights ``exp(−‖x̃ − y_i‖²/(2σ²) + lw_i)``)
  the reference row is the one of largest weight, the reference value ``R = U² − 2σ² lw_U`` and
  tile ``t`` is skipped only if ``L_t² − 2σ² max_{i∈t} lw_i − R > 2σ² ln(N/ε)`` (a tile whose
  rows all have ``lw = −inf`` is never computed); the skipped-mass bound uses the same exponent.
  Commitment is off with log-weights (the straight-line argument assumes equal weights): every
  call runs the certified tile selection.

Rows are ordered once by a principal-direction tree (tiles of nearby images), so a query's
candidates fall into few tiles; the order is a permutation and changes no result.

* **Shards.** When the training set is split over processes, each keeps the bounds of its own
  rows and the numbers of the certificate that span the whole set are reduced across them (``U``
  by MIN over each shard's previous nearest row, ``L_other`` by MIN, the skipped mass and the
  rows computed by SUM, the softmax states by the merge of :mod:`diffrepro.distributed`), with
  ``N`` the size of the whole set: every shard then skips, commits and releases the same queries.
"""
from __future__ import annotations

import math
import time
import warnings
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from . import _backend
from ._validate import ROW_TYPES
from .ops import DenoiserState, _check_state_finite, _nearest_key, _workers, finalize, merge_states

__all__ = ["PrunedRows", "OneProcess", "check_prune", "cluster_order", "straight_line_margin", "DEFAULT_PRUNE",
           "batch_fields", "summarize", "plot_commitment", "FIELDS"]

DEFAULT_PRUNE = 1e-12
# Training rows per tile of the bounds: small enough that a query's candidates fill few tiles,
# large enough for the GEMMs (measured: 128 keeps the kernel's throughput).
TILE_ROWS = 128
# Principal directions used to order the rows into tiles.
_ORDER_DIMS = 32
# Kernel output dtypes on a GPU.
_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64,
                 np.dtype(np.int64): torch.int64}
# Records of per-call statistics kept (oldest dropped first).
_MAX_RECORDS = 100_000


def check_prune(value) -> float:
    """``prune`` as a float in [0, 1): 0 is the dense path."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"prune must be a float in [0, 1), got {value!r}") from None
    if not 0.0 <= v < 1.0:
        raise ValueError(f"prune must be a float in [0, 1) (0 = dense), got {value!r}")
    return v


def _decode(rows, dtype: torch.dtype) -> np.ndarray:
    """Rows ``[n, D]`` as the kernels decode them (uint8: ``u / 127.5 − 1`` in ``dtype``, the
    same two IEEE roundings; floats cast), as a numpy array. Small per-call steps run in numpy:
    torch's OpenMP pool would compete with the kernel's workers on a loaded machine."""
    a = rows.numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
    a = a.reshape(a.shape[0], -1)
    f = np.float32 if dtype == torch.float32 else np.float64
    return a.astype(f) / f(127.5) - f(1) if a.dtype == np.uint8 else a.astype(f, copy=False)


def _sqdist(a: np.ndarray, b) -> np.ndarray:
    """Row-wise ``‖a − b‖²`` in float64 (``a`` float64 ``[n, D]``; ``b`` ``[n, D]`` or ``[D]``):
    one subtraction and one fused multiply-sum, the fewest passes over the ``[n, D]`` block."""
    d = a - b
    return np.einsum("ij,ij->i", d, d)


def _take(a: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``a[rows]`` without a copy when ``rows`` is every row in order (the common case)."""
    return a if len(rows) == len(a) else a[rows]


def _round_down_f32(v: np.ndarray) -> np.ndarray:
    """float64 -> float32 never above the input (a lower bound stays a lower bound)."""
    f = v.astype(np.float32)
    return np.where(f > v, np.nextafter(f, np.float32(-np.inf)), f)


def _top_direction(cov: np.ndarray, steps: int = 30) -> np.ndarray:
    """Leading eigenvector of a small symmetric PSD matrix by power iteration (a matrix-vector
    product per step: no threaded LAPACK call per tree node)."""
    v = np.sqrt(np.diag(cov)) + 1e-12
    for _ in range(steps):
        v = cov @ v
        v /= np.linalg.norm(v) + 1e-300
    return v


def cluster_order(rows, tile_rows: int = TILE_ROWS, chunk: int = 4096) -> np.ndarray:
    """A permutation of the rows that puts nearby images into the same tile.

    Rows are projected onto their top principal directions (from a strided sample) and split
    recursively at the median of each node's own principal direction (a PCA tree), in sizes
    that are multiples of ``tile_rows``; each leaf is one tile, its rows in ascending index order
    (so that ties inside a tile keep the lowest index). Cost: one pass over the rows.

    Args:
        rows: ``[n, ...]`` uint8 or float rows (numpy, memmap or tensor).
        tile_rows: rows per tile.
        chunk: rows decoded at a time.

    Returns:
        int64 ``[n]`` permutation.
    """
    n = rows.shape[0]
    if n <= tile_rows:
        return np.arange(n, dtype=np.int64)
    step = max(1, n // 256)
    sample = _decode(rows[::step][:256], torch.float64)
    mean = sample.mean(0)
    centred = sample - mean
    k = min(_ORDER_DIMS, len(sample))
    # Top principal directions from the sample's Gram matrix (n x n, cheap for n <= 256).
    lam, vec = np.linalg.eigh(centred @ centred.T)
    basis = (centred.T @ vec[:, ::-1][:, :k]) / np.sqrt(np.maximum(lam[::-1][:k], 1e-30))
    basis = basis.astype(np.float32)
    proj = np.concatenate([(_decode(rows[a:a + chunk], torch.float32) - mean.astype(np.float32))
                           @ basis for a in range(0, n, chunk)]).astype(np.float64)
    leaves, todo = [], [np.arange(n, dtype=np.int64)]
    while todo:
        idx = todo.pop()
        if len(idx) <= tile_rows:
            leaves.append((idx.min(), np.sort(idx)))
            continue
        p = proj[idx] - proj[idx].mean(0)
        direction = _top_direction(p.T @ p)
        order = idx[np.argsort(p @ direction, kind="stable")]
        half = max(tile_rows, (len(idx) // 2 // tile_rows) * tile_rows)
        todo += [order[half:], order[:half]]
    # Depth-first order of the leaves keeps neighbouring tiles close too.
    return np.concatenate([leaf for _, leaf in leaves])


def straight_line_margin(l_other: float, u: float, sigma_k: float, sigma, n: int, prune: float):
    """Certificate margin of a committed query along its remaining straight trajectory.

    With ``D ≡ y_j`` the probability-flow ODE ``dx/dσ = (x − D)/σ`` has the solution
    ``x(σ) = y_j + (σ/σ_k)(x_k − y_j)``: ``U(σ) = (σ/σ_k) U`` and each move lowers the bound on
    the other rows by the same amount as ``U`` shrinks, ``L(σ) = L − U + U(σ)``. The margin
    ``L(σ)² − U(σ)² − 2σ² ln(n/prune) = c² + 2c t U − 2t²σ_k² ln(n/prune)`` (``c = L − U``,
    ``t = σ/σ_k``) is concave in ``t``; it is ``c² > 0`` at ``t = 0`` and the commitment
    certificate at ``t = 1``, so it is positive on all of ``(0, 1]``.

    Returns:
        The margin at ``sigma`` (float or array); positive means certified.
    """
    c, t = l_other - u, np.asarray(sigma, dtype=np.float64) / sigma_k
    return c * c + 2 * c * t * u - 2 * (t * sigma_k) ** 2 * math.log(n / prune)


@dataclass
class _Chunk:
    """Rows handed to the kernel in one call: ``rows`` kernel-ready (or a loader), ``index`` the
    global row number of each position, ``first_tile`` its first tile in the bounds."""
    rows: object
    index: np.ndarray
    first_tile: int

    def load(self):
        return self.rows() if callable(self.rows) else self.rows


class _Bounds:
    """Per query slot: lower bounds per tile (stored as bound + drift, so a move only adds to
    ``drift``), the previous query, this shard's nearest computed row and the commitment."""

    def __init__(self, b: int, n_tiles: int):
        self.drift = np.zeros(b)
        self.prev: np.ndarray | None = None
        self.lb = np.zeros((b, n_tiles), dtype=np.float32)
        self.nearest = np.full(b, -1, dtype=np.int64)      # flat position (-1: none computed yet)
        self.commit = np.full(b, -1, dtype=np.int64)       # global row index (-1: not committed)
        self.commit_pos = np.full(b, -1, dtype=np.int64)   # its flat position (-1: another shard)
        self.commit_other = np.zeros(b)                    # L_other + drift
        self.commit_sigma = np.full(b, np.nan)

    def release(self, slots) -> None:
        self.commit[slots], self.commit_pos[slots], self.commit_sigma[slots] = -1, -1, np.nan


class OneProcess:
    """How :class:`PrunedRows` combines its per-query numbers with the other shards of a
    training set split over processes: here there are none. A sharded denoiser passes its own
    (element-wise MIN and SUM across the shards, the softmax-state merge), so that every shard
    takes the same decisions from the same global numbers."""

    def min(self, a: np.ndarray) -> np.ndarray:
        return a

    def sum(self, a: np.ndarray) -> np.ndarray:
        return a

    def merge(self, state: DenoiserState):
        return finalize(state)


class PrunedRows:
    """One set of training rows (all rows or one class) with certified pruning and commitment.

    Args:
        chunks: list of ``(rows, global_index)``; ``rows`` are kernel-ready (contiguous uint8 or
            compute-dtype rows, numpy/memmap or CPU tensor) or a callable returning them.
        center: ``[D]`` centring vector in the compute dtype.
        tile_norm: float64 ``[n_tiles]``, ``max ‖y − center‖`` per tile (for the rounding bound).
        dtype: compute dtype.
        tile_rows: rows per tile; each chunk is cut into its own tiles (its last may be shorter).
        device: where the rows live and the kernel runs: ``cpu`` (the CPU kernel) or a CUDA
            device (``pruned_denoiser`` of ``diffrepro._cuda``; the bookkeeping stays on the host,
            only the queries, the mask, the state and the tiles' best scores cross).
        emulate: run the CUDA kernel under the CPU emulator (``diffrepro._cuda_emu``) on host
            rows (tests); ``cuda_config`` / ``cuda_splits`` then force its tile configuration and
            row splits as ops.py's ``_config`` / ``_splits`` do.
        shards: the reductions across the shards of a split training set (:class:`OneProcess`:
            these rows are the whole set).
        n_total: rows of the whole set over all shards (default: these rows).
        log_weights: optional list of float64 ``[n]`` per-row log-weights, one per chunk (aligned
            with its ``global_index``); see the module's *Log-weights*.
    """

    def __init__(self, chunks, center: torch.Tensor, tile_norm: np.ndarray, dtype: torch.dtype,
                 tile_rows: int = TILE_ROWS, *, device=None, emulate: bool = False, shards=None,
                 n_total: int | None = None, log_weights=None):
        self.dtype, self.tile_rows, self.center = dtype, int(tile_rows), center
        self.device = torch.device("cpu" if device is None else device)
        self.emulate = bool(emulate)
        self.cuda_config, self.cuda_splits = -1, 0
        self._center_dev: torch.Tensor | None = None
        self.chunks: list[_Chunk] = []
        first = 0
        for rows, index in chunks:
            self.chunks.append(_Chunk(rows, np.asarray(index, dtype=np.int64), first))
            first += -(-len(index) // self.tile_rows)
        self.n_tiles = first
        self.index = np.concatenate([c.index for c in self.chunks] + [np.zeros(0, dtype=np.int64)])
        self.n_rows = len(self.index)
        self.shards = shards if shards is not None else OneProcess()
        self.n_total = self.n_rows if n_total is None else int(n_total)
        self.starts = np.cumsum([0] + [len(c.index) for c in self.chunks])
        sizes = [np.minimum(self.tile_rows, len(c.index) - self.tile_rows * np.arange(
            -(-len(c.index) // self.tile_rows))) for c in self.chunks]
        self.tile_size = np.concatenate(sizes + [np.zeros(0)]).astype(np.float64)
        self.tile_of = np.concatenate([c.first_tile + np.arange(len(c.index)) // self.tile_rows
                                       for c in self.chunks] + [np.zeros(0, dtype=np.int64)])
        self.tile_norm = np.asarray(tile_norm, dtype=np.float64)
        u = torch.finfo(dtype).eps / 2
        d = center.numel()
        # |fl(<a, b>) - <a, b>| <= gamma_D |a||b| (Higham, Thm 3.5) plus the roundings of the
        # centring, the norms and the subtraction: (2 gamma_D + 8u) (|a| + |b|)^2 bounds the
        # error of a squared distance formed as ||x - c||^2 - 2 g.
        self._err = 2 * d * u / (1 - d * u) + 8 * u
        self._slot: list[_Bounds | None] = [None]  # the bounds, shared with in_float64's twin
        self._float64: PrunedRows | None = None
        self._last: dict = {"b": 0, "held": np.zeros(0, dtype=np.int64), "rest": np.zeros(0, dtype=np.int64)}
        self.kernel_seconds = 0.0  # inside the kernel during the last call
        self._np_dtype = np.float32 if dtype == torch.float32 else np.float64
        self._center_np = center.numpy()
        self._set_log_weights(log_weights)

    def _set_log_weights(self, log_weights) -> None:
        """Per flat position (``lw``), per tile (``tile_lw``, the largest) and per chunk on the
        kernel's device (``_chunk_lw``); all None without log-weights."""
        self.lw = self.tile_lw = self._chunk_lw = None
        if log_weights is None:
            return
        parts = [np.ascontiguousarray(np.asarray(w, dtype=np.float64)) for w in log_weights]
        self.lw = np.concatenate(parts + [np.zeros(0)])
        firsts = np.concatenate([self.starts[i] + self.tile_rows * np.arange(-(-len(c.index) // self.tile_rows))
                                 for i, c in enumerate(self.chunks)] + [np.zeros(0)]).astype(np.int64)
        self.tile_lw = np.maximum.reduceat(self.lw, firsts) if len(firsts) else np.zeros(0)
        dev = self.device if self.device.type == "cuda" and not self.emulate else torch.device("cpu")
        self._chunk_lw = [torch.from_numpy(w).to(dev) for w in parts]

    @property
    def _bounds(self) -> _Bounds | None:
        return self._slot[0]

    @_bounds.setter
    def _bounds(self, value: _Bounds | None) -> None:
        self._slot[0] = value

    def in_float64(self) -> "PrunedRows":
        """These rows with the kernel in float64 (uint8 or float64 rows), sharing the tiles, the
        bounds and the commitments: a trajectory may switch precision at any call."""
        if self.dtype == torch.float64:
            return self
        if self._float64 is None:
            twin = PrunedRows([(c.rows, c.index) for c in self.chunks], self.center.double(), self.tile_norm,
                              torch.float64, self.tile_rows, device=self.device, emulate=self.emulate,
                              shards=self.shards, n_total=self.n_total)
            twin.cuda_config, twin.cuda_splits, twin._slot = self.cuda_config, self.cuda_splits, self._slot
            twin.lw, twin.tile_lw, twin._chunk_lw = self.lw, self.tile_lw, self._chunk_lw  # float64 already
            self._float64 = twin
        return self._float64

    # -- rows ------------------------------------------------------------------------------
    def rows_at(self, flat: np.ndarray) -> np.ndarray:
        """Decoded rows at flat positions, ``[len(flat), D]`` in the compute dtype (numpy)."""
        chunk = np.searchsorted(self.starts, flat, side="right") - 1
        if len(self.chunks) == 1:
            return _decode(_rows_from(self.chunks[0].load(), flat), self.dtype)
        out = np.empty((len(flat), self.center.numel()), dtype=self._np_dtype)
        for c in np.unique(chunk):
            sel = np.flatnonzero(chunk == c)
            out[sel] = _decode(_rows_from(self.chunks[c].load(), flat[sel] - self.starts[c]), self.dtype)
        return out

    def _global(self, flat: np.ndarray) -> np.ndarray:
        """Global row index of flat positions (-1 stays -1)."""
        out = np.full(len(flat), -1, dtype=np.int64)
        out[flat >= 0] = self.index[flat[flat >= 0]]
        return out

    def _rows_here(self, flat: np.ndarray) -> np.ndarray:
        """:meth:`rows_at`, zeros where ``flat`` is -1 (a row held by another shard)."""
        mine = flat >= 0
        if mine.all():
            return self.rows_at(flat)
        out = np.zeros((len(flat), self.center.numel()), dtype=self._np_dtype)
        if mine.any():
            out[mine] = self.rows_at(flat[mine])
        return out

    def _reference(self, qd: np.ndarray, slots: np.ndarray, flat: np.ndarray, sigma: np.ndarray) -> np.ndarray:
        """The certificate's reference ``R`` for the queries ``slots`` and the rows at ``flat``:
        ``U²`` (:meth:`_exact_sqdist`), with log-weights ``U² − 2σ² lw`` rounded up; the minimum
        over the shards (+inf where ``flat`` is -1 on every shard)."""
        if self.lw is None:
            return self._exact_sqdist(qd, slots, flat)[0]
        mine = flat >= 0
        u2 = np.where(mine, _sqdist(_take(qd, slots), self._rows_here(flat)) * (1 + 1e-12), np.inf)
        shift = np.where(mine, 2 * sigma**2 * self.lw[np.where(mine, flat, 0)], 0.0)
        return self.shards.min(u2 - shift + 1e-15 * np.abs(shift))

    def _tile_shift(self, sigma: np.ndarray):
        """``2σ² max_t lw`` per (query, tile), rounded up (+0 without log-weights; -inf for a
        tile whose rows are all excluded)."""
        if self.lw is None:
            return 0.0
        shift = 2 * sigma[:, None] ** 2 * self.tile_lw[None]
        with np.errstate(invalid="ignore"):
            return shift + 1e-15 * np.abs(np.where(np.isfinite(shift), shift, 0.0))

    def _exact_sqdist(self, qd: np.ndarray, slots: np.ndarray, flat: np.ndarray):
        """``(‖x̃ − y‖² rounded up, y)`` for the queries ``slots`` and the rows at ``flat``, the
        minimum over the shards (+inf and zero rows where ``flat`` is -1): an exact distance to
        one row of the whole set."""
        y = self._rows_here(flat)
        u2 = np.where(flat >= 0, _sqdist(_take(qd, slots), y) * (1 + 1e-12), np.inf)
        return self.shards.min(u2), y

    # -- one call --------------------------------------------------------------------------
    def __call__(self, q: torch.Tensor, sigma: np.ndarray, prune: float):
        """Pruned denoiser for ``q`` (``[b, D]`` compute dtype, CPU) at float64 ``sigma [b]``.

        Returns:
            ``(out [b, D] tensor, stats)``; stats holds per query ``nearest`` (global row),
            ``n_eff``, ``skipped_bound``, ``commit_sigma``, ``commit_index`` and
            ``rows_computed`` (rows of the whole set).
        """
        finite = np.isfinite(q.numpy())
        if not finite.all():
            raise ValueError(f"q must be finite, got {int((~finite).sum())} NaN/Inf values "
                             f"in a {q.dtype} tensor of shape {list(q.shape)}")
        try:
            return self._call(q, sigma, prune)
        except BaseException:
            # A call stopped half way leaves bounds and commitments of a query it never finished;
            # forget them all, so that the next call starts afresh (as a first call, always valid).
            self._bounds = None
            raise

    def _call(self, q: torch.Tensor, sigma: np.ndarray, prune: float):
        b = q.shape[0]
        self.kernel_seconds = 0.0
        st = self._bounds
        if st is None or st.lb.shape[0] != b:
            st = self._bounds = _Bounds(b, self.n_tiles)
        qn = q.numpy()
        qd = qn.astype(np.float64)
        if st.prev is not None:
            st.drift += np.sqrt(_sqdist(qd, st.prev))
            # Slots whose bounds all fell to 0 (a new batch, a far jump) start afresh, so that
            # the drift never grows beyond one trajectory (float32 bounds keep their precision).
            # A commitment released here fails its check below anyway (L_other - drift <= 0).
            dead = (st.lb.max(1, initial=0.0) <= st.drift) & ((st.commit < 0) | (st.commit_other <= st.drift))
            st.lb[dead], st.drift[dead], st.commit_other[dead] = 0, 0.0, 0.0
            st.release(dead)
        st.prev = qd
        thr = 2 * sigma**2 * math.log(self.n_total / prune)
        out = np.empty_like(qn)
        stats = {"n_eff": np.ones(b), "skipped_bound": np.zeros(b), "rows_computed": np.ones(b),
                 "nearest": np.full(b, -1, dtype=np.int64)}

        self._last = {"b": b, "held": np.zeros(0, dtype=np.int64), "rest": np.zeros(0, dtype=np.int64)}
        held = np.flatnonzero(self.shards.min((st.commit >= 0).astype(np.float64)) > 0)  # on every shard
        keep = held[:0]
        if held.size:
            u2, y = self._exact_sqdist(qd, held, st.commit_pos[held])
            lo = np.maximum(st.commit_other[held] - st.drift[held], 0.0)
            ok = lo**2 - u2 > thr[held]
            keep = held[ok]
            # The committed row, from the shard that holds it (a sum of it and zeros is exact).
            out[keep] = y[ok] if isinstance(self.shards, OneProcess) else self.shards.sum(y[ok])
            mine = st.commit_pos[keep] >= 0
            st.nearest[keep[mine]] = st.commit_pos[keep[mine]]
            stats["nearest"][keep] = st.commit[keep]
            stats["skipped_bound"][keep] = (self.n_total - 1) * np.exp(
                -(lo[ok] ** 2 - u2[ok]) / (2 * sigma[keep] ** 2))
            self._last.update(held=keep[mine], held_rows=st.commit_pos[keep[mine]].copy())
        lost = np.ones(b, dtype=bool)
        lost[keep] = False
        st.release(lost)

        rest = np.flatnonzero(lost)
        if rest.size:
            self._compute(qn, qd, sigma, thr, rest, st, out, stats)
        stats["commit_index"] = st.commit.copy()
        stats["commit_sigma"] = st.commit_sigma.copy()
        return torch.from_numpy(out), stats

    def last_computed(self) -> tuple[np.ndarray, np.ndarray]:
        """Which (query, row) pairs the last call computed: ``(mask bool [b, n], rows int64 [n])``
        with ``rows`` the global row number of each column (for tests and diagnostics)."""
        last = self._last
        mask = np.zeros((last["b"], self.n_rows), dtype=bool)
        if last["held"].size:
            mask[last["held"], last["held_rows"]] = True
        if last["rest"].size:
            mask[last["rest"]] = last["active"][:, self.tile_of]
        return mask, self.index

    def _compute(self, qn, qd, sigma, thr, rest, st: _Bounds, out, stats):
        """The general path for the uncommitted queries ``rest``: bounds -> active tiles ->
        kernel -> exact tile minima -> new bounds, output, commitment test."""
        drift = st.drift[rest][:, None]
        lb = np.maximum(st.lb[rest].astype(np.float64) - drift, 0.0)
        # U: the exact distance to the previous call's nearest row (+inf on the first call); with
        # log-weights R = U² − 2σ² lw_U against L_t² − 2σ² max lw of each tile.
        u2 = self._reference(qd, rest, st.nearest[rest], sigma[rest])
        shift = self._tile_shift(sigma[rest])
        with np.errstate(invalid="ignore"):  # inf - inf: an excluded tile (False below) on the first call
            active = np.square(lb) - shift - u2[:, None] <= thr[rest][:, None]
        self._last.update(rest=rest, active=active)
        qs = np.ascontiguousarray(_take(qn, rest))
        state, best, second = self._kernel(qs, 1.0 / sigma[rest] ** 2, active)
        # This shard's nearest computed row (flat position, -1: none), then the global one.
        here = state.nearest_index.numpy().copy()
        state.nearest_index = torch.from_numpy(self._global(here))
        res, info = self.shards.merge(state)
        out[rest] = res.numpy()
        # Exact smallest and second smallest squared distance per computed tile, lowered by the
        # rounding bound: ||x - c||^2 - 2 g - err (||x - c|| + max ||y - c||)^2.
        xn2 = _sqdist(_take(qd, rest), self._center_np)[:, None]
        err = self._err * (np.sqrt(xn2) + self.tile_norm[None]) ** 2
        d2 = np.maximum(xn2 - 2 * best - err, 0.0)
        d2_second = np.maximum(xn2 - 2 * second - err, 0.0)
        st.lb[rest] = np.where(active, _round_down_f32(np.sqrt(d2) + drift), st.lb[rest])
        st.nearest[rest] = np.where(here >= 0, here, st.nearest[rest])
        # The new U: the global nearest row and its exact float64 distance (with log-weights the
        # row of largest weight and R = 2σ² key = U² − 2σ² lw_U, rounded up).
        nearest = info["nearest_index"].numpy()
        u2 = info["nearest_sqdist"].numpy() * (1 + 1e-12)
        if self.lw is not None:
            ref = 2 * sigma[rest] ** 2 * info["nearest_key"].numpy()
            u2 = ref + 1e-12 * (np.abs(ref) + u2)
        stats["nearest"][rest] = nearest
        lb2 = np.where(active, d2, np.square(lb))
        gap = lb2 - shift - u2[:, None]
        with np.errstate(over="ignore"):
            skipped = np.where(active, 0.0, self.tile_size[None] * np.exp(-gap / (2 * sigma[rest] ** 2)[:, None]))
        stats["skipped_bound"][rest] = self.shards.sum(skipped.sum(1))
        stats["n_eff"][rest] = info["n_eff"].numpy()
        stats["rows_computed"][rest] = self.shards.sum((active * self.tile_size[None]).sum(1))
        # Commitment: every row but the nearest certified, its own tile's second smallest too
        # (the nearest row's tile is always computed, on the shard that holds it).
        owner = np.flatnonzero((here >= 0) & (self._global(here) == nearest))
        home = self.tile_of[here[owner]]
        lb2[owner, home] = d2_second[owner, home]
        l_other2 = self.shards.min(lb2.min(1, initial=np.inf))
        commit = (l_other2 - u2 > thr[rest]) & (self.n_total > 1) & (self.lw is None)
        new = rest[commit]
        st.commit[new] = nearest[commit]
        st.commit_pos[new] = np.where(np.isin(np.flatnonzero(commit), owner), here[commit], -1)
        st.commit_other[new] = np.sqrt(l_other2[commit]) + st.drift[new]
        st.commit_sigma[new] = sigma[new]

    def _kernel(self, qs: np.ndarray, inv: np.ndarray, active: np.ndarray):
        """Softmax state over the active (query, tile) pairs, chunk by chunk, and the two best
        scores of every computed pair (float64, -inf elsewhere). On a CUDA device (or the
        emulator) the same kernel contract runs there; the merged state comes back to the host."""
        b, d = qs.shape
        best = np.full((b, self.n_tiles), -np.inf)
        second = best.copy()
        inv = np.ascontiguousarray(inv, dtype=np.float64)
        gpu = self.device.type == "cuda" and not self.emulate
        dev = self.device if gpu else torch.device("cpu")
        x, inv_t = torch.from_numpy(qs), torch.from_numpy(inv)
        center = self.center
        if gpu:  # the query batch crosses once per call, the centre once
            x, inv_t = x.to(dev), inv_t.to(dev)
            if self._center_dev is None or self._center_dev.device != dev:
                self._center_dev = self.center.to(dev)
            center = self._center_dev
        state = None
        for ci, c in enumerate(self.chunks):
            n = len(c.index)
            cols = slice(c.first_tile, c.first_tile + -(-n // self.tile_rows))
            act = np.ascontiguousarray(active[:, cols], dtype=np.uint8)
            if not act.any():
                continue
            rows = c.load()
            if isinstance(rows, np.ndarray):  # read-only memmaps too: the kernel never writes
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    rows = torch.from_numpy(rows)
            if rows.device != dev:
                rows = rows.to(dev)
            part = DenoiserState(*(_alloc(shape, t, dev) for shape, t in (
                ((b,), np.float64), ((b,), np.float64), ((b,), np.float64), ((b, d), self._np_dtype),
                ((b,), np.int64), ((b,), np.float64), ((b,), np.float64))))
            cb, cs = _alloc(act.shape, self._np_dtype, dev), _alloc(act.shape, self._np_dtype, dev)
            act_t = torch.from_numpy(act).to(dev) if gpu else torch.from_numpy(act)
            args = dict(
                f64=self.dtype == torch.float64, x=x.data_ptr(), y=rows.data_ptr(), y_type=ROW_TYPES[rows.dtype],
                Q=b, N=n, D=d, center=center.data_ptr(), inv_sigma2=inv_t.data_ptr(),
                row_offset=int(self.starts[ci]), max_logit=part.max_logit.data_ptr(),
                max_logit_lo=part.max_logit_lo.data_ptr(), sum_exp=part.sum_exp.data_ptr(),
                sum_exp_sq=part.sum_exp_sq.data_ptr(), weighted_sum=part.weighted_sum.data_ptr(),
                nearest_index=part.nearest_index.data_ptr(), nearest_sqdist=part.nearest_sqdist.data_ptr(),
                log_weights=0 if self.lw is None else self._chunk_lw[ci].data_ptr())
            prune = dict(active=act_t.data_ptr(), tile_rows=self.tile_rows, tile_best=cb.data_ptr(),
                         tile_second=cs.data_ptr())
            start = time.perf_counter()
            self._launch(args, prune, (b, n, d), dev)
            cb, cs = cb.cpu().numpy(), cs.cpu().numpy()  # on a GPU: waits for the kernel
            self.kernel_seconds += time.perf_counter() - start
            _check_state_finite(part, x, rows)
            on = act.astype(bool)
            best[:, cols] = np.where(on, cb, best[:, cols])
            second[:, cols] = np.where(on, cs, second[:, cols])
            if self.lw is not None:
                part.nearest_key = _nearest_key(part, self._chunk_lw[ci], inv_t, int(self.starts[ci]))
            state = part if state is None else merge_states(state, part)
        if gpu and state is not None:
            key = state.nearest_key
            state = DenoiserState(*(t.cpu() for t in (
                state.max_logit, state.sum_exp, state.sum_exp_sq, state.weighted_sum, state.nearest_index,
                state.nearest_sqdist, state.max_logit_lo)))
            state.nearest_key = None if key is None else key.cpu()
        if state is None:  # no tile active here: every candidate is on another shard
            state = _empty_state(b, d, self._np_dtype)
            if self.lw is not None:
                state.nearest_key = torch.from_numpy(np.full(b, np.inf))
        return state, best, second

    def _launch(self, args: dict, prune: dict, sizes: tuple, dev: torch.device) -> None:
        """One pruned kernel call on the CPU, the CUDA emulator or the GPU (``dev``)."""
        if dev.type == "cpu" and not self.emulate:
            _backend.cpu.pruned_denoiser(args, prune, workers=_workers(None))
            return
        module = _backend.emu_module() if self.emulate else _backend.cuda_module()
        knobs = dict(config=self.cuda_config, splits=self.cuda_splits)
        nbytes = module.pruned_denoiser_workspace_bytes(*sizes, self.tile_rows, **knobs)
        ws = torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device=dev)
        if self.emulate:
            module.pruned_denoiser(args, prune, ws.data_ptr(), **knobs)
            return
        with torch.cuda.device(dev):
            stream = torch.cuda.current_stream(dev).cuda_stream
            module.pruned_denoiser(args, prune, ws.data_ptr(), stream, **knobs)


def _empty_state(b: int, d: int, dtype) -> DenoiserState:
    """The softmax state over no rows (what the kernel writes for a query with no active tile)."""
    def full(shape, value, t=np.float64):
        return torch.from_numpy(np.full(shape, value, dtype=t))

    return DenoiserState(max_logit=full(b, -np.inf), sum_exp=full(b, 0.0), sum_exp_sq=full(b, 0.0),
                         weighted_sum=full((b, d), 0, dtype), nearest_index=full(b, -1, np.int64),
                         nearest_sqdist=full(b, np.inf), max_logit_lo=full(b, 0.0))


def _alloc(shape, np_dtype, dev: torch.device) -> torch.Tensor:
    """Uninitialised output of a kernel: numpy-backed on the host (no torch thread pool), torch
    on a GPU."""
    if dev.type == "cpu":
        return torch.from_numpy(np.empty(shape, dtype=np_dtype))
    return torch.empty(shape, dtype=_TORCH_DTYPES[np.dtype(np_dtype)], device=dev)


def _rows_from(rows, flat: np.ndarray) -> np.ndarray:
    """Rows at positions ``flat`` of a chunk (numpy, memmap or tensor on any device) as numpy:
    a device tensor is gathered there and only the selected rows cross."""
    if isinstance(rows, torch.Tensor):
        if rows.device.type != "cpu":
            idx = torch.from_numpy(np.asarray(flat, dtype=np.int64)).to(rows.device)
            return rows.index_select(0, idx).cpu().numpy()
        rows = rows.numpy()
    return rows[flat]


def build_rows(chunks, dtype: torch.dtype, tile_rows: int = TILE_ROWS, *, device=None,
               emulate: bool = False, shards=None, n_total: int | None = None, log_weights=None) -> PrunedRows:
    """:class:`PrunedRows` from ``(rows, global_index)`` chunks (a shard without rows passes one
    ``[0, D]`` chunk): one pass computes the centre (mean of the decoded rows) and the largest
    centred norm of every tile. ``device``: where the rows live (None: the first resident chunk's
    device, else the CPU); rows on a GPU are read back block by block for this pass. ``emulate``,
    ``shards``, ``n_total`` and ``log_weights``: see :class:`PrunedRows`."""
    if device is None:
        first = chunks[0][0] if chunks else None
        device = first.device if isinstance(first, torch.Tensor) else "cpu"
    block = 4096 - 4096 % tile_rows or tile_rows  # whole tiles per block: a tile's norm in one block

    def blocks(rows):
        r = rows() if callable(rows) else rows
        for a in range(0, r.shape[0], block):
            part = r[a:a + block]
            yield part.cpu() if isinstance(part, torch.Tensor) else part

    total, count, dim = 0.0, 0, None
    for rows, _ in chunks:
        for part in blocks(rows):
            total = total + _decode(part, torch.float64).sum(0)
            count += part.shape[0]
        dim = dim or (None if callable(rows) else int(np.prod(rows.shape[1:])))
    f = np.float32 if dtype == torch.float32 else np.float64
    center = (total / count).astype(f) if count else np.zeros(dim, dtype=f)
    norms = [np.zeros(0)]
    for rows, _ in chunks:
        for part in blocks(rows):
            dist = np.linalg.norm((_decode(part, dtype) - center).astype(np.float64), axis=1)
            norms.append(np.pad(dist, (0, -len(dist) % tile_rows)).reshape(-1, tile_rows).max(1))
    return PrunedRows(chunks, torch.from_numpy(center), np.concatenate(norms) * (1 + 1e-6), dtype,
                      tile_rows, device=device, emulate=emulate, shards=shards, n_total=n_total,
                      log_weights=log_weights)


# -------------------------------------------------------------------------------------------
# Per-call records -> generate outputs


class Recorder:
    """Per-call statistics of a denoiser, in call order, for the queries of one batch."""

    def __init__(self):
        self.records: deque = deque(maxlen=_MAX_RECORDS)

    def add(self, record: dict) -> None:
        self.records.append(record)

    def pop(self) -> list[dict]:
        out = list(self.records)
        self.records.clear()
        return out


# The per-batch outputs of batch_fields, in order.
FIELDS = ("commit_sigma", "commit_index", "eval_sigma", "eval_n_eff", "eval_rows_fraction", "eval_skipped_bound")


def batch_fields(records: list[dict]) -> dict:
    """The commitment outputs of one batch from its denoiser records (one per evaluation).

    Returns:
        ``commit_sigma`` float64 ``[B]`` (σ of the evaluation from which the trajectory stayed
        certified committed, NaN if never), ``commit_index`` int64 ``[B]`` (the training row,
        −1 if never), ``eval_sigma`` float64 ``[E]`` (median σ of each evaluation), ``eval_n_eff``
        float64 ``[E, B]``, ``eval_rows_fraction`` float64 ``[E]`` (fraction of (query, row) pairs
        computed) and ``eval_skipped_bound`` float64 ``[E]`` (largest certified skipped mass).
    """
    if not records:
        raise ValueError("records must hold at least one denoiser call")
    last = records[-1]
    return {
        "commit_sigma": np.asarray(last["commit_sigma"], dtype=np.float64),
        "commit_index": np.asarray(last["commit_index"], dtype=np.int64),
        "eval_sigma": np.array([np.median(r["sigma"]) for r in records]),
        "eval_n_eff": np.stack([np.asarray(r["n_eff"], dtype=np.float64) for r in records]),
        "eval_rows_fraction": np.array([r["rows_fraction"] for r in records]),
        "eval_skipped_bound": np.array([float(np.max(r["skipped_bound"])) for r in records]),
    }


def summarize(fields: list[dict], prune: float) -> dict:
    """Manifest summary over the batches' :func:`batch_fields`."""
    sig = np.concatenate([f["commit_sigma"] for f in fields])
    done = sig[~np.isnan(sig)]
    q = (lambda p: float(np.quantile(done, p))) if done.size else (lambda p: None)
    rows = np.concatenate([f["eval_rows_fraction"] for f in fields])
    return {
        "prune": prune, "seeds": int(sig.size), "committed": int(done.size),
        "commit_sigma_quartiles": [q(0.25), q(0.5), q(0.75)],
        "rows_computed_fraction": float(rows.mean()),
        "max_skipped_bound": float(max(f["eval_skipped_bound"].max() for f in fields)),
    }


def plot_commitment(fields: list[dict], path, title: str | None = None) -> None:
    """Two panels: the distribution of commitment σ, and the median and quartiles of ``n_eff``
    against σ (the "critical window" where generations choose their training image); ``title``
    (e.g. ``plots.run_title``) heads the figure and is kept as the PNG's ``Title`` text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sig = np.concatenate([f["commit_sigma"] for f in fields])
    sig = sig[~np.isnan(sig)]
    # Fixed margins: tight_layout measures every label and took half of the plot's time.
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw=dict(left=0.07, right=0.98, bottom=0.15,
                                                                          top=0.88 if title else 0.96, wspace=0.25))
    if title:
        fig.suptitle(title)
    if sig.size:
        a.hist(sig, bins=np.geomspace(sig.min(), sig.max() * 1.0001 + 1e-12, 30))
    a.set_xscale("log")
    a.set_xlabel("σ at certified commitment")
    a.set_ylabel("seeds")
    sigma = fields[0]["eval_sigma"]
    n_eff = np.concatenate([f["eval_n_eff"] for f in fields], axis=1)
    lo, med, hi = np.quantile(n_eff, [0.25, 0.5, 0.75], axis=1)
    b.fill_between(sigma, lo, hi, alpha=0.3, label="quartiles")
    b.plot(sigma, med, label="median")
    b.set_xscale("log")
    b.set_yscale("log")
    b.set_xlabel("σ")
    b.set_ylabel("n_eff = 1/Σw²")
    b.legend()
    fig.savefig(path, dpi=120, metadata={"Title": title} if title else None)
    plt.close(fig)
