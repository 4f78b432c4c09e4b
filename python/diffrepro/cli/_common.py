# SPDX-License-Identifier: Apache-2.0
"""What every command shares: the error policy, argument types, input loaders that name the
argument in their errors, and atomic JSON output that never replaces a file diffrepro did not write.

Error policy (one line on stderr, never a usage block):

- a bad argument or input value (:class:`UsageError`, a ``ValueError`` raised while the command
  checks its inputs, or an argparse error) exits with status 2;
- a failure while running (a damaged or unreadable file, :class:`RunError`, ``OSError``) exits
  with status 1 and names the file;
- Ctrl-C exits with status 130 and says that rerunning the same command resumes;
- a warning is one line ``diffrepro <cmd>: warning: ...`` (under torchrun, from rank 0 only);
- anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from ..errors import RunError, UsageError

__all__ = ["RunError", "UsageError"]


def command_name(args) -> str:
    return "diffrepro " + " ".join(p for p in (args.command, getattr(args, "subcommand", None)) if p)


def run(args) -> int:
    """Run ``args.fn(args)`` under the error policy; returns the exit status."""
    name = command_name(args)
    quiet = os.environ.get("RANK", "0") != "0"  # under torchrun every rank warns alike: rank 0 says it
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, category, *rest, **kw: quiet or print(
            f"{name}: warning: {message}", file=sys.stderr)
        try:
            _check_shared_inputs(args)
            return int(args.fn(args) or 0)
        except UsageError as exc:
            print(f"{name}: error: {exc}", file=sys.stderr)
            return 2
        except RunError as exc:
            print(f"{name}: error: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:
            where = f" {exc.filename!r}" if exc.filename else ""
            print(f"{name}: error:{where} {exc.strerror or exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"\n{name}: interrupted; finished outputs are kept, rerun the same command to resume",
                  file=sys.stderr)
            return 130


def _check_shared_inputs(args) -> None:
    """What every command checks before any work: --outdir names a folder, and DIFFREPRO_NUM_THREADS
    (read by the kernels at their first call) is a thread count."""
    outdir = getattr(args, "outdir", None)
    if outdir and os.path.exists(outdir) and not os.path.isdir(outdir):
        raise UsageError(f"--outdir: got the file {str(outdir)!r}, expected a folder (existing or new)")
    if os.environ.get("DIFFREPRO_NUM_THREADS"):
        from .. import ops

        try:
            ops._workers(None)  # the kernels' own reading of it
        except ValueError as exc:
            raise UsageError(str(exc)) from None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every optional flag's help ends with its default; descriptions keep their line breaks."""

    def _get_help_string(self, action):
        if action.required or "default" in (action.help or ""):  # nothing to add, or the help says it
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the error policy: a bad or missing argument is one line and exit status 2,
    with a pointer to ``--help`` instead of the usage block. Sub-parsers inherit the class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"got {text!r}, expected an integer >= {minimum}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"got {value}, expected an integer >= {minimum}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _float_in(accepts, expected: str):
    """An argparse type for a finite float that ``accepts``; errors say ``got X, expected <expected>``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and accepts(value)):
            raise argparse.ArgumentTypeError(f"got {text!r}, expected {expected}")
        return value

    parse.__name__ = expected
    return parse


positive_float = _float_in(lambda v: v > 0, "a positive finite number")
nonneg_float = _float_in(lambda v: v >= 0, "a finite number >= 0")
cosine_threshold = _float_in(lambda v: -1.0 <= v <= 1.0, "a cosine threshold in [-1, 1]")


def dist_timeout_arg(p) -> None:
    p.add_argument("--dist-timeout", type=positive_float, default=600.0, metavar="SECONDS",
                   help="under torchrun: a process silent this long is reported lost and the others stop")


@contextlib.contextmanager
def job(args, device: str = "cpu"):
    """The ``torch.distributed`` job of a command (:func:`diffrepro.distributed.init`: one process
    unless started by torchrun). A rank that fails tells the others (they stop at once, naming it
    and its error); on success every rank leaves the process group."""
    from .. import distributed

    ctx = distributed.init(timeout=args.dist_timeout, device=device)
    try:
        yield ctx
    except BaseException as exc:
        ctx.fail(exc)
        raise
    ctx.close()


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def stem(path: str | os.PathLike) -> str:
    name = Path(os.fspath(path).rstrip("/\\")).name
    for suffix in (".tar.gz", ".npz", ".npy", ".zip", ".json"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def out_path(args, inputs: list[str], tag: str, explicit: str | None = None) -> Path:
    """``explicit``, or ``<stem of each input joined by '__'>.<tag>.json`` in ``--outdir`` (default:
    beside the first input), so that changing any input never overwrites an earlier result."""
    if explicit:
        return Path(explicit)
    folder = Path(args.outdir) if getattr(args, "outdir", None) else Path(os.path.abspath(inputs[0])).parent
    return folder / f"{'__'.join(stem(p) for p in inputs)}.{tag}.json"


# Keys of the .npz files the commands write: per generation (score rp, gl-sscd, gl-nn) and the linear models
# of distill (diffrepro.denoisers.linear).
_OWN_NPZ_KEYS = ({"ids", "sim"}, {"ids", "nn_index", "max_sim"}, {"ids", "nn_index", "dist", "ratio"},
                 {"W_eff", "b", "sigma", "mode", "M", "shape"})


def result_path(args, inputs: list[str], tag: str, *beside: str) -> Path:
    """:func:`out_path` for ``--json``, checked with :func:`refuse_overwrite` before any work, together
    with the files of suffixes ``beside`` written next to it (``".npz"``, ``".png"``)."""
    path = out_path(args, inputs, tag, getattr(args, "json", None))
    arg = "--json" if getattr(args, "json", None) else "default output"
    refuse_overwrite((arg, path), *((f"{arg} (its {suffix} beside it)", path.with_suffix(suffix)) for suffix in beside))
    return path


def written_by_diffrepro(path: Path) -> bool:
    """True when ``path`` holds an output the commands write, so that replacing it loses nothing of the
    user's: a result JSON (an object with "metric" or "rows"), one of their .npz files (exactly its keys)
    or a matplotlib figure. Anything unreadable is not ours."""
    from ..data import reading_file

    try:
        with reading_file(repr(str(path)), "an output of diffrepro", OSError, ValueError, SyntaxError):
            if path.suffix == ".json":
                obj = json.loads(path.read_bytes())
                return isinstance(obj, dict) and ("metric" in obj or "rows" in obj)
            if path.suffix == ".npz":
                with np.load(path) as z:
                    return set(z.files) in _OWN_NPZ_KEYS
            if path.suffix == ".png":
                import PIL.Image

                with PIL.Image.open(path) as img:
                    return str(img.info.get("Software", "")).startswith("Matplotlib")
    except RunError:
        return False
    return False


def refuse_overwrite(*outputs: tuple[str, Path]) -> None:
    """Before any work: each ``(argument, path)`` output must be new or a file diffrepro wrote."""
    for arg, path in outputs:
        if path.is_dir():
            raise UsageError(f"{arg}: expected a file path, got the folder {str(path)!r}")
        if path.exists() and not written_by_diffrepro(path):
            raise UsageError(f"{arg}: {str(path)!r} exists and was not written by diffrepro; refusing to overwrite "
                             "it (choose another --json/--outdir, or remove the file)")


def write_json(path: Path, obj: dict) -> None:
    """Strict JSON (non-finite floats as null: :func:`diffrepro.data.jsonable`), atomically."""
    from ..data import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, obj)


def ci_text(ci) -> str:
    return f"95% CI [{ci[0]:.4f}, {ci[1]:.4f}]"


def progress_enabled(args) -> bool:
    return not getattr(args, "no_progress", False) and sys.stderr.isatty()


# ----------------------------------------------------------------------------------------------
# Inputs that name their argument
# ----------------------------------------------------------------------------------------------
def require_path(arg: str, path: str, expected: str) -> None:
    if not os.path.exists(path):
        raise UsageError(f"{arg}: no such file or folder {path!r} (expected {expected})")


def load_images(arg: str, path: str, max_images: int | None = None, progress: bool = False):
    """A data set (uint8 [N, C, H, W]) and its ids: seeds for ``NNNNNN.png`` names (a generate output
    folder gives exactly its per-seed PNGs), else file names, else row numbers."""
    from ..data import load_dataset

    require_path(arg, path, "an image folder, EDM zip, CIFAR archive, .npz or .npy data set")
    try:
        ds = load_dataset(path, max_images=max_images, progress=progress)
    except ValueError as exc:
        raise UsageError(f"{arg}: {exc}") from exc
    except RunError as exc:
        raise RunError(f"{arg}: {exc}") from exc
    if len(ds) == 0:
        raise UsageError(f"{arg}: {path!r} holds no images")
    if ds.names is None:
        return ds, np.arange(len(ds), dtype=np.int64)
    from ..sscd import ids_from_names

    return ds, ids_from_names(ds.names)


def check_descriptor_rows(arg: str, path: str, features: np.ndarray, ids=None) -> None:
    """Refuse NaN, infinite or all-zero descriptor rows (a cosine is undefined there), naming the row."""
    from ..metrics import bad_descriptor_rows

    bad, why = bad_descriptor_rows(features)
    if len(bad):
        which = f"row {bad[0]}" + (f" (id {ids[bad[0]]})" if ids is not None else "")
        raise UsageError(f"{arg}: {path!r}: {which} is {why} ({len(bad)} such rows in all); expected finite, "
                         "non-zero descriptors (re-extract them with 'diffrepro features')")


def load_feature_file(arg: str, path: str, need_ids: bool = True):
    """A feature file written by ``diffrepro features`` (with ids unless ``need_ids`` is False), with
    finite, non-zero rows."""
    from ..data import reading_file
    from ..sscd import load_features

    expected = "a .npz feature file written by 'diffrepro features'"
    require_path(arg, path, expected)
    if os.path.isdir(path) or not path.endswith(".npz"):
        raise UsageError(f"{arg}: expected {expected}, got {path!r}")
    try:
        # numpy raises ValueError for a file that is not an .npz at all
        with reading_file(f"{arg}: {path!r}", expected, ValueError):
            feats = load_features(path)
    except KeyError as exc:
        raise UsageError(f"{arg}: {path!r} is not a feature file (no 'features' array)") from exc
    if feats.ids is None and need_ids:
        raise UsageError(f"{arg}: {path!r} has no 'ids' (rows in file order); pass --pair-by row to pair "
                         "rows by position, or re-extract it with 'diffrepro features' to pair by seed")
    if feats.features.ndim != 2 or len(feats.features) == 0:
        raise UsageError(f"{arg}: expected features of shape [N, D] with N >= 1, got {feats.features.shape}")
    check_descriptor_rows(arg, path, feats.features, feats.ids)
    return feats
