# SPDX-License-Identifier: Apache-2.0
"""PNG figures for the metrics: similarity matrices, hyperplane maps, score-vs-σ curves and
generations beside their nearest training images.

matplotlib (optional dependency) is imported lazily with the Agg backend; :func:`nn_grid`
needs only Pillow.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["available", "hyperplane_rgb", "nn_grid", "plot_hyperplane_map", "plot_score_vs_sigma",
           "plot_similarity_matrix", "run_title"]

# Pure colours of the three hyperplane classes (anchor 1, 2, 3).
_CLASS_RGB = np.array([[0.85, 0.15, 0.15], [0.15, 0.65, 0.2], [0.2, 0.3, 0.9]])


def available() -> bool:
    """True when matplotlib can be imported (the figures are optional; the image grids need only PIL).

    Imports it rather than looking for it: an installed but broken matplotlib counts as missing,
    so that a command skips its figure instead of failing after computing its result."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("diffrepro.plots needs matplotlib: pip install matplotlib (the plots extra)") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def run_title(dataset: str, seeds: int, sampler: str) -> str:
    """The title of a run's plot: what it was computed on, so that a figure read alone says so."""
    return f"{os.path.basename(str(dataset).rstrip('/')) or dataset}: {seeds} seeds, {sampler}"


def _save(fig, path: str | os.PathLike, title: str | None = None) -> None:
    """Render to memory, then write the PNG atomically (no half-written figure is ever left). The
    title is drawn by the caller and also kept as the PNG's ``Title`` text."""
    from .data import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=150, bbox_inches="tight", metadata={"Title": title} if title else None)
    fig.clf()
    _pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_similarity_matrix(matrix: np.ndarray, path: str | os.PathLike, *, names: Sequence[str] | None = None,
                           title: str | None = None, annotate: bool = True) -> None:
    """Heatmap of an RP/MAE-score matrix (P1 Fig. 3).

    Args:
        matrix: [M, M] scores in [0, 1] (``similarity_matrix(...)["matrix"]``).
        path: output PNG.
        names: M model names for the axes.
        title: figure title.
        annotate: print each value in its cell.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"matrix must be square [M, M], got {matrix.shape}")
    m = matrix.shape[0]
    names = [str(i) for i in range(m)] if names is None else list(names)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * m, 0.8 + 0.6 * m))
    im = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(m), names, rotation=45, ha="right")
    ax.set_yticks(range(m), names)
    if annotate:
        for i in range(m):
            for j in range(m):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center",
                        color="black" if matrix[i, j] > 0.6 else "white", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046)
    if title:
        ax.set_title(title)
    _save(fig, path, title)


def hyperplane_rgb(label: np.ndarray, sim: np.ndarray, *, floor: float = 0.0) -> np.ndarray:
    """RGB image of a hyperplane map: the class colour of ``label`` scaled by ``sim``.

    Args:
        label: [n, n] anchor index 0..2 per point.
        sim: [n, n] max similarity per point.
        floor: similarity shown as black (brightness ``(sim − floor)/(1 − floor)``, clipped).

    Returns:
        float [n, n, 3] in [0, 1].
    """
    bright = np.clip((np.asarray(sim, dtype=np.float64) - floor) / (1.0 - floor), 0.0, 1.0)
    return _CLASS_RGB[np.asarray(label)] * bright[..., None]


def plot_hyperplane_map(result: Mapping[str, np.ndarray] | str | os.PathLike, path: str | os.PathLike, *,
                        title: str | None = None, floor: float = 0.0) -> None:
    """Plot a noise-hyperplane map (P1 Fig. 4): three colour maps by label, brightness by similarity.

    Args:
        result: the dict returned by ``metrics.hyperplane_map`` or its ``.npz`` file
            (``alpha``, ``beta``, ``label``, ``sim``).
        path: output PNG.
        title: figure title.
        floor: similarity mapped to black.
    """
    if isinstance(result, (str, os.PathLike)):
        with np.load(result, allow_pickle=False) as f:
            result = {k: f[k] for k in ("alpha", "beta", "label", "sim")}
    alpha, beta = np.asarray(result["alpha"]), np.asarray(result["beta"])
    rgb = hyperplane_rgb(result["label"], result["sim"], floor=floor)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    # label[i, j] is (alpha[i], beta[j]): alpha on the x axis, beta on the y axis.
    ax.imshow(rgb.transpose(1, 0, 2), origin="lower", interpolation="nearest",
              extent=(alpha[0], alpha[-1], beta[0], beta[-1]))
    for k, (a, b) in enumerate(((0, 0), (1, 0), (0, 1))):
        ax.plot(a, b, marker="o", color="white", markeredgecolor="black")
        ax.annotate(f"x{k + 1}", (a, b), textcoords="offset points", xytext=(5, 5), color="white")
    ax.set_xlabel("alpha")
    ax.set_ylabel("beta")
    if title:
        ax.set_title(title)
    _save(fig, path, title)


def plot_score_vs_sigma(sigmas: Sequence[float], curves: Mapping[str, Sequence[float]], path: str | os.PathLike, *,
                        ylabel: str = "score", title: str | None = None, logx: bool = True,
                        hline: float | None = None) -> None:
    """Line plot of one or more scores against σ (e.g. linearity, score error, weight NMSE).

    Args:
        sigmas: [S] noise levels.
        curves: name -> [S] values.
        path: output PNG.
        ylabel: y-axis label.
        title: figure title.
        logx: log-scale σ axis.
        hline: optional horizontal reference line (e.g. a threshold).
    """
    sigmas = np.asarray(sigmas, dtype=np.float64)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in curves.items():
        values = np.asarray(values, dtype=np.float64)
        if values.shape != sigmas.shape:
            raise ValueError(f"curves[{name!r}] must have shape {sigmas.shape} to match sigmas, got {values.shape}")
        ax.plot(sigmas, values, marker="o", label=name)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel("sigma")
    ax.set_ylabel(ylabel)
    ax.legend()
    if title:
        ax.set_title(title)
    _save(fig, path, title)


_ROW_LABELS = ("generation", "nearest train")


def nn_grid(gen: np.ndarray, train: np.ndarray, nn_index: np.ndarray, path: str | os.PathLike, *,
            per_row: int = 8, scale: int = 2, pad: int = 2, gen_ids: Sequence | None = None,
            dist: Sequence[float] | None = None, title: str | None = None) -> None:
    """Labelled grid PNG: each generation above its nearest training image (Pillow only).

    Rows come in pairs: a left margin says "generation" beside the upper row and "nearest train"
    beside the lower one. Under each training tile its index (``#i``, and the distance when
    ``dist`` is given); under each generation its id (``seed s``) when ``gen_ids`` is given.

    Args:
        gen: uint8 [K, C, H, W] generations (C = 1 or 3).
        train: uint8 [N, C, H, W] training images.
        nn_index: [K] index into ``train`` of each generation's nearest neighbour.
        path: output PNG (written atomically).
        per_row: pairs per row of the grid.
        scale: integer upscaling factor (nearest neighbour).
        pad: white border between tiles, in output pixels.
        gen_ids: optional [K] ids (seeds) of the generations.
        dist: optional [K] distance (or similarity) of each generation to its nearest image.
        title: a line above the grid (e.g. :func:`run_title`), also kept as the PNG's ``Title`` text.
    """
    from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

    from .data import atomic_write_bytes

    gen, train = np.asarray(gen), np.asarray(train)
    if gen.dtype != np.uint8 or train.dtype != np.uint8:
        raise TypeError(f"gen and train must be uint8 images, got {gen.dtype} and {train.dtype}")
    if gen.ndim != 4 or train.ndim != 4 or gen.shape[1:] != train.shape[1:]:
        raise ValueError(f"gen and train must be [K, C, H, W] with equal C, H, W, got {gen.shape} and {train.shape}")
    nn_index = np.asarray(nn_index, dtype=np.int64)
    if nn_index.shape != (len(gen),):
        raise ValueError(f"nn_index must have shape [{len(gen)}], got {nn_index.shape}")
    for name, extra in (("gen_ids", gen_ids), ("dist", dist)):
        if extra is not None and len(extra) != len(gen):
            raise ValueError(f"{name} must have {len(gen)} entries (one per generation), got {len(extra)}")
    font = ImageFont.load_default()
    text_h = max(font.getbbox(label)[3] for label in _ROW_LABELS) + 2
    margin = max(font.getbbox(label)[2] for label in _ROW_LABELS) + 3 * pad
    k, c, h, w = gen.shape
    th, tw = h * scale + text_h + pad, w * scale + pad
    rows = -(-k // per_row)
    head = text_h + pad if title else 0  # the title line
    width = margin + min(k, per_row) * tw + pad
    if title:
        width = max(width, font.getbbox(title)[2] + 2 * pad)
    canvas = Image.new("RGB", (width, head + rows * 2 * th + pad), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, pad), title, fill="black", font=font)
    for r in range(rows):
        for half, label in enumerate(_ROW_LABELS):
            draw.text((pad, head + (2 * r + half) * th + pad + max(0, h * scale - text_h) // 2), label,
                      fill="black", font=font)
    for j in range(k):
        r, col = divmod(j, per_row)
        captions = (None if gen_ids is None else f"seed {gen_ids[j]}",
                    f"#{nn_index[j]}" + ("" if dist is None else f" d={float(dist[j]):.2f}"))
        for half, (img, caption) in enumerate(zip((gen[j], train[nn_index[j]]), captions)):
            tile = np.repeat(np.repeat(img.transpose(1, 2, 0), scale, 0), scale, 1)
            top, left = head + (2 * r + half) * th + pad, margin + col * tw
            canvas.paste(Image.fromarray(tile if c == 3 else tile.repeat(3, axis=2)), (left, top))
            if caption:
                draw.text((left, top + h * scale), caption, fill="black", font=font)
    info = PngImagePlugin.PngInfo()
    if title:
        info.add_text("Title", title)
    buf = io.BytesIO()
    canvas.save(buf, format="png", pnginfo=info)
    atomic_write_bytes(path, buf.getvalue())


def plot_provenance(images: np.ndarray, mosaics: np.ndarray, sources: np.ndarray, seeds: Sequence[int],
                    path: str | os.PathLike, title: str | None = None) -> None:
    """One row per seed: the generation, the mosaic of its source pixels (each output pixel
    replaced by the training pixel that dominates it) and the map of source image indices.

    Args:
        images, mosaics: float [S, C, H, W] in [-1, 1].
        sources: int [S, H, W] training image index per pixel.
        seeds: the S seeds (row labels).
        path: output PNG. title: figure title (``run_title``).
    """
    plt = _pyplot()
    s = len(seeds)
    fig, axes = plt.subplots(s, 3, figsize=(6.0, 2.0 * s + (0.4 if title else 0.0)), squeeze=False)

    def rgb(x):
        x = np.clip((np.asarray(x, dtype=np.float64) + 1) / 2, 0, 1).transpose(1, 2, 0)
        return x[..., 0] if x.shape[-1] == 1 else x

    for r, seed in enumerate(seeds):
        distinct = len(np.unique(sources[r]))
        for ax, img, name in ((axes[r, 0], rgb(images[r]), f"seed {seed}"),
                              (axes[r, 1], rgb(mosaics[r]), "source pixels"),
                              (axes[r, 2], None, f"source image ({distinct} distinct)")):
            if img is None:
                ax.imshow(sources[r], cmap="tab20", interpolation="nearest")
            else:
                ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
            ax.set_title(name, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    _save(fig, path, title)
