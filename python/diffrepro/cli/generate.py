# SPDX-License-Identifier: Apache-2.0
"""``diffrepro generate`` and ``diffrepro demo``: theoretical generations (diffrepro.generation)."""

from __future__ import annotations

import os
import warnings

from ..errors import UsageError, usage_errors
from ._common import HelpFormatter, int_at_least, nonneg_float, positive_float, progress_enabled, require_path

# Kept literal so that building the parser imports no torch; tests check them against
# diffrepro.samplers.SAMPLERS, FLOW_SOLVERS and PRESETS.
SAMPLER_CHOICES = ("heun", "euler", "dpm", "exact", "midpoint")
# diffrepro.denoisers.local.LOCAL_MODELS (a test checks them).
LOCAL_CHOICES = ("pspc", "ls", "els", "els-borders", "pca-locality")
PRESET_CHOICES = ("p1_net", "p1_optimal", "p2_euler10", "p2_euler10_net")


def add_commands(sub) -> None:
    g = sub.add_parser(
        "generate", help="theoretical generations (empirical or Gaussian denoiser), EDM layout",
        formatter_class=HelpFormatter,
        description="One PNG per seed from the empirical (optimal) or Gaussian denoiser of a training set, "
                    "quantised as EDM does, plus the float outputs per batch (batches/*.npz), an 8x8 grid and "
                    "manifest.json. Resumable: a rerun with the same settings continues where it stopped, and a rerun "
                    "with more seeds adds them (the first job on a folder owns its settings; jobs with overlapping "
                    "seeds may share it). "
                    "Runs under torchrun (torchrun --nproc_per_node=K -m diffrepro generate ...) with the same "
                    "flags and the same outputs.")
    g.add_argument("--train", metavar="DATA", help="CIFAR-10 python archive/folder, EDM zip, image folder, npz "
                   "or npy (default: the embedded 500 CIFAR-10 images)")
    g.add_argument("--max-train", metavar="N", type=int_at_least(1), default=None,
                   help="use the first N training images (default: all)")
    g.add_argument("--denoiser", choices=["empirical", "gaussian", *LOCAL_CHOICES], default="empirical",
                   help="empirical (multi-delta) optimal denoiser or Gaussian (Wiener) denoiser of --train, or a "
                        "local model: pspc (patch-set posterior composites, square patches), ls / els / els-borders "
                        "(local score machines), pca-locality (Wiener-filter masks)")
    g.add_argument("--patch-size", metavar="P", default=None,
                   help="pspc: patch size; ls/els/els-borders: odd kernel size; an int, or one per step as a comma "
                        "list (--family=edm, euler or heun: looked up by the nearest step of the sigma grid), e.g. "
                        "the CIFAR-10 PSPC schedule 32,32,32,32,32,32,32,23,15,11,7,5,3,3,3,3,3,3")
    g.add_argument("--mask-threshold", type=nonneg_float, default=0.02,
                   help="pca-locality: mask entries >= this fraction of the largest become 1, the rest 0 "
                        "(0: real-valued masks)")
    g.add_argument("--temperature", type=positive_float, default=1.0, help="pca-locality: softmax temperature")
    g.add_argument("--sampler", choices=SAMPLER_CHOICES, default=None,
                   help="ODE solver (default: heun as EDM, or the preset's); --family=flow: euler, heun or midpoint")
    g.add_argument("--steps", type=int_at_least(2), default=None,
                   help="EDM grid size N, or flow steps N (default: 18, or the preset's)")
    g.add_argument("--preset", choices=PRESET_CHOICES, default=None,
                   help="the papers' sampler settings: p1_optimal (Zhang et al., Euler 18), p1_net (Heun 18), "
                        "p2_euler10 (Li et al., Euler 10 to sigma 0.002), p2_euler10_net (to 0.02); "
                        "explicit flags override them")
    g.add_argument("--seeds", default="0-63", help="EDM syntax, e.g. 0-49999 or 1,5,10-20; on an existing --outdir "
                   "of the same settings, new seeds are added and finished ones reused")
    g.add_argument("--batch", type=int_at_least(1), default=256, help="seeds per batch")
    g.add_argument("--outdir", required=True, help="output folder (created; reused to resume)")
    g.add_argument("--subdirs", action="store_true", help="PNGs in thousand-subdirectories, as EDM")
    g.add_argument("--class", dest="class_idx", metavar="N", type=int_at_least(0), default=None,
                   help="class-conditional empirical denoiser for this class (default: unconditional; with "
                        "--guidance also the Gaussian model of the class)")
    g.add_argument("--guidance", metavar="W", type=float, default=None,
                   help="classifier-free guidance with --class: D_u + W (D_c - D_u) (0: unconditional, "
                        "1: conditional); empirical (class rows) or Gaussian (class mean and covariance) "
                        "(default: no guidance)")
    g.add_argument("--family", choices=["edm", "flow"], default="edm",
                   help="edm: the PF-ODE in sigma; flow: the flow-matching ODE in t of x_t = (1-t) x0 + t eps "
                        "from pure noise at t = 1 (SD3/Flux samplers; --sampler euler, heun or midpoint)")
    g.add_argument("--shift", type=positive_float, default=None,
                   help="--family=flow: time shift t' = s t / (1 + (s-1) t) (default: 1; SD3: 3)")
    g.add_argument("--flow-grid", choices=["uniform", "diffusers"], default=None,
                   help="--family=flow: uniform t grid, or diffusers' FlowMatchEulerDiscreteScheduler grid "
                        "(default: uniform)")
    g.add_argument("--latents", metavar="FILE", help="noise bank .npz (latents, seeds) instead of per-seed noise")
    g.add_argument("--dtype", choices=["float32", "float64"], default=None,
                   help="empirical denoiser compute dtype (default: float32; Gaussian: always float64)")
    g.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda also draws the per-seed noise on CUDA (EDM-identical); the CPU stream differs")
    g.add_argument("--sigma-min", type=positive_float, default=None,
                   help="smallest sigma (default: the preset's, 0.002)")
    g.add_argument("--sigma-max", type=positive_float, default=None, help="largest sigma (default: the preset's, 80)")
    g.add_argument("--rho", type=positive_float, default=None, help="EDM grid exponent (default: the preset's, 7)")
    g.add_argument("--part", metavar="I/K", default=None,
                   help="compute only part I of K (0 <= I < K) of the batches, without a rendezvous (a SLURM array "
                        "task: --part $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT); a final run without --part "
                        "checks and assembles the outputs")
    g.add_argument("--shard-train", action="store_true",
                   help="under torchrun: each process holds 1/K of the training rows and every denoiser call "
                        "combines the processes' partial sums (empirical denoiser)")
    g.add_argument("--dist-timeout", type=positive_float, default=600.0, metavar="SECONDS",
                   help="under torchrun: a process silent this long is reported lost and the others stop")
    g.add_argument("--prune", metavar="EPS", type=nonneg_float, default=1e-12,
                   help="empirical denoiser: skip training rows certified to weigh, together, less than EPS of the "
                        "largest weight, and commit samples left with one row (0: dense; recorded in the manifest)")
    g.add_argument("--dry-run", action="store_true", help="print the work, estimated flops/time/memory, and exit")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.set_defaults(fn=_cmd_generate)

    d = sub.add_parser("demo", help="memorisation demo on the embedded 500 CIFAR-10 images",
                       formatter_class=HelpFormatter,
                       description="Empirical-denoiser generations (Heun and Euler) beside their nearest training "
                                   "images, Gaussian-denoiser generations of the same seeds, throughput and the "
                                   "memorisation summary (summary.json).")
    d.add_argument("--outdir", default="demo_out", help="output folder")
    d.add_argument("--seeds", default="0-255", help="EDM syntax")
    d.add_argument("--steps", type=int_at_least(2), default=18, help="EDM grid size N")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(fn=_cmd_demo)


def _resolve(args) -> dict:
    """Check the generate arguments against each other and load the data."""
    import torch

    from .. import data, distributed, generation, samplers
    from ..denoisers.guidance import MAX_GUIDANCE

    flow = _flow_settings(args)
    preset = samplers.PRESETS[args.preset or "p1_net"]  # EDM's own default is the p1_net setting
    sampler = args.sampler or preset["solver"]
    if flow is not None and sampler not in samplers.FLOW_SOLVERS:
        raise UsageError(f"--sampler: got {sampler!r} with --family=flow, expected one of "
                         + ", ".join(samplers.FLOW_SOLVERS))
    if flow is None and sampler not in samplers.SAMPLERS:
        raise UsageError(f"--sampler: got {sampler!r} with --family=edm, expected one of "
                         + ", ".join(samplers.SAMPLERS) + " (midpoint: --family=flow)")
    steps = args.steps if args.steps is not None else preset["num_steps"]
    grid = {"sigma_min": args.sigma_min if args.sigma_min is not None else preset["sigma_min"],
            "sigma_max": args.sigma_max if args.sigma_max is not None else preset["sigma_max"],
            "rho": args.rho if args.rho is not None else preset["rho"]}
    if not grid["sigma_min"] < grid["sigma_max"]:
        raise UsageError(f"--sigma-min/--sigma-max: got {grid['sigma_min']} and {grid['sigma_max']}, "
                         "expected sigma_min < sigma_max")
    if sampler == "dpm" and steps < 3:
        raise UsageError(f"--steps: got {steps}, expected >= 3 with --sampler=dpm (order 3)")
    if sampler == "exact" and args.denoiser != "gaussian":
        raise UsageError(f"--sampler: got 'exact' with --denoiser={args.denoiser}, expected --denoiser=gaussian "
                         "(the closed-form ODE solution exists only there)")
    if sampler == "exact" and args.guidance is not None:
        raise UsageError(f"--sampler: got 'exact' with --guidance {args.guidance}, expected heun, euler or dpm "
                         "(the closed-form trajectory is the unconditional model's)")
    if args.denoiser == "gaussian" and args.dtype == "float32":
        raise UsageError("--dtype: got 'float32' with --denoiser=gaussian, expected float64 "
                         "(the Gaussian statistics are always float64)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device: got 'cuda', but no CUDA device is available; expected 'cpu'")
    with usage_errors("--seeds"):
        seeds = generation.SeedRanges.parse(args.seeds)
    with usage_errors("--part"):
        part = None if args.part is None else distributed.parse_part(args.part)
    if args.shard_train and args.denoiser != "empirical":
        raise UsageError(f"--shard-train: got it with --denoiser={args.denoiser}, expected --denoiser=empirical "
                         "(only the empirical denoiser's rows are sharded)")
    if args.guidance is not None and args.class_idx is None:
        raise UsageError(f"--guidance: got {args.guidance} without --class, expected --class N "
                         "(guidance moves towards a class)")
    if args.guidance is not None and not abs(args.guidance) <= MAX_GUIDANCE:
        raise UsageError(f"--guidance: got {args.guidance:g}, expected a number in [-{MAX_GUIDANCE:g}, "
                         f"{MAX_GUIDANCE:g}] (images lie in [-1, 1], the guided prediction within 1 + 2|W|)")
    if args.guidance is not None and args.shard_train:
        raise UsageError("--guidance: got it with --shard-train, expected no --shard-train (the guided "
                         "denoiser's two terms are not sharded)")
    if args.class_idx is not None and args.guidance is None and args.denoiser == "gaussian":
        raise UsageError(f"--class: got {args.class_idx} with --denoiser={args.denoiser}, expected "
                         "--denoiser=empirical (class-conditional optimum) or a local model, or --guidance 1 for "
                         "the Gaussian model of the class")
    _check_local(args, sampler, steps, flow, grid)
    if args.latents is not None and not os.path.isfile(args.latents):
        raise UsageError(f"--latents: got {args.latents!r}, expected an existing noise-bank .npz")
    if args.train:
        require_path("--train", args.train, "a CIFAR-10 archive or folder, EDM zip, image folder, .npz or .npy")
    with usage_errors("--train"):
        ds = (data.load_dataset(args.train, max_images=args.max_train, progress=progress_enabled(args))
              if args.train else data.default_dataset())
        if args.max_train is not None and not args.train:
            ds = data.Dataset(ds.images[:args.max_train], None if ds.labels is None else ds.labels[:args.max_train],
                              None if ds.names is None else ds.names[:args.max_train], ds.source)
    if args.class_idx is not None:
        if not 0 <= args.class_idx < ds.label_dim:
            raise UsageError(f"--class: got {args.class_idx}, expected a class in [0, {ds.label_dim}) of "
                             f"{ds.source!r}" + ("" if ds.labels is not None else " (the data set has no labels)"))
        if not (ds.labels == args.class_idx).any():
            raise UsageError(f"--class: class {args.class_idx} has no image among the {len(ds)} of {ds.source!r}")
    if args.preset:
        reason = samplers.sampler_mismatch(sampler, args.preset)
        if reason:
            warnings.warn(reason, stacklevel=1)
    return {"sampler": sampler, "steps": steps, "grid": grid, "seeds": seeds, "ds": ds, "part": part,
            "flow": flow}


def _check_local(args, sampler, steps, flow, grid) -> None:
    """The local models' flags: --patch-size for pspc/ls/els, a per-step list only on an EDM grid
    of as many steps (its σ grid kept in ``args.patch_sigmas``); no guidance or dry run."""
    local, args.patch_sigmas = args.denoiser in LOCAL_CHOICES, None
    if not local or args.denoiser == "pca-locality":
        if args.patch_size is not None:
            raise UsageError(f"--patch-size: got {args.patch_size!r} with --denoiser={args.denoiser}, expected "
                             "--denoiser=pspc, ls, els or els-borders")
        if not local:
            return
    from ..denoisers.local import parse_sizes

    if args.guidance is not None or args.dry_run:
        flag = "--guidance" if args.guidance is not None else "--dry-run"
        raise UsageError(f"{flag}: got it with --denoiser={args.denoiser}, expected --denoiser=empirical or gaussian")
    if args.denoiser == "pca-locality":
        return
    if args.patch_size is None:
        raise UsageError(f"--patch-size: missing, expected an int or a comma list per step with "
                         f"--denoiser={args.denoiser}")
    with usage_errors("--patch-size"):
        sizes = parse_sizes(args.patch_size)
    if isinstance(sizes, list) and (flow is not None or sampler not in ("heun", "euler") or len(sizes) != steps):
        raise UsageError(f"--patch-size: got {len(sizes)} sizes with --sampler={sampler}, --steps={steps}"
                         + (", --family=flow" if flow is not None else "")
                         + f", expected one per step of an EDM grid (--family=edm, heun or euler, "
                         f"--steps={len(sizes)})")
    if isinstance(sizes, list):
        from ..samplers import edm_grid

        args.patch_sigmas = edm_grid(steps, grid["sigma_min"], grid["sigma_max"], grid["rho"])[:-1].tolist()
    args.patch_size = sizes


def _flow_settings(args) -> dict | None:
    """``{"shift", "grid"}`` for --family=flow (None for edm); EDM-only flags are refused with flow
    and flow-only flags without it."""
    if args.family == "edm":
        for flag, value in (("--shift", args.shift), ("--flow-grid", args.flow_grid)):
            if value is not None:
                raise UsageError(f"{flag}: got {value} with --family=edm, expected --family=flow")
        return None
    for flag, value in (("--preset", args.preset), ("--sigma-min", args.sigma_min),
                        ("--sigma-max", args.sigma_max), ("--rho", args.rho)):
        if value is not None:
            raise UsageError(f"{flag}: got {value} with --family=flow, expected --family=edm (the flow sampler "
                             "steps in t from 1 to 0: --steps, --shift, --flow-grid)")
    return {"shift": 1.0 if args.shift is None else args.shift, "grid": args.flow_grid or "uniform"}


def _denoiser(args, ds, dtype, ctx):
    """The denoiser of the run; with --shard-train, this rank's slice of the rows."""
    from .. import distributed
    from ..denoisers import EmpiricalDenoiser, GaussianDenoiser, GuidedDenoiser

    if args.guidance is not None:
        if args.denoiser == "empirical":
            return GuidedDenoiser.empirical(ds, guidance=args.guidance, dtype=dtype, device=args.device)
        return GuidedDenoiser.gaussian(ds, guidance=args.guidance, device=args.device)
    labels = ds.labels if args.class_idx is not None else None
    if args.denoiser == "empirical" and args.prune >= 1:
        raise UsageError(f"--prune: got {args.prune}, expected a number in [0, 1) (0: dense)")
    if args.shard_train:
        lo, hi = distributed.shard_bounds(len(ds), ctx.world_size, ctx.rank)
        return distributed.ShardedEmpiricalDenoiser(
            ds.images[lo:hi], lo, ctx, labels=None if labels is None else labels[lo:hi],
            label_dim=ds.label_dim if labels is not None else None, dtype=dtype, device=args.device,
            prune=args.prune)
    if args.denoiser == "empirical":
        return EmpiricalDenoiser(ds.images, labels=labels, dtype=dtype, device=args.device, prune=args.prune)
    if args.denoiser in LOCAL_CHOICES:
        return _local(args, ds, labels, dtype)
    return GaussianDenoiser.from_data(ds.images, device=args.device)


def _local(args, ds, labels, dtype):
    """A local model; a per-step size refers to the run's EDM grid."""
    from ..denoisers.local import local_denoiser

    return local_denoiser(args.denoiser, ds.images, patch_size=args.patch_size, sigmas=args.patch_sigmas,
                          mask_threshold=args.mask_threshold, temperature=args.temperature, labels=labels,
                          label_dim=ds.label_dim if labels is not None else None, dtype=dtype, device=args.device)


def _dry_run(args, r, dtype, work) -> int:
    from .. import data, generation
    from .._estimate import format_duration

    ds, sampler, steps = r["ds"], r["sampler"], r["steps"]
    shape = tuple(int(v) for v in ds.images.shape[1:])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and int(os.environ.get("RANK", "0")) != 0:
        return 0
    closed = args.denoiser == "gaussian" and sampler != "dpm" and r["flow"] is None and args.guidance is None
    guided_rows = None if args.guidance is None else int((ds.labels == args.class_idx).sum())
    est = generation.estimate_cost(args.denoiser, len(ds), shape, work, dtype=dtype, device=args.device,
                                   closed=closed, guided_rows=guided_rows)
    seeds, job = work["seeds"], work["job"]
    print(f"data     {ds.source} ({len(ds)} images {shape}, sha256 {data.dataset_hash(ds.images)[:16]}...)")
    flow = r["flow"]
    schedule = (f"sigma [{r['grid']['sigma_min']}, {r['grid']['sigma_max']}], rho {r['grid']['rho']}" if flow is None
                else f"flow t 1 -> 0, shift {flow['shift']}, {flow['grid']} grid")
    print(f"denoiser {args.denoiser} ({str(dtype).replace('torch.', '')}, {args.device})"
          + ("" if args.guidance is None else f", guidance {args.guidance} towards class {args.class_idx}")
          + f"; sampler {sampler}, {steps} steps, {schedule}"
          + (" (closed-form trajectory: 2 GEMMs per batch)" if closed else ""))
    print(f"seeds    {len(seeds)} ({seeds.format()[:60]}) in {len(work['plan'])} batches of <= {args.batch}"
          + (f"; part {args.part}: {len(job)} batches" if args.part else "")
          + f"; to compute: {work['compute_seeds']} seeds in {work['compute_batches']} batches "
          f"({work['new_seeds']} new); "
          f"PNGs missing: {work['missing_png']}")
    if world > 1:
        print(f"procs    {world} (" + ("training rows split over them" if args.shard_train
                                       else "batch i on process i mod " + str(world)) + ")")
    calls = 0 if closed else work["evaluations"] * (1 if args.guidance is None else 2)
    print(f"NFE      {work['nfe']} per sample; {calls} batched denoiser calls"
          + ("" if args.guidance is None else f" (unconditional and class {args.class_idx}: {guided_rows} rows)"))
    print(f"estimate {est['flops'] / 1e9:.1f} GFLOP at this machine's measured rates ({est['probe']}): "
          f"~{format_duration(est['seconds'])}" + (" dense (pruning skips part of it)"
                                                   if args.denoiser == "empirical" and args.prune > 0 else "")
          + f"; memory ~{est['memory_bytes'] / 2**30:.2f} GiB")
    return 0


def _cmd_generate(args) -> int:
    import torch

    from .. import data, distributed, generation
    from .._estimate import format_duration

    r = _resolve(args)
    ds, sampler, steps = r["ds"], r["sampler"], r["steps"]
    dtype = torch.float64 if args.dtype == "float64" or args.denoiser == "gaussian" else torch.float32
    with usage_errors("--seeds"):
        work = generation.plan_work(r["seeds"], args.outdir, sampler=sampler, steps=steps, batch=args.batch,
                                    subdirs=args.subdirs, part=r["part"], flow=r["flow"])
    if args.dry_run:
        return _dry_run(args, r, dtype, work)
    notes = {"train": ds.source, "preset": args.preset}
    if args.denoiser == "gaussian":
        notes["train_sha256"] = data.dataset_hash(ds.images)
    ctx = distributed.init(timeout=args.dist_timeout, device=args.device)
    den = _denoiser(args, ds, dtype, ctx)
    manifest = generation.generate(den, r["seeds"], args.outdir, sampler=sampler, steps=steps, batch=args.batch,
                                   latents=args.latents, class_idx=args.class_idx, subdirs=args.subdirs,
                                   notes=notes, part=r["part"], context=ctx, flow=r["flow"],
                                   progress=not args.no_progress and ctx.rank == 0, **r["grid"])
    ctx.close()
    if ctx.rank == 0:
        tm = manifest["timing"]
        what = "complete" if manifest["status"] == "complete" else (
            f"part {args.part} done" if args.part else "incomplete (see the warning above)")
        held = manifest["config"]["seeds"]
        held = len(generation.SeedRanges.parse(held)) if held else 0
        print(f"{len(work['seeds'])} images in {args.outdir}: {what} ({tm['generated']} generated, "
              f"{tm['reused']} reused) in {format_duration(tm['seconds'])}" + (f" on {ctx.world_size} processes"
                                                                                if ctx.world_size > 1 else "")
              + (f"; the folder holds {held} finished seeds" if held != len(work["seeds"]) else ""))
    return 0


def _cmd_demo(args) -> int:
    from .. import generation

    with usage_errors("--seeds"):
        seeds = generation.SeedRanges.parse(args.seeds)
    generation.demo(args.outdir, seeds, args.steps, progress=progress_enabled(args))
    return 0
