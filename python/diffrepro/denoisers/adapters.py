# SPDX-License-Identifier: Apache-2.0
"""Adapters that give trained networks (callables, diffusers models, EDM pickles) the
denoiser interface."""

from __future__ import annotations

import math
import os
import pickle
import sys
from typing import Callable

import numpy as np
import torch

from .base import Denoiser, _bcast, _class_indices


class CallableDenoiser(Denoiser):
    """Wrap any callable or torch module ``fn(x, sigma[, class_labels]) -> x0`` as a Denoiser.

    ``fn`` is called without autograd (except inside :meth:`jvp`/:meth:`vjp`) with ``x`` on the
    module's device (the device of its first parameter, else x's) and, when ``dtype`` is given,
    ``x`` and ``sigma`` cast to it (EDM networks cast internally, so leave it None for them).
    ``class_labels`` is passed only when not None. The output is returned in x's dtype and device.

    Args:
        fn: the network or function; it receives the unscaled ``x`` and σ as a float64 ``[B]``.
        img_channels: C.
        img_resolution: H (= W).
        label_dim: number of classes (0: unconditional).
        sigma_min: smallest supported σ.
        sigma_max: largest supported σ.
        round_sigma: optional σ-snapping function (EDM's ``net.round_sigma``).
        dtype: cast inputs to this dtype before calling (None: unchanged).
    """

    def __init__(self, fn: Callable, *, img_channels: int, img_resolution: int,
                 label_dim: int = 0, sigma_min: float = 0.0, sigma_max: float = math.inf,
                 round_sigma: Callable | None = None, dtype: torch.dtype | None = None):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.img_channels, self.img_resolution = int(img_channels), int(img_resolution)
        self.label_dim = int(label_dim)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self._round_sigma, self.dtype = round_sigma, dtype

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma) if self._round_sigma is None else self._round_sigma(sigma)

    def _device(self, x):
        params = getattr(self.fn, "parameters", None)
        first = next(iter(params()), None) if callable(params) else None
        return x.device if first is None else first.device

    def _denoise(self, x, sigma, class_labels):
        dev = self._device(x)
        xin, sin = x.to(dev), sigma.to(dev)
        if self.dtype is not None:
            xin, sin = xin.to(self.dtype), sin.to(self.dtype)
        # A graph only for the autograd Jacobian products (Denoiser.jvp/vjp), which pass an x
        # that requires grad; sampling builds none.
        with torch.set_grad_enabled(x.requires_grad):
            out = self.fn(xin, sin) if class_labels is None else \
                self.fn(xin, sin, torch.as_tensor(class_labels, device=dev))
        return out.to(device=x.device, dtype=x.dtype)


def as_denoiser(obj, **kwargs) -> Denoiser:
    """Adapt ``obj`` to the :class:`Denoiser` interface.

    * A :class:`Denoiser` is returned unchanged.
    * An object with EDM network attributes (``img_channels``, ``img_resolution``) is wrapped
      with those attributes (``label_dim``, ``sigma_min``, ``sigma_max``, ``round_sigma`` too,
      when present); ``kwargs`` override them.
    * Any other callable needs ``img_channels`` and ``img_resolution`` in ``kwargs``.

    Raises:
        TypeError: ``obj`` is not callable, or the image shape is unknown.
    """
    if isinstance(obj, Denoiser):
        return obj
    if not callable(obj):
        raise TypeError(f"obj must be a Denoiser, a torch module or a callable, got "
                        f"{type(obj).__name__}")
    attrs = {}
    if hasattr(obj, "img_channels") and hasattr(obj, "img_resolution"):
        attrs = dict(img_channels=obj.img_channels, img_resolution=obj.img_resolution,
                     label_dim=getattr(obj, "label_dim", 0),
                     sigma_min=getattr(obj, "sigma_min", 0.0),
                     sigma_max=getattr(obj, "sigma_max", math.inf),
                     round_sigma=getattr(obj, "round_sigma", None))
    attrs.update(kwargs)
    if "img_channels" not in attrs or "img_resolution" not in attrs:
        raise TypeError(f"{type(obj).__name__} has no img_channels/img_resolution attributes; "
                        "pass img_channels=... and img_resolution=... to as_denoiser")
    return CallableDenoiser(obj, **attrs)


def _ddpm_alphas_cumprod(config: dict) -> np.ndarray:
    """ᾱ_n (float64 ``[M]``) from a diffusers DDPM/DDIM scheduler config."""
    m = int(config.get("num_train_timesteps", 1000))
    if config.get("rescale_betas_zero_snr"):
        raise ValueError("scheduler_config rescale_betas_zero_snr=True gives ᾱ = 0 (σ = ∞) at the "
                         "last step, which has no EDM σ; it is not supported")
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], dtype=np.float64)
    else:
        kind = config.get("beta_schedule", "linear")
        b0, b1 = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
        if kind == "linear":
            betas = np.linspace(b0, b1, m, dtype=np.float64)
        elif kind == "scaled_linear":
            betas = np.linspace(b0 ** 0.5, b1 ** 0.5, m, dtype=np.float64) ** 2
        elif kind == "squaredcos_cap_v2":
            # Nichol & Dhariwal (2021) cosine schedule, as diffusers' betas_for_alpha_bar.
            abar = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
            t = np.arange(m + 1, dtype=np.float64) / m
            betas = np.minimum(1 - abar(t[1:]) / abar(t[:-1]), 0.999)
        else:
            raise ValueError(f"scheduler_config beta_schedule={kind!r} is not supported; expected "
                             "'linear', 'scaled_linear', 'squaredcos_cap_v2' or trained_betas")
    return np.cumprod(1 - betas)


class DiffusersDenoiser(Denoiser):
    """Adapter for diffusers-style DDPM networks (eps-, v- or x0-prediction).

    EDM's σ and the DDPM marginals are linked by ``ᾱ = 1/(1+σ²)`` (Karras et al. 2022, Table 1, DDPM row): the
    network input is ``x_t = x̃/√(1+σ²)`` and its timestep is found from σ_n = √((1−ᾱ_n)/ᾱ_n):

    * ``timesteps="interpolate"`` (default): a fractional timestep, linear in ``log ᾱ`` between
      the two neighbouring trained steps (as DPM-Solver's discrete-time wrapper, which
      interpolates ``log α`` piecewise linearly), clamped to ``[0, M−1]``;
    * ``timesteps="snap"``: the integer step whose σ_n is nearest (EDM's iDDPM ``round_sigma``);
      ``round_sigma`` then snaps too, so EDM-type samplers only ask for trained σ_n.

    The prediction is converted with the σ actually passed in: eps ``D = x̃ − σ ε̂``,
    v ``D = α x_t − σα v`` (α = 1/√(1+σ²)), sample ``D = output``.

    Args:
        unet: module called as ``unet(x_t, t)`` or ``unet(x_t, t, class_labels=labels)``
            returning a tensor, a tuple or an object with ``.sample``.
        scheduler_config: a diffusers scheduler, its ``.config``, or a dict with
            ``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule`` (or
            ``trained_betas``) and ``prediction_type``.
        img_channels: C (default ``unet.config.in_channels``).
        img_resolution: H (default ``unet.config.sample_size``).
        label_dim: number of classes (default ``unet.config.num_class_embeds`` or 0).
        timesteps: ``"interpolate"`` or ``"snap"``.
        dtype: network dtype for ``x_t`` (default: the unet's parameter dtype).
    """

    def __init__(self, unet, scheduler_config, *, img_channels: int | None = None,
                 img_resolution: int | None = None, label_dim: int | None = None,
                 timesteps: str = "interpolate", dtype: torch.dtype | None = None):
        cfg = getattr(scheduler_config, "config", scheduler_config)
        cfg = dict(cfg)
        ucfg = getattr(unet, "config", {})
        ucfg = dict(ucfg) if ucfg is not None else {}
        self.unet = unet
        self.prediction_type = cfg.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"scheduler_config prediction_type={self.prediction_type!r}; expected "
                             "'epsilon', 'v_prediction' or 'sample'")
        if timesteps not in ("interpolate", "snap"):
            raise ValueError(f"timesteps must be 'interpolate' or 'snap', got {timesteps!r}")
        self.timesteps = timesteps
        abar = _ddpm_alphas_cumprod(cfg)
        self.train_sigmas = np.sqrt((1 - abar) / abar)
        self.sigma_min, self.sigma_max = float(self.train_sigmas[0]), float(self.train_sigmas[-1])
        self.img_channels = int(img_channels if img_channels is not None
                                else ucfg.get("in_channels", 0))
        res = img_resolution if img_resolution is not None else ucfg.get("sample_size", 0)
        self.img_resolution = int(res[0] if isinstance(res, (tuple, list)) else res)
        if self.img_channels < 1 or self.img_resolution < 1:
            raise ValueError("img_channels and img_resolution are not in unet.config; pass them")
        self.label_dim = int(label_dim if label_dim is not None
                             else ucfg.get("num_class_embeds") or 0)
        params = getattr(unet, "parameters", None)
        first = next(iter(params()), None) if callable(params) else None
        self._net_device = None if first is None else first.device
        self.dtype = dtype or (first.dtype if first is not None else torch.float32)

    def _snap_index(self, sigma) -> np.ndarray:
        s = np.asarray(torch.as_tensor(sigma, dtype=torch.float64).cpu()).reshape(-1)
        return np.abs(s[:, None] - self.train_sigmas[None, :]).argmin(1)

    def round_sigma(self, sigma):
        if self.timesteps == "interpolate":
            return torch.as_tensor(sigma)
        t = torch.as_tensor(sigma)
        snapped = torch.from_numpy(self.train_sigmas[self._snap_index(t)])
        return snapped.reshape(t.shape).to(device=t.device, dtype=t.dtype if t.is_floating_point()
                                          else torch.float64)

    def timestep(self, sigma) -> torch.Tensor:
        """Network timestep for each σ: float ``[B]`` (interpolate) or int64 ``[B]`` (snap)."""
        if self.timesteps == "snap":
            return torch.from_numpy(self._snap_index(sigma))
        s = np.asarray(torch.as_tensor(sigma, dtype=torch.float64).cpu()).reshape(-1)
        # −log ᾱ = log(1+σ²) increases with the step index n.
        t = np.interp(np.log1p(s ** 2), np.log1p(self.train_sigmas ** 2),
                      np.arange(len(self.train_sigmas), dtype=np.float64))
        return torch.from_numpy(t).to(torch.float32)

    def _denoise(self, x, sigma, class_labels):
        dev = self._net_device or x.device
        sig = _bcast(sigma, x)
        alpha = 1 / torch.sqrt(1 + sig ** 2)
        x_t = x * alpha
        labels = _class_indices(class_labels, x.shape[0], self.label_dim, dev)
        t = self.timestep(sigma).to(dev)
        with torch.set_grad_enabled(x.requires_grad):  # as in CallableDenoiser
            args = (x_t.to(device=dev, dtype=self.dtype), t)
            out = self.unet(*args) if labels is None else self.unet(*args, class_labels=labels)
        out = getattr(out, "sample", out)
        out = (out[0] if isinstance(out, (tuple, list)) else out).to(device=x.device,
                                                                     dtype=x.dtype)
        if self.prediction_type == "epsilon":
            return x - sig * out
        if self.prediction_type == "v_prediction":
            return alpha * x_t - sig * alpha * out
        return out


def load_edm_pickle(path: str | os.PathLike, edm_root: str | os.PathLike | None = None, *,
                    device="cpu") -> Denoiser:
    """Load an EDM network pickle's ``['ema']`` model and wrap it as a :class:`Denoiser`.

    EDM pickles reference EDM's ``dnnlib``/``torch_utils`` modules, so a checkout of
    https://github.com/NVlabs/edm (not bundled: CC BY-NC-SA) is put at the front of ``sys.path``.
    Unpickling runs code from the file: only load pickles you trust.

    Args:
        path: the ``.pkl`` file (e.g. ``edm-cifar10-32x32-uncond-vp.pkl``).
        edm_root: the EDM checkout (default: the ``EDM_ROOT`` environment variable).
        device: where to move the network.

    Returns:
        A :class:`CallableDenoiser` with the network's attributes (EDM preconditioners take
        float64 x and σ and cast internally).

    Raises:
        ValueError: no ``edm_root``, or the pickle has no ``'ema'`` entry.
        FileNotFoundError: ``path`` or the EDM modules are missing.
    """
    root = edm_root if edm_root is not None else os.environ.get("EDM_ROOT")
    if root is None:
        raise ValueError("edm_root is None and EDM_ROOT is not set: pass the path of an EDM "
                         "checkout (the folder holding dnnlib/ and torch_utils/)")
    root = os.path.abspath(os.fspath(root))
    for module in ("dnnlib", "torch_utils"):
        if not os.path.isdir(os.path.join(root, module)):
            raise FileNotFoundError(f"edm_root {root!r} has no {module}/ folder; expected an EDM "
                                    "checkout (https://github.com/NVlabs/edm)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path {os.fspath(path)!r} does not exist")
    if root not in sys.path:
        sys.path.insert(0, root)
    with open(path, "rb") as f:
        data = pickle.load(f)
    if not isinstance(data, dict) or "ema" not in data:
        raise ValueError(f"path {os.fspath(path)!r} is not an EDM network pickle: no 'ema' entry")
    net = data["ema"].eval().requires_grad_(False).to(device)
    return as_denoiser(net)
