# SPDX-License-Identifier: Apache-2.0
"""Scoring commands of the ``diffrepro`` CLI: ``features``, ``score {rp, mae, gl-sscd, gl-nn,
matrix}``, ``linearity`` and ``distill`` (SPEC §5, §6, §7, §9).

Each command is thin: it parses and checks its arguments, loads the inputs, calls
:mod:`diffrepro.metrics`, :mod:`diffrepro.sscd` or :mod:`diffrepro.distill`, prints a one-line
summary and writes its results as JSON atomically (``--json OUT``; by default next to the
first input, or in ``--outdir``, as ``<input stem>.<command>.json``).

Proportions (RP, MAE score, GL via SSCD) are written with their success count, the number of
trials and the 95% Wilson score interval, together with the threshold used (strict ``>`` for
similarities, strict ``<`` for the MAE).

Examples::

    diffrepro features --images=out/edm --model=sscd_disc_large.torchscript.pt --out=edm.npz
    diffrepro score rp --a=edm.npz --b=ddpm.npz --tau=0.6
    diffrepro score mae --a=out/edm --b=out/ddpm --thresh=15
    diffrepro score gl-sscd --gen=edm.npz --train=train_feats.npy
    diffrepro score gl-nn --gen=out/edm --train=cifar10-32x32.zip --normalize=x
    diffrepro score matrix --features a.npz b.npz c.npz --metric=rp
    diffrepro linearity --denoiser=gaussian --train=train.zip --images=test.zip
    diffrepro distill --denoiser=empirical --train=train.zip --images=test.zip --sigmas=p2 --M=61440
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["add_commands"]

_P2_GRID = "p2"
_DEFAULT_A = (0.99, 0.8675, 0.745, 0.6225, 0.5)


class CommandError(ValueError):
    """A user error: reported as ``diffrepro <command>: error: <message>`` with exit status 2."""


# ----------------------------------------------------------------------------------------------
# registration
# ----------------------------------------------------------------------------------------------
def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``features``, ``score`` (rp, mae, gl-sscd, gl-nn, matrix), ``linearity`` and
    ``distill`` on the CLI's sub-parsers object."""
    _add_features(sub)
    _add_score(sub)
    _add_linearity(sub)
    _add_distill(sub)


def _output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="OUT", help="write the results here (default: next to the first "
                   "input, or in --outdir, as <input stem>.<command>.json)")
    p.add_argument("--outdir", metavar="DIR", help="folder for the default output files")


def _add_features(sub) -> None:
    p = sub.add_parser("features", help="SSCD descriptors of an image folder or zip (SPEC §7)",
                       description="Extract SSCD descriptors and save them as .npz with keys features "
                       "(float32 [N, D]), ids (int64 seeds for folders of NNNNNN.png, file names "
                       "otherwise) and meta (JSON). An up-to-date --out is reused (same images, "
                       "model and preprocessing) unless --force.")
    p.add_argument("--images", required=True, metavar="DIR|ZIP", help="image folder, EDM zip or data set file")
    p.add_argument("--model", required=True, metavar="FILE", help="SSCD TorchScript file (*.torchscript.pt)")
    p.add_argument("--out", required=True, metavar="F.npz", help="feature file to write")
    p.add_argument("--preprocess", default="p1_pil320", choices=("p1_pil320", "torch320", "short288"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-images", type=int, default=None, help="first N images in sorted order")
    p.add_argument("--grey-to-rgb", action="store_true", help="replicate 1-channel images to RGB")
    p.add_argument("--allow-tf32", action="store_true", help="allow TF32 on CUDA (P1 ran with it)")
    p.add_argument("--cache-dir", default=None, help="also cache descriptors by image content here")
    p.add_argument("--force", action="store_true", help="recompute even if --out is up to date")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=_cli("features")(_cmd_features))


def _add_score(sub) -> None:
    p = sub.add_parser("score", help="RP, MAE, GL (SSCD or nearest neighbour) and similarity matrices (SPEC §5)")
    ss = p.add_subparsers(dest="score_command", required=True, metavar="{rp,mae,gl-sscd,gl-nn,matrix}")

    s = ss.add_parser("rp", help="reproducibility score of two feature files, paired by id (SPEC §5.2)")
    s.add_argument("--a", required=True, metavar="F1.npz", help="features of model A's generations")
    s.add_argument("--b", required=True, metavar="F2.npz", help="features of model B's generations (same ids)")
    s.add_argument("--tau", type=float, default=0.6, help="similarity threshold, strict > (default 0.6)")
    _output_args(s)
    s.set_defaults(fn=_cli("score rp")(_cmd_rp))

    s = ss.add_parser("mae", help="MAE score of two image folders, paired by id (SPEC §5.2)")
    s.add_argument("--a", required=True, metavar="DIR1", help="images of model A (folder, zip or npz)")
    s.add_argument("--b", required=True, metavar="DIR2", help="images of model B (same ids)")
    s.add_argument("--thresh", type=float, default=15.0, help="MAE threshold on [0, 255], strict < (default 15)")
    _output_args(s)
    s.set_defaults(fn=_cli("score mae")(_cmd_mae))

    s = ss.add_parser("gl-sscd", help="P1's generalisation score via SSCD (SPEC §5.3)")
    s.add_argument("--gen", required=True, metavar="F.npz", help="features of the generations")
    s.add_argument("--train", required=True, metavar="T.npz|T.npy",
                   help="training descriptors: a feature file, or a float32/float16 [N, D] .npy (memory-mapped)")
    s.add_argument("--tau", type=float, default=0.6, help="similarity threshold, strict > (default 0.6)")
    s.add_argument("--chunk-rows", type=int, default=16384, help="training rows per kernel call")
    _output_args(s)
    s.set_defaults(fn=_cli("score gl-sscd")(_cmd_gl_sscd))

    s = ss.add_parser("gl-nn", help="P2's nearest-neighbour generalisation score (SPEC §5.4)")
    s.add_argument("--gen", required=True, metavar="DIR|NPZ",
                   help="generations: image folder/zip (uint8), or .npz with float [-1, 1] images "
                        "(key x, samples or images) or uint8 images")
    s.add_argument("--train", required=True, metavar="DATA", help="training set (zip, folder, CIFAR, npz, npy)")
    s.add_argument("--normalize", default="x", choices=("x", "none", "nn"),
                   help="divide the NN distance by |x| (default), |NN(x)| or nothing")
    s.add_argument("--quantize", action="store_true", help="quantise float generations first (as saved PNGs)")
    s.add_argument("--max-gen", type=int, default=None, help="use the first K generations")
    s.add_argument("--chunk-rows", type=int, default=16384, help="training rows per kernel call")
    _output_args(s)
    s.set_defaults(fn=_cli("score gl-nn")(_cmd_gl_nn))

    s = ss.add_parser("matrix", help="pairwise RP or MAE-score matrix and its heatmap (SPEC §5.5)")
    s.add_argument("--features", "--inputs", dest="inputs", nargs="+", required=True, metavar="F",
                   help="feature files (--metric rp) or image folders/zips (--metric mae), one per model")
    s.add_argument("--metric", default="rp", choices=("rp", "mae"))
    s.add_argument("--names", nargs="+", default=None, help="model names (default: the input stems)")
    s.add_argument("--tau", type=float, default=0.6, help="RP threshold, strict > (default 0.6)")
    s.add_argument("--thresh", type=float, default=15.0, help="MAE threshold, strict < (default 15)")
    s.add_argument("--png", default=None, help="heatmap file (default: the JSON path with .png)")
    _output_args(s)
    s.set_defaults(fn=_cli("score matrix")(_cmd_matrix))


def _denoiser_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--denoiser", required=True, choices=("empirical", "gaussian"),
                   help="empirical (multi-delta) optimal denoiser or the Gaussian (Wiener) denoiser of --train")
    p.add_argument("--train", required=True, metavar="DATA",
                   help="training set; for --denoiser gaussian also a Gaussian statistics .npz (mu, lam, U)")
    p.add_argument("--images", required=True, metavar="DATA", help="held-out clean images")
    p.add_argument("--sigmas", default=_P2_GRID,
                   help="'p2' (P2's ten EDM levels, 80 ... 0.002) or a comma-separated list of σ > 0")
    p.add_argument("--max-train", type=int, default=None, help="use the first N training images")
    p.add_argument("--seed", type=int, default=0, help="seed of the CPU noise generator")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                   help="empirical denoiser compute dtype (the Gaussian one is always float64)")
    p.add_argument("--device", default="cpu")


def _add_linearity(sub) -> None:
    p = sub.add_parser("linearity", help="P2's linearity scores of a denoiser against σ (SPEC §5.6)",
                       description="Cosine and NMSE linearity scores of D(·;σ) on pairs x = y + σε of "
                       "held-out images (x1 from images [0:P], x2 from [P:2P]); the noise is drawn once "
                       "on the CPU and reused across σ (P2's 'noisy images' variant).")
    _denoiser_args(p)
    p.add_argument("--pairs", type=int, default=100, help="P, the number of pairs (needs 2P images)")
    p.add_argument("--a-values", default=",".join(map(str, _DEFAULT_A)),
                   help="values of a = α² (β² = 1 − a), comma-separated (default P2's five)")
    p.add_argument("--inputs", default="noisy", choices=("noisy", "pure"),
                   help="noisy: y + σε (noise reused across σ); pure: σε with fresh noise per σ")
    p.add_argument("--abs-cos", action="store_true", help="use |cos| (the code has no abs)")
    p.add_argument("--nmse-squared", action="store_true", help="square the relative L2 (the paper's wording)")
    p.add_argument("--plot", default=None, help="score-vs-σ PNG (default: the JSON path with .png)")
    _output_args(p)
    p.set_defaults(fn=_cli("linearity")(_cmd_linearity))


def _add_distill(sub) -> None:
    p = sub.add_parser("distill", help="closed-form linear distillation of a denoiser per σ (SPEC §6)",
                       description="Fit D_L(x) = W x + b to the teacher on M noisy held-out inputs "
                       "x = y + σε per σ (closed-form least squares, or P2's Adam), save the models "
                       "(W_eff, b, sigma, mode, M, stacked over σ) and report the weight NMSE against "
                       "the Gaussian (Wiener) weights of --train.")
    _denoiser_args(p)
    p.add_argument("--M", type=int, default=None, help="pairs per σ (default 20·d; needs M > d + 1)")
    p.add_argument("--mode", default="lstsq", choices=("lstsq", "adam"))
    p.add_argument("--ridge", type=float, default=0.0, help="lstsq ridge penalty (default 0)")
    p.add_argument("--epochs", type=int, default=100, help="adam: passes over --images (P2: 100)")
    p.add_argument("--lr", type=float, default=None, help="adam: learning rate (default P2's table)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", default=None, metavar="MODEL.npz",
                   help="linear models (default: the JSON path with .npz)")
    _output_args(p)
    p.set_defaults(fn=_cli("distill")(_cmd_distill))


# ----------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------
def _cli(command: str):
    """Turn user errors (bad values, missing files) into ``SystemExit`` with a one-line message."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(args):
            try:
                return fn(args)
            except (CommandError, ValueError, TypeError, FileNotFoundError, KeyError) as exc:
                msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
                raise SystemExit(f"diffrepro {command}: error: {msg}") from exc

        return run

    return wrap


def _stem(path: str | os.PathLike) -> str:
    name = Path(os.fspath(path).rstrip("/\\")).name
    for suffix in (".tar.gz", ".npz", ".npy", ".zip", ".json"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _out_path(args, first_input: str, tag: str, explicit: str | None = None, suffix: str = ".json") -> Path:
    if explicit:
        return Path(explicit)
    folder = Path(args.outdir) if getattr(args, "outdir", None) else Path(os.path.abspath(first_input)).parent
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{_stem(first_input)}.{tag}{suffix}"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return os.fspath(obj)
    return obj


def _write_json(path: Path, obj: dict) -> None:
    from .data import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(_jsonable(obj), indent=1) + "\n").encode())


def _ci(ci) -> str:
    return f"95% CI [{ci[0]:.4f}, {ci[1]:.4f}]"


def _require_file(arg: str, path: str, expected: str) -> None:
    if not os.path.exists(path):
        raise CommandError(f"{arg}: no such file or folder {path!r} (expected {expected})")


def _positive_int(arg: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise CommandError(f"{arg}: expected an integer >= {minimum}, got {value}")


def _load_feature_file(arg: str, path: str, need_ids: bool = True):
    """A feature file (with ids unless ``need_ids`` is False); errors name the argument."""
    from .sscd import load_features

    _require_file(arg, path, "a .npz feature file written by 'diffrepro features'")
    if os.path.isdir(path) or not path.endswith(".npz"):
        raise CommandError(f"{arg}: expected a .npz feature file written by 'diffrepro features', got {path!r}")
    try:
        feats = load_features(path)
    except KeyError as exc:
        raise CommandError(f"{arg}: {path!r} is not a feature file (no 'features' array)") from exc
    if feats.ids is None and need_ids:
        raise CommandError(f"{arg}: {path!r} has no 'ids' (a P1-style feature file, rows in file order); "
                           "re-extract it with 'diffrepro features' so generations pair by seed")
    if feats.features.ndim != 2 or len(feats.features) == 0:
        raise CommandError(f"{arg}: expected features of shape [N, D] with N >= 1, got {feats.features.shape}")
    return feats


def _load_images(arg: str, path: str, max_images: int | None = None):
    """A data set (uint8 [N, C, H, W]) with int64 seed ids (NNNNNN.png) or names as ids."""
    from .data import load_dataset
    from .sscd import ids_from_names

    _require_file(arg, path, "an image folder, EDM zip, CIFAR archive, .npz or .npy data set")
    try:
        ds = load_dataset(path, max_images=max_images)
    except ValueError as exc:
        raise CommandError(f"{arg}: {exc}") from exc
    if len(ds) == 0:
        raise CommandError(f"{arg}: {path!r} holds no images")
    ids = np.arange(len(ds), dtype=np.int64) if ds.names is None else ids_from_names(ds.names)
    return ds, ids


def _parse_sigmas(text: str) -> np.ndarray:
    if text.strip().lower() == _P2_GRID:
        from .schedules import edm_sigmas

        return edm_sigmas(10, 0.002, 80.0, 7.0).numpy()
    try:
        values = np.array([float(v) for v in text.split(",") if v.strip()], dtype=np.float64)
    except ValueError:
        values = np.array([])
    if values.size == 0 or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise CommandError(f"--sigmas: expected 'p2' or a comma-separated list of positive numbers, got {text!r}")
    return values


def _parse_a_values(text: str) -> np.ndarray:
    try:
        values = np.array([float(v) for v in text.split(",") if v.strip()], dtype=np.float64)
    except ValueError:
        values = np.array([])
    if values.size == 0 or np.any((values < 0) | (values > 1)) or not np.all(np.isfinite(values)):
        raise CommandError(f"--a-values: expected a comma-separated list of numbers in [0, 1], got {text!r}")
    return values


# ----------------------------------------------------------------------------------------------
# features
# ----------------------------------------------------------------------------------------------
def _cmd_features(args) -> int:
    from .data import dataset_hash
    from .sscd import SSCDExtractor, load_features, save_features

    _positive_int("--batch-size", args.batch_size)
    _positive_int("--max-images", args.max_images)
    _require_file("--model", args.model, "an SSCD TorchScript file (*.torchscript.pt)")
    if os.path.isdir(args.model):
        raise CommandError(f"--model: expected a TorchScript file, got the folder {args.model!r}")
    if os.path.isdir(args.out):
        raise CommandError(f"--out: expected a .npz file path, got the folder {args.out!r}")
    ds, ids = _load_images("--images", args.images, args.max_images)
    if len(np.unique(ids)) != len(ids):
        raise CommandError(f"--images: image ids must be unique, but {args.images!r} holds repeated seeds "
                           "(the same NNNNNN.png in two sub-folders?)")
    extractor = SSCDExtractor(args.model, preprocess=args.preprocess, device=args.device,
                              batch_size=args.batch_size, grey_to_rgb=args.grey_to_rgb,
                              cache=args.cache_dir if args.cache_dir else False,
                              allow_tf32=args.allow_tf32, progress=not args.no_progress)
    meta = {**extractor.meta, "images": os.path.abspath(args.images), "images_sha256": dataset_hash(ds.images),
            "n": len(ds), "image_shape": list(ds.images.shape[1:])}
    if os.path.isfile(args.out) and not args.force:
        try:
            old = load_features(args.out)
        except (OSError, ValueError, KeyError):  # unreadable or foreign file: recompute and replace it
            old = None
        keys = ("model_sha256", "preprocess", "grey_to_rgb", "allow_tf32", "images_sha256")
        if old is not None and old.ids is not None and all(old.meta.get(k) == meta[k] for k in keys) \
                and np.array_equal(old.ids, ids):
            print(f"features: {args.out} is up to date ({len(ids)} x {old.features.shape[1]}, "
                  f"{args.preprocess}); use --force to recompute")
            return 0
    feats = extractor(ds.images)
    save_features(args.out, feats, ids, meta)
    kind = "int64 seeds" if ids.dtype.kind == "i" else "file names"
    print(f"features: {len(ids)} x {feats.shape[1]} descriptors ({args.preprocess}, ids: {kind}) -> {args.out}")
    return 0


# ----------------------------------------------------------------------------------------------
# score rp / mae / gl-sscd / gl-nn / matrix
# ----------------------------------------------------------------------------------------------
def _check_tau(value: float, arg: str = "--tau") -> None:
    if not math.isfinite(value) or not -1.0 <= value <= 1.0:
        raise CommandError(f"{arg}: expected a cosine threshold in [-1, 1], got {value}")


def _check_thresh(value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise CommandError(f"--thresh: expected a non-negative MAE threshold on [0, 255], got {value}")


def _cmd_rp(args) -> int:
    from . import metrics

    _check_tau(args.tau)
    a = _load_feature_file("--a", args.a)
    b = _load_feature_file("--b", args.b)
    if a.features.shape[1] != b.features.shape[1]:
        raise CommandError(f"--a and --b: descriptors must have the same dimension, got D={a.features.shape[1]} "
                           f"and D={b.features.shape[1]} (different SSCD models?)")
    try:
        res = metrics.rp(a, b, tau=args.tau)
    except ValueError as exc:
        raise CommandError(f"--a/--b: {exc}") from exc
    out = {"metric": "rp", "rp": res["rp"], "count": res["count"], "n_pairs": res["n"], "ci95": res["ci95"],
           "tau": args.tau, "comparison": "sim > tau", "mean_sim": float(np.mean(res["sim"])),
           "a": os.path.abspath(args.a), "b": os.path.abspath(args.b),
           "a_meta": a.meta, "b_meta": b.meta}
    path = _out_path(args, args.a, "rp", args.json)
    _write_json(path, out)
    print(f"rp = {res['rp']:.4f} ({res['count']}/{res['n']} pairs with sim > {args.tau}; {_ci(res['ci95'])}) -> {path}")
    return 0


def _cmd_mae(args) -> int:
    from . import metrics

    _check_thresh(args.thresh)
    da, ids_a = _load_images("--a", args.a)
    db, ids_b = _load_images("--b", args.b)
    if da.images.shape[1:] != db.images.shape[1:]:
        raise CommandError(f"--a and --b: images must have the same shape, got {list(da.images.shape[1:])} "
                           f"and {list(db.images.shape[1:])}")
    try:
        res = metrics.mae_score(da.images, db.images, thresh=args.thresh, ids1=ids_a, ids2=ids_b)
    except ValueError as exc:
        raise CommandError(f"--a/--b: {exc}".replace("q1", "--a").replace("q2", "--b")) from exc
    out = {"metric": "mae", "mae_score": res["mae_score"], "count": res["count"], "n_pairs": res["n"],
           "ci95": res["ci95"], "thresh": args.thresh, "comparison": "mae < thresh",
           "mean_mae": float(np.mean(res["mae"])), "a": os.path.abspath(args.a), "b": os.path.abspath(args.b)}
    path = _out_path(args, args.a, "mae", args.json)
    _write_json(path, out)
    print(f"mae_score = {res['mae_score']:.4f} ({res['count']}/{res['n']} pairs with MAE < {args.thresh}; "
          f"{_ci(res['ci95'])}) -> {path}")
    return 0


def _open_train_descriptors(path: str, dim: int):
    """``--train`` of gl-sscd: a feature file (in memory) or a memory-mapped float .npy."""
    expected = "a .npz feature file or a float32/float16 [N, D] .npy descriptor file"
    _require_file("--train", path, expected)
    if path.endswith(".npz"):
        arr = _load_feature_file("--train", path, need_ids=False).features
    elif path.endswith(".npy"):
        try:
            arr = np.load(path, mmap_mode="r")
        except ValueError as exc:
            raise CommandError(f"--train: cannot memory-map {path!r}: {exc}") from exc
        if arr.dtype not in (np.float32, np.float16):
            raise CommandError(f"--train: expected float32 or float16 descriptors in {path!r}, got dtype {arr.dtype}")
    else:
        raise CommandError(f"--train: expected {expected}, got {path!r}")
    if arr.ndim != 2 or len(arr) == 0:
        raise CommandError(f"--train: expected descriptors of shape [N, D] with N >= 1, got {tuple(arr.shape)}")
    if arr.shape[1] != dim:
        raise CommandError(f"--train: descriptors have D={arr.shape[1]} but --gen has D={dim} (different SSCD models?)")
    return arr


def _has_key(path: str, key: str) -> bool:
    with np.load(path) as z:
        return key in z.files


def _cmd_gl_sscd(args) -> int:
    from . import metrics

    _check_tau(args.tau)
    _positive_int("--chunk-rows", args.chunk_rows)
    gen = _load_feature_file("--gen", args.gen, need_ids=False)   # GL needs no pairing: P1 files are fine
    train = _open_train_descriptors(args.train, gen.features.shape[1])
    res = metrics.gl_sscd(gen.features, train, tau=args.tau, chunk_rows=args.chunk_rows)
    out = {"metric": "gl_sscd", "gl": res["gl"], "ci95": res["gl_ci95"],
           "memorised_fraction": res["memorised_fraction"], "memorised_fraction_ci95": res["ci95"],
           "n_memorised": res["count"], "n": res["n"], "n_train": int(train.shape[0]), "tau": args.tau,
           "comparison": "memorised if max_i sim(x_j, y_i) > tau; gl = 1 - memorised_fraction",
           "mean_max_sim": float(np.mean(res["max_sim"])),
           "gen": os.path.abspath(args.gen), "train": os.path.abspath(args.train)}
    path = _out_path(args, args.gen, "gl-sscd", args.json)
    _write_json(path, out)
    print(f"gl = {res['gl']:.4f} ({_ci(res['gl_ci95'])}); memorised_fraction = {res['memorised_fraction']:.4f} "
          f"({res['count']}/{res['n']} generations with max sim > {args.tau} over {train.shape[0]} training "
          f"descriptors) -> {path}")
    return 0


def _load_generations(path: str, max_gen: int | None) -> np.ndarray:
    """``--gen`` of gl-nn as float [K, C, H, W] in [-1, 1] (uint8 images are decoded u/127.5 − 1)."""
    if path.endswith(".npz") and os.path.isfile(path):
        with np.load(path) as z:
            for key in ("x", "samples", "images", "x0"):
                if key in z.files and np.issubdtype(z[key].dtype, np.floating):
                    x = np.asarray(z[key][:max_gen])
                    if x.ndim != 4:
                        raise CommandError(f"--gen: float array {key!r} in {path!r} must be [K, C, H, W], got {x.shape}")
                    return x
    ds, _ = _load_images("--gen", path, max_gen)
    return ds.images.astype(np.float64) / 127.5 - 1.0


def _cmd_gl_nn(args) -> int:
    from . import metrics

    _positive_int("--max-gen", args.max_gen)
    _positive_int("--chunk-rows", args.chunk_rows)
    _require_file("--gen", args.gen, "an image folder/zip or a .npz of generations")
    gen = _load_generations(args.gen, args.max_gen)
    train, _ = _load_images("--train", args.train)
    if tuple(gen.shape[1:]) != tuple(train.images.shape[1:]):
        raise CommandError(f"--gen and --train: images must have the same [C, H, W], got {list(gen.shape[1:])} "
                           f"and {list(train.images.shape[1:])}")
    res = metrics.gl_nn(gen, train.images, normalize=args.normalize, quantize=args.quantize,
                        chunk_rows=args.chunk_rows)
    half = 1.959963984540054 * res["std"] / math.sqrt(res["n"])
    out = {"metric": "gl_nn", "gl_nn": res["gl_nn"], "n": res["n"], "std": res["std"],
           "ci95": (res["gl_nn"] - half, res["gl_nn"] + half), "ci95_method": "normal approximation of the mean",
           "normalize": args.normalize, "quantize": args.quantize, "n_train": len(train),
           "reading": "mean_k |x_k - NN(x_k)| / |x_k| (SPEC §5.4, reconstructed); > 0.6: generalising",
           "gen": os.path.abspath(args.gen), "train": os.path.abspath(args.train)}
    path = _out_path(args, args.gen, "gl-nn", args.json)
    _write_json(path, out)
    print(f"gl_nn = {res['gl_nn']:.4f} (normalize={args.normalize}, K={res['n']}, N={len(train)}; "
          f"{_ci(out['ci95'])}) -> {path}")
    return 0


def _cmd_matrix(args) -> int:
    from . import metrics, plots

    if len(args.inputs) < 2:
        raise CommandError(f"--features: expected at least 2 inputs, got {len(args.inputs)}")
    names = args.names or [_stem(p) for p in args.inputs]
    if len(names) != len(args.inputs):
        raise CommandError(f"--names: expected {len(args.inputs)} names (one per input), got {len(names)}")
    if args.metric == "rp":
        _check_tau(args.tau)
        items = [_load_feature_file(f"--features[{i}]", p) for i, p in enumerate(args.inputs)]
    else:
        _check_thresh(args.thresh)
        items = []
        for i, p in enumerate(args.inputs):
            ds, ids = _load_images(f"--features[{i}]", p)
            items.append((ds.images, ids))
    try:
        res = metrics.similarity_matrix(items, args.metric, names=names, tau=args.tau, thresh=args.thresh)
    except ValueError as exc:
        raise CommandError(f"--features: {exc}") from exc
    path = _out_path(args, args.inputs[0], f"{args.metric}-matrix", args.json)
    png = Path(args.png) if args.png else path.with_suffix(".png")
    plots.plot_similarity_matrix(res["matrix"], png, names=names,
                                 title=f"{args.metric.upper()} ({'tau' if args.metric == 'rp' else 'thresh'}="
                                       f"{args.tau if args.metric == 'rp' else args.thresh})")
    out = {"metric": args.metric, "names": names, "matrix": res["matrix"], "count": res["count"],
           "n": res["n"], "ci95": res["ci95"], "diagonal": "defined as 1, not computed",
           **({"tau": args.tau, "comparison": "sim > tau"} if args.metric == "rp"
              else {"thresh": args.thresh, "comparison": "mae < thresh"}),
           "inputs": [os.path.abspath(p) for p in args.inputs], "png": os.path.abspath(png)}
    _write_json(path, out)
    m = res["matrix"]
    off = m[~np.eye(len(m), dtype=bool)]
    print(f"{args.metric} matrix {len(m)}x{len(m)}: off-diagonal min {off.min():.4f}, max {off.max():.4f} "
          f"-> {path}, {png}")
    return 0


# ----------------------------------------------------------------------------------------------
# linearity / distill
# ----------------------------------------------------------------------------------------------
def _make_denoiser(args):
    """(denoiser, training images or None, description) for --denoiser/--train."""
    from .denoisers import EmpiricalDenoiser, GaussianDenoiser

    _positive_int("--max-train", args.max_train)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    if args.denoiser == "gaussian" and args.train.endswith(".npz") and os.path.isfile(args.train) \
            and _has_key(args.train, "lam"):
        return GaussianDenoiser.load(args.train, device=args.device), None
    ds, _ = _load_images("--train", args.train, args.max_train)
    if ds.images.shape[2] != ds.images.shape[3]:
        raise CommandError(f"--train: images must be square, got [C, H, W] = {list(ds.images.shape[1:])}")
    if args.denoiser == "empirical":
        return EmpiricalDenoiser(ds.images, dtype=dtype, device=args.device), ds.images
    return GaussianDenoiser.from_data(ds.images, device=args.device), ds.images


def _held_out(args, den, count: int | None = None) -> torch.Tensor:
    """--images as float64 [N, C, H, W] in [-1, 1], checked against the denoiser's shape."""
    ds, _ = _load_images("--images", args.images, count)
    shape = (den.img_channels, den.img_resolution, den.img_resolution)
    if tuple(ds.images.shape[1:]) != shape:
        raise CommandError(f"--images: images must match --train's [C, H, W] = {list(shape)}, "
                           f"got {list(ds.images.shape[1:])}")
    return torch.from_numpy(np.asarray(ds.images)).to(torch.float64) / 127.5 - 1.0


def _cmd_linearity(args) -> int:
    from . import metrics, plots

    sigmas = _parse_sigmas(args.sigmas)
    a_values = _parse_a_values(args.a_values)
    _positive_int("--pairs", args.pairs)
    den, _ = _make_denoiser(args)
    y = _held_out(args, den, 2 * args.pairs)
    if len(y) < 2 * args.pairs:
        raise CommandError(f"--images: --pairs {args.pairs} needs {2 * args.pairs} images, got {len(y)}")
    p = args.pairs
    y = y.to(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    eps = torch.randn((2, *y.shape), generator=gen, dtype=torch.float64).to(args.device)
    per_sigma = []
    for sigma in sigmas:
        if args.inputs == "pure":
            eps = torch.randn((2, *y.shape), generator=gen, dtype=torch.float64).to(args.device)
            x1, x2 = sigma * eps[0, :p], sigma * eps[1, p:]
        else:
            x1, x2 = y[:p] + sigma * eps[0, :p], y[p:] + sigma * eps[1, p:]
        res = metrics.linearity_score(lambda x, s=float(sigma): den(x, s), x1, x2, a_values=a_values,
                                      abs_cos=args.abs_cos, nmse_squared=args.nmse_squared)
        per_sigma.append(res)
    cos = np.stack([r["cos"] for r in per_sigma])      # [S, A]
    nmse = np.stack([r["nmse"] for r in per_sigma])    # [S, A]
    main = int(np.argmin(np.abs(a_values - 0.5)))
    out = {"metric": "linearity", "denoiser": args.denoiser, "sigma": sigmas, "a": a_values,
           "alpha": np.sqrt(a_values), "beta": np.sqrt(1 - a_values), "cos": cos, "nmse": nmse,
           "main_a": float(a_values[main]), "cos_main": cos[:, main], "nmse_main": nmse[:, main],
           "pairs": p, "inputs": args.inputs, "abs_cos": args.abs_cos, "nmse_squared": args.nmse_squared,
           "seed": args.seed, "train": os.path.abspath(args.train), "images": os.path.abspath(args.images),
           "layout": "cos[i][j], nmse[i][j]: sigma[i], a[j]"}
    path = _out_path(args, args.images, f"linearity-{args.denoiser}", args.json)
    png = Path(args.plot) if args.plot else path.with_suffix(".png")
    curves = {f"cos a={a:g}": cos[:, j] for j, a in enumerate(a_values)}
    curves[f"nmse a={a_values[main]:g}"] = nmse[:, main]
    plots.plot_score_vs_sigma(sigmas, curves, png, ylabel="linearity score",
                              title=f"linearity of the {args.denoiser} denoiser")
    out["png"] = os.path.abspath(png)
    _write_json(path, out)
    print(f"linearity ({args.denoiser}, a={a_values[main]:g}, {p} pairs): cos {cos[:, main].min():.4f}..."
          f"{cos[:, main].max():.4f}, nmse {nmse[:, main].min():.4f}...{nmse[:, main].max():.4f} over "
          f"{len(sigmas)} sigmas -> {path}, {png}")
    return 0


def _cmd_distill(args) -> int:
    from . import metrics
    from .denoisers import GaussianDenoiser, LinearDenoiserSet
    from .distill import distill_linear, noisy_batches

    sigmas = _parse_sigmas(args.sigmas)
    _positive_int("--batch-size", args.batch_size)
    _positive_int("--epochs", args.epochs)
    if args.ridge < 0 or not math.isfinite(args.ridge):
        raise CommandError(f"--ridge: expected a finite value >= 0, got {args.ridge}")
    den, train_images = _make_denoiser(args)
    y = _held_out(args, den)
    d = y[0].numel()
    M = 20 * d if args.M is None else args.M
    if args.mode == "lstsq" and M <= d + 1:
        raise CommandError(f"--M: least squares needs M > d + 1 = {d + 1} pairs, got {M}")
    if isinstance(den, GaussianDenoiser):
        reference = den
    else:
        reference = GaussianDenoiser.from_data(train_images, device=args.device)

    def teacher(x, sigma):
        return den(x.to(device=args.device, dtype=torch.float64), sigma)

    models, rows = [], []
    for sigma in sigmas:
        if args.mode == "lstsq":
            inputs = noisy_batches(y, float(sigma), batch_size=args.batch_size, epochs=-(-M // len(y)),
                                   seed=args.seed, device=args.device)
            model = distill_linear(teacher, inputs, float(sigma), M=M, ridge=args.ridge, mode="lstsq")
        else:
            inputs = noisy_batches(y, float(sigma), batch_size=args.batch_size, epochs=args.epochs,
                                   seed=args.seed, device=args.device)
            lr = args.lr
            if lr is None:
                from .distill import LR_TABLE

                lr = LR_TABLE.get(round(float(sigma), 4))
                if lr is None:
                    raise CommandError(f"--lr: required for sigma={sigma:g}, which is not one of P2's levels "
                                       f"{sorted(LR_TABLE)}")
            model = distill_linear(teacher, inputs, float(sigma), mode="adam", lr=lr)
        w_g = reference.linear(float(sigma))
        sq = metrics.weight_nmse(model.W, w_g.W, squared=True)["nmse"]
        plain = metrics.weight_nmse(model.W, w_g.W, squared=False)["nmse"]
        b_err = float(torch.linalg.norm(model.b - w_g.b.to(model.b)) / torch.linalg.norm(w_g.b.to(model.b)).clamp_min(1e-300))
        models.append(model)
        rows.append({"sigma": float(sigma), "weight_nmse": sq, "weight_rel_fro": plain, "bias_rel_err": b_err,
                     "M": model.M, "mode": model.mode})
    path = _out_path(args, args.images, f"distill-{args.denoiser}", args.json)
    model_path = Path(args.out) if args.out else path.with_suffix(".npz")
    model_path.parent.mkdir(parents=True, exist_ok=True)
    LinearDenoiserSet(models).save(model_path)
    same = os.path.abspath(args.images) == os.path.abspath(args.train)
    out = {"metric": "distill", "denoiser": args.denoiser, "mode": args.mode,
           "M": M if args.mode == "lstsq" else models[0].M, "ridge": args.ridge,
           "sigma": sigmas, "weight_nmse": [r["weight_nmse"] for r in rows],
           "weight_rel_fro": [r["weight_rel_fro"] for r in rows], "per_sigma": rows,
           "weight_nmse_definition": "|W_L - W_G|_F^2 / |W_G|_F^2 (W_G: Wiener weights of --train)",
           "inputs": "training images + noise" if same else "held-out --images + noise",
           "seed": args.seed, "train": os.path.abspath(args.train), "images": os.path.abspath(args.images),
           "model": os.path.abspath(model_path)}
    _write_json(path, out)
    nm = np.array(out["weight_nmse"])
    print(f"distill ({args.denoiser}, {args.mode}, M={M}, {len(sigmas)} sigmas): weight NMSE vs Wiener "
          f"{nm.min():.3e}...{nm.max():.3e} -> {model_path}, {path}")
    return 0
