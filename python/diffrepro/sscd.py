# SPDX-License-Identifier: Apache-2.0
"""SSCD copy-detection descriptors: TorchScript loading, preprocessing, batched extraction.

SSCD (Pizzi et al., CVPR 2022, ``facebookresearch/sscd-copy-detection``) maps an image to an
L2-normalised descriptor (ResNe(X)t trunk -> GeM pooling p=3 -> Linear -> L2 normalise); the
cosine of two descriptors is P1's similarity ``M_SSCD`` (SPEC §5.1, §7). diffrepro never
downloads weights: pass the path of a ``*.torchscript.pt`` release file.

Preprocessing presets (all end with ``/255`` then the ImageNet mean/std normalisation):

* ``"p1_pil320"`` (default, P1's pipeline): PIL bilinear resize of the uint8 image to
  320x320 (PIL resamples in two separable passes with uint8 rounding in between).
* ``"torch320"``: ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)``
  to 320x320 on float32, with no uint8 rounding. Batched and device-side, hence faster,
  but not bit-compatible with P1.
* ``"short288"``: SSCD README's recommendation, PIL bilinear resize of the short edge to 288
  keeping the aspect ratio (square images become 288x288).

Measured ``torch320`` vs ``p1_pil320`` difference. The real ``sscd_disc_large`` weights are not
available here, so this was measured with a random stand-in descriptor (conv-conv-GeM(p=3)-
linear-L2, 64-D, linear bias centring the pooled features so that unrelated images get spread
similarities in [-1, 1]; tests/test_sscd.py) on real CIFAR-10 training images
(``cifar10-train-subset.npz``), over all distinct pairs:

=============  ========  ===========  ==========  =========  ====================
images         pairs     mean |Δsim|  p99         max        flips at tau = 0.6
=============  ========  ===========  ==========  =========  ====================
first 256      32,640    1.2e-3       4.0e-3      6.0e-3     16 (0.049%)
first 1,024    523,776   1.1e-3       4.0e-3      1.04e-2    264 (0.050%)
=============  ========  ===========  ==========  =========  ====================

The same image's two descriptors have cosine >= 0.99993. So the SPEC's provisional bound
|Δsim| <= 5e-3 holds for 99% of pairs but **not** for the maximum. Without the centring bias
(all similarities squeezed into [0.67, 1]) the max is 2.1e-4, so the figure depends on the
network; re-measure with the real weights before relying on it. The inputs differ by at most
one grey level (mean 0.30 levels): PIL rounds to uint8 after each separable pass, while both
use half-pixel centres and clamp at the borders. Use ``p1_pil320`` to match P1's numbers.

Feature files (SPEC §9) are ``.npz`` with ``features`` float32 [N, D], ``ids`` (int64 seeds
for generated images, so that ``000123.png`` pairs with id 123; file names otherwise) and
``meta`` (a JSON string).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .data import atomic_save_npz

__all__ = [
    "PRESETS",
    "Features",
    "SSCDExtractor",
    "ids_from_names",
    "load_features",
    "preprocess_images",
    "save_features",
]

PRESETS = ("p1_pil320", "torch320", "short288")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


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
        meta=np.array(json.dumps(meta or {}, sort_keys=True)),
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
    """PIL bilinear resize of uint8 [B, 3, H, W]; ``size_fn(W, H) -> (W', H')``."""
    from PIL import Image

    out = [
        np.asarray(Image.fromarray(np.ascontiguousarray(im.transpose(1, 2, 0))).resize(
            size_fn(im.shape[2], im.shape[1]), Image.BILINEAR))
        for im in images
    ]
    return np.stack(out).transpose(0, 3, 1, 2)


def _short_edge(width: int, height: int, short: int = 288) -> tuple[int, int]:
    # torchvision Resize(int): the short edge becomes `short`, the long one int(short*long/short_edge).
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


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
        x = torch.from_numpy(np.ascontiguousarray(images)).to(device).float().div_(255.0)
        x = F.interpolate(x, size=(320, 320), mode="bilinear", align_corners=False, antialias=False)
    elif preset == "p1_pil320":
        x = torch.from_numpy(_pil_resize(images, lambda w, h: (320, 320))).to(device).float().div_(255.0)
    elif preset == "short288":
        x = torch.from_numpy(_pil_resize(images, _short_edge)).to(device).float().div_(255.0)
    else:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    mean = torch.tensor(_IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(_IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _default_cache_dir() -> Path:
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch")
    return Path(torch_home) / "diffrepro_cache"


class SSCDExtractor:
    """Batched SSCD feature extraction from a TorchScript file.

    Args:
        torchscript_path: path of an SSCD ``*.torchscript.pt`` file (or any TorchScript
            module mapping float32 [B, 3, H, W] to [B, D]).
        preprocess: ``"p1_pil320"`` (P1), ``"torch320"`` or ``"short288"``.
        device: device to run the network on.
        batch_size: images per forward pass.
        grey_to_rgb: replicate single-channel images to RGB instead of rejecting them.
        cache: ``False`` (no cache), ``True`` (``$TORCH_HOME/diffrepro_cache``) or a folder.
            The cache key is sha256(image bytes, shape, dtype) + sha256(model file) + preset
            (+ TF32 when allowed).
        allow_tf32: allow TF32 in the CUDA convolutions/matmuls (PyTorch's cuDNN default, and
            what P1 ran with); ``False`` (default) gives reference-compatible float32.
        progress: show a tqdm progress bar.

    Raises:
        FileNotFoundError: if ``torchscript_path`` does not exist.
        ValueError: for an unknown ``preprocess`` or a non-positive ``batch_size``.
    """

    def __init__(
        self,
        torchscript_path: str | os.PathLike,
        *,
        preprocess: str = "p1_pil320",
        device: str | torch.device = "cpu",
        batch_size: int = 256,
        grey_to_rgb: bool = False,
        cache: bool | str | os.PathLike = False,
        allow_tf32: bool = False,
        progress: bool = True,
    ) -> None:
        self.path = Path(torchscript_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"torchscript_path: no such file {str(self.path)!r}")
        if preprocess not in PRESETS:
            raise ValueError(f"preprocess must be one of {PRESETS}, got {preprocess!r}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.preprocess = preprocess
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.grey_to_rgb = grey_to_rgb
        self.allow_tf32 = allow_tf32
        self.progress = progress
        self.cache_dir = None if cache is False else (_default_cache_dir() if cache is True else Path(cache))
        with warnings.catch_warnings():
            # SSCD is released as TorchScript only; torch >= 2.10 flags jit.load as deprecated.
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*jit.load")
            self.model = torch.jit.load(str(self.path), map_location=self.device).eval()
        self._model_sha256: str | None = None

    @property
    def model_sha256(self) -> str:
        """sha256 of the TorchScript file (computed once, on first use)."""
        if self._model_sha256 is None:
            self._model_sha256 = _sha256_file(self.path)
        return self._model_sha256

    @property
    def meta(self) -> dict[str, Any]:
        """Provenance to store with the features (see :func:`save_features`)."""
        return {
            "model": self.path.name,
            "model_sha256": self.model_sha256,
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
            return load_features(cache_file).features
        feats = self._extract(arr)
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            save_features(cache_file, feats, np.arange(len(feats)), self.meta)
        return feats

    def _extract(self, arr: np.ndarray) -> np.ndarray:
        from tqdm.auto import tqdm

        chunks = []
        saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = self.allow_tf32
        try:
            with torch.inference_mode(), tqdm(
                total=len(arr), desc="sscd", unit="img", disable=not self.progress
            ) as bar:
                for start in range(0, len(arr), self.batch_size):
                    batch = arr[start:start + self.batch_size]
                    out = self.model(preprocess_images(batch, self.preprocess, self.device)).double()
                    if out.ndim != 2 or out.shape[0] != len(batch):
                        raise ValueError(f"the TorchScript model must return [B, D], got {tuple(out.shape)}")
                    # Defensive L2 renormalisation (SPEC §5.1); SSCD already normalises (~1e-7 off).
                    chunks.append(F.normalize(out, dim=1).float().cpu().numpy())
                    bar.update(len(batch))
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
        return np.concatenate(chunks)
