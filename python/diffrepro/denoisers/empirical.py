# SPDX-License-Identifier: Apache-2.0
"""The empirical (multi-delta) optimal denoiser of a training set."""

from __future__ import annotations

import copy
import hashlib
import time

import numpy as np
import torch

from .. import pruning
from .._validate import check_finite
from ..ops import _log_weights, check_some_weight, empirical_denoiser_partial, finalize, merge_states, row_center
from .base import Denoiser, _class_indices, _per_sample, _torch_dtype, _training_images
from .jacobian import empirical_jvp

# Memmapped training sets larger than this are streamed in chunks instead of loaded whole.
_RESIDENT_LIMIT_BYTES = 1 << 30
# Default chunk size (bytes of training rows) when streaming.
_STREAM_CHUNK_BYTES = 256 << 20
# A float32 call whose logits may be off by more than this (the worst-case rounding bound of the
# squared distances over 2 sigma^2) runs in float64: at small sigma float32 rounding otherwise
# decides between near-duplicate training images, and the dense and pruned paths round differently.
_NEAR_TIE_LOGIT_ERROR = 1.0

def sha256_rows(rows) -> str:
    """SHA-256 of the C-contiguous bytes of an array or tensor of rows, read in 64 MiB chunks (for
    a uint8 ``[N, C, H, W]`` set it equals :func:`diffrepro.data.dataset_hash`)."""
    h = hashlib.sha256()
    row_bytes = rows[0].numel() * rows.element_size() if isinstance(rows, torch.Tensor) else rows[0].nbytes
    step = max(1, (64 << 20) // max(1, row_bytes))
    for a in range(0, len(rows), step):
        chunk = rows[a:a + step]
        chunk = chunk.detach().cpu().numpy() if isinstance(chunk, torch.Tensor) else chunk
        h.update(np.ascontiguousarray(chunk).data)
    return h.hexdigest()


def _cast(t: torch.Tensor, device, dtype) -> torch.Tensor:
    """``t.to(device, dtype)``; CPU to CPU through numpy, single-threaded: torch would wake its
    OpenMP pool for each small cast, whose spinning threads compete with the kernel's workers."""
    if t.device.type == "cpu" and torch.device(device).type == "cpu":
        if t.dtype == dtype:
            return t
        with np.errstate(over="ignore"):  # an overflow becomes inf, which _check_query names
            return torch.from_numpy(t.detach().numpy().astype(torch.empty(0, dtype=dtype).numpy().dtype))
    return t.to(device=device, dtype=dtype)


def _check_query(x: torch.Tensor, q: torch.Tensor) -> None:
    """Refuses a NaN/Inf query (or one whose squared norm overflows float64) before any state is
    touched, with the same message on the dense and pruned paths (the pruning bounds and
    commitments persist from call to call)."""
    on_host = q.device.type == "cpu"  # numpy there: torch would wake its thread pool (see _cast)
    if not bool(np.isfinite(q.detach().numpy()).all() if on_host else torch.isfinite(q).all()):
        check_finite("x", x)
        raise ValueError(f"x / s must be finite in {q.dtype}, got x up to {float(x.abs().max()):.3g} "
                         f"(shape {list(x.shape)}), which overflows it")
    if on_host:
        with np.errstate(over="ignore"):
            sq = np.square(q.detach().numpy().astype(np.float64)).sum(1)
    else:
        sq = q.double().square().sum(1).cpu().numpy()
    if not np.isfinite(sq).all():  # the logits and the pruning bounds need ||x/s||^2 in float64
        raise ValueError(f"x / s must have a squared norm finite in float64, got x up to "
                         f"{float(x.abs().max()):.3g} (shape {list(x.shape)})")


class RecordedCalls:
    """The call of the empirical denoisers (one process or a sharded set): for each class group
    the pruned path (:mod:`diffrepro.pruning`) or the dense one, and a record of the call's
    statistics for :meth:`pop_records`.

    A subclass provides ``prune``, ``device``, ``dtype``, ``_recorder``, ``_groups(x,
    class_labels)`` (yields ``(query index tensor or None, class or None)``), ``_rows_in(k)``
    (rows of class ``k`` in the whole set), ``_pruned_rows(k)`` and ``_dense(q, sigma, k)`` (returns
    the output, ``n_eff`` and the global nearest row).
    """

    def _x0(self, x, sigma, s, class_labels):
        start = time.perf_counter()
        b = x.shape[0]
        exact = self._near_tie(x, sigma, s)
        q = _cast(x.reshape(b, -1), self.device, torch.float64 if exact else self.dtype)
        sigma = sigma.to(self.device)
        if s is not None and not bool((s == 1).all()):
            q = q / s.to(device=q.device, dtype=q.dtype)[:, None]  # x~ = x / s, as the kernel forms it
        _check_query(x, q)
        record = {"sigma": sigma.cpu().numpy(), "n_eff": np.ones(b), "nearest": np.full(b, -1),
                  "skipped_bound": np.zeros(b), "commit_sigma": np.full(b, np.nan),
                  "commit_index": np.full(b, -1), "rows_computed": 0.0, "rows_total": 0.0,
                  "kernel_seconds": 0.0}
        out = None
        for sel, k in self._groups(x, class_labels):
            idx = np.arange(b) if sel is None else sel.numpy()
            n_rows = self._rows_in(k)
            qk = q if sel is None else q[sel.to(self.device)].contiguous()
            if self.prune > 0:
                rows = self._pruned_rows(k)
                rows = rows.in_float64() if exact else rows
                # The certificate's bookkeeping runs on the host (PrunedRows moves what the
                # kernel needs); the result goes back to the device.
                res, st = rows(qk.cpu(), record["sigma"][idx], self.prune)
                res = res.to(self.device)
                record["kernel_seconds"] += rows.kernel_seconds
                for key in ("n_eff", "nearest", "skipped_bound", "commit_sigma", "commit_index"):
                    record[key][idx] = st[key]
                record["rows_computed"] += float(st["rows_computed"].sum())
            else:
                t = time.perf_counter()
                res, n_eff, nearest = self._dense(qk, sigma if sel is None else sigma[sel.to(sigma.device)], k)
                record["kernel_seconds"] += time.perf_counter() - t
                record["n_eff"][idx] = n_eff.cpu().numpy()
                record["nearest"][idx] = nearest.cpu().numpy()
                record["rows_computed"] += float(n_rows * len(idx))
            record["rows_total"] += float(n_rows * len(idx))
            if sel is None:
                out = res
            else:
                out = torch.empty_like(q) if out is None else out
                out[sel.to(self.device)] = res
        record["rows_fraction"] = record.pop("rows_computed") / record.pop("rows_total")
        out = _cast(out.reshape(x.shape), x.device, x.dtype)
        record["seconds"] = time.perf_counter() - start
        self._recorder.add(record)
        return out

    def _near_tie(self, x, sigma, s) -> bool:
        """Whether this call runs in float64 to keep float32 rounding out of near-ties (no here)."""
        return False

    def pop_records(self) -> list[dict]:
        """Statistics of every call since the last pop, in call order, and forget them.

        Returns:
            One dict per call: ``sigma``, ``n_eff`` (``1/Σw²``), ``nearest`` (global row),
            ``skipped_bound`` (certified skipped mass relative to the largest weight),
            ``commit_sigma``/``commit_index`` (NaN/−1 unless committed) as ``[B]`` arrays, and
            ``rows_fraction``, the fraction of (query, row) pairs computed, ``seconds`` (the
            call) and ``kernel_seconds`` (inside the kernels; the rest is bookkeeping).
            :func:`diffrepro.pruning.batch_fields` turns a batch's records into its outputs.
        """
        return self._recorder.pop()


class EmpiricalDenoiser(RecordedCalls, Denoiser):
    """Posterior mean of the empirical training distribution (Zhang et al. 2024, Thm 1; Li, Dai, Qu 2024, eq. 5).

    ``D(x̃;σ) = Σ_i softmax_i(−‖x̃ − y_i‖²/(2σ²)) y_i``, computed by
    :func:`diffrepro.empirical_denoiser`. A uint8 training set stays uint8 (the kernel decodes
    ``u/127.5 − 1``), so 50k CIFAR images take 0.15 GB.

    With ``labels``, ``class_labels`` restricts each query to the rows of its class (the
    class-conditional optimum). Queries are grouped by class; each class's rows are gathered
    into one contiguous block the first time that class is asked for, and cached (at most one
    extra copy of the training set in total).

    When ``chunk_rows`` is set, or ``train`` is an ``np.memmap`` larger than 1 GiB, the
    training rows are streamed in chunks through :func:`diffrepro.empirical_denoiser_partial`,
    :func:`diffrepro.merge_states` and :func:`diffrepro.finalize` (memmap chunks are read per
    call; the result equals the in-memory one up to float rounding).

    Pruning (on by default, CPU and CUDA): rows whose weight is certified below ``prune``
    relative to the largest, all skipped rows together, are skipped, and a query left with one
    row is committed to it (O(D) per later call); see :mod:`diffrepro.pruning` for the
    certificate. ``prune=0`` is the dense path. Each call's statistics (σ, ``n_eff``, nearest
    row, certified skipped mass, fraction of rows computed, commitment σ and row per query) are
    kept for :meth:`pop_records`. On a CUDA device the pruned CUDA kernel skips the inactive
    (query, tile) pairs on the GPU (``pruned_denoiser_cuda``, docs/cuda.md); the certificate's
    bookkeeping stays on the host, so each call moves the query batch, the tile mask, the state
    and the tiles' best scores between host and device.

    Args:
        train: uint8 ``[N, C, H, W]`` (numpy, np.memmap or tensor), float in [-1, 1], or a
            :class:`diffrepro.data.Dataset` (its labels are used unless ``labels`` is given).
        labels: optional int ``[N]`` class labels.
        dtype: compute dtype, torch.float32 (default, fast) or torch.float64 (reference).
        device: where the training set lives and the kernel runs.
        chunk_rows: stream this many training rows per kernel call (None: one call).
        label_dim: number of classes (default ``max(labels) + 1``).
        prune: relative weight below which rows are skipped, with a certificate (0: dense).
        log_weights: optional float ``[N]`` per-row log-weights ``lw_i``: the weights become
            ``exp(−‖x̃ − y_i‖²/(2σ²) + lw_i)``, the denoiser of the weighted training set
            ``Σ_i e^{lw_i} δ_{y_i}`` (duplicate counts: ``log(count)``; importance weights; the
            exact posterior of :mod:`diffrepro.inverse`). −inf excludes a row; NaN/+inf are
            refused. ``class_labels`` use the log-weights of their class's rows; the nearest
            row is then the row of largest weight. See :meth:`reweighted`.
    """

    def __init__(self, train, *, labels=None, dtype: torch.dtype = torch.float32,
                 device="cpu", chunk_rows: int | None = None, label_dim: int | None = None,
                 prune: float = pruning.DEFAULT_PRUNE, log_weights=None):
        train, labels = _training_images(train, labels, dtype)
        n, c, h, w = train.shape
        if chunk_rows is not None and (int(chunk_rows) != chunk_rows or chunk_rows < 1):
            raise ValueError(f"chunk_rows must be a positive integer or None, got {chunk_rows!r}")
        self.dtype, self.device = dtype, torch.device(device)
        self.prune = pruning.check_prune(prune)
        self._pruned: dict = {}
        self._recorder = pruning.Recorder()
        self.img_channels, self.img_resolution = int(c), int(h)
        self.num_rows = int(n)

        if _torch_dtype(train) not in (torch.uint8, torch.float32, torch.float64):
            raise TypeError(f"train must be uint8 or float32/float64, got dtype {train.dtype}")
        row_bytes = train[0].nbytes if isinstance(train, np.ndarray) else \
            train[0].numel() * train.element_size()
        self._memmap = isinstance(train, np.memmap) and n * row_bytes > _RESIDENT_LIMIT_BYTES
        if self._memmap:
            self.chunk_rows = int(chunk_rows or max(1, _STREAM_CHUNK_BYTES // row_bytes))
            self._train = train
        else:
            self.chunk_rows = None if chunk_rows is None else int(chunk_rows)
            self._train = self._to_device(np.array(train) if isinstance(train, np.memmap)
                                          else train)

        self._class_rows: list[np.ndarray] = []
        self._class_blocks: dict[int, torch.Tensor] = {}
        self._centers: dict[tuple, torch.Tensor] = {}
        self.label_dim = 0
        if labels is not None:
            labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
            if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer) \
                    or labels.min() < 0:
                raise ValueError(f"labels must be {n} non-negative integers, got "
                                 f"{labels.dtype} {labels.shape}")
            self.label_dim = int(label_dim if label_dim is not None else labels.max() + 1)
            if labels.max() >= self.label_dim:
                raise ValueError(f"label_dim={self.label_dim} but labels go up to {labels.max()}")
            self._class_rows = [np.flatnonzero(labels == k) for k in range(self.label_dim)]
        self._labels_sha256 = None if labels is None else hashlib.sha256(labels.astype(np.int64).tobytes()).hexdigest()
        self._fingerprint = None
        self._spread: tuple[np.ndarray, float] | None = None
        self._log_weights = _log_weights(log_weights, n, self.device)
        check_some_weight(self._log_weights)

    def reweighted(self, log_weights) -> "EmpiricalDenoiser":
        """This denoiser with ``log_weights`` added to its rows' log-weights (``[N]``, as in the
        constructor), sharing the training rows: e.g. the exact posterior of a measurement
        (:class:`diffrepro.inverse.PosteriorDenoiser`). Pruning state and records start afresh."""
        extra = _log_weights(log_weights, self.num_rows, self.device)
        out = copy.copy(self)
        out._log_weights = extra if self._log_weights is None else self._log_weights + extra
        check_some_weight(out._log_weights)
        out._pruned, out._recorder, out._fingerprint = {}, pruning.Recorder(), None
        return out

    def float64_rows(self, block: int = 1024):
        """The training images in index order, decoded to float64 ``[n, C, H, W]`` CPU tensors
        (uint8 as ``u/127.5 − 1``), ``block`` rows at a time."""
        shape = (self.img_channels, self.img_resolution, self.img_resolution)
        for lo in range(0, self.num_rows, block):
            rows = self._train[lo:lo + block]
            rows = rows.cpu() if isinstance(rows, torch.Tensor) else torch.from_numpy(np.asarray(rows))
            rows = rows.to(torch.float64) / 127.5 - 1 if rows.dtype == torch.uint8 else rows.to(torch.float64)
            yield rows.reshape(-1, *shape)

    def _class_log_weights(self, k: int | None, lo: int, hi: int):
        """Log-weights of rows ``[lo, hi)`` of class ``k``'s (virtual, ascending-index) array
        (None: all rows), or None without log-weights."""
        if self._log_weights is None:
            return None
        if k is None:
            return self._log_weights[lo:hi]
        return self._log_weights[torch.from_numpy(self._class_rows[k][lo:hi]).to(self.device)]

    def fingerprint(self) -> dict:
        """Content identity for run records: sha256 of the training rows as stored (for uint8 rows
        the :func:`diffrepro.data.dataset_hash` of the set) and of the labels, the compute dtype,
        device and streaming chunk size. The row hash is computed once and cached."""
        if self._fingerprint is None:
            rows = self._train
            self._fingerprint = {
                "train_sha256": sha256_rows(rows), "n_train": self.num_rows,
                "rows_dtype": str(_torch_dtype(rows)).replace("torch.", ""),
                "labels_sha256": self._labels_sha256, "label_dim": self.label_dim,
                "dtype": str(self.dtype).replace("torch.", ""), "device": self.device.type,
                "chunk_rows": self.chunk_rows, "prune": self.prune}
            if self._log_weights is not None:
                lw = self._log_weights.cpu().numpy()
                self._fingerprint["log_weights_sha256"] = hashlib.sha256(lw.tobytes()).hexdigest()
        return dict(self._fingerprint)

    def _near_tie(self, x, sigma, s) -> bool:
        """Float32 calls over uint8 rows run in float64 (dense and pruned alike, so both give
        the float64 answer) where the float32 logits' rounding bound exceeds
        _NEAR_TIE_LOGIT_ERROR for some query: ``(2 (D + 8) + 8) u (|x/s - c| + max|y - c|)^2 /
        2 sigma^2`` (Higham's dot-product bound, as pruning's certificate uses it), with c the
        mean row. There the float32 scores cannot order rows whose weights differ by a factor e:
        near-duplicate images, between which float32 rounding would choose."""
        if self.dtype != torch.float32 or _torch_dtype(self._train) != torch.uint8:
            return False
        center, spread = self._row_spread()
        d = center.size
        # numpy, single-threaded (see _cast): a check on every call must not wake torch's pool
        q = x.reshape(x.shape[0], -1).detach().cpu().numpy().astype(np.float64)
        q = q if s is None else q / s.cpu().numpy()[:, None]
        with np.errstate(over="ignore", invalid="ignore"):  # a NaN query stays float32 and is refused there
            err = (2 * (d + 8) + 8) * 2.0**-24 * (np.linalg.norm(q - center, axis=1) + spread) ** 2
            return bool((err / (2 * sigma.cpu().numpy() ** 2) > _NEAR_TIE_LOGIT_ERROR).any())

    def _row_spread(self) -> tuple[np.ndarray, float]:
        """``(c, max_i |y_i - c|)`` with c the mean decoded row, one pass, computed once."""
        if self._spread is None:
            rows = self._train.reshape(self.num_rows, -1)

            def block(a):
                part = rows[a:a + 4096]
                return (part.cpu().numpy() if isinstance(part, torch.Tensor) else np.asarray(part)) / 127.5 - 1

            step = range(0, self.num_rows, 4096)
            center = sum(block(a).sum(0) for a in step) / self.num_rows
            spread = max(float(np.linalg.norm(block(a) - center, axis=1).max()) for a in step)
            self._spread = (center, spread)
        return self._spread

    def class_count(self, k: int) -> int:
        """Number of training rows of class ``k`` (0 for a class outside ``[0, label_dim)``)."""
        return len(self._class_rows[k]) if 0 <= k < self.label_dim else 0

    def _to_device(self, rows) -> torch.Tensor:
        """Training rows -> tensor on the device: uint8 kept, floats cast to the compute dtype."""
        t = torch.from_numpy(rows) if isinstance(rows, np.ndarray) else rows
        t = t.to(self.device)
        return (t if t.dtype == torch.uint8 else t.to(self.dtype)).contiguous()

    def _stream_rows(self, rows: np.ndarray):
        """A memmap slice for the kernel: passed as is on the CPU (the kernel reads the pages
        without a copy) when its dtype is usable there, else copied to the device."""
        usable = _torch_dtype(rows) in (torch.uint8, self.dtype)
        if self.device.type == "cpu" and usable:
            return rows
        return self._to_device(np.array(rows))

    def _class_train(self, k: int | None) -> torch.Tensor:
        """Resident rows of class ``k`` (all rows for None), cached per class."""
        if k is None:
            return self._train
        if k not in self._class_blocks:
            rows = torch.from_numpy(self._class_rows[k]).to(self.device)
            self._class_blocks[k] = self._train.index_select(0, rows)
        return self._class_blocks[k]

    def _spans(self, k: int | None) -> list[tuple[int, int]]:
        """``[lo, hi)`` ranges of class ``k``'s rows (None: all rows, in index order) streamed one
        kernel call at a time; empty ranges are left out."""
        n = self.num_rows if k is None else len(self._class_rows[k])
        if not self._memmap:
            step = self.chunk_rows or n
            return [(a, min(a + step, n)) for a in range(0, n, step)]
        if k is None:
            return [(a, min(a + self.chunk_rows, n)) for a in range(0, n, self.chunk_rows)]
        rows = self._class_rows[k]
        bounds = [np.searchsorted(rows, [a, a + self.chunk_rows])
                  for a in range(0, self.num_rows, self.chunk_rows)]
        return [(int(lo), int(hi)) for lo, hi in bounds if hi > lo]

    def _load(self, k: int | None, lo: int, hi: int):
        """Rows ``[lo, hi)`` of class ``k``'s (virtual, ascending-index) array, kernel-ready."""
        if not self._memmap:
            return self._class_train(k)[lo:hi]
        if k is None:
            return self._stream_rows(self._train[lo:hi])
        return self._to_device(self._train[self._class_rows[k][lo:hi]])

    def _chunks(self, k: int | None):
        """Yield ``(rows, row_offset)`` covering class ``k``'s rows (None: all) in index order.

        ``row_offset`` counts rows of the class's own (virtual, ascending-index) array, so the
        merged state's nearest index is local to that array; :meth:`_global_index` maps it back.
        """
        for lo, hi in self._spans(k):
            yield self._load(k, lo, hi), lo

    def _global_index(self, idx: torch.Tensor, k: int | None) -> torch.Tensor:
        if k is None:
            return idx
        return torch.from_numpy(self._class_rows[k]).to(idx.device)[idx]

    def _row_center(self, k: int | None, lo: int, hi: int, rows, dtype: torch.dtype) -> torch.Tensor:
        """The kernel's centring vector of a chunk in ``dtype`` (the call's: float64 where near-ties
        run in float64), computed on first use and kept (a strided sample of 256 rows, decoded: it
        was a tenth of a call at Q=256, N=5,170)."""
        key = (k, lo, hi, dtype)
        if key not in self._centers:
            self._centers[key] = row_center(rows, dtype)
        return self._centers[key]

    def _streamed(self, q, sigma, s, k):
        state = None
        for lo, hi in self._spans(k):
            rows = self._load(k, lo, hi)
            lw = self._class_log_weights(k, lo, hi)
            part = empirical_denoiser_partial(q, rows, sigma, s=s, row_offset=lo, log_weights=lw,
                                              _row_center=self._row_center(k, lo, hi, rows, q.dtype))
            state = part if state is None else merge_states(state, part)
        if state is None:
            raise ValueError(f"class {k} has no training rows")
        return finalize(state)

    def _groups(self, x, class_labels):
        """Split the batch by class: yields ``(query index tensor or None, class or None)``."""
        classes = _class_indices(class_labels, x.shape[0], self.label_dim, "cpu")
        if classes is None:
            yield None, None
            return
        for k in torch.unique(classes).tolist():
            if len(self._class_rows[k]) == 0:
                raise ValueError(f"class_labels ask for class {k}, which has no training rows")
            lw = self._class_log_weights(k, 0, len(self._class_rows[k]))
            if lw is not None and not bool((lw > -float("inf")).any()):
                raise ValueError(f"class_labels ask for class {k}, whose rows all have log-weight -inf")
            yield torch.nonzero(classes == k).reshape(-1), k

    def _rows_in(self, k: int | None) -> int:
        return self.num_rows if k is None else len(self._class_rows[k])

    def _dense(self, q, sigma, k):
        res, info = self._streamed(q, sigma, 1.0, k)
        return res, info["n_eff"], self._global_index(info["nearest_index"], k)

    def _pruned_rows(self, k: int | None) -> pruning.PrunedRows:
        """The pruning state of class ``k``'s rows (None: all rows), built on first use:
        resident rows are copied once in an order that puts nearby images into the same tile
        (:func:`diffrepro.pruning.cluster_order`); streamed rows keep their order and are read
        per call."""
        if k not in self._pruned:
            base = np.arange(self.num_rows) if k is None else self._class_rows[k]
            if not self._memmap and self.chunk_rows is None:
                flat = self._train.reshape(self.num_rows, -1)
                own = flat if k is None else flat.index_select(0, torch.from_numpy(base).to(flat.device))
                order = pruning.cluster_order(own.cpu().numpy())
                del own
                rows = flat.index_select(0, torch.from_numpy(base[order]).to(self.device))
                chunks = [(rows.contiguous(), base[order])]
            else:
                def loader(lo, hi):
                    return lambda: self._load(k, lo, hi).reshape(hi - lo, -1)

                chunks = [(loader(lo, hi), base[lo:hi]) for lo, hi in self._spans(k)]
            lw = None
            if self._log_weights is not None:
                all_lw = self._log_weights.cpu().numpy()
                lw = [all_lw[index] for _, index in chunks]
            self._pruned[k] = pruning.build_rows(chunks, self.dtype, device=self.device, log_weights=lw)
        return self._pruned[k]

    def _jvp(self, x, sigma, v, class_labels):
        """Exact ``Cov_w(y) v / σ²`` in float64 over each query's (class) rows, one chunked
        pass (:func:`~diffrepro.denoisers.jacobian.empirical_jvp`); symmetric, so also the VJP."""
        q, vq = (t.reshape(len(t), -1).to(self.device) for t in (x, v))
        out = torch.empty(q.shape, dtype=torch.float64, device=self.device)
        for sel, k in self._groups(x, class_labels):
            sel = slice(None) if sel is None else sel.to(self.device)
            rows = (chunk for chunk, _ in self._chunks(k))
            lw = None if self._log_weights is None else \
                [self._class_log_weights(k, lo, hi) for lo, hi in self._spans(k)]
            out[sel] = empirical_jvp(rows, q[sel], sigma[sel].to(self.device), vq[sel], log_weights=lw)[1]
        return out.reshape(x.shape).to(device=x.device, dtype=x.dtype)

    _vjp = _jvp

    def nearest(self, x: torch.Tensor, sigma, s=1.0, class_labels=None):
        """Diagnostics from the softmax: nearest training row and effective sample size.

        Args:
            x: float ``[B, C, H, W]`` scaled state (``x/s`` is compared to the training rows).
            sigma: scalar or ``[B]`` noise levels.
            s: scalar or ``[B]`` signal scales.
            class_labels: as in :meth:`__call__` (restricts the search to the class's rows).

        Returns:
            ``(nearest_index, n_eff)``: int64 ``[B]`` global row indices of the nearest training
            image (lowest index on ties) and float64 ``[B]`` ``n_eff = 1/Σ w_i²``.
        """
        self._check_x(x)
        b = x.shape[0]
        q = x.reshape(b, -1).to(device=self.device, dtype=self.dtype)
        sigma = _per_sample(sigma, b, self.device, "sigma")
        s = _per_sample(s, b, self.device, "s")
        index = torch.empty(b, dtype=torch.int64, device=self.device)
        n_eff = torch.empty(b, dtype=torch.float64, device=self.device)
        for sel, k in self._groups(x, class_labels):
            sel = slice(None) if sel is None else sel.to(self.device)
            _, info = self._streamed(q[sel], sigma[sel], s[sel], k)
            index[sel] = self._global_index(info["nearest_index"].to(self.device), k)
            n_eff[sel] = info["n_eff"].to(device=self.device, dtype=torch.float64)
        return index, n_eff
