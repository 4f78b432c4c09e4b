# SPDX-License-Identifier: Apache-2.0
"""``diffrepro inverse``: solutions of a linear inverse problem with the analytic denoisers
(diffrepro.inverse), one PNG per seed in the ``generate`` layout."""

from __future__ import annotations

from ..errors import UsageError, usage_errors
from ._common import HelpFormatter, int_at_least, nonneg_float, positive_float, progress_enabled, require_path

# Kept literal so that building the parser imports no torch; tests check them against diffrepro.inverse.
TASK_CHOICES = ("inpaint-box", "inpaint-random", "sr2", "sr4", "deblur")
LIKELIHOOD_CHOICES = ("exact", "moment", "dps")


def add_commands(sub) -> None:
    p = sub.add_parser(
        "inverse", help="inverse-problem solutions (inpainting, super-resolution, deblurring), generate layout",
        formatter_class=HelpFormatter,
        description="Measures one target image through a linear operator (box or random-pixel inpainting, 2x/4x "
                    "average-pooling super-resolution, Gaussian blur) and solves for it from each seed's noise with "
                    "the EDM sampler and the posterior denoiser of the empirical or Gaussian model (exact by default; "
                    "Tweedie moment projection or DPS on request). Writes the generate layout (NNNNNN.png per seed, "
                    "batches/*.npz, grid.png, "
                    "manifest.json) plus inverse.npz (target, measurement and, for the Gaussian model, the exact "
                    "posterior mean), so 'features' and 'score rp' compare two models' solutions seed by seed. "
                    "Resumable like generate.")
    p.add_argument("--task", choices=TASK_CHOICES, required=True, help="measurement operator")
    p.add_argument("--outdir", required=True, help="output folder (created; reused to resume)")
    p.add_argument("--train", metavar="DATA", help="training set of the denoiser (default: the embedded 500 CIFAR-10 "
                   "images)")
    p.add_argument("--max-train", metavar="N", type=int_at_least(1), default=None,
                   help="use the first N training images (default: all)")
    p.add_argument("--denoiser", choices=["empirical", "gaussian"], default="empirical", help="prior")
    p.add_argument("--target", metavar="DATA", help="data set holding the image to measure (default: --train's)")
    p.add_argument("--target-index", metavar="K", type=int_at_least(0), default=0, help="row of the target image")
    p.add_argument("--likelihood", choices=LIKELIHOOD_CHOICES, default="exact",
                   help="exact: the prior's exact posterior (empirical: training images reweighted by "
                   "exp(-|y - A y_i|^2 / 2 s_y^2), one denoiser call per step; Gaussian: the Gaussian posterior); "
                   "moment: Tweedie moment projection (50 conjugate-gradient steps); dps: Chung et al. 2023")
    p.add_argument("--noise-std", type=nonneg_float, default=0.01,
                   help="measurement noise s_y added to the measurement and assumed by the exact and moment "
                   "likelihoods (0: noise-free, the exact posterior keeps only the images that fit y best)")
    p.add_argument("--measurement-seed", type=int_at_least(0), default=0, help="seed of the measurement noise")
    p.add_argument("--zeta", type=nonneg_float, default=1.0, help="DPS step size (--likelihood=dps)")
    p.add_argument("--cg-iters", type=int_at_least(1), default=50,
                   help="conjugate-gradient iterations per denoiser call (--likelihood=moment)")
    p.add_argument("--missing", type=nonneg_float, default=0.7, help="missing pixel fraction (inpaint-random)")
    p.add_argument("--mask-seed", type=int_at_least(0), default=0, help="seed of the random mask (inpaint-random)")
    p.add_argument("--blur-std", type=positive_float, default=1.0, help="Gaussian blur std in pixels (deblur)")
    p.add_argument("--sampler", choices=["heun", "euler"], default="heun", help="EDM solver")
    p.add_argument("--steps", type=int_at_least(2), default=18, help="EDM grid size N")
    p.add_argument("--sigma-min", type=positive_float, default=0.002, help="smallest sigma")
    p.add_argument("--sigma-max", type=positive_float, default=80.0, help="largest sigma")
    p.add_argument("--rho", type=positive_float, default=7.0, help="EDM grid exponent")
    p.add_argument("--seeds", default="0-63", help="EDM syntax, e.g. 0-49999 or 1,5,10-20")
    p.add_argument("--batch", type=int_at_least(1), default=64, help="seeds per batch")
    p.add_argument("--dtype", choices=["float32", "float64"], default=None,
                   help="empirical denoiser compute dtype (default float32; the Jacobian products are float64)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the denoiser runs")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything, print the work and its estimated flops/time/memory, and exit")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress (a bar on a terminal, else a line at most every 30 s)")
    p.set_defaults(fn=_cmd_inverse)


def _dataset(arg: str, path: str | None, max_images: int | None, progress: bool):
    from .. import data

    if path is None:
        ds = data.default_dataset()
        return ds if max_images is None else data.Dataset(
            ds.images[:max_images], None if ds.labels is None else ds.labels[:max_images],
            None if ds.names is None else ds.names[:max_images], ds.source)
    require_path(arg, path, "a CIFAR-10 archive or folder, EDM zip, image folder, .npz or .npy")
    with usage_errors(arg):
        return data.load_dataset(path, max_images=max_images, progress=progress)


def _jacobian_products(args) -> int:
    """Jacobian–vector products per posterior evaluation (at most: the conjugate gradients stop at
    their tolerance)."""
    return {"moment": 2 * args.cg_iters + 1, "dps": int(args.zeta > 0)}.get(args.likelihood, 0)


def _dry_run(args, ds, target_ds, op, seeds, dtype) -> int:
    """The plan and its cost (generate's planner and estimate, with the posterior's Jacobian
    products); loads the data, checks the problem, writes nothing."""
    import math

    from .. import _estimate, data, generation

    shape = tuple(int(v) for v in ds.images.shape[1:])
    with usage_errors("--outdir"):
        work = generation.plan_work(seeds, args.outdir, sampler=args.sampler, steps=args.steps, batch=args.batch)
    products = _jacobian_products(args)
    extra = 0.0
    if args.denoiser == "gaussian":  # the exact posterior mean: B = A R (r operator images), B Bᵀ, eigh
        r, m = min(len(ds), math.prod(shape)), math.prod(op.measurement_shape(shape))
        extra = 2.0 * r * r * m + 9.0 * r**3
    est = generation.estimate_cost(args.denoiser, len(ds), shape, work, dtype=dtype, device=args.device,
                                   jacobian_products=products, extra_flops=extra)
    likelihood = {"moment": f"moment projection (<= {args.cg_iters} CG iterations, s_y {args.noise_std})",
                  "dps": f"DPS (zeta {args.zeta})"}.get(args.likelihood, args.likelihood)
    print(f"data     {ds.source} ({len(ds)} images {shape}, sha256 {data.dataset_hash(ds.images)[:16]}...)")
    print(f"problem  {op.name} of row {args.target_index} of {target_ds.source}, measurement "
          f"{list(op.measurement_shape(shape))} + noise {args.noise_std} (seed {args.measurement_seed})")
    print(f"solver   {args.denoiser} prior ({str(dtype).replace('torch.', '')}, {args.device}), {likelihood}; "
          f"sampler {args.sampler}, {args.steps} steps, sigma [{args.sigma_min}, {args.sigma_max}], rho {args.rho}")
    print(f"seeds    {len(work['seeds'])} ({work['seeds'].format()[:60]}) in {len(work['plan'])} batches of <= "
          f"{args.batch}; to compute: {work['compute_seeds']} seeds in {work['compute_batches']} batches; "
          f"PNGs missing: {work['missing_png']}")
    print(f"NFE      {work['nfe']} per sample, each 1 denoiser call + {products} Jacobian products (at most); "
          f"{work['evaluations']} batched evaluations")
    print(f"estimate {est['flops'] / 1e9:.1f} GFLOP at this machine's measured rates ({est['probe']}): "
          f"~{_estimate.format_duration(est['seconds'])}; memory ~{est['memory_bytes'] / 2**30:.2f} GiB")
    print("dry run: nothing written")
    return 0


def _cmd_inverse(args) -> int:
    import numpy as np
    import torch

    from .. import data, generation, inverse, noise
    from ..denoisers import EmpiricalDenoiser, GaussianDenoiser

    if not args.sigma_min < args.sigma_max:
        raise UsageError(f"--sigma-min/--sigma-max: got {args.sigma_min} and {args.sigma_max}, expected "
                         "sigma_min < sigma_max")
    if args.denoiser == "gaussian" and args.dtype == "float32":
        raise UsageError("--dtype: got 'float32' with --denoiser=gaussian, expected float64 (the Gaussian "
                         "statistics are always float64)")
    if args.missing >= 1:
        raise UsageError(f"--missing: got {args.missing}, expected a fraction in [0, 1)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device: got 'cuda', but no CUDA device is available; expected 'cpu'")
    with usage_errors("--seeds"):
        seeds = noise.parse_seeds(args.seeds)
    progress = progress_enabled(args)
    ds = _dataset("--train", args.train, args.max_train, progress)
    target_ds = ds if args.target is None else _dataset("--target", args.target, None, progress)
    if args.target_index >= len(target_ds):
        raise UsageError(f"--target-index: got {args.target_index}, expected a row in [0, {len(target_ds)}) of "
                         f"{target_ds.source!r}")
    shape = tuple(int(v) for v in ds.images.shape[1:])
    if tuple(target_ds.images.shape[1:]) != shape:
        raise UsageError(f"--target: images of shape {tuple(target_ds.images.shape[1:])}, expected the training "
                         f"images' {shape}")
    with usage_errors("--blur-std" if args.task == "deblur" else "--task"):
        op = inverse.make_operator(args.task, shape[1], seed=args.mask_seed, missing=args.missing,
                                   blur_std=args.blur_std)
    dtype = torch.float64 if args.dtype == "float64" or args.denoiser == "gaussian" else torch.float32
    target = data.decode(torch.from_numpy(np.array(target_ds.images[args.target_index:args.target_index + 1])))
    with usage_errors(f"--task {args.task}"):  # the operator, the shapes and a finite measurement: before any write
        op.measurement_shape(shape)
        clean = op(target)
        gen = torch.Generator().manual_seed(args.measurement_seed)
        measurement = clean + args.noise_std * torch.randn(clean.shape, generator=gen, dtype=torch.float64)
        inverse.check_problem(op, measurement, shape)
    if args.dry_run:
        return _dry_run(args, ds, target_ds, op, seeds, dtype)
    with usage_errors("--train"):
        if args.denoiser == "empirical":
            den = EmpiricalDenoiser(ds.images, dtype=dtype, device=args.device)
        else:
            den = GaussianDenoiser.from_data(ds.images, device=args.device, progress=progress)
    with usage_errors(f"--task {args.task}"):
        post = inverse.PosteriorDenoiser(den, op, measurement, likelihood=args.likelihood, zeta=args.zeta,
                                         noise_std=args.noise_std, cg_iters=args.cg_iters)
    info = {"kind": args.denoiser, "train": ds.source, "train_hash": data.dataset_hash(ds.images),
            "n_train": len(ds), "dtype": str(dtype).replace("torch.", ""), "device": args.device,
            "inverse": {**post.describe(), "target": target_ds.source, "target_index": args.target_index,
                        "target_hash": data.dataset_hash(target_ds.images[args.target_index:args.target_index + 1]),
                        "measurement_noise_std": args.noise_std, "measurement_seed": args.measurement_seed}}
    with usage_errors("--outdir"):
        manifest = generation.generate(post, seeds, args.outdir, sampler=args.sampler, steps=args.steps,
                                       sigma_min=args.sigma_min, sigma_max=args.sigma_max, rho=args.rho,
                                       batch=args.batch, info=info, progress=not args.no_progress)
    extra = {"target": target.numpy(), "measurement": measurement.numpy(), "preview": op.preview(measurement).numpy()}
    if args.denoiser == "gaussian":
        extra["posterior_mean"] = inverse.gaussian_posterior_mean(den, op, measurement, args.noise_std).cpu().numpy()
    data.atomic_save_npz(f"{args.outdir}/inverse.npz", **extra)
    tm = manifest["timing"]
    print(f"{len(seeds)} solutions of {op.name} in {args.outdir} ({tm['generated']} computed, {tm['reused']} "
          f"reused) in {tm['seconds']:.2f} s")
    return 0
