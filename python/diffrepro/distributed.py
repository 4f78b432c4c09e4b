# SPDX-License-Identifier: Apache-2.0
"""Multi-process runs on ``torch.distributed``: the job context, fault-aware collectives, per-file
claims between independent jobs, the sharded empirical denoiser and the sharded top-k merge.

A job started by ``torchrun`` (or any launcher that sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/
``MASTER_PORT``) calls :func:`init`; gloo carries CPU runs, NCCL CUDA runs, and a gloo side group
carries the control messages in both cases. Every rank keeps a heartbeat counter in the job's
store (the torchrun agent's store, or the ``file://`` / TCP store of the rendezvous), so a rank
that is killed or stops running is named by the others within the timeout instead of hanging
them: :meth:`Context.barrier` waits as long as every peer's heartbeat advances and raises
:class:`~diffrepro.errors.RunError` naming the ranks whose heartbeat stopped, and a failed
collective is reported the same way.

Independent jobs (SLURM array tasks, two users) coordinate through :func:`claim`: an atomic
``O_CREAT|O_EXCL``-style lock file per output holding the owner's pid, host and process start
time, broken only when the owner is provably dead (same host, process gone).
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import gc
import hashlib
import json
import os
import re
import socket
import tempfile
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import torch

from . import data, pruning
from .denoisers.base import Denoiser, _class_indices, _per_sample
from .denoisers.empirical import RecordedCalls, sha256_rows
from .errors import RunError
from .ops import _log_weights, empirical_denoiser_partial, finalize, merge_topk

__all__ = ["Claim", "Context", "ShardedEmpiricalDenoiser", "all_gather_topk", "all_reduce", "claim", "current",
           "held_by_another", "init", "parse_part", "shard_bounds", "single"]

# A heartbeat every min(1 s, timeout / 10); a rank is declared lost after `timeout` seconds without one.
_BEAT_SECONDS = 1.0
_POLL_SECONDS = 0.01


def shard_bounds(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of shard ``rank`` when ``n`` rows are split into ``world_size`` contiguous
    shards whose sizes differ by at most one (the first ``n % world_size`` shards are larger)."""
    q, r = divmod(int(n), int(world_size))
    lo = rank * q + min(rank, r)
    return lo, lo + q + (rank < r)


# ------------------------------------------------------------------------------------------------
# Job context


class Context:
    """One process's view of a job: its rank, the world size and fault-aware collectives.

    Use :func:`init` to create one (or :func:`single` for one process, whose collectives are
    no-ops). Every rank must call the collectives in the same order.

    Attributes:
        rank: this process's rank.
        world_size: number of processes.
        timeout: seconds without a heartbeat (or a collective's progress) after which a peer is lost.
        group: the process group of the data collectives (NCCL on CUDA, gloo on CPU; None alone).
    """

    def __init__(self, rank: int = 0, world_size: int = 1, *, timeout: float = 600.0, group=None,
                 control=None, store=None):
        self.rank, self.world_size, self.timeout = int(rank), int(world_size), float(timeout)
        self.group, self._control, self._store = group, control, store
        self._lock = threading.Lock()
        self._barriers = 0
        self._stop = threading.Event()
        self._beat_thread = None
        if world_size > 1:
            self._beat()
            self._beat_thread = threading.Thread(target=self._beat_loop, name="diffrepro-heartbeat", daemon=True)
            self._beat_thread.start()
            atexit.register(self._stop_beat)  # a daemon thread inside a store call aborts the exit

    def __repr__(self) -> str:
        return f"Context(rank={self.rank}, world_size={self.world_size}, timeout={self.timeout})"

    # heartbeats ---------------------------------------------------------------------------------
    def _stop_beat(self) -> None:
        self._stop.set()
        if self._beat_thread is not None:
            self._beat_thread.join()

    def _store_add(self, key: str, value: int) -> int:
        with self._lock:
            return int(self._store.add(key, value))

    def _beat(self) -> None:
        self._store_add(f"hb/{self.rank}", 1)

    @property
    def _interval(self) -> float:
        return min(_BEAT_SECONDS, self.timeout / 10)

    def _beat_loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._beat()
            except Exception:  # the store is gone: the waiting side reports it
                return

    def _beats(self) -> list[int]:
        return [self._store_add(f"hb/{r}", 0) for r in range(self.world_size)]

    def _lost(self, wait: float | None = None) -> list[int]:
        """Ranks whose heartbeat does not advance within ``wait`` seconds (default: 3 beats)."""
        wait = 3 * self._interval if wait is None else wait
        try:
            before = self._beats()
            time.sleep(wait)
            after = self._beats()
        except Exception:  # the store's host (rank 0 or the launcher) is gone
            return [0] if self.rank != 0 else []
        return [r for r in range(self.world_size) if r != self.rank and after[r] == before[r]]

    def fail(self, exc: BaseException) -> None:
        """Tell the other ranks that this one stops with ``exc`` (they raise at their next
        barrier or failed collective instead of waiting for the timeout)."""
        if self.world_size == 1 or getattr(exc, "lost_ranks", None):
            return  # a lost rank is found by every peer itself, within the same timeout
        try:
            with self._lock:
                self._store.set(f"failed/{self.rank}", f"{type(exc).__name__}: {exc}".splitlines()[0][:500])
            self._store_add("failed", 1)
        except Exception:  # the store is gone too: the peers find out by themselves
            pass

    def _failed(self) -> RunError | None:
        """The error of a rank that announced its failure (:meth:`fail`), if any."""
        if not self._store_add("failed", 0):
            return None
        for r in range(self.world_size):
            with self._lock:
                if r != self.rank and self._store.check([f"failed/{r}"]):
                    msg = self._store.get(f"failed/{r}").decode(errors="replace")
                    return RunError(f"rank {self.rank} of {self.world_size}: rank {r} stopped with {msg}")
        return None

    def _error(self, what: str, exc: BaseException | None = None, lost: list[int] | None = None) -> RunError:
        try:
            failed = self._failed()
        except Exception:
            failed = None
        if failed is not None:
            return failed
        lost = self._lost() if lost is None else lost
        who = (f"lost rank{'s' if len(lost) > 1 else ''} {', '.join(map(str, lost))} (killed or hung: no "
               f"heartbeat for {self.timeout:g} s)" if lost else "a peer failed")
        detail = f" [{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}]" if exc else ""
        err = RunError(f"rank {self.rank} of {self.world_size}: {who} during {what}{detail}; finished outputs "
                       "are kept, rerun with any number of processes to resume")
        err.lost_ranks = lost
        return err

    # collectives --------------------------------------------------------------------------------
    def barrier(self, what: str = "barrier") -> None:
        """Wait until every rank arrives; raise :class:`RunError` naming the ranks whose heartbeat
        stopped for ``timeout`` seconds (a slow but running peer is waited for)."""
        if self.world_size == 1:
            return
        n = self._barriers
        self._barriers += 1
        key = f"barrier/{n}"
        try:
            self._store_add(f"{key}/{self.rank}", 1)
            count = self._store_add(key, 1)
            seen = self._beats()
            last_change = [time.monotonic()] * self.world_size
            while count < self.world_size:
                time.sleep(_POLL_SECONDS)
                count = self._store_add(key, 0)
                beats, now = self._beats(), time.monotonic()
                for r in range(self.world_size):
                    if beats[r] != seen[r]:
                        seen[r], last_change[r] = beats[r], now
                failed = self._failed()
                if failed is not None:
                    raise failed
                missing = [r for r in range(self.world_size) if not self._store_add(f"{key}/{r}", 0)]
                lost = [r for r in missing if now - last_change[r] > self.timeout]
                if lost:
                    raise self._error(what, lost=lost)
        except RunError:
            raise
        except Exception as exc:  # the store itself failed
            raise self._error(what, exc) from exc

    def _collective(self, what: str, fn):
        try:
            return fn()
        except RuntimeError as exc:  # DistBackendError and gloo's timeouts are RuntimeErrors
            raise self._error(what, exc) from exc

    def all_gather_object(self, obj, what: str = "all_gather") -> list:
        """Every rank's ``obj`` (picklable), in rank order."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        self._collective(what, lambda: dist.all_gather_object(out, obj, group=self._control))
        return out

    def broadcast_object(self, obj, src: int = 0, what: str = "broadcast"):
        """``obj`` of rank ``src`` on every rank."""
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        self._collective(what, lambda: dist.broadcast_object_list(box, src=src, group=self._control))
        return box[0]

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", what: str = "all_reduce") -> torch.Tensor:
        """In-place all-reduce (``op``: ``"sum"``, ``"max"`` or ``"min"``) on the data group."""
        if self.world_size == 1:
            return tensor
        return all_reduce(tensor, op, self.group, context=self, what=what)

    def close(self) -> None:
        """Stop the heartbeat and leave the process group (call on every rank after success)."""
        global _CURRENT
        self._stop_beat()
        if self.world_size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            # Garbage cycles that still reference a group (e.g. through a frame a library's stored
            # traceback keeps) are freed now: at the interpreter's teardown gloo's threads abort the exit.
            gc.collect()
        if _CURRENT is self:
            _CURRENT = None


_CURRENT: Context | None = None


def single() -> Context:
    """The context of a one-process run (no-op collectives)."""
    return Context()


def current() -> Context:
    """The context set by :func:`init` in this process, else a one-process context."""
    return _CURRENT if _CURRENT is not None else single()


def init(*, timeout: float = 600.0, device="cpu", init_method: str = "env://", rank: int | None = None,
         world_size: int | None = None) -> Context:
    """Join the job: rendezvous, the process group and the heartbeat.

    Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the defaults are right; tests and
    scripts may pass ``init_method="file:///path"`` or ``"tcp://127.0.0.1:PORT"`` with ``rank``
    and ``world_size``. Without a multi-process environment this returns :func:`single`.

    Args:
        timeout: seconds after which a silent peer counts as lost (collectives and barriers).
        device: ``"cpu"`` (gloo) or ``"cuda"`` (NCCL for the data, gloo for control; each rank
            uses GPU ``LOCAL_RANK``).
        init_method: rendezvous URL.
        rank: this process's rank (default: from the URL or the environment).
        world_size: number of processes (default: likewise).

    Returns:
        The :class:`Context` (also returned by :func:`current` from then on).
    """
    global _CURRENT
    import torch.distributed as dist

    if not (timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if init_method == "env://" and world_size is None and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return single()
    td = datetime.timedelta(seconds=timeout)
    kwargs = {} if rank is None else {"rank": rank, "world_size": world_size}
    store, rank, world_size = next(dist.rendezvous(init_method, timeout=td, **kwargs))
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count()))))
    try:
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.PrefixStore("pg", store), rank=rank,
                                world_size=world_size, timeout=td)
    except RuntimeError as exc:
        raise RunError(f"rank {rank} of {world_size}: could not join the process group within {timeout:g} s "
                       f"({str(exc).splitlines()[0]})") from exc
    control = dist.new_group(backend="gloo", timeout=td) if cuda else None
    ctx = Context(rank, world_size, timeout=timeout, group=dist.group.WORLD, control=control,
                  store=dist.PrefixStore("diffrepro", store))
    ctx.barrier("start-up")
    _CURRENT = ctx
    return ctx


_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def all_reduce(tensor: torch.Tensor, op: str = "sum", group=None, *, context: Context | None = None,
               what: str = "all_reduce") -> torch.Tensor:
    """In-place ``torch.distributed.all_reduce`` on ``group``; with a ``context``, a failure is
    reported as :class:`RunError` naming the lost ranks."""
    import torch.distributed as dist

    reduce_op = getattr(dist.ReduceOp, _OPS[op])
    if context is None:
        dist.all_reduce(tensor, op=reduce_op, group=group)
        return tensor
    return context._collective(what, lambda: dist.all_reduce(tensor, op=reduce_op, group=group) or tensor)


# ------------------------------------------------------------------------------------------------
# Claims between independent jobs


def _process_start(pid: int) -> str | None:
    """Start time of ``pid`` (clock ticks since boot, from /proc; None where unavailable)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(owner: dict) -> bool:
    """Whether the owner of a claim may still run: False only when provably dead (same host)."""
    if owner.get("host") != socket.gethostname():
        return True
    pid = int(owner.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    start = _process_start(pid)
    return start is None or owner.get("start") in (None, start)


@dataclasses.dataclass
class Claim:
    """An exclusive claim on one output (see :func:`claim`); ``release()`` removes the lock file."""

    path: Path
    owner: dict

    def release(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


_MY_OWNER: dict | None = None


def _me() -> dict:
    global _MY_OWNER
    pid = os.getpid()
    if _MY_OWNER is None or _MY_OWNER["pid"] != pid:
        _MY_OWNER = {"pid": pid, "host": socket.gethostname(), "start": _process_start(pid)}
    return _MY_OWNER


def held_by_another(owner: dict) -> bool:
    """Whether a lock's owner (as :func:`claim` records it) may still run and is another process:
    False for an empty or unreadable owner, a provably dead one (same host) and this process."""
    me = _me()
    mine = owner.get("pid") == me["pid"] and owner.get("host") == me["host"]
    return bool(owner) and _alive(owner) and not mine


def claim(lock_path, info: dict | None = None) -> Claim | dict:
    """Claim an output by creating ``lock_path`` atomically (write a temporary file, then
    ``os.link``, which fails if the lock exists, also on NFS).

    A lock whose owner is provably dead (same host, process gone or pid reused) is broken and
    taken over; a lock of this very process is taken over too.

    Args:
        lock_path: the lock file.
        info: extra JSON fields recorded in the lock beside the owner (e.g. what it covers).

    Returns:
        A :class:`Claim` on success, else the owner ``{"pid", "host", "start", "since", ...}`` of
        the live claim that blocks it.
    """
    lock_path = Path(lock_path)
    me = {**_me(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(info or {})}
    fd, tmp = tempfile.mkstemp(dir=lock_path.parent, prefix=f".{lock_path.name}.", suffix=".claim")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(data.strict_json(me))
        for _ in range(3):
            try:
                os.link(tmp, lock_path)
                return Claim(lock_path, me)
            except FileExistsError:
                pass
            try:
                owner = json.loads(lock_path.read_text() or "{}")
            except FileNotFoundError:
                continue  # released meanwhile: try again
            except (OSError, ValueError):
                owner = {}
            if held_by_another(owner):
                return owner
            # Break the dead owner's lock: rename it away first, so that of two processes breaking
            # it at once only one removes it (the other's rename fails and it retries).
            try:
                os.rename(lock_path, f"{tmp}.stale")
                os.unlink(f"{tmp}.stale")
            except FileNotFoundError:
                pass
        try:  # three lost races in a row: report whoever holds it now
            return json.loads(lock_path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
    finally:
        os.unlink(tmp)


# ------------------------------------------------------------------------------------------------
# Sharded training set


class _ShardReductions:
    """The reductions of :class:`diffrepro.pruning.PrunedRows` across the shards of a
    :class:`ShardedEmpiricalDenoiser`: element-wise MIN and SUM (float64) and the state merge."""

    def __init__(self, den: ShardedEmpiricalDenoiser):
        # A weak reference: the denoiser holds these reductions, and a cycle would keep its process
        # group alive until the interpreter's final teardown, where gloo's threads abort the exit.
        self.den = weakref.proxy(den)

    def min(self, a: np.ndarray) -> np.ndarray:
        return self.den._reduce(torch.from_numpy(np.array(a, dtype=np.float64)), "min", "pruning bounds").numpy()

    def sum(self, a: np.ndarray) -> np.ndarray:
        return self.den._reduce(torch.from_numpy(np.array(a)), "sum", "pruning sums").numpy()

    def merge(self, state):
        return finalize(self.den._merge(state))


class ShardedEmpiricalDenoiser(RecordedCalls, Denoiser):
    """The empirical optimal denoiser of a training set spread over the ranks of a job.

    Each rank holds a contiguous slice of the rows. A call computes the rank's softmax state
    with :func:`diffrepro.empirical_denoiser_partial` and combines the states across ranks as
    :func:`diffrepro.merge_states` combines chunks (P1 Thm 1 / P2 eq. 5 evaluated by an online
    softmax): an all-reduce MAX of the row maxima ``m``, then one all-reduce SUM of the rescaled
    ``Σ exp(l−m)``, ``Σ exp(l−m)²`` and ``Σ exp(l−m) y`` (float64), and the nearest row by
    (distance, global index) from an all-gather of each rank's candidate. Every rank then holds
    the same output, equal to the one-process result up to float rounding.

    Class-conditional calls restrict each rank to its rows of the class; a rank holding no row
    of a class contributes an empty state.

    Pruning (on by default) works as in :class:`diffrepro.denoisers.EmpiricalDenoiser`: each
    rank keeps the bounds of its own rows, and the certificate's global numbers (the distance
    ``U`` to the nearest row, the bound on all other rows, the skipped mass) are all-reduced, so
    every rank skips, commits and releases the same queries and the output is the one-process
    pruned result up to float rounding. Per-call statistics as
    :meth:`~diffrepro.denoisers.EmpiricalDenoiser.pop_records`.

    Args:
        local_rows: this rank's rows, uint8 ``[n, C, H, W]`` (decoded ``u/127.5 − 1``) or float.
        row_offset: global index of the first local row.
        group: a :class:`Context` (faults reported naming the lost rank) or a process group
            (None: the default group).
        labels: int ``[n]`` class labels of the local rows.
        label_dim: number of classes over the whole set (required with ``labels``).
        dtype: compute dtype, float32 or float64.
        device: where the rows live and the kernel runs.
        prune: relative weight below which rows are skipped, with a certificate (0: dense).
        log_weights: optional float ``[n]`` log-weights of the local rows (as
            :class:`~diffrepro.denoisers.EmpiricalDenoiser`'s; given on every rank or on none).
    """

    sharded = True

    def __init__(self, local_rows, row_offset: int, group=None, *, labels=None, label_dim: int | None = None,
                 dtype: torch.dtype = torch.float32, device="cpu", prune: float = pruning.DEFAULT_PRUNE,
                 log_weights=None):
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        rows = torch.from_numpy(np.ascontiguousarray(local_rows)) if isinstance(local_rows, np.ndarray) \
            else torch.as_tensor(local_rows)
        if rows.ndim != 4 or rows.shape[2] != rows.shape[3]:
            raise ValueError(f"local_rows must be [n, C, H, H], got shape {tuple(rows.shape)}")
        if isinstance(row_offset, bool) or int(row_offset) != row_offset or row_offset < 0:
            raise ValueError(f"row_offset must be a non-negative integer, got {row_offset!r}")
        self.context = group if isinstance(group, Context) else None
        self.group = self.context.group if self.context else group
        self.dtype, self.device = dtype, torch.device(device)
        self.prune = pruning.check_prune(prune)
        self._pruned: dict = {}
        self._recorder = pruning.Recorder()
        self._class_sizes: dict = {}
        self.row_offset = int(row_offset)
        self._rows = (rows if rows.dtype == torch.uint8 else rows.to(dtype)).to(self.device).contiguous()
        self.img_channels, self.img_resolution = int(rows.shape[1]), int(rows.shape[2])
        self.label_dim = 0
        self._class_rows: list[np.ndarray] = []
        if labels is not None:
            labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
            if labels.shape != (len(rows),) or (len(labels) and labels.min() < 0):
                raise ValueError(f"labels must be {len(rows)} non-negative integers, got {labels.dtype} "
                                 f"{labels.shape}")
            if label_dim is None or (len(labels) and labels.max() >= label_dim):
                raise ValueError(f"label_dim must be given and exceed every label, got {label_dim!r}")
            self.label_dim = int(label_dim)
            self._class_rows = [np.flatnonzero(labels == k) for k in range(self.label_dim)]
        self._labels_sha256 = None if labels is None else hashlib.sha256(labels.astype(np.int64).tobytes()).hexdigest()
        self._class_blocks: dict[int, torch.Tensor] = {}
        self._fingerprint = None
        self.num_rows = int(self._reduce(torch.tensor([len(rows)], dtype=torch.float64), "sum", "row count")[0])
        # Every rank must certify with the same prune: otherwise their decisions (and outputs) differ.
        lo_hi = self._reduce(torch.tensor([-self.prune, self.prune], dtype=torch.float64), "max", "prune")
        if -lo_hi[0] != lo_hi[1]:
            raise ValueError(f"prune must be the same on every rank, got values from {-float(lo_hi[0]):g} to "
                             f"{float(lo_hi[1]):g}")
        self._log_weights = _log_weights(log_weights, len(rows), self.device)
        self._check_log_weights()

    def _check_log_weights(self) -> None:
        """Log-weights on every rank or on none, and a finite one somewhere (collectives: every
        rank raises the same error)."""
        lw = self._log_weights
        top = float(lw.max()) if lw is not None and len(lw) else -float("inf")
        given = 0.0 if lw is None else 1.0
        got = self._reduce(torch.tensor([given, -given, top], dtype=torch.float64), "max", "log_weights")
        if float(got[0]) != -float(got[1]):
            raise ValueError("log_weights must be given on every rank or on none, got them on some ranks only")
        if given and float(got[2]) == -float("inf"):
            raise ValueError("log_weights are -inf for every row on every rank: no row has a finite weight")

    def _reduce(self, t: torch.Tensor, op: str, what: str) -> torch.Tensor:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            return t  # one process: nothing to combine
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(self.group) == "nccl" \
            else torch.device("cpu")
        moved = t.to(dev)
        all_reduce(moved, op, self.group, context=self.context, what=what)
        return moved.to(t.device)

    def _gather(self, obj, what: str) -> list:
        import torch.distributed as dist

        if self.context is not None:
            return self.context.all_gather_object(obj, what)
        if not dist.is_available() or not dist.is_initialized():
            return [obj]
        out = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def class_count(self, k: int) -> int:
        """Rows of class ``k`` over all ranks (a collective: call it on every rank)."""
        local = len(self._class_rows[k]) if 0 <= k < self.label_dim else 0
        return int(self._reduce(torch.tensor([local], dtype=torch.float64), "sum", "class count")[0])

    def fingerprint(self) -> dict:
        """Content identity over all ranks: each shard's row count, offset and sha256 (a collective)."""
        if self._fingerprint is None:
            local = {"rows": len(self._rows), "row_offset": self.row_offset, "sha256": sha256_rows(self._rows),
                     "labels_sha256": self._labels_sha256}
            if self._log_weights is not None:
                local["log_weights_sha256"] = hashlib.sha256(self._log_weights.cpu().numpy().tobytes()).hexdigest()
            shards = self._gather(local, "fingerprint")
            # The merge's float rounding depends on the shard layout: a run resumes with the same one.
            self._fingerprint = {"shard_count": len(shards), "shards": shards, "n_train": self.num_rows,
                                 "rows_dtype": str(self._rows.dtype).replace("torch.", ""),
                                 "label_dim": self.label_dim, "dtype": str(self.dtype).replace("torch.", ""),
                                 "device": self.device.type, "prune": self.prune}
        return dict(self._fingerprint)

    def _class_block(self, k: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Local rows of class ``k`` (all for None) and their global indices (None: contiguous)."""
        if k is None:
            return self._rows, None
        if k not in self._class_blocks:
            self._class_blocks[k] = self._rows.index_select(0, torch.from_numpy(self._class_rows[k]).to(self.device))
        return self._class_blocks[k], torch.from_numpy(self._class_rows[k] + self.row_offset)

    def _class_log_weights(self, k: int | None):
        """Log-weights of the local rows of class ``k`` (all for None), None without them."""
        if self._log_weights is None or k is None:
            return self._log_weights
        return self._log_weights[torch.from_numpy(self._class_rows[k]).to(self.device)]

    def _state(self, q, sigma, s, k):
        """The merged state of queries ``q`` over every rank's rows of class ``k``."""
        rows, index = self._class_block(k)
        part = empirical_denoiser_partial(q, rows, sigma, s=s, row_offset=self.row_offset if index is None else 0,
                                          log_weights=self._class_log_weights(k))
        if index is not None and len(rows):
            nearest = part.nearest_index
            part.nearest_index = torch.where(nearest >= 0, index.to(nearest.device)[nearest.clamp_min(0)], nearest)
        return finalize(self._merge(part))

    def _merge(self, part):
        """This rank's softmax state (nearest row as a global index) merged with every rank's."""
        # The max logit is the pair hi + lo (merge_states): MAX of the hi parts (with the negated
        # nearest distances), then MAX of the lo parts among the ranks at the top hi (with the
        # negated lowest global index among the rows at the smallest distance), then one float64
        # SUM of the rescaled sums.
        # With log-weights the nearest row is ranked by its key (ops.merge_states), and its
        # distance travels in the sums (one rank holds that row: a sum with zeros is exact).
        nearest = part.nearest_index
        n = len(nearest)
        hi = part.max_logit
        lo = part.max_logit_lo if part.max_logit_lo is not None else torch.zeros_like(hi)
        key = part.nearest_sqdist if part.nearest_key is None else part.nearest_key
        top = self._reduce(torch.cat([hi, -key]), "max", "denoiser call (max)")
        m_hi, best = top[:n], -top[n:]
        at_top = (hi == m_hi) & (hi > -float("inf"))
        cand = torch.where((nearest >= 0) & (key == best), nearest, torch.iinfo(torch.int64).max)
        second = self._reduce(torch.cat([torch.where(at_top, lo, -float("inf")), -cand.to(torch.float64)]), "max",
                              "denoiser call (nearest)")
        m_lo, first = second[:n], (-second[n:]).to(torch.int64)  # indices < 2^53: exact in float64
        f = torch.where(hi == -float("inf"), 0.0, torch.exp((hi - m_hi) + (lo - m_lo)))
        mine = (nearest == first) & (nearest >= 0)
        packed = torch.cat([(part.sum_exp * f)[:, None], (part.sum_exp_sq * f * f)[:, None],
                            torch.where(mine, part.nearest_sqdist, 0.0)[:, None],
                            part.weighted_sum.double() * f[:, None]], 1)
        packed = self._reduce(packed, "sum", "denoiser call (sums)")
        found = first != torch.iinfo(torch.int64).max
        sqdist = best if part.nearest_key is None else torch.where(found, packed[:, 2], float("inf"))
        # replace() keeps the fields that hold for every rank (sigma, s, query fingerprint); the rows
        # covered are every rank's, recorded as unknown rather than as this shard's.
        return dataclasses.replace(
            part, max_logit=m_hi, max_logit_lo=m_lo, sum_exp=packed[:, 0].contiguous(),
            sum_exp_sq=packed[:, 1].contiguous(), weighted_sum=packed[:, 3:].to(part.weighted_sum.dtype).contiguous(),
            nearest_index=first, nearest_sqdist=sqdist.contiguous(), rows=None,
            nearest_key=None if part.nearest_key is None else best)

    def _rows_in(self, k: int | None) -> int:
        """Rows of class ``k`` (all for None) over every rank (a collective the first time)."""
        if k is None:
            return self.num_rows
        if k not in self._class_sizes:
            self._class_sizes[k] = self.class_count(k)
        return self._class_sizes[k]

    def _dense(self, q, sigma, k):
        res, info = self._state(q, sigma, 1.0, k)  # q is x / s already
        return res, info["n_eff"], info["nearest_index"]

    def _pruned_rows(self, k: int | None) -> pruning.PrunedRows:
        """This rank's pruning state of its rows of class ``k`` (None: all rows), built on first
        use with the rows ordered into tiles of nearby images, as the one-process denoiser."""
        if k not in self._pruned:
            rows, index = self._class_block(k)
            flat = rows.reshape(len(rows), int(np.prod(rows.shape[1:])))  # [0, D] for a class not held here
            index = np.arange(self.row_offset, self.row_offset + len(rows)) if index is None else index.numpy()
            order = pruning.cluster_order(flat.cpu().numpy())
            ordered = flat.index_select(0, torch.from_numpy(order).to(flat.device)).contiguous()
            lw = self._class_log_weights(k)
            self._pruned[k] = pruning.build_rows([(ordered, index[order])], self.dtype, shards=_ShardReductions(self),
                                                 n_total=self._rows_in(k),
                                                 log_weights=None if lw is None else [lw.cpu().numpy()[order]])
        return self._pruned[k]

    def _groups(self, x, class_labels):
        classes = _class_indices(class_labels, x.shape[0], self.label_dim, "cpu")
        if classes is None:
            yield None, None
            return
        # Every rank sees the same labels, so the groups (and collectives) are in the same order.
        for k in torch.unique(classes).tolist():
            if self._rows_in(k) == 0:  # on every rank alike
                raise ValueError(f"class_labels ask for class {k}, which has no training rows")
            yield torch.nonzero(classes == k).reshape(-1), k

    def nearest(self, x: torch.Tensor, sigma, s=1.0, class_labels=None):
        """Global nearest training row (lowest index on ties) and ``n_eff``, as
        :meth:`diffrepro.denoisers.EmpiricalDenoiser.nearest` (a collective)."""
        self._check_x(x)
        b = x.shape[0]
        q = x.reshape(b, -1).to(device=self.device, dtype=self.dtype)
        sigma, s = _per_sample(sigma, b, self.device, "sigma"), _per_sample(s, b, self.device, "s")
        index = torch.empty(b, dtype=torch.int64, device=self.device)
        n_eff = torch.empty(b, dtype=torch.float64, device=self.device)
        for sel, k in self._groups(x, class_labels):
            sel = slice(None) if sel is None else sel.to(self.device)
            _, info = self._state(q[sel], sigma[sel], s[sel], k)
            index[sel], n_eff[sel] = info["nearest_index"], info["n_eff"].to(torch.float64)
        return index, n_eff


# ------------------------------------------------------------------------------------------------
# Sharded references


def all_gather_topk(state, group=None):
    """Merge each rank's top-k state of the same queries into the global top-k, on every rank.

    Each rank searched its own slice of the references (``nn_search_partial`` with the slice's
    ``row_offset``); the states are all-gathered and merged in rank order with
    :func:`diffrepro.merge_topk` (ties go to the lower global index), so the result equals a
    one-process search.

    Args:
        state: this rank's :class:`diffrepro.TopKState`.
        group: a :class:`Context`, a process group, or None (the default group, or one process).

    Returns:
        The merged :class:`diffrepro.TopKState` (CPU tensors).
    """
    import torch.distributed as dist

    local = dataclasses.replace(state, values=state.values.cpu(), indices=state.indices.cpu())
    if isinstance(group, Context):
        states = group.all_gather_object(local, "top-k merge")
    elif dist.is_available() and dist.is_initialized():
        states = [None] * dist.get_world_size(group)
        dist.all_gather_object(states, local, group=group)
    else:
        states = [local]
    out = states[0]
    for other in states[1:]:
        out = merge_topk(out, other)
    return out


_PART_RE = re.compile(r"^(\d+)/(\d+)$")


def parse_part(text: str) -> tuple[int, int]:
    """``"I/K"`` (0 <= I < K) -> ``(I, K)``: the I-th of K independent parts of a job."""
    m = _PART_RE.match(text.strip())
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"got {text!r}, expected I/K with 0 <= I < K (e.g. $SLURM_ARRAY_TASK_ID/"
                         "$SLURM_ARRAY_TASK_COUNT)")
    return int(m.group(1)), int(m.group(2))
