# SPDX-License-Identifier: Apache-2.0
"""Flow matching (rectified flow) beside the EDM denoisers.

The linear interpolant ``x_t = (1 − t) x0 + t ε`` of flow matching (Lipman et al. 2023), rectified
flow (Liu et al. 2023), Stable Diffusion 3 (Esser et al. 2024) and Flux is the noise family
``s(t) = 1 − t``, ``σ(t) = t/(1 − t)`` (:class:`~diffrepro.schedules.RectifiedFlow`), so every
denoiser gives an exact velocity ``v = E[ε − x0 | x_t] = (x_t − D(x_t/(1 − t); σ(t)))/t``
(:meth:`diffrepro.denoisers.Denoiser.velocity`) and every velocity network gives a denoiser
``D(x̃; σ) = x_t − t v(x_t, t)`` with ``t = σ/(1 + σ)``, ``x_t = x̃/(1 + σ)``
(:class:`VelocityDenoiser`). Theoretical flow generations and a flow network's generations from
the same noise come from :func:`diffrepro.samplers.sample_flow` with the same grid.
"""

from __future__ import annotations

import torch

from .denoisers.base import Denoiser, _bcast, _class_indices, _per_sample

__all__ = ["VelocityDenoiser"]


class VelocityDenoiser(Denoiser):
    """A velocity-predicting flow network (diffusers-style) behind the denoiser interface.

    The network is called as ``net(x_t, timestep)`` or ``net(x_t, timestep, class_labels=labels)``
    with ``timestep = t · timestep_scale`` (diffusers' flow schedulers pass ``1000 t``) and returns
    ``v ≈ ε − x0`` (a tensor, a tuple or an object with ``.sample``), the convention of diffusers'
    ``FlowMatchEulerDiscreteScheduler`` (``x ← x + (t_next − t) v``). :meth:`velocity` calls the
    network directly (also at t = 1); as an EDM denoiser it returns ``x_t − t v`` at
    ``t = σ/(1 + σ)``, so EDM samplers, :func:`diffrepro.inverse.dps` and the autograd
    :meth:`jvp`/:meth:`vjp` work with it too.

    Args:
        net: the network (a torch module or callable).
        img_channels: C (default ``net.config.in_channels``).
        img_resolution: H (default ``net.config.sample_size``).
        label_dim: number of classes (default ``net.config.num_class_embeds`` or 0).
        timestep_scale: the network's timestep per unit t (1000 for diffusers, 1 for t itself).
        dtype: network input dtype (default: its parameters' dtype, else float32).
    """

    def __init__(self, net, *, img_channels: int | None = None, img_resolution: int | None = None,
                 label_dim: int | None = None, timestep_scale: float = 1000.0, dtype: torch.dtype | None = None):
        if not callable(net):
            raise TypeError(f"net must be callable, got {type(net).__name__}")
        cfg = getattr(net, "config", None)
        cfg = dict(cfg) if cfg is not None else {}
        self.net = net
        self.img_channels = int(img_channels if img_channels is not None else cfg.get("in_channels", 0))
        res = img_resolution if img_resolution is not None else cfg.get("sample_size", 0)
        self.img_resolution = int(res[0] if isinstance(res, (tuple, list)) else res)
        if self.img_channels < 1 or self.img_resolution < 1:
            raise ValueError("img_channels and img_resolution are not in net.config; pass them")
        self.label_dim = int(label_dim if label_dim is not None else cfg.get("num_class_embeds") or 0)
        if not timestep_scale > 0:
            raise ValueError(f"timestep_scale must be > 0, got {timestep_scale!r}")
        self.timestep_scale = float(timestep_scale)
        params = getattr(net, "parameters", None)
        first = next(iter(params()), None) if callable(params) else None
        self._net_device = None if first is None else first.device
        self.dtype = dtype or (first.dtype if first is not None else torch.float32)

    def _call(self, x_t: torch.Tensor, t: torch.Tensor, class_labels) -> torch.Tensor:
        """``v(x_t, t)`` from the network, in x_t's dtype and device; t float64 ``[B]``."""
        dev = self._net_device or x_t.device
        labels = _class_indices(class_labels, x_t.shape[0], self.label_dim, dev)
        step = (t * self.timestep_scale).to(device=dev, dtype=self.dtype)
        with torch.set_grad_enabled(x_t.requires_grad):  # a graph only for jvp/vjp
            args = (x_t.to(device=dev, dtype=self.dtype), step)
            out = self.net(*args) if labels is None else self.net(*args, class_labels=labels)
        out = getattr(out, "sample", out)
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out.to(device=x_t.device, dtype=x_t.dtype)

    def velocity(self, x: torch.Tensor, t, class_labels=None) -> torch.Tensor:
        """The network's velocity ``v(x_t, t)``; ``t`` scalar or ``[B]`` in (0, 1]."""
        self._check_x(x)
        t = _per_sample(t, x.shape[0], x.device, "t")
        if bool((t > 1).any()):
            raise ValueError(f"t must be in (0, 1], got {t.tolist()[:8]}")
        return self._call(x, t, class_labels)

    def _denoise(self, x, sigma, class_labels):
        t = sigma / (1 + sigma)
        x_t = x / _bcast(1 + sigma, x)
        return x_t - _bcast(t, x) * self._call(x_t, t, class_labels)
