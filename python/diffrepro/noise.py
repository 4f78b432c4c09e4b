# SPDX-License-Identifier: Apache-2.0
"""Initial noise: EDM per-seed generators, seed lists, noise banks, slerp and noise planes.

EDM's ``StackedRandomGenerator`` convention, seed split and file names (Karras et al. 2022), the
slerp of noises (P1, Zhang et al. 2024, App. A.3) and the noise hyperplane (P1 Fig. 4). Per-seed
noise follows EDM's ``generate.py``: one ``torch.Generator(device).manual_seed(seed % 2**32)`` per
seed. The CUDA (Philox) and CPU (mt19937) streams differ: only CUDA-generated noise reproduces
EDM's reference images.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np
import torch

__all__ = [
    "NoiseBank",
    "StackedRandomGenerator",
    "noise_plane",
    "parse_seeds",
    "seed_filename",
    "seed_latents",
    "slerp",
    "split_seeds",
]


def _as_seed_list(seeds, name: str = "seeds") -> list[int]:
    if isinstance(seeds, str):
        return parse_seeds(seeds)
    if isinstance(seeds, (torch.Tensor, np.ndarray)):
        seeds = seeds.tolist()
    try:
        out = [int(s) for s in seeds]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of ints or a seed string, got {seeds!r}") from None
    if any(s < 0 for s in out):
        raise ValueError(f"{name} must be non-negative ints, got {[s for s in out if s < 0][:5]}")
    return out


class StackedRandomGenerator:
    """One ``torch.Generator`` per seed (EDM's ``StackedRandomGenerator``).

    Args:
        device: device of the generators (``"cuda"`` reproduces EDM's reference noise).
        seeds: sequence of non-negative ints; each generator is seeded with ``seed % 2**32``.
    """

    def __init__(self, device, seeds: Iterable[int]):
        self.generators = [torch.Generator(device).manual_seed(int(s) % (1 << 32)) for s in _as_seed_list(seeds)]

    def _check(self, size):
        if len(size) == 0 or size[0] != len(self.generators):
            raise ValueError(f"size[0] must equal the number of seeds ({len(self.generators)}), got size={tuple(size)}")

    def randn(self, size, **kwargs) -> torch.Tensor:
        """Stacks ``randn(size[1:])`` drawn from each generator; ``size[0]`` = number of seeds."""
        self._check(size)
        return torch.stack([torch.randn(size[1:], generator=g, **kwargs) for g in self.generators])

    def randn_like(self, input: torch.Tensor) -> torch.Tensor:
        """``randn`` with ``input``'s shape, dtype, layout and device (sampler churn noise)."""
        return self.randn(input.shape, dtype=input.dtype, layout=input.layout, device=input.device)

    def randint(self, *args, size, **kwargs) -> torch.Tensor:
        """Stacks ``randint(*args, size=size[1:])`` drawn from each generator."""
        self._check(size)
        return torch.stack([torch.randint(*args, size=size[1:], generator=g, **kwargs) for g in self.generators])


def seed_latents(
    seeds,
    shape: Sequence[int],
    *,
    device="cpu",
    label_dim: int = 0,
    class_idx: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-seed initial noise and class labels exactly as EDM's ``generate.py`` draws them.

    Args:
        seeds: sequence of ints or a seed string (see :func:`parse_seeds`).
        shape: ``(C, H, W)`` of one sample.
        device: generator and output device.
        label_dim: number of classes of a conditional net (0: unconditional).
        class_idx: if given, every label is set to this class. The random labels are still
            drawn first, as EDM does, so the generator state is the same either way.

    Returns:
        ``latents`` float32 ``[S, C, H, W]`` and ``class_labels`` float32 one-hot
        ``[S, label_dim]`` (``None`` when ``label_dim == 0``).
    """
    seeds = _as_seed_list(seeds)
    shape = tuple(int(v) for v in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be (C, H, W) with positive sizes, got {shape}")
    if isinstance(label_dim, bool) or not isinstance(label_dim, int) or label_dim < 0:
        raise ValueError(f"label_dim must be an int >= 0, got {label_dim!r}")
    if class_idx is not None and not (label_dim > 0 and 0 <= class_idx < label_dim):
        raise ValueError(f"class_idx must be in [0, label_dim={label_dim}), got {class_idx!r}")
    rnd = StackedRandomGenerator(device, seeds)
    latents = rnd.randn([len(seeds), *shape], device=device)
    labels = None
    if label_dim:
        labels = torch.eye(label_dim, device=device)[rnd.randint(label_dim, size=[len(seeds)], device=device)]
        if class_idx is not None:
            labels[:, :] = 0
            labels[:, class_idx] = 1
    return latents, labels


# ASCII digits only: str.isdigit() and \d also accept "³", which int() rejects, and "٣", which EDM does not write
_ITEM_RE = re.compile(r"([0-9]+)(?:-([0-9]+))?")


def parse_seeds(spec) -> list[int]:
    """Parses EDM's seed syntax: comma-separated ints and inclusive ranges ``a-b``.

    Example: ``parse_seeds("0-3,100")`` returns ``[0, 1, 2, 3, 100]``. A list of ints is
    returned as a list. Whitespace around items is ignored; digits are ASCII ``0-9``.
    :func:`diffrepro.generation.format_seeds` is its inverse.

    Raises:
        ValueError: for an empty item, a non-integer item or a range with ``b < a``, quoting it.
    """
    if not isinstance(spec, str):
        return _as_seed_list(spec, "spec")
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        m = _ITEM_RE.fullmatch(part)
        if m is None:
            raise ValueError(
                f"seeds must be comma-separated non-negative ints or ranges like '0-63', got item {part!r} in {spec!r}"
            )
        lo = int(m.group(1))
        hi = lo if m.group(2) is None else int(m.group(2))
        if hi < lo:
            raise ValueError(f"seed range must satisfy start <= end, got {part!r} in {spec!r}")
        out.extend(range(lo, hi + 1))
    return out


class NoiseBank:
    """A set of per-seed latents, saved as one ``.npz`` with ``latents`` and ``seeds``.

    Args:
        latents: float32 ``[S, C, H, W]``.
        seeds: int64 ``[S]``, unique.
    """

    def __init__(self, latents, seeds):
        latents = torch.as_tensor(latents)
        seeds = torch.as_tensor(_as_seed_list(seeds), dtype=torch.int64)
        if latents.dtype != torch.float32:
            raise TypeError(f"latents must be float32, got {latents.dtype}")
        if latents.ndim != 4:
            raise ValueError(f"latents must have shape [S, C, H, W], got {tuple(latents.shape)}")
        if latents.shape[0] != seeds.numel():
            raise ValueError(f"seeds must have one entry per latent ({latents.shape[0]}), got {seeds.numel()}")
        if torch.unique(seeds).numel() != seeds.numel():
            raise ValueError("seeds must be unique, got duplicates")
        self.latents = latents
        self.seeds = seeds
        self._index = {int(s): i for i, s in enumerate(seeds.tolist())}

    @classmethod
    def generate(cls, seeds, shape: Sequence[int], *, device="cpu") -> NoiseBank:
        """Draws per-seed latents with :func:`seed_latents` (stored on the CPU)."""
        seeds = _as_seed_list(seeds)
        latents, _ = seed_latents(seeds, shape, device=device)
        return cls(latents.cpu(), seeds)

    def __len__(self) -> int:
        return self.seeds.numel()

    def get(self, seeds) -> torch.Tensor:
        """Latents for ``seeds`` in the given order, float32 ``[len(seeds), C, H, W]``.

        Raises:
            KeyError: naming the missing seeds.
        """
        seeds = _as_seed_list(seeds)
        missing = [s for s in seeds if s not in self._index]
        if missing:
            raise KeyError(
                f"seeds not in the noise bank: {missing[:10]}{' ...' if len(missing) > 10 else ''} "
                f"({len(missing)} missing; the bank holds {len(self)} seeds)"
            )
        return self.latents[[self._index[s] for s in seeds]]

    def save(self, path) -> None:
        """Writes the bank atomically (:func:`diffrepro.data.atomic_save_npz`: readers never see a partial
        file, and the file gets the mode the umask allows, like any other output)."""
        from .data import atomic_save_npz

        atomic_save_npz(path, latents=self.latents.cpu().numpy(), seeds=self.seeds.numpy())

    @classmethod
    def load(cls, path) -> NoiseBank:
        """Reads a bank written by :meth:`save`.

        Raises:
            KeyError: if the file lacks ``latents`` or ``seeds``.
        """
        with np.load(os.fspath(path)) as z:
            for key in ("latents", "seeds"):
                if key not in z.files:
                    raise KeyError(f"noise bank {os.fspath(path)!r} has no array {key!r} (found {z.files})")
            return cls(torch.from_numpy(z["latents"].copy()), torch.from_numpy(z["seeds"].astype(np.int64)))


def slerp(e0: torch.Tensor, e1: torch.Tensor, alpha, *, batched: bool = False) -> torch.Tensor:
    """Spherical interpolation of noises (P1 App. A.3, with ``sin θ`` in the second coefficient's
    denominator where the paper prints ``θ``, and the noises, not the images, interpolated).

    ``slerp = sin((1-a) theta)/sin(theta) e0 + sin(a theta)/sin(theta) e1`` with
    ``theta = arccos(<e0, e1> / (|e0| |e1|))``; falls back to ``(1-a) e0 + a e1`` when
    ``sin(theta) < 1e-6``. Computed in float64, returned in ``e0``'s dtype.

    Args:
        e0: noise tensor, any shape.
        e1: noise tensor, same shape as ``e0``.
        alpha: float, or a 1-D tensor/sequence ``[A]``.
        batched: if True, dim 0 indexes independent pairs and theta is per pair.

    Returns:
        ``e0.shape`` for a float alpha, ``[A, *e0.shape]`` for a vector alpha.
    """
    if not isinstance(e0, torch.Tensor) or not isinstance(e1, torch.Tensor):
        raise TypeError(f"e0 and e1 must be tensors, got {type(e0).__name__} and {type(e1).__name__}")
    if e0.shape != e1.shape:
        raise ValueError(f"e1 must have the shape of e0 {tuple(e0.shape)}, got {tuple(e1.shape)}")
    a = torch.as_tensor(alpha, dtype=torch.float64, device=e0.device)
    if a.ndim > 1:
        raise ValueError(f"alpha must be a float or a 1-D sequence, got shape {tuple(a.shape)}")
    x0, x1 = e0.to(torch.float64), e1.to(torch.float64)
    if batched:
        if e0.ndim < 1:
            raise ValueError("batched=True needs e0 with a leading batch dimension")
        f0, f1 = x0.reshape(x0.shape[0], -1), x1.reshape(x1.shape[0], -1)
        bshape = (x0.shape[0],) + (1,) * (x0.ndim - 1)
    else:
        f0, f1 = x0.reshape(1, -1), x1.reshape(1, -1)
        bshape = (1,) * x0.ndim
    cos = (f0 * f1).sum(1) / (f0.norm(dim=1) * f1.norm(dim=1))
    theta = torch.arccos(cos.clamp(-1, 1)).reshape(bshape)
    sin = torch.sin(theta)
    a_ = a.reshape(a.shape + (1,) * x0.ndim)
    use_lerp = sin < 1e-6
    safe_sin = torch.where(use_lerp, torch.ones_like(sin), sin)
    w0 = torch.where(use_lerp, 1 - a_, torch.sin((1 - a_) * theta) / safe_sin)
    w1 = torch.where(use_lerp, a_, torch.sin(a_ * theta) / safe_sin)
    return (w0 * x0 + w1 * x1).to(e0.dtype)


def noise_plane(
    e1: torch.Tensor,
    e2: torch.Tensor,
    e3: torch.Tensor,
    alphas=None,
    betas=None,
    renormalize: bool = False,
) -> torch.Tensor:
    """Noise hyperplane ``e(a, b) = e1 + a (e2 - e1) + b (e3 - e1)`` (P1 Fig. 4).

    Args:
        e1, e2, e3: anchor noises, same shape ``S`` (e.g. ``[C, H, W]``).
        alphas: ``[A]`` coefficients (default ``linspace(-0.1, 1.1, 100)``).
        betas: ``[B]`` coefficients (default ``linspace(-0.1, 1.1, 100)``).
        renormalize: if True, rescale every noise to the mean norm of the three anchors
            (the reference does not: the norm drops to ~1/sqrt(3) at the centroid).

    Returns:
        ``[A, B, *S]`` in ``e1``'s dtype; entry ``[i, j]`` is ``e(alphas[i], betas[j])``.
    """
    for name, e in (("e2", e2), ("e3", e3)):
        if e.shape != e1.shape:
            raise ValueError(f"{name} must have the shape of e1 {tuple(e1.shape)}, got {tuple(e.shape)}")
    grid = torch.linspace(-0.1, 1.1, 100, dtype=torch.float64)
    a = grid if alphas is None else torch.as_tensor(alphas, dtype=torch.float64)
    b = grid if betas is None else torch.as_tensor(betas, dtype=torch.float64)
    if a.ndim != 1 or b.ndim != 1:
        raise ValueError(f"alphas and betas must be 1-D, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    x1, x2, x3 = (e.to(torch.float64) for e in (e1, e2, e3))
    tail = (1,) * e1.ndim
    out = x1 + a.reshape(-1, 1, *tail) * (x2 - x1) + b.reshape(1, -1, *tail) * (x3 - x1)
    if renormalize:
        target = (x1.norm() + x2.norm() + x3.norm()) / 3
        norms = out.reshape(a.numel(), b.numel(), -1).norm(dim=2).reshape(a.numel(), b.numel(), *tail)
        out = out * (target / norms)
    return out.to(e1.dtype)


def split_seeds(seeds, batch: int, world_size: int = 1, rank: int = 0) -> list[torch.Tensor]:
    """EDM's multi-process batch split (Karras et al. 2022, ``generate.py``).

    ``torch.as_tensor(seeds).tensor_split(ceil(S / (batch * world_size)) * world_size)``,
    then rank ``r`` takes ``[r::world_size]``. Batches may be empty for small ``S``.

    Returns:
        The int64 seed batches of ``rank``.
    """
    seeds = _as_seed_list(seeds)
    for name, v, lo in (("batch", batch, 1), ("world_size", world_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
    if not seeds:
        raise ValueError("seeds must not be empty")
    num_batches = math.ceil(len(seeds) / (batch * world_size)) * world_size
    return list(torch.as_tensor(seeds, dtype=torch.int64).tensor_split(num_batches)[rank::world_size])


def seed_filename(seed: int, subdirs: bool = False) -> str:
    """EDM output name ``f"{seed:06d}.png"``, under ``f"{seed - seed % 1000:06d}/"`` with ``subdirs``."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    seed = int(seed)
    name = f"{seed:06d}.png"
    return f"{seed - seed % 1000:06d}/{name}" if subdirs else name
