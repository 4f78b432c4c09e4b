# SPDX-License-Identifier: Apache-2.0
"""Theoretical generations with the analytic denoisers, written in EDM's layout, resumably.

The workflow follows EDM's ``generate.py`` (Karras et al. 2022): seeds in EDM syntax, per-seed
noise (:func:`diffrepro.noise.seed_latents`) or a noise bank, EDM's batch split
(:func:`diffrepro.noise.split_seeds`), a deterministic sampler (Heun 18 by default,
:func:`diffrepro.samplers.sample`) and one PNG per seed quantised as EDM does
(:func:`diffrepro.data.quantize`). diffrepro also writes the float64 outputs (one ``.npz`` per
batch), a JSON manifest and an 8×8 grid, and resumes after an interruption: a batch whose npz
exists is not recomputed, and only missing PNGs are written.

Output folder::

    outdir/000123.png               (or outdir/000000/000123.png with subdirs=True)
    outdir/batches/batch-000000.npz seeds int64 [B], images float64 [B, C, H, W] (first seed in name)
    outdir/grid.png                 the first 64 seeds, row-major 8×8
    outdir/manifest.json            configuration, σ grid, data hash, build and timing
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from collections import Counter
from pathlib import Path

import numpy as np
import PIL
import torch
from tqdm.auto import tqdm

from . import data, metrics, noise, plots, samplers
from ._backend import build_info
from .denoisers import EmpiricalDenoiser, GaussianDenoiser, TimedDenoiser
from .samplers import has_closed_form, nfe, sample

__all__ = ["demo", "estimate_cost", "generate", "load_outputs", "plan_work"]

_GRID_SEEDS = 64
_MANIFEST = "manifest.json"
_BATCH_DIR = "batches"
# GFLOP/s assumed for the Gaussian model's eigendecomposition in dry-run estimates is the probe's
# GEMM rate; LAPACK's eigh runs slower than GEMM, so that part of the estimate is optimistic.
_EIGH_FLOPS_PER_D3 = 9.0


# ------------------------------------------------------------------------------------------------
# Denoisers


def _flops_per_sample(denoiser, sampler: str, steps: int, class_idx) -> float | None:
    """Denoiser flops per generated sample (None when unknown, e.g. class-restricted rows)."""
    den = getattr(denoiser, "inner", denoiser)
    d = den.img_channels * den.img_resolution ** 2
    if isinstance(den, GaussianDenoiser):
        r = d if den.rank is None else den.rank
        per_eval = 4.0 * d * r  # project and back-project
        return per_eval if has_closed_form(den, sampler) else per_eval * nfe(sampler, steps)
    if isinstance(den, EmpiricalDenoiser) and class_idx is None:
        return 4.0 * den.num_rows * d * nfe(sampler, steps)  # logits GEMM + weighted-sum GEMM
    return None


# ------------------------------------------------------------------------------------------------
# Output folder: batches, resume, manifest


def format_seeds(seeds: list[int]) -> str:
    """Compact EDM seed syntax for a list (inverse of :func:`diffrepro.noise.parse_seeds`)."""
    parts, i = [], 0
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        parts.append(str(seeds[i]) if i == j else f"{seeds[i]}-{seeds[j]}")
        i = j + 1
    return ",".join(parts)


def _batch_path(outdir: Path, batch_seeds: list[int]) -> Path:
    return outdir / _BATCH_DIR / f"batch-{batch_seeds[0]:06d}.npz"


def _batch_done(path: Path, batch_seeds: list[int]) -> bool:
    """True when the batch npz exists and holds exactly these seeds."""
    if not path.is_file():
        return False
    with np.load(path) as z:
        return "seeds" in z.files and z["seeds"].tolist() == batch_seeds


def plan_work(seeds, outdir, *, sampler: str = "heun", steps: int = 18, batch: int = 256,
              subdirs: bool = False) -> dict:
    """The batches EDM's split gives and which of them still need computing or PNG writes.

    Args:
        seeds: seed list or EDM seed string.
        outdir: output folder (may not exist yet).
        sampler: one of :data:`SAMPLERS`.
        steps: grid size N.
        batch: maximum batch size.
        subdirs: thousand-subdirectory PNG layout.

    Returns:
        ``{"seeds", "batches" (lists of seeds), "compute" (indices of batches to sample),
        "missing_png" (seeds whose PNG is absent), "nfe", "evaluations"}``; ``evaluations`` is
        the number of batched denoiser calls still to run.
    """
    seeds = noise.parse_seeds(seeds)
    if not seeds:
        raise ValueError("seeds must not be empty")
    if len(set(seeds)) != len(seeds):
        dup = sorted(s for s, count in Counter(seeds).items() if count > 1)[:5]
        raise ValueError(f"seeds must be unique (each seed names one PNG), got duplicates {dup}")
    outdir = Path(outdir)
    batches = [b.tolist() for b in noise.split_seeds(seeds, batch) if b.numel()]
    compute = [i for i, b in enumerate(batches) if not _batch_done(_batch_path(outdir, b), b)]
    missing = [s for s in seeds if not (outdir / noise.seed_filename(s, subdirs)).is_file()]
    return {"seeds": seeds, "batches": batches, "compute": compute, "missing_png": missing,
                "nfe": nfe(sampler, steps), "evaluations": len(compute) * nfe(sampler, steps)}


def _versions() -> dict:
    from . import __version__

    return {"diffrepro": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "pillow": PIL.__version__, "python": platform.python_version()}


def _check_resume(outdir: Path, config: dict) -> None:
    path = outdir / _MANIFEST
    if not path.is_file():
        return
    old = json.loads(path.read_text()).get("config", {})
    diffs = [f"{k}: got {json.dumps(config.get(k))}, existing {json.dumps(old.get(k))}"
             for k in sorted(set(config) | set(old)) if config.get(k) != old.get(k)]
    if diffs:
        raise ValueError(f"outdir {str(outdir)!r} holds outputs of a different run ("
                         + "; ".join(diffs) + "); use another outdir or delete it")


def _write_manifest(outdir: Path, manifest: dict) -> None:
    data.atomic_write_bytes(outdir / _MANIFEST, json.dumps(manifest, indent=1).encode())


def _save_grid(outdir: Path, first: dict, seeds: list[int]) -> None:
    """8×8 row-major grid of the first 64 seeds (fewer seeds: 8 columns, white padding)."""
    shown = seeds[:_GRID_SEEDS]
    images = torch.stack([first[s] for s in shown])
    cols = min(8, len(shown))
    rows = -(-len(shown) // cols)
    pad = torch.ones((rows * cols - len(shown), *images.shape[1:]), dtype=images.dtype)
    data.save_grid_png(outdir / "grid.png", torch.cat([images, pad]), rows, cols)


def load_outputs(outdir) -> tuple[np.ndarray, np.ndarray]:
    """Read the float outputs of a finished :func:`generate` run, in its seed order.

    Args:
        outdir: the run's output folder.

    Returns:
        ``(seeds int64 [S], images float64 [S, C, H, W])``.

    Raises:
        FileNotFoundError: the manifest or a batch file is missing (the run is incomplete).
    """
    outdir = Path(outdir)
    if not (outdir / _MANIFEST).is_file():
        raise FileNotFoundError(f"outdir {str(outdir)!r} has no {_MANIFEST}; not a generate() output")
    config = json.loads((outdir / _MANIFEST).read_text())["config"]
    seeds = noise.parse_seeds(config["seeds"])
    parts = []
    for b in noise.split_seeds(seeds, config["batch"]):
        if b.numel():
            path = _batch_path(outdir, b.tolist())
            if not path.is_file():
                raise FileNotFoundError(f"batch file {str(path)!r} is missing; rerun generate to "
                                        "finish the run")
            with np.load(path) as z:
                parts.append(z["images"])
    return np.asarray(seeds, dtype=np.int64), np.concatenate(parts)


def _latent_source(latents, seeds: list[int], shape: tuple, noise_device: torch.device):
    """Returns ``(get(batch_seeds) -> latents, description)`` for a bank, a bank path or None."""
    if latents is None:
        stream = ("EDM-identical (CUDA Philox)" if noise_device.type == "cuda"
                  else "CPU mt19937: portable, differs from EDM's CUDA noise")
        return (lambda b: noise.seed_latents(b, shape, device=noise_device)[0],
                f"seed_latents(device={noise_device.type}): {stream}")
    where = "latents"
    if not isinstance(latents, noise.NoiseBank):
        where = f"latents bank {os.fspath(latents)!r}"
        latents = noise.NoiseBank.load(latents)
    if tuple(latents.latents.shape[1:]) != shape:
        raise ValueError(f"{where} holds latents of shape {tuple(latents.latents.shape[1:])}, "
                         f"expected {shape} (the denoiser's C, H, W)")
    have = set(latents.seeds.tolist())
    missing = [s for s in seeds if s not in have]
    if missing:
        raise ValueError(f"{where} lacks {len(missing)} of the requested seeds (first: "
                         f"{missing[:5]}); it holds {len(latents)} seeds")
    digest = hashlib.sha256(latents.latents.numpy().tobytes()).hexdigest()[:16]
    return latents.get, f"noise bank ({len(latents)} seeds, sha256 {digest}...)"


def generate(denoiser, seeds, outdir, *, sampler: str = "heun", steps: int = 18,
             sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
             batch: int = 256, latents=None, noise_device=None, class_idx: int | None = None,
             subdirs: bool = False, info: dict | None = None, progress: bool = True) -> dict:
    """Generate one image per seed with a denoiser and write EDM-style outputs, resumably.

    Batches follow EDM's split (:func:`diffrepro.noise.split_seeds`, one process). For each
    batch the float64 samples are written first (``batches/batch-<first seed>.npz``), then the
    missing PNGs; every write is atomic. A rerun into the same folder checks that the
    configuration matches the manifest, skips batches whose npz exists, writes PNGs missing
    from those from the npz (no recomputation) and computes the rest, so an interrupted run
    loses at most the batch in flight and the outputs are byte-identical to an uninterrupted run.

    Args:
        denoiser: EDM-style denoiser, e.g. :class:`~diffrepro.denoisers.EmpiricalDenoiser` or
            :class:`~diffrepro.denoisers.GaussianDenoiser`.
        seeds: seed list or EDM seed string (``"0-49999"``); seeds must be unique.
        outdir: output folder (created).
        sampler: ``"heun"`` (EDM default), ``"euler"``, ``"dpm"`` or ``"exact"`` (Gaussian only).
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
        info: extra configuration recorded in the manifest and checked on resume (e.g.
            the training set's source and hash).
        progress: show a tqdm progress bar.

    Returns:
        The manifest (also written to ``outdir/manifest.json``).
    """
    den = getattr(denoiser, "inner", denoiser)
    samplers.check_sampler(sampler, steps, den)
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    label_dim = int(getattr(den, "label_dim", 0))
    if class_idx is not None and not (label_dim > 0 and 0 <= class_idx < label_dim):
        raise ValueError(f"class_idx must be in [0, label_dim={label_dim}) for this denoiser, "
                         f"got {class_idx!r}")
    outdir = Path(outdir)
    work = plan_work(seeds, outdir, sampler=sampler, steps=steps, batch=batch, subdirs=subdirs)
    seeds = work["seeds"]
    shape = (den.img_channels, den.img_resolution, den.img_resolution)
    device = torch.device(getattr(den, "device", "cpu"))
    noise_device = device if noise_device is None else torch.device(noise_device)
    get_latents, latents_desc = _latent_source(latents, seeds, shape, noise_device)

    closed = has_closed_form(den, sampler)
    grid = samplers.evaluation_sigmas(den, sampler, steps, sigma_min, sigma_max, rho)
    grid_meaning = ("σ of each denoiser evaluation, in order" if sampler == "dpm"
                    else "EDM step grid t_0..t_{N-1}, 0")
    config = {
        "seeds": format_seeds(seeds), "batch": int(batch), "subdirs": bool(subdirs),
        "denoiser": {"class": type(den).__name__, **(info or {})},
        "sampler": sampler, "steps": int(steps), "sigma_min": float(sigma_min),
        "sigma_max": float(sigma_max), "rho": float(rho), "class_idx": class_idx,
        "latents": latents_desc,
    }
    _check_resume(outdir, config)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / _BATCH_DIR).mkdir(exist_ok=True)
    dpm = {"order": 3, "method": "singlestep", "skip_type": "logSNR", "family": "edm",
           "denoise_to_zero": True}
    manifest = {
        "config": config, "status": "running",
        "sampler_detail": {"nfe": work["nfe"], "closed_form": closed, "sigmas": grid,
                           "sigmas_meaning": grid_meaning, "state_dtype": "float64",
                           "dpm": dpm if sampler == "dpm" else None},
        "build_info": build_info(), "versions": _versions(),
    }
    _write_manifest(outdir, manifest)

    timed = TimedDenoiser(den)
    grid_seeds = set(seeds[:_GRID_SEEDS])
    first: dict[int, torch.Tensor] = {}
    missing_png = set(work["missing_png"])
    to_compute = set(work["compute"])
    computed, sample_seconds = 0, 0.0
    start = time.perf_counter()
    bar = tqdm(total=len(seeds), unit="img", desc="generate", disable=not progress)
    for i, b in enumerate(work["batches"]):
        path = _batch_path(outdir, b)
        if i in to_compute:
            lat = get_latents(b).to(device)
            labels = None
            if class_idx is not None:
                labels = torch.zeros(len(b), label_dim, device=device)
                labels[:, class_idx] = 1
            t = time.perf_counter()
            images = sample(timed, lat, labels, sampler=sampler, steps=steps, sigma_min=sigma_min,
                            sigma_max=sigma_max, rho=rho).cpu()
            sample_seconds += time.perf_counter() - t
            data.atomic_save_npz(path, seeds=np.asarray(b, dtype=np.int64), images=images.numpy())
            computed += len(b)
        elif missing_png.intersection(b) or grid_seeds.intersection(b):
            with np.load(path) as z:
                images = torch.from_numpy(z["images"])
        else:
            bar.update(len(b))
            continue
        quantized = data.quantize(images).numpy()
        for j, s in enumerate(b):
            if s in missing_png:
                png = outdir / noise.seed_filename(s, subdirs)
                png.parent.mkdir(exist_ok=True)
                data.save_png(png, quantized[j])
            if s in grid_seeds:
                first[s] = images[j]
        bar.update(len(b))
    bar.close()
    _save_grid(outdir, first, seeds)
    elapsed = time.perf_counter() - start

    flops = _flops_per_sample(den, sampler, steps, class_idx)
    # The closed-form Gaussian path makes no denoiser calls: its "kernel" is the whole sampling.
    kernel = sample_seconds if closed else timed.seconds
    manifest["status"] = "complete"
    manifest["timing"] = {
        "seconds": elapsed, "generated": computed, "reused": len(seeds) - computed,
        "images_per_second": computed / elapsed if computed and elapsed > 0 else None,
        "sampling_seconds": sample_seconds, "denoiser_seconds": timed.seconds,
        "denoiser_calls": timed.calls,
        "denoiser_gflops_per_second": (flops * computed / kernel / 1e9
                                       if flops is not None and computed and kernel > 0 else None),
        # sampler + Python time outside the denoiser, relative to the time inside it (no I/O)
        "sampler_overhead_fraction": ((sample_seconds - timed.seconds) / timed.seconds
                                      if timed.seconds > 0 else None),
    }
    _write_manifest(outdir, manifest)
    return manifest


# ------------------------------------------------------------------------------------------------
# Dry run


def estimate_cost(kind: str, n_train: int, shape, work: dict, *, batch: int, dtype=torch.float32,
                  device="cpu", probe=None) -> dict:
    """Flops, time and memory of a planned run, from a short timed probe.

    Args:
        kind: ``"empirical"`` or ``"gaussian"``.
        n_train: training images N.
        shape: ``(C, H, W)``.
        work: :func:`plan_work`'s result.
        batch: maximum batch size.
        dtype: empirical denoiser compute dtype.
        device: where the work runs.
        probe: for ``"empirical"``, the denoiser to time on ``min(batch, 64)`` queries; for
            ``"gaussian"`` a float64 ``[min(batch, 256), d] × [d, d]`` GEMM is timed.

    Returns:
        ``{"flops", "gflops_per_second" (probe), "seconds", "memory_bytes", "probe"}``.
    """
    d = math.prod(shape)
    todo = sum(len(work["batches"][i]) for i in work["compute"])
    width = max((len(b) for b in work["batches"]), default=0)
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    if kind == "empirical":
        flops = 4.0 * n_train * d * work["nfe"] * todo
        q = min(batch, 64)
        x = torch.randn(q, *shape, generator=gen, dtype=torch.float64).to(device)
        probe(x[:1], 1.0)  # warm-up
        t = time.perf_counter()
        probe(x, 1.0)
        seconds = time.perf_counter() - t
        rate = 4.0 * n_train * d * q / seconds
        described = f"one denoiser call, {q} queries x {n_train} rows"
        resident = n_train * d + 6 * width * d * 8 + width * d * torch.finfo(dtype).bits // 8
    else:
        fit = (2.0 * n_train * min(n_train, d) * d) + _EIGH_FLOPS_PER_D3 * min(n_train, d) ** 3
        flops = fit + 4.0 * d * d * todo
        q = min(batch, 256)
        a = torch.randn(q, d, generator=gen, dtype=torch.float64).to(device)
        m = torch.randn(d, d, generator=gen, dtype=torch.float64).to(device)
        t = time.perf_counter()
        a @ m
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t
        rate = 2.0 * q * d * d / seconds
        described = f"float64 GEMM [{q}, {d}] x [{d}, {d}] (eigh assumed at this rate: optimistic)"
        resident = n_train * d + 4 * d * d * 8 + 4 * width * d * 8
    return {"flops": flops, "gflops_per_second": rate / 1e9, "seconds": flops / rate,
                "memory_bytes": resident, "probe": described}


# ------------------------------------------------------------------------------------------------
# Demo


def demo(outdir="demo_out", seeds="0-255", steps: int = 18, *, batch: int = 256,
         progress: bool = True, report=print) -> dict:
    """Theoretical generations over the embedded 500 CIFAR-10 images (the README's main job).

    Runs :func:`generate` with the empirical denoiser (Heun ``steps``, and Euler, i.e. paper 1's
    ``p1_optimal`` sampler at 18 steps, for the agreement check) and with the Gaussian denoiser (Heun, closed form) on CPU per-seed noise,
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
    info = {"train": ds.source, "train_hash": data.dataset_hash(ds.images), "n_train": len(ds)}
    common = {"steps": steps, "batch": batch, "progress": progress, "noise_device": "cpu"}
    t = time.perf_counter()
    gauss = GaussianDenoiser.from_data(ds.images)
    fit_seconds = time.perf_counter() - t
    emp = EmpiricalDenoiser(ds.images)
    runs = {
        "empirical_heun": generate(emp, seeds, outdir / "empirical_heun", sampler="heun",
                                   info={**info, "dtype": "float32"}, **common),
        "empirical_euler": generate(emp, seeds, outdir / "empirical_euler", sampler="euler",
                                    info={**info, "dtype": "float32"}, **common),
        "gaussian_heun": generate(gauss, seeds, outdir / "gaussian_heun", sampler="heun",
                                  info={**info, "dtype": "float64"}, **common),
    }
    heun, euler, gaussian = (load_outputs(outdir / name)[1] for name in runs)
    mem = metrics.memorisation_summary(heun, euler, ds.images)
    gauss_mem = metrics.memorisation_summary(gaussian, gaussian, ds.images)["memorised_a"]
    shown = min(len(heun), _GRID_SEEDS)
    plots.nn_grid(data.quantize(heun[:shown]), ds.images, mem["nearest_a"][:shown],
                  outdir / "empirical_vs_nearest.png")
    summary = {
        "seeds": len(heun), "n_train": len(ds), "steps": steps,
        "memorised_heun": mem["memorised_a"], "memorised_euler": mem["memorised_b"],
        "euler_heun_same_nearest": mem["agreement"], "memorised_gaussian": gauss_mem,
        "memorised_meaning": "quantised generation byte-equal to a training image; ci95: Wilson interval",
        "gaussian_fit_seconds": fit_seconds,
        "timing": {name: m["timing"] for name, m in runs.items()}}
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
    report(f"outputs: {outdir}/ (empirical_vs_nearest.png, */grid.png, summary.json)")
    return summary
