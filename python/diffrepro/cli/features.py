# SPDX-License-Identifier: Apache-2.0
"""``diffrepro features``: SSCD descriptors of an image set (diffrepro.sscd)."""

from __future__ import annotations

import os
import time

import numpy as np

from ..errors import RunError, UsageError, usage_errors
from ._common import (
    HelpFormatter,
    int_at_least,
    load_images,
    progress_enabled,
    require_path,
)

_PRESETS = ("p1_pil320", "torch320", "short288")  # literal: no torch at parser time; tested against sscd


def add_commands(sub) -> None:
    p = sub.add_parser(
        "features", help="SSCD descriptors of an image folder, zip or data set (Pizzi et al. 2022)",
        formatter_class=HelpFormatter,
        description="Extract SSCD copy-detection descriptors and save them as .npz with keys features "
                    "(float32 [N, D]), ids (int64 seeds for folders of NNNNNN.png, file names otherwise) and "
                    "meta (JSON: model sha256, preprocessing, images sha256). An up-to-date --out is reused "
                    "unless --force; a file that is not a diffrepro feature file is never overwritten.")
    p.add_argument("--images", required=True, metavar="DIR|ZIP", help="image folder, EDM zip or data set file; "
                   "a generate output folder gives exactly its per-seed PNGs, ids = seeds")
    p.add_argument("--model", required=True, metavar="FILE", help="SSCD model file (TorchScript)")
    p.add_argument("--out", required=True, metavar="F.npz", help="feature file to write")
    p.add_argument("--preprocess", default="p1_pil320", choices=_PRESETS,
                   help="p1_pil320: Zhang et al.'s PIL resize to 320x320; torch320: the same in torch; "
                        "short288: SSCD's short-edge 288")
    p.add_argument("--device", default="cpu", help="device to run the model on")
    p.add_argument("--batch-size", type=int_at_least(1), default=256, help="images per forward pass")
    p.add_argument("--max-images", type=int_at_least(1), default=None,
                   help="first N images in sorted name order (a generate folder: its first N seeds)")
    p.add_argument("--grey-to-rgb", action="store_true", help="replicate 1-channel images to RGB")
    p.add_argument("--allow-tf32", action="store_true", help="allow TF32 on CUDA (Zhang et al. ran with it)")
    p.add_argument("--cache-dir", default=None, help="also cache descriptors by image content here")
    p.add_argument("--force", action="store_true", help="recompute even if --out is up to date")
    p.add_argument("--dry-run", action="store_true", help="time one batch, print the estimated cost and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=_cmd_features)


def _is_feature_file(path: str) -> bool:
    """True when ``path`` holds a feature file diffrepro wrote (its metadata proves it)."""
    from ..data import reading_file
    from ..sscd import load_features

    try:
        with reading_file(repr(path), "a feature file", OSError, ValueError):
            old = load_features(path)
    except (RunError, KeyError):
        return False
    return old.ids is not None and "model_sha256" in old.meta and "preprocess" in old.meta


def _load_model(args):
    """The descriptor model of ``--model``; a file torch cannot load is a :class:`RunError` naming it."""
    from ..sscd import SSCDExtractor

    with usage_errors("--model"):
        try:
            return SSCDExtractor(args.model, preprocess=args.preprocess, device=args.device,
                                 batch_size=args.batch_size, grey_to_rgb=args.grey_to_rgb,
                                 cache=args.cache_dir if args.cache_dir else False,
                                 allow_tf32=args.allow_tf32, progress=progress_enabled(args))
        except RunError as exc:  # neither TorchScript nor ONNX
            raise RunError(f"--model: {str(exc).removeprefix('model_path: ')}") from exc
        except RuntimeError as exc:  # torch.jit.load: "PytorchStreamReader failed ...", "Expected hasRecord ..."
            first = " ".join(str(exc).split("\n", 1)[0].split())[:200]
            raise RunError(f"--model: cannot load {args.model!r} as a TorchScript model ({first}); expected an "
                           "SSCD TorchScript file such as sscd_disc_mixup.torchscript.pt") from exc


def _cmd_features(args) -> int:
    from ..data import dataset_hash
    from ..sscd import load_features, save_features

    require_path("--model", args.model, "an SSCD model file")
    if os.path.isdir(args.model):
        raise UsageError(f"--model: expected a model file, got the folder {args.model!r}")
    if os.path.isdir(args.out):
        raise UsageError(f"--out: expected a .npz file path, got the folder {args.out!r}")
    if os.path.exists(args.out) and not _is_feature_file(args.out):
        raise UsageError(f"--out: {args.out!r} exists and is not a feature file written by diffrepro; "
                         "refusing to overwrite it (choose another --out or remove the file)")
    extractor = _load_model(args)  # before decoding any image: a bad --model fails at once
    ds, ids = load_images("--images", args.images, args.max_images, progress=progress_enabled(args))
    if len(np.unique(ids)) != len(ids):
        raise UsageError(f"--images: image ids must be unique, but {args.images!r} holds repeated seeds "
                         "(the same NNNNNN.png in two sub-folders?)")
    if args.dry_run:
        probe = ds.images[:min(len(ds), args.batch_size, 32)]
        start = time.perf_counter()
        extractor(probe)
        rate = len(probe) / (time.perf_counter() - start)
        print(f"features: {len(ds)} images, {args.preprocess} on {args.device}: ~{rate:.1f} images/s "
              f"(one batch of {len(probe)} timed) -> ~{len(ds) / rate:.0f} s; nothing written")
        return 0
    meta = {**extractor.meta, "images": os.path.abspath(args.images), "images_sha256": dataset_hash(ds.images),
            "n": len(ds), "image_shape": list(ds.images.shape[1:])}
    if os.path.isfile(args.out) and not args.force:
        old = load_features(args.out)
        keys = ("model_sha256", "preprocess", "grey_to_rgb", "allow_tf32", "images_sha256")
        if all(old.meta.get(k) == meta[k] for k in keys) and np.array_equal(old.ids, ids):
            print(f"features: {args.out} is up to date ({len(ids)} x {old.features.shape[1]}, "
                  f"{args.preprocess}); use --force to recompute")
            return 0
    feats = extractor(ds.images)
    save_features(args.out, feats, ids, meta)
    kind = "int64 seeds" if ids.dtype.kind == "i" else "file names"
    print(f"features: {len(ids)} x {feats.shape[1]} descriptors ({args.preprocess}, ids: {kind}) -> {args.out}")
    return 0
