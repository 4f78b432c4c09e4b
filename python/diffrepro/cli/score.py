# SPDX-License-Identifier: Apache-2.0
"""``diffrepro score {rp, mae, gl-sscd, gl-nn, matrix}`` (diffrepro.metrics).

Each writes its result as JSON (``--json``, or ``<input stems>.<score>.json`` beside the first
input or in ``--outdir``) with the same keys as the Python result, and, where the score is per
generation, an ``.npz`` beside it (nearest training index and similarity or distance per
generation). Proportions carry their count, n and 95% Wilson interval.

``gl-sscd`` and ``gl-nn`` also run under ``torchrun``: each process searches its slice of the
training set and the slices' winners are merged (the result is bitwise that of one process);
rank 0 alone writes and prints.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from ..errors import UsageError, usage_errors
from ._common import (
    HelpFormatter,
    ci_text,
    cosine_threshold,
    dist_timeout_arg,
    int_at_least,
    job,
    load_feature_file,
    load_images,
    nonneg_float,
    refuse_overwrite,
    require_path,
    result_path,
    stem,
    write_json,
)

_MODEL_KEYS = ("model_sha256", "preprocess")


def _output_args(p) -> None:
    p.add_argument("--json", metavar="OUT", help="result file (default: <input stems>.<score>.json beside the "
                   "first input, or in --outdir)")
    p.add_argument("--outdir", metavar="DIR", help="folder for the default output files")


def _mixed_models_arg(p) -> None:
    p.add_argument("--allow-mixed-models", action="store_true",
                   help="compare descriptors of different models or preprocessing (warn and record it) "
                        "instead of refusing")


def add_commands(sub) -> None:
    p = sub.add_parser("score", help="RP, MAE, GL (SSCD or nearest neighbour) and similarity matrices",
                       formatter_class=HelpFormatter,
                       description="Reproducibility and generalisation scores of Zhang et al. (ICML 2024) and "
                                   "Li, Dai, Qu (NeurIPS 2024).")
    ss = p.add_subparsers(dest="subcommand", required=True, metavar="{rp,mae,gl-sscd,gl-nn,matrix}")

    s = ss.add_parser("rp", help="reproducibility: fraction of same-seed pairs with SSCD similarity > tau",
                      formatter_class=HelpFormatter)
    s.add_argument("--a", required=True, metavar="F1.npz", help="features of model A's generations")
    s.add_argument("--b", required=True, metavar="F2.npz", help="features of model B's generations")
    s.add_argument("--tau", type=cosine_threshold, default=0.6, help="similarity threshold, strict >")
    s.add_argument("--pair-by", choices=("id", "row"), default="id",
                   help="pair generations by id (seed) or by row position (feature files without ids)")
    _mixed_models_arg(s)
    _output_args(s)
    s.set_defaults(fn=_cmd_rp)

    s = ss.add_parser("mae", help="fraction of same-seed pairs with mean absolute pixel difference < thresh",
                      formatter_class=HelpFormatter)
    s.add_argument("--a", required=True, metavar="DIR1", help="images of model A (folder, zip or npz)")
    s.add_argument("--b", required=True, metavar="DIR2", help="images of model B (same ids)")
    s.add_argument("--thresh", type=nonneg_float, default=15.0, help="MAE threshold on [0, 255], strict <")
    _output_args(s)
    s.set_defaults(fn=_cmd_mae)

    s = ss.add_parser("gl-sscd", help="generalisation via SSCD: 1 - fraction of generations with a training "
                      "image of similarity > tau (Zhang et al.)", formatter_class=HelpFormatter)
    s.add_argument("--gen", required=True, metavar="F.npz", help="features of the generations")
    s.add_argument("--train", required=True, metavar="T.npz|T.npy",
                   help="training descriptors: a feature file, or a float32/float16 [N, D] .npy (memory-mapped)")
    s.add_argument("--tau", type=cosine_threshold, default=0.6, help="similarity threshold, strict >")
    s.add_argument("--chunk-rows", type=int_at_least(1), default=16384, help="training rows per kernel call")
    dist_timeout_arg(s)
    _mixed_models_arg(s)
    _output_args(s)
    s.set_defaults(fn=_cmd_gl_sscd)

    s = ss.add_parser("gl-nn", help="mean relative distance to the nearest training image (Li, Dai, Qu eq. 14)",
                      formatter_class=HelpFormatter)
    s.add_argument("--gen", required=True, metavar="DIR|NPZ",
                   help="generations: image folder/zip (uint8), a generate output folder, or .npz with float "
                        "[-1, 1] images (key x, samples or images)")
    s.add_argument("--train", required=True, metavar="DATA", help="training set (zip, folder, CIFAR, npz, npy)")
    s.add_argument("--normalize", default="x", choices=("x", "none", "nn"),
                   help="divide the NN distance by |x|, |NN(x)| or nothing")
    s.add_argument("--quantize", action="store_true", help="quantise float generations first (as saved PNGs)")
    s.add_argument("--max-gen", type=int_at_least(1), default=None, help="use the first K generations")
    s.add_argument("--chunk-rows", type=int_at_least(1), default=16384, help="training rows per kernel call")
    dist_timeout_arg(s)
    _output_args(s)
    s.set_defaults(fn=_cmd_gl_nn)

    s = ss.add_parser("matrix", help="pairwise RP or MAE-score matrix and its heatmap", formatter_class=HelpFormatter)
    s.add_argument("--features", "--inputs", dest="inputs", nargs="+", required=True, metavar="F",
                   help="feature files (--metric rp) or image folders/zips (--metric mae), one per model")
    s.add_argument("--metric", default="rp", choices=("rp", "mae"), help="pairwise score")
    s.add_argument("--names", nargs="+", default=None, help="model names (default: the input stems)")
    s.add_argument("--tau", type=cosine_threshold, default=0.6, help="RP threshold, strict >")
    s.add_argument("--thresh", type=nonneg_float, default=15.0, help="MAE threshold, strict <")
    s.add_argument("--png", default=None, help="heatmap file (default: the JSON path with .png)")
    _mixed_models_arg(s)
    _output_args(s)
    s.set_defaults(fn=_cmd_matrix)


# ----------------------------------------------------------------------------------------------
def _check_same_model(named_metas: list[tuple[str, dict]], allow: bool) -> dict:
    """Refuse (or with ``allow``, warn about) descriptors from different models or preprocessing.

    Returns what is recorded in the JSON: the model identity and whether it was verified."""
    known = [(n, {k: m.get(k) for k in _MODEL_KEYS}) for n, m in named_metas if all(m.get(k) for k in _MODEL_KEYS)]
    unknown = [n for n, m in named_metas if not all(m.get(k) for k in _MODEL_KEYS)]
    differ = [n for n, ident in known[1:] if ident != known[0][1]]
    if differ:
        first = known[0]
        detail = "; ".join(f"{n}: {ident}" for n, ident in [first] + [k for k in known if k[0] in differ])
        if not allow:
            raise UsageError(f"{', '.join([first[0]] + differ)}: descriptors come from different models or "
                             f"preprocessing ({detail}); similarities across them are meaningless. Pass "
                             "--allow-mixed-models to compare them anyway")
        warnings.warn(f"comparing descriptors of different models or preprocessing ({detail})", stacklevel=1)
    if unknown:
        warnings.warn(f"{', '.join(unknown)}: no model/preprocessing metadata (not written by 'diffrepro "
                      "features'); cannot check that the descriptors are comparable", stacklevel=1)
    return {"model": known[0][1] if known else None, "mixed_models": bool(differ), "unverified": unknown}


def _save_per_generation(json_path: Path, **arrays) -> Path:
    from ..data import atomic_save_npz

    path = json_path.with_suffix(".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_npz(path, **arrays)
    return path


def _my_rows(n: int, ctx) -> tuple[int, int]:
    """The training rows this process searches (all of them in one process; a memory-mapped file is
    read only there)."""
    from ..distributed import shard_bounds

    return shard_bounds(n, ctx.world_size, ctx.rank)


def _processes(ctx) -> str:
    return f", searched by {ctx.world_size} processes" if ctx.world_size > 1 else ""


def _cmd_rp(args) -> int:
    from .. import metrics
    from ..sscd import Features

    by_id = args.pair_by == "id"
    a = load_feature_file("--a", args.a, need_ids=by_id)
    b = load_feature_file("--b", args.b, need_ids=by_id)
    if a.features.shape[1] != b.features.shape[1]:
        raise UsageError(f"--a and --b: descriptors must have the same dimension, got D={a.features.shape[1]} "
                         f"and D={b.features.shape[1]} (different SSCD models?)")
    if not by_id:
        if len(a.features) != len(b.features):
            raise UsageError(f"--pair-by row: --a has {len(a.features)} rows and --b has {len(b.features)}; "
                             "pairing by row needs the same number")
        rows = np.arange(len(a.features), dtype=np.int64)
        a, b = Features(a.features, rows, a.meta), Features(b.features, rows, b.meta)
    model = _check_same_model([("--a", a.meta), ("--b", b.meta)], args.allow_mixed_models)
    path = result_path(args, [args.a, args.b], "rp", ".npz")
    with usage_errors("--a/--b"):
        res = metrics.rp(a, b, tau=args.tau)
    per = _save_per_generation(path, ids=res["ids"], sim=res["sim"])
    out = {"metric": "rp", **{k: res[k] for k in ("rp", "count", "n", "ci95", "tau")},
           "comparison": "sim > tau", "pair_by": args.pair_by, "mean_sim": float(np.mean(res["sim"])),
           "a": os.path.abspath(args.a), "b": os.path.abspath(args.b), **model,
           "a_meta": a.meta, "b_meta": b.meta, "per_generation": os.path.abspath(per)}
    write_json(path, out)
    print(f"rp = {res['rp']:.4f} ({res['count']}/{res['n']} pairs with sim > {args.tau}; {ci_text(res['ci95'])}) "
          f"-> {path}")
    return 0


def _cmd_mae(args) -> int:
    da, ids_a = load_images("--a", args.a)
    db, ids_b = load_images("--b", args.b)
    if da.images.shape[1:] != db.images.shape[1:]:
        raise UsageError(f"--a and --b: images must have the same shape, got {list(da.images.shape[1:])} "
                         f"and {list(db.images.shape[1:])}")
    path = result_path(args, [args.a, args.b], "mae")
    from .. import metrics  # after the inputs and outputs are checked: those errors come before torch is imported

    with usage_errors("--a/--b"):
        res = metrics.mae_score(da.images, db.images, thresh=args.thresh, ids1=ids_a, ids2=ids_b)
    out = {"metric": "mae", **{k: res[k] for k in ("mae_score", "count", "n", "ci95", "thresh")},
           "comparison": "mae < thresh", "mean_mae": float(np.mean(res["mae"])),
           "a": os.path.abspath(args.a), "b": os.path.abspath(args.b)}
    write_json(path, out)
    print(f"mae_score = {res['mae_score']:.4f} ({res['count']}/{res['n']} pairs with MAE < {args.thresh}; "
          f"{ci_text(res['ci95'])}) -> {path}")
    return 0


def _open_train_descriptors(path: str, dim: int):
    """``--train`` of gl-sscd: a feature file (in memory, with its metadata) or a memory-mapped .npy."""
    from ..data import reading_file

    expected = "a .npz feature file or a float32/float16 [N, D] .npy descriptor file"
    require_path("--train", path, expected)
    meta: dict = {}
    if path.endswith(".npz"):
        feats = load_feature_file("--train", path, need_ids=False)
        arr, meta = feats.features, feats.meta
    elif path.endswith(".npy"):
        # numpy raises ValueError for a damaged header or a file shorter than its header says
        with reading_file(f"--train: {path!r}", "a float32/float16 [N, D] .npy descriptor file", ValueError):
            arr = np.load(path, mmap_mode="r")
        if arr.dtype not in (np.float32, np.float16):
            raise UsageError(f"--train: expected float32 or float16 descriptors in {path!r}, got dtype {arr.dtype}")
    else:
        raise UsageError(f"--train: expected {expected}, got {path!r}")
    if arr.ndim != 2 or len(arr) == 0:
        raise UsageError(f"--train: expected descriptors of shape [N, D] with N >= 1, got {tuple(arr.shape)}")
    if arr.shape[1] != dim:
        raise UsageError(f"--train: descriptors have D={arr.shape[1]} but --gen has D={dim} (different SSCD models?)")
    return arr, meta


def _cmd_gl_sscd(args) -> int:
    from .. import metrics

    gen = load_feature_file("--gen", args.gen, need_ids=False)  # GL needs no pairing: files without ids are fine
    train, train_meta = _open_train_descriptors(args.train, gen.features.shape[1])
    model = _check_same_model([("--gen", gen.meta), ("--train", train_meta)], args.allow_mixed_models)
    path = result_path(args, [args.gen, args.train], "gl-sscd", ".npz")
    with job(args) as ctx, usage_errors("--train"):
        lo, hi = _my_rows(len(train), ctx)
        res = metrics.gl_sscd(gen.features, train[lo:hi], tau=args.tau, chunk_rows=args.chunk_rows, context=ctx,
                              row_offset=lo)
    if ctx.rank:
        return 0
    ids = gen.ids if gen.ids is not None else np.arange(len(gen.features), dtype=np.int64)
    per = _save_per_generation(path, ids=ids, nn_index=res["nn_index"], max_sim=res["max_sim"])
    out = {"metric": "gl_sscd",
           **{k: res[k] for k in ("gl", "gl_ci95", "memorised_fraction", "memorised_ci95", "count", "n", "tau")},
           "n_train": int(train.shape[0]),
           "comparison": "memorised if max_i sim(x_j, y_i) > tau; gl = 1 - memorised_fraction",
           "mean_max_sim": float(np.mean(res["max_sim"])), **model,
           "gen": os.path.abspath(args.gen), "train": os.path.abspath(args.train),
           "per_generation": os.path.abspath(per)}
    write_json(path, out)
    print(f"gl = {res['gl']:.4f} ({ci_text(res['gl_ci95'])}); memorised_fraction = {res['memorised_fraction']:.4f} "
          f"({res['count']}/{res['n']} generations with max sim > {args.tau} over {train.shape[0]} training "
          f"descriptors{_processes(ctx)}) -> {path}")
    return 0


def _float_generations(path: str, max_gen: int | None):
    """The float array (key x, samples, images or x0) and ids (``seeds``, else rows) of a .npz of
    generations, or None when it holds no float array (uint8 images are read as a data set)."""
    from ..data import reading_file

    # numpy raises ValueError for a file that is not an .npz at all
    with reading_file(f"--gen: {path!r}", "a .npz of generations", ValueError), np.load(path) as z:
        key = next((k for k in ("x", "samples", "images", "x0")
                    if k in z.files and np.issubdtype(z[k].dtype, np.floating)), None)
        if key is None:
            return None
        x = np.asarray(z[key][:max_gen])
        ids = np.asarray(z["seeds"][:max_gen]) if "seeds" in z.files else np.arange(len(x))
    if x.ndim != 4:
        raise UsageError(f"--gen: float array {key!r} in {path!r} must be [K, C, H, W], got {x.shape}")
    bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
    if len(bad):
        raise UsageError(f"--gen: {path!r}: generation {ids[bad[0]]} (row {bad[0]}) is NaN or infinite; "
                         "expected images in [-1, 1]")
    return x, ids


def _load_generations(path: str, max_gen: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``--gen`` of gl-nn: float [K, C, H, W] in [-1, 1] and ids (uint8 images are decoded)."""
    from ..data import decode

    floats = _float_generations(path, max_gen) if path.endswith(".npz") and os.path.isfile(path) else None
    if floats is not None:
        return floats
    ds, ids = load_images("--gen", path, max_gen)
    return decode(ds.images), ids


def _cmd_gl_nn(args) -> int:
    require_path("--gen", args.gen, "an image folder/zip or a .npz of generations")
    gen, ids = _load_generations(args.gen, args.max_gen)
    train, _ = load_images("--train", args.train)
    if tuple(gen.shape[1:]) != tuple(train.images.shape[1:]):
        raise UsageError(f"--gen and --train: images must have the same [C, H, W], got {list(gen.shape[1:])} "
                         f"and {list(train.images.shape[1:])}")
    path = result_path(args, [args.gen, args.train], "gl-nn", ".npz")
    from .. import metrics  # after the inputs and outputs are checked: those errors come before torch is imported

    with job(args) as ctx, usage_errors("--gen"):
        lo, hi = _my_rows(len(train), ctx)
        res = metrics.gl_nn(gen, train.images[lo:hi], normalize=args.normalize, quantize=args.quantize,
                            chunk_rows=args.chunk_rows, context=ctx, row_offset=lo)
    if ctx.rank:
        return 0
    per = _save_per_generation(path, ids=ids, nn_index=res["nn_index"], dist=res["dist"], ratio=res["ratio"])
    out = {"metric": "gl_nn", **{k: res[k] for k in ("gl_nn", "n", "std", "ci95", "normalize")},
           "ci95_method": "normal approximation of the mean", "quantize": args.quantize, "n_train": len(train),
           "reading": "mean_k |x_k - NN(x_k)| / |x_k| (Li, Dai, Qu eq. 14); > 0.6: generalising",
           "gen": os.path.abspath(args.gen), "train": os.path.abspath(args.train),
           "per_generation": os.path.abspath(per)}
    write_json(path, out)
    print(f"gl_nn = {res['gl_nn']:.4f} (normalize={args.normalize}, K={res['n']}, N={len(train)}{_processes(ctx)}; "
          f"{ci_text(res['ci95'])}) -> {path}")
    return 0


def _cmd_matrix(args) -> int:
    from .. import metrics, plots

    if len(args.inputs) < 2:
        raise UsageError(f"--features: expected at least 2 inputs, got {len(args.inputs)}")
    names = args.names or [stem(p) for p in args.inputs]
    if len(names) != len(args.inputs):
        raise UsageError(f"--names: expected {len(args.inputs)} names (one per input), got {len(names)}")
    model = None
    if args.metric == "rp":
        items = [load_feature_file(f"--features[{i}]", p) for i, p in enumerate(args.inputs)]
        model = _check_same_model([(f"--features[{i}]", f.meta) for i, f in enumerate(items)],
                                  args.allow_mixed_models)
    else:
        items = []
        for i, p in enumerate(args.inputs):
            ds, ids = load_images(f"--features[{i}]", p)
            items.append((ds.images, ids))
    path = result_path(args, args.inputs, f"{args.metric}-matrix")
    png = Path(args.png) if args.png else path.with_suffix(".png")
    refuse_overwrite(("--png" if args.png else "default heatmap", png))
    with usage_errors("--features"):
        res = metrics.similarity_matrix(items, args.metric, names=names, tau=args.tau, thresh=args.thresh)
    out = {"metric": args.metric, "names": names, "matrix": res["matrix"], "count": res["count"],
           "n": res["n"], "ci95": res["ci95"], "diagonal": "defined as 1, not computed",
           **({"tau": args.tau, "comparison": "sim > tau", **model} if args.metric == "rp"
              else {"thresh": args.thresh, "comparison": "mae < thresh"}),
           "inputs": [os.path.abspath(p) for p in args.inputs]}
    if plots.available():
        plots.plot_similarity_matrix(res["matrix"], png, names=names,
                                     title=f"{args.metric.upper()} ({'tau' if args.metric == 'rp' else 'thresh'}="
                                           f"{args.tau if args.metric == 'rp' else args.thresh})")
        out["png"] = os.path.abspath(png)
    else:
        warnings.warn("matplotlib is not installed: the heatmap was skipped (pip install matplotlib, the plots extra)",
                      stacklevel=1)
    write_json(path, out)
    m = res["matrix"]
    off = m[~np.eye(len(m), dtype=bool)]
    print(f"{args.metric} matrix {len(m)}x{len(m)}: off-diagonal min {off.min():.4f}, max {off.max():.4f} -> "
          f"{path}" + (f", {png}" if "png" in out else ""))
    return 0
