# SPDX-License-Identifier: Apache-2.0
"""Provenance maps of the local denoisers (which training patch dominates each output pixel)
against a float64 brute-force argmax written here with explicit loops, on real CIFAR-10 crops;
and the provenance fields, plot and novelty summary of a local ``generate`` run."""

import json

import numpy as np
import pytest
import torch

from diffrepro import plots
from diffrepro.denoisers import LocalScoreDenoiser, PatchSetDenoiser, PCALocalityDenoiser
from diffrepro.generation import generate

N_TRAIN, SIDE = 30, 8


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def real(cifar_subset):
    """uint8 training crops [30, 3, 8, 8] and two float64 noisy held-out crops (σ = 0.5, 2)."""
    train = np.ascontiguousarray(cifar_subset[:N_TRAIN, :, 10:10 + SIDE, 12:12 + SIDE])
    held = cifar_subset[4000:4002, :, 10:10 + SIDE, 12:12 + SIDE].astype(np.float64) / 127.5 - 1
    sigma = np.array([0.5, 2.0])
    x = held + sigma[:, None, None, None] * np.random.default_rng(0).standard_normal(held.shape)
    return train, x, sigma


def _decode(u):
    return np.asarray(u).astype(np.float64) / 127.5 - 1


def _winner(sqdist, sigma):
    """Index and softmax weight of the smallest distance (first on a tie), float64."""
    logits = -np.asarray(sqdist) / (2 * sigma ** 2)
    w = np.exp(logits - logits.max())
    w /= w.sum()
    i = int(np.argmax(logits))
    return i, w[i]


def oracle_pspc(x, y, sigma, p):
    h = x.shape[-1]
    img, wt = np.zeros((h, h), np.int64), np.full((h, h), -1.0)
    for u in range(h - p + 1):
        for v in range(h - p + 1):
            d = [((x[:, u:u + p, v:v + p] - yi[:, u:u + p, v:v + p]) ** 2).sum() for yi in y]
            i, w = _winner(d, sigma)
            for r in range(u, u + p):
                for c in range(v, v + p):
                    if w > wt[r, c]:
                        img[r, c], wt[r, c] = i, w
    rows, cols = np.meshgrid(np.arange(h), np.arange(h), indexing="ij")
    return img, rows, cols, wt


def oracle_ls(x, y, sigma, k):
    h, d = x.shape[-1], k // 2
    xp = np.pad(x, ((0, 0), (d, d), (d, d)))
    yp = np.pad(y, ((0, 0), (0, 0), (d, d), (d, d)))
    img, wt = np.zeros((h, h), np.int64), np.zeros((h, h))
    for r in range(h):
        for c in range(h):
            dist = [((xp[:, r:r + k, c:c + k] - yi[:, r:r + k, c:c + k]) ** 2).sum() for yi in yp]
            img[r, c], wt[r, c] = _winner(dist, sigma)
    rows, cols = np.meshgrid(np.arange(h), np.arange(h), indexing="ij")
    return img, rows, cols, wt


def oracle_els(x, y, sigma, k):
    """Circularly padded query patches against every interior patch of every image."""
    h, d = x.shape[-1], k // 2
    xp = np.pad(x, ((0, 0), (d, d), (d, d)), mode="wrap")
    cands = [(i, r, c) for i in range(len(y)) for r in range(d, h - d) for c in range(d, h - d)]
    out = [np.zeros((h, h), np.int64) for _ in range(3)] + [np.zeros((h, h))]
    for r in range(h):
        for c in range(h):
            q = xp[:, r:r + k, c:c + k]
            dist = [((q - y[i, :, cr - d:cr + d + 1, cc - d:cc + d + 1]) ** 2).sum() for i, cr, cc in cands]
            j, w = _winner(dist, sigma)
            out[0][r, c], out[1][r, c], out[2][r, c] = cands[j]
            out[3][r, c] = w
    return tuple(out)


def oracle_els_borders(x, y, sigma, k):
    """Zero-padded query and candidates; per axis a border coordinate matches only itself, an
    interior one every interior coordinate."""
    h, d = x.shape[-1], k // 2
    xp = np.pad(x, ((0, 0), (d, d), (d, d)))
    yp = np.pad(y, ((0, 0), (0, 0), (d, d), (d, d)))

    def along(t):
        return [t] if t < d or t >= h - d else list(range(d, h - d))

    out = [np.zeros((h, h), np.int64) for _ in range(3)] + [np.zeros((h, h))]
    for r in range(h):
        for c in range(h):
            cands = [(i, cr, cc) for i in range(len(y)) for cr in along(r) for cc in along(c)]
            q = xp[:, r:r + k, c:c + k]
            dist = [((q - yp[i, :, cr:cr + k, cc:cc + k]) ** 2).sum() for i, cr, cc in cands]
            j, w = _winner(dist, sigma)
            out[0][r, c], out[1][r, c], out[2][r, c] = cands[j]
            out[3][r, c] = w
    return tuple(out)


def oracle_pca(x, y, sigma, mask, temperature):
    """Per element m: d_i(m) = Σ_n M[n, m] (x_n − y_in)²; per pixel the channel whose winner weighs most."""
    c, h, _ = x.shape
    sq = (x.reshape(1, -1) - y.reshape(len(y), -1)) ** 2
    dist = sq @ mask  # [N, D]
    img, wt = np.zeros((h, h), np.int64), np.full((h, h), -1.0)
    for ch in range(c):
        for r in range(h):
            for col in range(h):
                i, w = _winner(dist[:, (ch * h + r) * h + col], sigma * np.sqrt(temperature))
                if w > wt[r, col]:
                    img[r, col], wt[r, col] = i, w
    rows, cols = np.meshgrid(np.arange(h), np.arange(h), indexing="ij")
    return img, rows, cols, wt


def _check(got, want, b):
    for key, ref in zip(("image", "row", "col"), want[:3]):
        assert got[key].dtype == torch.int64 and got[key].shape == (2, SIDE, SIDE)
        np.testing.assert_array_equal(got[key][b].numpy(), ref, err_msg=key)
    assert got["weight"].dtype == torch.float64
    np.testing.assert_allclose(got["weight"][b].numpy(), want[3], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("model", ["pspc-3", "pspc-8", "ls-3", "els-3", "elsb-5", "pca"])
def test_provenance_matches_brute_force(real, model):
    train, x, sigma = real
    y = _decode(train)
    name, _, size = model.partition("-")
    k = int(size) if size else None
    if name == "pspc":
        den, oracle = PatchSetDenoiser(train, k, dtype=torch.float64), lambda xb, s: oracle_pspc(xb, y, s, k)
    elif name == "ls":
        den, oracle = LocalScoreDenoiser(train, k, dtype=torch.float64), lambda xb, s: oracle_ls(xb, y, s, k)
    elif name == "els":
        den = LocalScoreDenoiser(train, k, equivariant=True, dtype=torch.float64)
        oracle = lambda xb, s: oracle_els(xb, y, s, k)  # noqa: E731
    elif name == "elsb":
        den = LocalScoreDenoiser(train, k, equivariant=True, borders=True, dtype=torch.float64)
        oracle = lambda xb, s: oracle_els_borders(xb, y, s, k)  # noqa: E731
    else:
        den = PCALocalityDenoiser(train, mask_threshold=0.02, temperature=1.5, dtype=torch.float64)
        oracle = lambda xb, s: oracle_pca(xb, y, s, den.mask(s).numpy(), 1.5)  # noqa: E731 (mask: an input)
    got = den.provenance(torch.from_numpy(x), torch.from_numpy(sigma))
    wants = [oracle(x[b], float(sigma[b])) for b in range(2)]
    assert min(w[3].min() for w in wants) < 0.9  # not a trivially certain softmax
    for b, want in enumerate(wants):
        _check(got, want, b)


def test_provenance_class_conditional_indexes_the_training_set(real):
    """With labels, the winner is reported as a row of the whole training set."""
    train, x, sigma = real
    labels = np.arange(N_TRAIN) % 3
    den = LocalScoreDenoiser(train, 3, labels=labels, dtype=torch.float64)
    got = den.provenance(torch.from_numpy(x), torch.from_numpy(sigma), class_labels=torch.tensor([1, 2]))
    y = _decode(train)
    for b, k in enumerate((1, 2)):
        rows = np.flatnonzero(labels == k)
        want = oracle_ls(x[b], y[rows], float(sigma[b]), 3)
        np.testing.assert_array_equal(got["image"][b].numpy(), rows[want[0]])
        np.testing.assert_allclose(got["weight"][b].numpy(), want[3], rtol=1e-9)


@pytest.mark.parametrize("model", ["pspc", "ls", "els", "els-borders", "pca"])
def test_training_image_at_tiny_sigma_is_its_own_source(real, model):
    """A training image as the query at σ = 0.01: every pixel comes from that image, at its own
    position, with weight ~1 (ELS: interior pixels only; its border queries are circularly
    padded while its candidates are interior patches)."""
    train, _, _ = real
    den = {"pspc": lambda: PatchSetDenoiser(train, 3), "ls": lambda: LocalScoreDenoiser(train, 3),
           "els": lambda: LocalScoreDenoiser(train, 3, equivariant=True),
           "els-borders": lambda: LocalScoreDenoiser(train, 3, equivariant=True, borders=True),
           "pca": lambda: PCALocalityDenoiser(train)}[model]()
    idx = [7, 21]
    got = den.provenance(torch.from_numpy(_decode(train[idx])).float(), 0.01)
    inner = slice(1, SIDE - 1) if model == "els" else slice(0, SIDE)
    rows, cols = np.meshgrid(np.arange(SIDE), np.arange(SIDE), indexing="ij")
    for b, i in enumerate(idx):
        assert (got["image"][b, inner, inner] == i).all()
        np.testing.assert_array_equal(got["row"][b, inner, inner].numpy(), rows[inner, inner])
        np.testing.assert_array_equal(got["col"][b, inner, inner].numpy(), cols[inner, inner])
        assert float(got["weight"][b, inner, inner].min()) > 0.999


def test_generate_local_run_has_provenance_fields_plot_and_novelty(real, tmp_path):
    train, _, _ = real
    den = LocalScoreDenoiser(train, 3)
    out = tmp_path / "run"
    manifest = generate(den, "0-1", out, steps=4, batch=2, progress=False, notes={"train": "cifar crops"})
    (rec,) = sorted((out / "batches").glob("batch-*.npz"))
    with np.load(rec) as z:
        assert z["provenance_image"].dtype == np.int64 and z["provenance_image"].shape == (2, SIDE, SIDE)
        for key in ("provenance_row", "provenance_col"):
            assert z[key].dtype == np.int64 and z[key].shape == (2, SIDE, SIDE)
        assert z["provenance_weight"].dtype == np.float64 and z["provenance_weight"].shape == (2, SIDE, SIDE)
        image, weight = z["provenance_image"], z["provenance_weight"]
        assert image.min() >= 0 and image.max() < N_TRAIN and (weight > 0).all() and (weight <= 1 + 1e-12).all()
        # The last evaluation (σ = 0.002) is the output: where its winner holds almost all the
        # weight, the generated pixel is the source pixel.
        src = _decode(train)[image, :, z["provenance_row"], z["provenance_col"]].transpose(0, 3, 1, 2)
        sure = np.broadcast_to((weight > 0.9999)[:, None], src.shape)
        assert sure.mean() > 0.5
        np.testing.assert_allclose(z["images"][sure], src[sure], atol=1e-3)
    novelty = manifest["novelty"]
    assert novelty["n"] == 2 and novelty["copies"] + novelty["mosaics"] == 2
    for b, seed in enumerate(novelty["seeds"]):
        share = np.bincount(image[b].ravel(), minlength=N_TRAIN).max() / SIDE ** 2
        assert seed["distinct_sources"] == len(np.unique(image[b]))
        assert seed["largest_source_share"] == pytest.approx(share)
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["novelty"]["n"] == 2
    assert (out / "plots" / "provenance.png").exists() == plots.available()
