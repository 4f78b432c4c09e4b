# SPDX-License-Identifier: Apache-2.0
"""The empirical (multi-delta) optimal denoiser of a training set."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from ..data import Dataset
from ..ops import empirical_denoiser, empirical_denoiser_partial, finalize, merge_states
from .base import Denoiser, _class_indices, _per_sample, _torch_dtype
from .jacobian import empirical_jvp

# Memmapped training sets larger than this are streamed in chunks instead of loaded whole.
_RESIDENT_LIMIT_BYTES = 1 << 30
# Default chunk size (bytes of training rows) when streaming.
_STREAM_CHUNK_BYTES = 256 << 20

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


class EmpiricalDenoiser(Denoiser):
    """Posterior mean of the empirical training distribution (SPEC §1; P1 Thm 1, P2 eq. 5).

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

    Args:
        train: uint8 ``[N, C, H, W]`` (numpy, np.memmap or tensor), float in [-1, 1], or a
            :class:`diffrepro.data.Dataset` (its labels are used unless ``labels`` is given).
        labels: optional int ``[N]`` class labels.
        dtype: compute dtype, torch.float32 (default, fast) or torch.float64 (reference).
        device: where the training set lives and the kernel runs.
        chunk_rows: stream this many training rows per kernel call (None: one call).
        label_dim: number of classes (default ``max(labels) + 1``).
    """

    def __init__(self, train, *, labels=None, dtype: torch.dtype = torch.float32,
                 device="cpu", chunk_rows: int | None = None, label_dim: int | None = None):
        if isinstance(train, Dataset):
            labels = train.labels if labels is None else labels
            train = train.images
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if not isinstance(train, (np.ndarray, torch.Tensor)) or train.ndim != 4:
            raise ValueError(f"train must be a [N, C, H, W] array or tensor, got "
                             f"{type(train).__name__} {tuple(getattr(train, 'shape', ()))}")
        n, c, h, w = train.shape
        if n < 1 or h != w:
            raise ValueError(f"train must have N >= 1 square images, got shape {tuple(train.shape)}")
        if chunk_rows is not None and (int(chunk_rows) != chunk_rows or chunk_rows < 1):
            raise ValueError(f"chunk_rows must be a positive integer or None, got {chunk_rows!r}")
        self.dtype, self.device = dtype, torch.device(device)
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
                "chunk_rows": self.chunk_rows}
        return dict(self._fingerprint)

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

    def _chunks(self, k: int | None):
        """Yield ``(rows, row_offset)`` covering class ``k``'s rows (None: all) in index order.

        ``row_offset`` counts rows of the class's own (virtual, ascending-index) array, so the
        merged state's nearest index is local to that array; :meth:`_global_index` maps it back.
        """
        if not self._memmap:
            train = self._class_train(k)
            step = self.chunk_rows or len(train)
            for a in range(0, len(train), step):
                yield train[a:a + step], a
            return
        rows = None if k is None else self._class_rows[k]
        for a in range(0, self.num_rows, self.chunk_rows):
            b = min(a + self.chunk_rows, self.num_rows)
            if rows is None:
                yield self._stream_rows(self._train[a:b]), a
            else:
                lo, hi = np.searchsorted(rows, [a, b])
                if hi > lo:
                    yield self._to_device(self._train[rows[lo:hi]]), int(lo)

    def _global_index(self, idx: torch.Tensor, k: int | None) -> torch.Tensor:
        if k is None:
            return idx
        return torch.from_numpy(self._class_rows[k]).to(idx.device)[idx]

    def _streamed(self, q, sigma, s, k):
        state = None
        for rows, offset in self._chunks(k):
            part = empirical_denoiser_partial(q, rows, sigma, s=s, row_offset=offset)
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
            yield torch.nonzero(classes == k).reshape(-1), k

    def _x0(self, x, sigma, s, class_labels):
        b = x.shape[0]
        q = x.reshape(b, -1).to(device=self.device, dtype=self.dtype)
        sigma = sigma.to(self.device)
        s = torch.ones_like(sigma) if s is None else s.to(self.device)
        out = torch.empty_like(q)
        for sel, k in self._groups(x, class_labels):
            sel = slice(None) if sel is None else sel.to(self.device)
            if self._memmap or self.chunk_rows is not None:
                out[sel] = self._streamed(q[sel], sigma[sel], s[sel], k)[0]
            else:
                out[sel] = empirical_denoiser(q[sel], self._class_train(k), sigma[sel], s=s[sel])
        return out.reshape(x.shape).to(device=x.device, dtype=x.dtype)

    def _jvp(self, x, sigma, v, class_labels):
        """Exact ``Cov_w(y) v / σ²`` in float64 over each query's (class) rows, one chunked
        pass (:func:`~diffrepro.denoisers.jacobian.empirical_jvp`); symmetric, so also the VJP."""
        q, vq = (t.reshape(len(t), -1).to(self.device) for t in (x, v))
        out = torch.empty(q.shape, dtype=torch.float64, device=self.device)
        for sel, k in self._groups(x, class_labels):
            sel = slice(None) if sel is None else sel.to(self.device)
            rows = (chunk for chunk, _ in self._chunks(k))
            out[sel] = empirical_jvp(rows, q[sel], sigma[sel].to(self.device), vq[sel])[1]
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
