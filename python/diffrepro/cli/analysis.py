# SPDX-License-Identifier: Apache-2.0
"""``diffrepro linearity`` and ``diffrepro distill`` (diffrepro.sweeps)."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np

from ..errors import UsageError, usage_errors
from ._common import (
    HelpFormatter,
    dist_timeout_arg,
    int_at_least,
    job,
    load_images,
    nonneg_float,
    positive_float,
    progress_enabled,
    refuse_overwrite,
    result_path,
    stem,
    write_json,
)

_P2_A = "0.99,0.8675,0.745,0.6225,0.5"  # literal (no torch at parser time); tested against sweeps.P2_A_VALUES
# distill writes one d x d float64 matrix per sigma: say so before writing more than this.
_LARGE_OUTPUT_BYTES = 100 << 20


def _denoiser_args(p) -> None:
    p.add_argument("--denoiser", required=True, choices=("empirical", "gaussian"),
                   help="empirical (multi-delta) optimal denoiser or the Gaussian (Wiener) denoiser of --train")
    p.add_argument("--train", required=True, metavar="DATA",
                   help="training set; for --denoiser gaussian also a Gaussian statistics .npz (mu, lam, U)")
    p.add_argument("--images", required=True, metavar="DATA", help="held-out clean images")
    p.add_argument("--sigmas", default="p2",
                   help="'p2' (Li, Dai, Qu's ten EDM levels, 80 ... 0.002) or a comma-separated list of sigma > 0")
    p.add_argument("--max-train", type=int_at_least(1), default=None, help="use the first N training images")
    p.add_argument("--seed", type=int, default=0, help="seed of the CPU noise generator")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                   help="empirical denoiser compute dtype (the Gaussian one is always float64)")
    p.add_argument("--device", default="cpu", help="device of the denoiser and the inputs")
    p.add_argument("--dry-run", action="store_true", help="print the work and its estimated cost, and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", metavar="OUT", help="result file (default: <images>__<train>.<command>.json)")
    p.add_argument("--outdir", metavar="DIR", help="folder for the default output files")
    dist_timeout_arg(p)


def add_commands(sub) -> None:
    p = sub.add_parser("linearity", help="linearity scores of a denoiser against sigma (Li, Dai, Qu eqs. 11-12)",
                       formatter_class=HelpFormatter,
                       description="Cosine and NMSE linearity scores of D(.; sigma) on pairs x = y + sigma*eps of "
                                   "held-out images (x1 from images [0:P], x2 from [P:2P]); the noise is drawn once "
                                   "on the CPU and reused across sigma (the paper's 'noisy images' variant).")
    _denoiser_args(p)
    p.add_argument("--pairs", type=int_at_least(1), default=100, help="P, the number of pairs (needs 2P images)")
    p.add_argument("--a-values", default=_P2_A, help="values of a = alpha^2 (beta^2 = 1 - a), comma-separated")
    p.add_argument("--inputs", default="noisy", choices=("noisy", "pure"),
                   help="noisy: y + sigma*eps (noise reused across sigma); pure: sigma*eps with fresh noise per sigma")
    p.add_argument("--abs-cos", action="store_true", help="use |cos| (the paper's code has no abs)")
    p.add_argument("--nmse-squared", action="store_true", help="square the relative L2 (the paper's wording)")
    p.add_argument("--plot", default=None, help="score-vs-sigma PNG (default: the JSON path with .png)")
    p.set_defaults(fn=_cmd_linearity)

    p = sub.add_parser("distill", help="linear distillation of a denoiser per sigma (Li, Dai, Qu eqs. 8-9)",
                       formatter_class=HelpFormatter,
                       description="Fit D_L(x) = W x + b to the teacher on M noisy held-out inputs x = y + sigma*eps "
                                   "per sigma (closed-form least squares, or the paper's Adam), save the models "
                                   "(W_eff, b, sigma, mode, M, stacked over sigma) and report the weight NMSE against "
                                   "the Gaussian (Wiener) weights of --train.")
    _denoiser_args(p)
    p.add_argument("--M", type=int_at_least(1), default=None,
                   help="inputs per sigma (default: 20 d; lstsq needs M > d + 1)")
    p.add_argument("--mode", default="lstsq", choices=("lstsq", "adam"), help="closed form or the paper's Adam")
    p.add_argument("--ridge", type=nonneg_float, default=0.0, help="lstsq ridge penalty")
    p.add_argument("--epochs", type=int_at_least(1), default=100, help="adam: passes over --images")
    p.add_argument("--lr", type=positive_float, default=None, help="adam: learning rate (default: the paper's table)")
    p.add_argument("--batch-size", type=int_at_least(1), default=256, help="inputs per batch")
    p.add_argument("--out", default=None, metavar="MODEL.npz", help="linear models (default: the JSON path with .npz)")
    p.set_defaults(fn=_cmd_distill)


def _parse_floats(arg: str, text: str, low: float, high: float, what: str) -> np.ndarray:
    try:
        values = np.array([float(v) for v in text.split(",") if v.strip()], dtype=np.float64)
    except ValueError:
        values = np.array([])
    if values.size == 0 or not np.all(np.isfinite(values)) or np.any((values < low) | (values > high)):
        raise UsageError(f"{arg}: expected {what}, got {text!r}")
    return values


def _sigmas(text: str) -> np.ndarray:
    if text.strip().lower() == "p2":
        from ..sweeps import p2_sigmas

        return p2_sigmas()
    values = _parse_floats("--sigmas", text, 0.0, math.inf, "'p2' or a comma-separated list of positive numbers")
    if np.any(values <= 0):
        raise UsageError(f"--sigmas: expected 'p2' or a comma-separated list of positive numbers, got {text!r}")
    return values


def _gaussian_stats(args) -> bool:
    """True when --train is a Gaussian statistics .npz (mu, lam, U) for --denoiser gaussian."""
    from ..data import reading_file

    if args.denoiser != "gaussian" or not args.train.endswith(".npz") or not os.path.isfile(args.train):
        return False
    # numpy raises ValueError for a file that is not an .npz at all
    with reading_file(f"--train: {args.train!r}", "a data set or Gaussian statistics .npz", ValueError), \
            np.load(args.train) as z:
        return "lam" in z.files


def _train(args, progress: bool):
    """(training images, or None for a statistics file; the Gaussian statistics denoiser or None)."""
    from ..denoisers import GaussianDenoiser

    if _gaussian_stats(args):
        with usage_errors("--train"):
            return None, GaussianDenoiser.load(args.train, device=args.device)
    ds, _ = load_images("--train", args.train, args.max_train, progress=progress)
    if ds.images.shape[2] != ds.images.shape[3]:
        raise UsageError(f"--train: images must be square, got [C, H, W] = {list(ds.images.shape[1:])}")
    return ds.images, None


def _make_denoiser(args, train, stats, progress: bool):
    """The denoiser of --denoiser/--train (a fit of the Gaussian model takes a while: never in a dry run)."""
    import torch

    from ..denoisers import EmpiricalDenoiser, GaussianDenoiser

    if stats is not None:
        return stats
    if args.denoiser == "empirical":
        dtype = torch.float64 if args.dtype == "float64" else torch.float32
        return EmpiricalDenoiser(train, dtype=dtype, device=args.device)
    return GaussianDenoiser.from_data(train, device=args.device, progress=progress)


def _held_out(args, shape, count: int | None = None):
    ds, _ = load_images("--images", args.images, count)
    if tuple(ds.images.shape[1:]) != tuple(shape):
        raise UsageError(f"--images: images must match --train's [C, H, W] = {list(shape)}, "
                         f"got {list(ds.images.shape[1:])}")
    return ds.images


def _train_shape(train, stats) -> tuple[int, ...]:
    if train is not None:
        return tuple(int(v) for v in train.shape[1:])
    return (stats.img_channels, stats.img_resolution, stats.img_resolution)


def _cost(args, train, d: int, evaluations: int) -> tuple[float, float]:
    """(flops, seconds) of ``evaluations`` denoiser calls on one query each, plus the Gaussian fit
    where --train is a data set, at this machine's measured rates (:mod:`diffrepro._estimate`)."""
    import torch

    from .. import _estimate

    if args.denoiser == "empirical":
        dtype = torch.float64 if args.dtype == "float64" else torch.float32
        flops = 4.0 * len(train) * d * evaluations  # logits and weighted-sum products
        return flops, flops / _estimate.denoiser_rate(d, dtype, str(args.device))
    flops = 4.0 * d * d * evaluations  # project on the eigenvectors and back
    seconds = flops / _estimate.gemm_rate(str(args.device))
    if train is not None:
        fit = sum(_estimate.gaussian_fit_flops(len(train), d))
        flops, seconds = flops + fit, seconds + _estimate.gaussian_fit_seconds(len(train), d, str(args.device))
    return flops, seconds


def _cost_line(command: str, args, train, d: int, evaluations: int, extra: tuple[float, float] = (0.0, 0.0)) -> str:
    from .._estimate import format_duration

    flops, seconds = _cost(args, train, d, evaluations)
    flops, seconds = flops + extra[0], seconds + extra[1]
    against = f"{len(train)} training images" if args.denoiser == "empirical" else (
        "the Gaussian model" + (f" (fitted on {len(train)} images first)" if train is not None else ""))
    return (f"{command}: {evaluations} denoiser evaluations of dimension {d} against {against}: "
            f"~{flops / 1e9:.1f} GFLOP, ~{format_duration(seconds)} at this machine's measured rates; nothing written")


def _cmd_linearity(args) -> int:
    from .. import plots, sweeps

    sigmas = _sigmas(args.sigmas)
    a_values = _parse_floats("--a-values", args.a_values, 0.0, 1.0, "a comma-separated list of numbers in [0, 1]")
    progress = progress_enabled(args)
    train, stats = _train(args, progress)
    y = _held_out(args, _train_shape(train, stats), 2 * args.pairs)
    if len(y) < 2 * args.pairs:
        raise UsageError(f"--images: --pairs {args.pairs} needs {2 * args.pairs} images, got {len(y)}")
    path = result_path(args, [args.images, args.train], f"linearity-{args.denoiser}")
    png = Path(args.plot) if args.plot else path.with_suffix(".png")
    refuse_overwrite(("--plot" if args.plot else "default plot", png))
    if args.dry_run:  # x1, x2 and every mix a x1 + b x2, per pair and sigma
        evaluations = len(sigmas) * args.pairs * (2 + len(a_values))
        print(_cost_line("linearity", args, train, int(np.prod(y.shape[1:])), evaluations))
        return 0
    den = _make_denoiser(args, train, stats, progress)
    with job(args, args.device) as ctx:  # under torchrun the σ are shared out; rank 0 writes
        res = sweeps.linearity_sweep(den, y, sigmas, pairs=args.pairs, a_values=a_values, inputs=args.inputs,
                                     abs_cos=args.abs_cos, nmse_squared=args.nmse_squared, seed=args.seed,
                                     device=args.device, progress=progress and ctx.rank == 0, context=ctx)
    if ctx.rank:
        return 0
    out = {"metric": "linearity", "denoiser": args.denoiser, **res, "train": os.path.abspath(args.train),
           "images": os.path.abspath(args.images), "layout": "cos[i][j], nmse[i][j]: sigma[i], a[j]"}
    if plots.available():
        main = res["main_a"]
        curves = {f"cos a={a:g}": res["cos"][:, j] for j, a in enumerate(res["a"])}
        curves[f"nmse a={main:g}"] = res["nmse_main"]
        train_of = f"{len(train)} images of {stem(args.train)}" if train is not None else stem(args.train)
        plots.plot_score_vs_sigma(res["sigma"], curves, png, ylabel="linearity score",
                                  title=f"linearity of the {args.denoiser} denoiser of {train_of}: {args.pairs} pairs "
                                        f"of {stem(args.images)}, {args.inputs} inputs")
        out["png"] = os.path.abspath(png)
    else:
        warnings.warn("matplotlib is not installed: the plot was skipped (pip install matplotlib, the plots extra)",
                      stacklevel=1)
    write_json(path, out)
    cos, nmse = res["cos_main"], res["nmse_main"]
    print(f"linearity ({args.denoiser}, a={res['main_a']:g}, {args.pairs} pairs): "
          f"cos {cos.min():.4f}...{cos.max():.4f}, "
          f"nmse {nmse.min():.4f}...{nmse.max():.4f} over {len(sigmas)} sigmas -> {path}"
          + (f", {out['png']}" if "png" in out else ""))
    return 0


def _fit_cost(args, train, d: int, n_sigmas: int, evaluations: int) -> tuple[float, float]:
    """(flops, seconds) of distill's own work beside the teacher's calls: the reference Gaussian fit
    (an empirical teacher), each sigma's Wiener weights U diag(g) U^T, and the linear fits (least
    squares: input and target moments, then a d x d solve; Adam: forward and backward passes)."""
    from .. import _estimate

    device = str(args.device)
    flops = 2.0 * d ** 3 * n_sigmas
    if args.mode == "lstsq":
        flops += 4.0 * d * d * evaluations + 3.0 * d ** 3 * n_sigmas
    else:
        flops += 6.0 * d * d * evaluations
    seconds = flops / _estimate.gemm_rate(device)
    if args.denoiser == "empirical":
        flops += sum(_estimate.gaussian_fit_flops(len(train), d))
        seconds += _estimate.gaussian_fit_seconds(len(train), d, device)
    return flops, seconds


def _cmd_distill(args) -> int:
    from .. import sweeps
    from ..denoisers import GaussianDenoiser

    sigmas = _sigmas(args.sigmas)
    progress = progress_enabled(args)
    train, stats = _train(args, progress)
    y = _held_out(args, _train_shape(train, stats))
    d = int(np.prod(y.shape[1:]))
    M = 20 * d if args.M is None else args.M
    if args.mode == "lstsq" and M <= d + 1:
        raise UsageError(f"--M: least squares needs M > d + 1 = {d + 1} inputs, got {M}")
    model_bytes = len(sigmas) * (d * d + d) * 8
    evaluations = len(sigmas) * (M if args.mode == "lstsq" else args.epochs * len(y))
    path = result_path(args, [args.images, args.train], f"distill-{args.denoiser}")
    model_path = Path(args.out) if args.out else path.with_suffix(".npz")
    refuse_overwrite(("--out" if args.out else "default models file", model_path))
    if args.dry_run:
        print(_cost_line("distill", args, train, d, evaluations, _fit_cost(args, train, d, len(sigmas), evaluations))
              + f"; the models would take {model_bytes / 2**20:.0f} MiB")
        return 0
    if model_bytes > _LARGE_OUTPUT_BYTES:
        warnings.warn(f"the linear models ({len(sigmas)} x {d} x {d} float64) will take "
                      f"{model_bytes / 2**20:.0f} MiB on disk", stacklevel=1)
    den = _make_denoiser(args, train, stats, progress)
    reference = den if isinstance(den, GaussianDenoiser) else GaussianDenoiser.from_data(train, device=args.device,
                                                                                          progress=progress)
    with job(args, args.device) as ctx, usage_errors("--lr" if args.mode == "adam" else "--M"):
        models, res = sweeps.distill_sweep(den, y, sigmas, reference=reference, M=M, mode=args.mode,
                                           ridge=args.ridge, epochs=args.epochs, lr=args.lr,
                                           batch_size=args.batch_size, seed=args.seed, device=args.device,
                                           progress=progress and ctx.rank == 0, context=ctx)
    if ctx.rank:  # under torchrun the σ were shared out; rank 0 writes
        return 0
    model_path.parent.mkdir(parents=True, exist_ok=True)
    models.save(model_path)
    same = os.path.abspath(args.images) == os.path.abspath(args.train)
    out = {"metric": "distill", "denoiser": args.denoiser, **res,
           "weight_nmse_definition": "|W_L - W_G|_F^2 / |W_G|_F^2 (W_G: Wiener weights of --train)",
           "inputs": "training images + noise" if same else "held-out --images + noise",
           "train": os.path.abspath(args.train), "images": os.path.abspath(args.images),
           "model": os.path.abspath(model_path)}
    write_json(path, out)
    nm = res["weight_nmse"]
    print(f"distill ({args.denoiser}, {args.mode}, M={res['M']}, {len(sigmas)} sigmas): weight NMSE vs Wiener "
          f"{nm.min():.3e}...{nm.max():.3e} -> {model_path}, {path}")
    return 0
