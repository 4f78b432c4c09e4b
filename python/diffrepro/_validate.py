# SPDX-License-Identifier: Apache-2.0
"""Input checks and coercions for the public ops. Every error names the argument, what it got
and what was expected."""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch

ROW_TYPES = {torch.float32: 0, torch.float64: 1, torch.uint8: 2, torch.float16: 3}


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)} on {value.device}"
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} numpy array of shape {list(value.shape)}"
    return f"{type(value).__name__} {value!r}"[:200]


def to_tensor(name: str, value, dtypes: tuple[torch.dtype, ...]) -> tuple[torch.Tensor, bool]:
    """Returns (tensor, came_from_numpy). numpy arrays (np.memmap too) are wrapped without a copy."""
    from_numpy = isinstance(value, np.ndarray)
    if from_numpy:
        with warnings.catch_warnings():  # read-only memmaps: we never write to inputs
            warnings.simplefilter("ignore", UserWarning)
            try:
                tensor = torch.from_numpy(value)
            except TypeError:
                expected = _names(dtypes)
                raise TypeError(f"{name} must have one of the dtypes {expected}, got {_describe(value)}") from None
    elif isinstance(value, torch.Tensor):
        tensor = value
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {_describe(value)}")
    if tensor.dtype not in dtypes:
        raise TypeError(f"{name} must have one of the dtypes {_names(dtypes)}, got {_describe(value)}")
    if torch.is_grad_enabled() and tensor.requires_grad:
        raise ValueError(
            f"{name} requires grad, but diffrepro's kernels are not differentiable; "
            "call under torch.no_grad() or pass a detached tensor"
        )
    return tensor, from_numpy


def _names(dtypes) -> str:
    return "/".join(str(d).replace("torch.", "") for d in dtypes)


def as_rows(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """[R, D] or [R, C, H, W] -> contiguous [R, D] (C-major flatten; copies if not contiguous)."""
    if tensor.ndim not in (2, 4):
        raise ValueError(f"{name} must have shape [R, D] or [R, C, H, W], got {_describe(tensor)}")
    if tensor.shape[1:].numel() == 0:
        raise ValueError(f"{name} must have at least one feature per row, got {_describe(tensor)}")
    rows = tensor.reshape(tensor.shape[0], tensor.shape[1:].numel())
    return rows if rows.is_contiguous() else rows.contiguous()


def check_finite(name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point() or not tensor.numel():
        return
    if tensor.device.type == "cpu" and tensor.dtype != torch.bfloat16:
        # numpy runs this single-threaded: a check on every call must not wake torch's OpenMP
        # pool, whose spinning threads would then compete with the kernel's workers.
        finite = bool(np.isfinite(tensor.detach().numpy()).all())
    else:
        finite = bool(torch.isfinite(tensor).all())
    if not finite:
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{name} must be finite, got {bad} NaN/Inf values in {_describe(tensor)}")


def same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    for name, dev in devices.items():
        if dev != first:
            listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
            raise ValueError(f"all tensors must be on one device, got {listing}")
    return first


def per_query(name: str, value, Q: int, device: torch.device) -> torch.Tensor:
    """A positive finite float or a [Q] tensor/array -> float64 [Q] tensor on `device`."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        return torch.full((Q,), float(value), dtype=torch.float64, device=device)
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a float or a [Q] tensor, got {_describe(value)}")
    if value.ndim == 0:
        value = value.reshape(1).expand(Q)
    if value.shape != (Q,):
        raise ValueError(f"{name} must be a float or have shape [{Q}] (one per query), got {_describe(value)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {_describe(value)}")
    v = value.detach().to(device=device, dtype=torch.float64)
    if not bool((torch.isfinite(v) & (v > 0)).all()):
        raise ValueError(f"{name} must be positive and finite everywhere, got min {float(v.min())}")
    return v.contiguous()


def check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)
