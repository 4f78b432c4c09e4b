# SPDX-License-Identifier: Apache-2.0
# Dataset readers (CIFAR-10 python batches, EDM dataset zips and folders, npz, npy) returning uint8
# NCHW arrays in the reference order, plus the uint8 quantisation, PNG/grid writers and atomic saves.
"""Image data in and out: readers, the uint8 convention, PNG/grid writers and atomic saves.

Every reader returns uint8 images as an ``[N, C, H, W]`` numpy array (RGB or single channel,
C-major) in the order the reference code uses: the CIFAR-10 batches in file order, and EDM
zips and folders by sorted relative file name. Convert to the diffusion scale with
:func:`decode` (``y = u / 127.5 - 1``); :func:`quantize` is EDM's exact inverse on those values.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import gzip
import hashlib
import importlib.resources
import io
import json
import math
import os
import pickle
import struct
import sys
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import PIL.Image
from tqdm.auto import tqdm

from .errors import RunError, UsageError

__all__ = [
    "Dataset",
    "load_dataset",
    "default_dataset",
    "dataset_hash",
    "quantize",
    "save_png",
    "image_grid",
    "save_grid_png",
    "write_edm_zip",
    "write_cifar_batches",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_save_npz",
    "jsonable",
    "strict_json",
    "reading_file",
]

_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{k}" for k in range(1, 6))
_CIFAR_TEST = ("test_batch",)
_CIFAR_LABEL_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
_DEFAULT_DATA = "cifar10_500.npz"
_GENERATE_MANIFEST = "manifest.json"

# What the archive and image libraries raise for a file that is damaged (truncated download,
# disk error) rather than of the wrong kind; the readers turn these into a RunError naming the file.
_DAMAGED = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, pickle.UnpicklingError, struct.error)


@dataclass
class Dataset:
    """An image data set held as uint8.

    Attributes:
        images: uint8 ``[N, C, H, W]`` array (may be an ``np.memmap`` for ``.npy`` inputs).
        labels: int64 ``[N]`` class indices, or None when the source has none.
        names: ``N`` per-image names (relative file names, ``"batch:row"`` or ``"file.npz:row"``),
            or None for array inputs.
        source: the path (or resource name) the data came from.
    """

    images: np.ndarray
    labels: np.ndarray | None
    names: list[str] | None
    source: str

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def label_dim(self) -> int:
        """Number of classes (``max(label) + 1``), 0 when unlabelled."""
        if self.labels is None or len(self.labels) == 0:
            return 0
        return int(self.labels.max()) + 1


# ------------------------------------------------------------------------------------------------
# Readers


def load_dataset(path: str | os.PathLike, *, max_images: int | None = None,
                 split: str = "train", progress: bool = False) -> Dataset:
    """Load an image data set, dispatching on what ``path`` is.

    Recognised inputs (the formats of EDM's ``dataset_tool.py`` and of the CIFAR-10 release):

    * ``cifar-10-python.tar.gz`` (any ``*.tar.gz`` holding ``cifar-10-batches-py/``) or an
      extracted ``cifar-10-batches-py`` folder: ``split="train"`` concatenates
      ``data_batch_1`` … ``data_batch_5`` in that order, ``split="test"`` reads ``test_batch``.
    * A :func:`diffrepro.generation.generate` output folder (recognised by its ``manifest.json``):
      exactly the per-seed PNGs of the seeds the manifest lists, in that order, named as written
      (``000123.png``, so that ids are seeds); never ``grid.png`` or ``batches/``. The run must be
      complete and every listed PNG present.
    * An EDM dataset ``*.zip`` or an image folder: every file whose extension PIL knows, sorted
      by relative name (``/`` separators), labels from ``dataset.json`` when present. A folder
      without images falls back to its top-level ``*.npz`` files with key ``samples``
      (``[N, H, W, C]`` uint8), concatenated in sorted file order. A folder holding generate
      runs in its sub-folders is refused (pass one run).
    * ``*.npz`` with ``images`` (``[N, C, H, W]`` uint8) and optional ``labels``, or with
      ``samples`` (``[N, H, W, C]`` uint8).
    * ``*.npy`` holding a uint8 ``[N, C, H, W]`` array, opened as a read-only memmap.

    Args:
        path: file or folder as above.
        max_images: keep only the first ``max_images`` images in that order (as EDM's
            ``dataset_tool.py --max-images``). None keeps all.
        split: ``"train"`` or ``"test"``; only CIFAR-10 python inputs have a test split.
        progress: show a tqdm progress bar while decoding image files.

    Returns:
        A :class:`Dataset` with uint8 ``[N, C, H, W]`` images.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unknown format, inconsistent images or labels, bad ``max_images``/``split``.
        RunError: a damaged file (truncated or corrupt archive, image, pickle or numpy file) or
            an unfinished generate run, named in the message.
    """
    path = os.fspath(path)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if max_images is not None and (isinstance(max_images, bool) or int(max_images) != max_images
                                   or max_images < 0):
        raise ValueError(f"max_images must be a non-negative integer or None, got {max_images!r}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"path {path!r} does not exist")

    is_cifar = (path.endswith(".tar.gz") or
                (os.path.isdir(path) and os.path.isfile(os.path.join(path, _CIFAR_TRAIN[0]))))
    if is_cifar:
        return _load_cifar(path, split, max_images)
    if split != "train":
        raise ValueError(f"split={split!r} only applies to CIFAR-10 python inputs; path {path!r} "
                         "is not one (use split='train')")
    if os.path.isdir(path):
        return _load_image_folder(path, max_images, progress)
    lower = path.lower()
    if lower.endswith(".zip"):
        return _load_edm_zip(path, max_images, progress)
    if lower.endswith(".npz"):
        return _load_npz(path, max_images)
    if lower.endswith(".npy"):
        with reading_file(repr(path), "a uint8 [N, C, H, W] .npy array", ValueError):
            images = np.load(path, mmap_mode="r")
        _check_images(images, f"array in {path!r}")
        return Dataset(images[:max_images], None, None, path)
    raise ValueError(
        f"path {path!r} is not a recognised data set: expected a CIFAR-10 python archive "
        "(cifar-10-python.tar.gz) or cifar-10-batches-py folder, an EDM dataset .zip, an image "
        "folder, a .npz with 'images' or 'samples', or a uint8 [N,C,H,W] .npy")


def default_dataset() -> Dataset:
    """Load the embedded demo set: the first 500 CIFAR-10 training images with labels.

    The rows are the first 500 images of ``data_batch_1`` in file order (see
    ``diffrepro/_data/README.md`` for provenance).

    Returns:
        A :class:`Dataset` with uint8 ``[500, 3, 32, 32]`` images and int64 labels.
    """
    resource = importlib.resources.files("diffrepro") / "_data" / _DEFAULT_DATA
    with resource.open("rb") as f, np.load(f) as z:
        images, labels = z["images"], z["labels"].astype(np.int64)
    names = [f"data_batch_1:{i}" for i in range(len(images))]
    return Dataset(images, labels, names, f"diffrepro/_data/{_DEFAULT_DATA}")


def dataset_hash(images: np.ndarray) -> str:
    """SHA-256 (hex) of the C-contiguous bytes of a uint8 ``[N, C, H, W]`` array.

    Memmaps are hashed in chunks without loading them whole.

    Args:
        images: uint8 ``[N, C, H, W]`` numpy array (or CPU torch tensor).

    Returns:
        64-character hex digest.
    """
    images = _as_numpy(images, "images")
    _check_images(images, "images")
    h = hashlib.sha256()
    rows = max(1, (64 << 20) // max(1, images[0].nbytes if len(images) else 1))
    for start in range(0, len(images), rows):
        h.update(np.ascontiguousarray(images[start:start + rows]).data)
    return h.hexdigest()


def _check_images(images, what: str) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 \
            or images.shape[1] not in (1, 3):
        got = (f"{type(images).__name__} {getattr(images, 'dtype', '')} "
               f"{tuple(getattr(images, 'shape', ()))}")
        raise ValueError(f"{what} must be a uint8 [N, C, H, W] array with C in (1, 3), got {got}")


def _as_numpy(a, what: str) -> np.ndarray:
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "detach") and hasattr(a, "cpu"):  # torch tensor
        return a.detach().cpu().numpy()
    raise TypeError(f"{what} must be a numpy array or torch tensor, got {type(a).__name__}")


def _detail(exc: BaseException) -> str:
    """``ExcType: message`` on one line."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())


@contextlib.contextmanager
def reading_file(where: str, expected: str, *also: type[BaseException]):
    """Turn what a damaged file raises while the block reads it (zip, tar, gzip, zlib, pickle and
    struct errors, ``EOFError``, and the exception types ``also``) into one :class:`RunError`
    that names the file (``where``, quoted by the caller), the failure and what was expected."""
    try:
        yield
    except (RunError, UsageError):
        raise
    except (*_DAMAGED, *also) as exc:
        raise RunError(f"{where}: cannot read it as {expected} ({_detail(exc)}); "
                       "the file may be truncated or corrupt") from exc


@functools.cache
def _numpy_pickle_globals() -> dict[tuple[str, str], object]:
    """The globals a pickled numpy array may reference, under old and new module names."""
    allowed: dict[tuple[str, str], object] = {("_codecs", "encode"): codecs.encode}
    for obj in (np.ndarray, np.dtype, np.zeros(1).__reduce__()[0],
                np.float64(0).__reduce__()[0], np.zeros(1).__reduce_ex__(5)[0]):
        # Files written with numpy < 2 name numpy.core, numpy >= 2 names numpy._core.
        for module in {obj.__module__, obj.__module__.replace("numpy._core", "numpy.core")}:
            allowed[(module, obj.__name__)] = obj
    return allowed


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays, dtypes and scalars (never arbitrary code)."""

    def __init__(self, f, where: str, **kwargs):
        super().__init__(f, **kwargs)
        self.where = where

    def find_class(self, module, name):
        obj = _numpy_pickle_globals().get((module, name))
        if obj is None:
            raise RunError(f"{self.where!r}: the CIFAR-10 batch references {module}.{name}; expected only numpy "
                           "arrays in a data batch (refusing to run code from a data file)")
        return obj


def _read_cifar_batch(f, where: str) -> tuple[np.ndarray, np.ndarray]:
    # pickle raises ValueError for an unknown protocol and a few damaged opcodes
    with reading_file(repr(where), "a CIFAR-10 python batch (a pickle of numpy arrays)", ValueError):
        batch = _NumpyOnlyUnpickler(f, where, encoding="latin1").load()
    try:
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{where} is not a CIFAR-10 batch (needs 'data' and 'labels'): {e}") from e
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (data.shape[0],):
        raise ValueError(f"{where}: expected data [n, 3072] and labels [n], got "
                         f"{data.shape} and {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar(path: str, split: str, max_images: int | None) -> Dataset:
    members = _CIFAR_TRAIN if split == "train" else _CIFAR_TEST
    if not os.path.isfile(path):
        return _read_cifar(path, members, max_images, _open_folder_batch)
    with reading_file(repr(path), "a gzip-compressed tar archive (cifar-10-python.tar.gz)", gzip.BadGzipFile), \
            tarfile.open(path, "r:gz") as tar:
        return _read_cifar(path, members, max_images, functools.partial(_open_tar_batch, tar))


def _open_folder_batch(path: str, member: str):
    where = os.path.join(path, member)
    if not os.path.isfile(where):
        raise ValueError(f"path {path!r}: missing CIFAR-10 file {member!r}")
    return open(where, "rb"), where


def _open_tar_batch(tar: tarfile.TarFile, path: str, member: str):
    try:
        info = tar.getmember(f"{_CIFAR_DIR}/{member}")
    except KeyError:
        raise ValueError(f"path {path!r} is not a CIFAR-10 python archive: no member "
                         f"{_CIFAR_DIR}/{member}") from None
    return tar.extractfile(info), f"{path}:{_CIFAR_DIR}/{member}"


def _read_cifar(path: str, members: tuple[str, ...], max_images: int | None, open_batch: Callable) -> Dataset:
    images, labels, names = [], [], []
    for member in members:
        if max_images is not None and sum(len(x) for x in images) >= max_images:
            break
        f, where = open_batch(path, member)
        with f:
            x, y = _read_cifar_batch(f, where)
        images.append(x)
        labels.append(y)
        names += [f"{member}:{i}" for i in range(len(x))]
    images_all = np.concatenate(images)[:max_images]
    return Dataset(np.ascontiguousarray(images_all), np.concatenate(labels)[:max_images],
                   names[:len(images_all)], path)


def _image_extensions() -> set[str]:
    PIL.Image.init()
    return set(PIL.Image.EXTENSION)


def _is_image_name(name: str, extensions: set[str]) -> bool:
    return os.path.splitext(name)[1].lower() in extensions


def _decode(data: bytes | str, where: str) -> np.ndarray:
    """Decode one image file to uint8 CHW (mode L gives C=1, RGB gives C=3)."""
    # PIL reports a damaged image as OSError ("image file is truncated", UnidentifiedImageError),
    # SyntaxError (broken PNG chunk), ValueError or DecompressionBombError.
    with reading_file(repr(where), "an image file PIL can decode (PNG, JPEG, ...)", OSError, SyntaxError, ValueError,
                  PIL.Image.DecompressionBombError):
        with PIL.Image.open(data if isinstance(data, str) else io.BytesIO(data)) as img:
            mode = img.mode
            hwc = np.asarray(img, dtype=np.uint8) if mode in ("L", "RGB") else None
    if hwc is None:
        raise ValueError(f"image {where!r} has PIL mode {mode!r}; expected 'L' or 'RGB'")
    return (hwc[None] if hwc.ndim == 2 else hwc.transpose(2, 0, 1))


def _stack(names: list[str], read: Callable, source: str, progress: bool) -> np.ndarray:
    """Decode ``names`` in order into one preallocated ``[N, C, H, W]`` array."""
    images = None
    folder = os.path.isdir(source)

    def where(name: str) -> str:  # a file of a folder, or a member of an archive
        return os.path.join(source, name) if folder else f"{source}:{name}"

    for i, name in enumerate(tqdm(names, desc="decode", disable=not progress)):
        chw = _decode(read(name), where(name))
        if images is None:
            images = np.empty((len(names), *chw.shape), np.uint8)
        elif chw.shape != images.shape[1:]:
            raise ValueError(f"image {where(name)} has shape {chw.shape} (CHW) but "
                             f"{where(names[0])} has {images.shape[1:]}; all must match")
        images[i] = chw
    return images


def _labels_from_json(text: bytes | str | None, names: list[str], source: str):
    if text is None:
        return None
    try:
        meta = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RunError(f"{source}/dataset.json: cannot read it as JSON ({_detail(exc)}); expected EDM's "
                       '{"labels": [[name, class], ...]} (the file may be truncated or corrupt)') from exc
    labels = meta.get("labels") if isinstance(meta, dict) else None
    if labels is None:
        return None
    if not isinstance(labels, list) or not all(isinstance(e, list) and len(e) == 2 for e in labels):
        raise ValueError(f"{source}/dataset.json: 'labels' must be a list of [name, class] pairs")
    table = dict(labels)
    missing = [n for n in names if n not in table]
    if missing:
        raise ValueError(f"{source}/dataset.json has no label for {missing[0]!r} "
                         f"({len(missing)} images unlabelled)")
    return np.asarray([table[n] for n in names], dtype=np.int64)


def _load_edm_zip(path: str, max_images: int | None, progress: bool) -> Dataset:
    extensions = _image_extensions()
    with reading_file(repr(path), "an EDM dataset zip"):
        z = zipfile.ZipFile(path)

    def member(name: str) -> bytes:
        with reading_file(repr(f"{path}:{name}"), "a member of an EDM dataset zip"):
            return z.read(name)

    with z:
        all_names = set(z.namelist())
        names = sorted(n for n in all_names if _is_image_name(n, extensions))[:max_images]
        if not names:
            raise ValueError(f"path {path!r}: zip contains no image files")
        meta = member("dataset.json") if "dataset.json" in all_names else None
        labels = _labels_from_json(meta, names, path)
        images = _stack(names, member, path, progress)
    return Dataset(images, labels, names, path)


def _generate_manifest(folder: str) -> dict | None:
    """The manifest of a :func:`diffrepro.generation.generate` output folder, or None when
    ``folder`` is not one (no ``manifest.json``, or one without the run's seed list)."""
    path = os.path.join(folder, _GENERATE_MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read())
    except (ValueError, UnicodeDecodeError) as exc:
        raise RunError(f"{path!r}: cannot read it as JSON ({_detail(exc)}); expected the manifest of a "
                       "diffrepro generate run (the file may be truncated or corrupt)") from exc
    config = manifest.get("config") if isinstance(manifest, dict) else None
    return manifest if isinstance(config, dict) and isinstance(config.get("seeds"), str) else None


def _load_generate_output(path: str, manifest: dict, max_images: int | None, progress: bool) -> Dataset:
    """The per-seed PNGs of a finished generate run, in the manifest's seed order."""
    from .noise import parse_seeds, seed_filename

    status = manifest.get("status")
    if status != "complete":
        raise RunError(f"{path!r} is an unfinished diffrepro generate run (manifest status {status!r}, expected "
                       "'complete'); rerun the same generate command to finish it")
    config = manifest["config"]
    try:
        seeds = parse_seeds(config["seeds"])
    except ValueError as exc:
        raise RunError(f"{os.path.join(path, _GENERATE_MANIFEST)!r}: bad seed list ({exc})") from exc
    names = [seed_filename(s, bool(config.get("subdirs"))) for s in seeds][:max_images]
    missing = [n for n in names if not os.path.isfile(os.path.join(path, n))]
    if missing:
        raise RunError(f"{path!r}: {len(missing)} of the {len(names)} PNGs its manifest lists are missing "
                       f"(first: {missing[0]!r}); rerun the same generate command to write them")
    images = _stack(names, lambda n: os.path.join(path, n), path, progress)
    return Dataset(images, None, names, path)


def _load_image_folder(path: str, max_images: int | None, progress: bool) -> Dataset:
    manifest = _generate_manifest(path)
    if manifest is not None:
        return _load_generate_output(path, manifest, max_images, progress)
    extensions = _image_extensions()
    walked = list(os.walk(path))
    runs = sorted(os.path.relpath(root, path) for root, _dirs, files in walked[1:]
                  if _GENERATE_MANIFEST in files and _generate_manifest(root) is not None)
    if runs:
        raise ValueError(f"path {path!r} holds diffrepro generate runs in its sub-folders ({', '.join(runs[:3])}"
                         f"{', ...' if len(runs) > 3 else ''}); expected one run folder, e.g. "
                         f"{os.path.join(path, runs[0])!r}")
    rel = sorted(os.path.relpath(os.path.join(root, f), path).replace(os.sep, "/")
                 for root, _dirs, files in walked for f in files)
    names = [n for n in rel if _is_image_name(n, extensions)][:max_images]
    if not names:
        return _load_npz_samples_folder(path, max_images)
    meta_path = os.path.join(path, "dataset.json")
    meta = None
    if os.path.isfile(meta_path):
        with open(meta_path, "rb") as f:
            meta = f.read()
    labels = _labels_from_json(meta, names, path)
    images = _stack(names, lambda n: os.path.join(path, n), path, progress)
    return Dataset(images, labels, names, path)


def _samples_to_nchw(samples, where: str) -> np.ndarray:
    samples = np.asarray(samples)
    if samples.dtype != np.uint8 or samples.ndim != 4 or samples.shape[3] not in (1, 3):
        raise ValueError(f"{where}: 'samples' must be uint8 [N, H, W, C] with C in (1, 3), "
                         f"got {samples.dtype} {samples.shape}")
    return samples.transpose(0, 3, 1, 2)


def _load_npz_samples_folder(path: str, max_images: int | None) -> Dataset:
    files = sorted(f for f in os.listdir(path) if f.lower().endswith(".npz"))
    if not files:
        raise ValueError(f"path {path!r}: folder contains neither image files nor *.npz sample files")
    chunks, names, total = [], [], 0
    for file in files:
        if max_images is not None and total >= max_images:
            break
        where = os.path.join(path, file)
        arrays = _read_npz(where, ("samples",))
        if "samples" not in arrays:
            raise ValueError(f"{where}: expected key 'samples', found {sorted(arrays)}")
        x = _samples_to_nchw(arrays["samples"], where)
        chunks.append(x)
        names += [f"{file}:{i}" for i in range(len(x))]
        total += len(x)
    images = np.ascontiguousarray(np.concatenate(chunks)[:max_images])
    return Dataset(images, None, names[:len(images)], path)


def _read_npz(path: str, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays ``keys`` (those present) of an ``.npz``, read now so that a damaged file fails
    here with a :class:`RunError` naming it; the other keys map to None."""
    # numpy raises ValueError for a file that is neither a zip nor an .npy (it would unpickle it)
    # and for a damaged member header
    with reading_file(repr(path), "a numpy .npz archive", ValueError):
        z = np.load(path)
    if not hasattr(z, "files"):
        raise ValueError(f"path {path!r} holds one array ({z.dtype} {z.shape}), not an .npz archive of named arrays")
    with z, reading_file(repr(path), "a numpy .npz archive", ValueError):
        return {k: (z[k] if k in keys else None) for k in z.files}


def _load_npz(path: str, max_images: int | None) -> Dataset:
    arrays = _read_npz(path, ("images", "samples", "labels"))
    keys = set(arrays)
    if "images" in keys:
        images = np.asarray(arrays["images"])
        _check_images(images, f"'images' in {path!r}")
    elif "samples" in keys:
        images = np.ascontiguousarray(_samples_to_nchw(arrays["samples"], path))
    else:
        raise ValueError(f"path {path!r}: npz needs key 'images' ([N,C,H,W] uint8) or "
                         f"'samples' ([N,H,W,C] uint8), found {sorted(keys)}")
    labels = np.asarray(arrays["labels"]).astype(np.int64) if "labels" in keys else None
    if labels is not None and labels.shape != (len(images),):
        raise ValueError(f"path {path!r}: 'labels' must have shape ({len(images)},), "
                         f"got {labels.shape}")
    return Dataset(images[:max_images], None if labels is None else labels[:max_images], None, path)


# ------------------------------------------------------------------------------------------------
# Writers


def decode(u, dtype=None):
    """uint8 pixels to the diffusion scale, ``y = u / 127.5 − 1`` (the inverse of :func:`quantize`).

    Args:
        u: uint8 numpy array or torch tensor of any shape.
        dtype: result dtype (default float64, numpy or torch to match ``u``).

    Returns:
        Floats in [-1, 1] of the same shape and kind (torch tensors stay on their device).
    """
    if isinstance(u, np.ndarray):
        if u.dtype != np.uint8:
            raise TypeError(f"u must be uint8 pixels, got dtype {u.dtype}")
        return (u.astype(dtype or np.float64) / 127.5 - 1.0).astype(dtype or np.float64, copy=False)
    import torch

    if not torch.is_tensor(u) or u.dtype != torch.uint8:
        raise TypeError(f"u must be a uint8 numpy array or torch tensor, got {getattr(u, 'dtype', type(u).__name__)}")
    return u.to(dtype or torch.float64) / 127.5 - 1.0


def quantize(x):
    """Convert images in [-1, 1] to uint8 exactly as EDM saves its PNGs.

    ``q = floor(clip(x * 127.5 + 128, 0, 255))``, evaluated in float64. This is round-half-up of
    ``x * 127.5 + 127.5``, so ``u / 127.5 - 1`` maps back to ``u`` exactly (also from float32).

    Args:
        x: float array or tensor of any shape (numpy or torch; layout is kept).

    Returns:
        uint8 array of the same shape and kind (torch tensors stay on their device).

    Raises:
        ValueError: ``x`` contains NaN or infinity.
        TypeError: ``x`` is not a floating numpy array or torch tensor.
    """
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"x must be a floating array, got dtype {x.dtype}")
        if not np.isfinite(x).all():
            raise ValueError("x contains non-finite values (NaN or inf); cannot quantize")
        return np.floor(np.clip(x.astype(np.float64) * 127.5 + 128.0, 0.0, 255.0)).astype(np.uint8)
    if hasattr(x, "is_floating_point"):
        import torch

        if not x.is_floating_point():
            raise TypeError(f"x must be a floating tensor, got dtype {x.dtype}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x contains non-finite values (NaN or inf); cannot quantize")
        q = (x.to(torch.float64) * 127.5 + 128.0).clamp_(0.0, 255.0).floor_()
        return q.to(torch.uint8)
    raise TypeError(f"x must be a numpy array or torch tensor, got {type(x).__name__}")


def _chw_to_pil(image, what: str) -> PIL.Image.Image:
    image = _as_numpy(image, what)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"{what} must be uint8 [C, H, W] with C in (1, 3), got "
                         f"{image.dtype} {image.shape}")
    if image.shape[0] == 1:
        return PIL.Image.fromarray(np.ascontiguousarray(image[0]), "L")
    return PIL.Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)), "RGB")


def _png_bytes(image, what: str, compress_level: int) -> bytes:
    buf = io.BytesIO()
    _chw_to_pil(image, what).save(buf, format="png", compress_level=compress_level, optimize=False)
    return buf.getvalue()


def save_png(path: str | os.PathLike, image, *, compress_level: int = 6) -> None:
    """Write one uint8 ``[C, H, W]`` image as PNG (mode RGB for C=3, L for C=1), atomically.

    Args:
        path: destination file; its folder must exist.
        image: uint8 ``[C, H, W]`` numpy array or tensor (use :func:`quantize` first).
        compress_level: zlib level 0-9 (PNG is lossless at every level; EDM's
            ``dataset_tool.py`` uses 0, PIL's default is 6).
    """
    atomic_write_bytes(path, _png_bytes(image, "image", compress_level))


def image_grid(images, rows: int, cols: int):
    """Tile ``rows * cols`` images row-major: image ``i`` goes to row ``i // cols``, column ``i % cols``.

    Args:
        images: ``[rows*cols, C, H, W]`` numpy array or tensor of any dtype.
        rows: number of grid rows.
        cols: number of grid columns.

    Returns:
        ``[C, rows*H, cols*W]`` array of the same kind and dtype.
    """
    if images.ndim != 4 or images.shape[0] != rows * cols:
        raise ValueError(f"images must be [rows*cols, C, H, W] = [{rows * cols}, C, H, W], got "
                         f"shape {tuple(images.shape)}")
    _, c, h, w = images.shape
    grid = images.reshape(rows, cols, c, h, w).permute(2, 0, 3, 1, 4) if hasattr(images, "permute") \
        else images.reshape(rows, cols, c, h, w).transpose(2, 0, 3, 1, 4)
    return grid.reshape(c, rows * h, cols * w)


def save_grid_png(path: str | os.PathLike, images, rows: int, cols: int) -> None:
    """Save a row-major grid of images as one PNG (floats in [-1, 1] are quantized first).

    Args:
        path: destination file.
        images: ``[rows*cols, C, H, W]`` uint8, or float in [-1, 1].
        rows: number of grid rows.
        cols: number of grid columns.
    """
    floating = (images.is_floating_point() if hasattr(images, "is_floating_point")
                else np.issubdtype(images.dtype, np.floating))
    if floating:
        images = quantize(images)
    save_png(path, image_grid(images, rows, cols))


def write_edm_zip(path: str | os.PathLike, images, labels=None) -> None:
    """Write images as an EDM ``dataset_tool.py`` zip (Karras et al. 2022), atomically.

    Layout: ``ZIP_STORED`` members ``"{idx//1000:05d}/img{idx:08d}.png"`` saved with
    ``compress_level=0``, followed by ``dataset.json`` = ``{"labels": [[name, int], ...]}`` or
    ``{"labels": null}``.

    Args:
        path: destination ``.zip``.
        images: uint8 ``[N, C, H, W]`` (C in 1, 3).
        labels: optional ``[N]`` integer class labels.
    """
    images = _as_numpy(images, "images")
    _check_images(images, "images")
    if labels is not None:
        labels = _as_numpy(labels, "labels")
        if labels.shape != (len(images),):
            raise ValueError(f"labels must have shape ({len(images)},), got {labels.shape}")
    buf = io.BytesIO()
    entries = []
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        for idx, image in enumerate(images):
            name = f"{idx // 1000:05d}/img{idx:08d}.png"
            z.writestr(name, _png_bytes(image, f"images[{idx}]", 0))
            if labels is not None:
                entries.append([name, int(labels[idx])])
        z.writestr("dataset.json", strict_json({"labels": entries if labels is not None else None}))
    atomic_write_bytes(path, buf.getvalue())


def write_cifar_batches(directory: str | os.PathLike, images, labels, *, test_images=None,
                        test_labels=None, num_batches: int = 5) -> list[str]:
    """Write a ``cifar-10-batches-py``-style folder of pickled batches (a test-fixture helper).

    The training images are split into ``num_batches`` consecutive ``data_batch_k`` files;
    each is a protocol-2 pickle of ``{"batch_label", "labels", "data" [n, 3072] uint8,
    "filenames"}`` as in the real release, plus ``batches.meta`` with the label names and, when
    given, ``test_batch``.

    Args:
        directory: output folder (created if missing).
        images: uint8 ``[N, 3, 32, 32]`` training images.
        labels: ``[N]`` integer labels.
        test_images: optional uint8 ``[M, 3, 32, 32]`` test images.
        test_labels: ``[M]`` labels for ``test_images``.
        num_batches: number of ``data_batch_k`` files.

    Returns:
        The written file names.
    """
    os.makedirs(directory, exist_ok=True)
    parts = [(f"data_batch_{k + 1}", x, y) for k, (x, y) in
             enumerate(zip(np.array_split(_as_numpy(images, "images"), num_batches),
                           np.array_split(_as_numpy(labels, "labels"), num_batches)))]
    if test_images is not None:
        parts.append(("test_batch", _as_numpy(test_images, "test_images"),
                      _as_numpy(test_labels, "test_labels")))
    written = []
    for name, x, y in parts:
        if x.dtype != np.uint8 or x.shape[1:] != (3, 32, 32) or len(y) != len(x):
            raise ValueError(f"{name}: images must be uint8 [n, 3, 32, 32] with n labels, got "
                             f"{x.dtype} {x.shape} and {len(y)} labels")
        batch = {"batch_label": name, "labels": [int(v) for v in y],
                 "data": np.ascontiguousarray(x.reshape(len(x), -1)),
                 "filenames": [f"{name}_{i:05d}.png" for i in range(len(x))]}
        atomic_write_bytes(os.path.join(directory, name), pickle.dumps(batch, protocol=2))
        written.append(name)
    meta = {"label_names": list(_CIFAR_LABEL_NAMES), "num_cases_per_batch": len(parts[0][1]),
            "num_vis": 3072}
    atomic_write_bytes(os.path.join(directory, "batches.meta"), pickle.dumps(meta, protocol=2))
    return written + ["batches.meta"]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    Readers never see a partial file; on error the temporary file is removed. The file gets the
    mode a plain ``open(path, "w")`` would give (``0o666`` less the umask), so collaborators can
    read it where the umask allows.
    """
    _atomic_write(path, lambda f: f.write(data))


def jsonable(obj):
    """``obj`` in plain JSON types (dicts with string keys, lists, str, int, float, bool, None):
    arrays, tensors and numpy scalars become lists and numbers, paths strings, and every
    non-finite float (NaN, ±infinity) None, i.e. JSON's ``null``: JSON has no NaN or infinity, and a
    strict parser rejects the bare ``NaN``/``Infinity`` that Python's ``json`` writes by default.
    A ``null`` where a number is expected reads "undefined or unbounded" (e.g. the ``sigma_max`` of a
    guided or posterior denoiser, which accepts every σ)."""
    torch = sys.modules.get("torch")  # a tensor exists only if torch was imported
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if torch is not None and isinstance(obj, torch.Tensor):
        return jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def strict_json(obj, *, indent: int | None = None, sort_keys: bool = False, default=None) -> str:
    """The strict JSON text of :func:`jsonable` ``(obj)``: the one encoder of every JSON diffrepro
    writes (files, and JSON stored inside ``.npz`` files). ``allow_nan=False`` makes a non-finite
    float that escaped :func:`jsonable` (e.g. through ``default``) an error, never a bare ``NaN``."""
    return json.dumps(jsonable(obj), indent=indent, sort_keys=sort_keys, default=default, allow_nan=False)


def atomic_write_json(path: str | os.PathLike, obj, *, default=None) -> None:
    """:func:`strict_json` (indent 1, trailing newline) written atomically (:func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, (strict_json(obj, indent=1, default=default) + "\n").encode())


def atomic_save_npz(path: str | os.PathLike, /, **arrays) -> None:
    """``np.savez`` (uncompressed) to ``path`` atomically; the name is used exactly as given.

    Args:
        path: destination file (no ``.npz`` suffix is appended).
        **arrays: arrays to store, by key.
    """
    _atomic_write(path, lambda f: np.savez(f, **arrays))


def _umask() -> int:
    """The process umask, read without changing it where the OS says it (Linux), else by setting
    and restoring it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: str | os.PathLike, write: Callable) -> None:
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600 whatever the umask
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
