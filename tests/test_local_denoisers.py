# SPDX-License-Identifier: Apache-2.0
"""Local analytic denoisers (PSPC, LS/ELS, PCA locality) against float64 oracles written here
with plain loops and explicit padding, on real CIFAR-10 rows (16x16 crops: borders and padding
included, fast)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_f32_accuracy

from diffrepro.denoisers import (
    EmpiricalDenoiser,
    LocalScoreDenoiser,
    PatchSetDenoiser,
    PCALocalityDenoiser,
    StepSchedule,
)
from diffrepro.schedules import edm_sigmas

N_TRAIN = 40
SIGMAS = torch.tensor([0.3, 1.0, 3.0], dtype=torch.float64)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The oracles make many small torch calls: one thread (a shared 2-core machine's spinning
    OpenMP pool makes them 25x slower); the kernels keep their own workers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def real(cifar_subset):
    """uint8 training crops [40, 3, 16, 16] and float64 queries (3 held-out crops + noise)."""
    train = np.ascontiguousarray(cifar_subset[:N_TRAIN, :, 8:24, 4:20])
    held = torch.from_numpy(cifar_subset[4000:4003, :, 8:24, 4:20].astype(np.float64) / 127.5 - 1)
    g = torch.Generator().manual_seed(0)
    x = held + SIGMAS[:, None, None, None] * torch.randn(held.shape, generator=g, dtype=torch.float64)
    return train, x


def _decode(u) -> torch.Tensor:
    return torch.from_numpy(np.asarray(u).astype(np.float64) / 127.5 - 1)


def _softmax_values(q, cands, values, sigma):
    """Σ_c softmax_c(−‖q − cand_c‖²/2σ²) value_c for one query vector (any dtype); distances by
    torch.cdist, as the naive float32 reference of the tolerance rule (helpers.py) computes them."""
    logits = -torch.cdist(q.reshape(1, -1), cands.reshape(len(cands), -1))[0] ** 2 / (2 * sigma ** 2)
    return (torch.softmax(logits, 0)[:, None] * values.reshape(len(values), -1)).sum(0)


def pspc_oracle(x, y, sigma, p, dtype=torch.float64):
    x, y = x.to(dtype), y.to(dtype)
    b, c, h, _ = x.shape
    out, count = torch.zeros_like(x), torch.zeros(h, h, dtype=dtype)
    for j in range(b):
        for u in range(h - p + 1):
            for v in range(h - p + 1):
                crops = y[:, :, u:u + p, v:v + p]
                out[j, :, u:u + p, v:v + p] += _softmax_values(x[j, :, u:u + p, v:v + p], crops, crops,
                                                               float(sigma[j])).reshape(c, p, p)
    for u in range(h - p + 1):
        for v in range(h - p + 1):
            count[u:u + p, v:v + p] += 1
    return out / count


def _local_oracle(x, y, sigma, k, candidates, qpad, dtype):
    """Per pixel q: softmax over the zero-padded training patches at ``candidates(r, c)``
    (padded coordinates = top-left), value = the patch's centre; queries padded with ``qpad``."""
    x, y = x.to(dtype), y.to(dtype)
    d = k // 2
    xp = F.pad(x, (d, d, d, d), mode=qpad)
    yp = F.pad(y, (d, d, d, d))
    b, c, h, _ = x.shape
    out = torch.empty_like(x)
    stacks = {}
    for r in range(h):
        for col in range(h):
            where = tuple(candidates(r, col))
            if where not in stacks:
                stacks[where] = torch.stack([yp[:, :, u:u + k, v:v + k] for u, v in where], 1).reshape(-1, c, k, k)
            cands = stacks[where]
            for j in range(b):
                out[j, :, r, col] = _softmax_values(xp[j, :, r:r + k, col:col + k], cands,
                                                    cands[:, :, d, d], float(sigma[j]))
    return out


def ls_oracle(x, y, sigma, k, dtype=torch.float64):
    return _local_oracle(x, y, sigma, k, lambda r, c: [(r, c)], "constant", dtype)


def els_oracle(x, y, sigma, k, dtype=torch.float64):
    h, d = x.shape[-1], k // 2
    valid = [(u, v) for u in range(d, h - d) for v in range(d, h - d)]
    return _local_oracle(x, y, sigma, k, lambda r, c: valid, "circular", dtype)


def els_borders_oracle(x, y, sigma, k, dtype=torch.float64):
    h, d = x.shape[-1], k // 2

    def kind(i):
        return i if i < d or i >= h - d else "interior"

    def same(r, c):
        return [(u, v) for u in range(h) for v in range(h) if kind(u) == kind(r) and kind(v) == kind(c)]

    return _local_oracle(x, y, sigma, k, same, "constant", dtype)


def pca_mask_oracle(lam, u, sigma, threshold):
    """numpy: Wiener filter of the covariance's eigenpairs, rows / diagonal, binarised."""
    w = (u * (lam / (lam + sigma ** 2))) @ u.T
    diag = np.diag(w).copy()
    diag[np.abs(diag) < 1e-6] = 1.0
    m = w / diag[:, None]
    if threshold > 0:
        m = (np.abs(m) >= threshold * np.abs(m).max()).astype(np.float64)
    return torch.from_numpy(m)


def pca_oracle(x, y, sigma, threshold, temperature, dtype=torch.float64):
    x, y = x.to(dtype).reshape(len(x), -1), y.to(dtype).reshape(len(y), -1)
    lam, u = np.linalg.eigh(np.cov(y.double().numpy().T, bias=True))
    lam = np.clip(lam, 0, None)
    out = torch.empty_like(x)
    for j in range(len(x)):
        m = pca_mask_oracle(lam, u, float(sigma[j]), threshold).to(dtype)
        dist = ((x[j][None] - y) ** 2) @ m  # [N, D]: column m masks element m
        w = torch.softmax(-dist / (2 * float(sigma[j]) ** 2 * temperature), 0)
        out[j] = (w * y).sum(0)
    return out


def _check(den_cls, oracle, real, **kw):
    train, x = real
    y = _decode(train)
    want = oracle(x, y, SIGMAS)
    got64 = den_cls(train, dtype=torch.float64, **kw)(x, SIGMAS)
    assert (got64 - want.reshape(got64.shape)).abs().max().item() <= 1e-10
    got32 = den_cls(train, dtype=torch.float32, **kw)(x.float(), SIGMAS)
    assert got32.dtype == torch.float32
    naive = oracle(x, y, SIGMAS, dtype=torch.float32)
    assert_f32_accuracy(got32, want, naive)
    return got64


def test_pspc_matches_oracle(real):
    _check(lambda t, **kw: PatchSetDenoiser(t, 5, **kw), lambda x, y, s, **kw: pspc_oracle(x, y, s, 5, **kw), real)


def test_ls_matches_oracle(real):
    _check(lambda t, **kw: LocalScoreDenoiser(t, 5, **kw), lambda x, y, s, **kw: ls_oracle(x, y, s, 5, **kw), real)


def test_els_matches_oracle(real):
    _check(lambda t, **kw: LocalScoreDenoiser(t, 3, equivariant=True, **kw),
           lambda x, y, s, **kw: els_oracle(x, y, s, 3, **kw), real)


def test_els_borders_matches_oracle(real):
    _check(lambda t, **kw: LocalScoreDenoiser(t, 5, equivariant=True, borders=True, **kw),
           lambda x, y, s, **kw: els_borders_oracle(x, y, s, 5, **kw), real)


@pytest.mark.parametrize("threshold", [0.02, 0.0])
def test_pca_locality_matches_oracle(real, threshold):
    train, x = real  # 8x8 corners: one kernel pass per distinct mask column (192 of them)
    real = np.ascontiguousarray(train[:, :, :8, :8]), x[:, :, :8, :8].contiguous()
    _check(lambda t, **kw: PCALocalityDenoiser(t, mask_threshold=threshold, temperature=0.5, **kw),
           lambda x, y, s, **kw: pca_oracle(x, y, s, threshold, 0.5, **kw), real)


def test_full_size_patch_and_kernel_equal_the_empirical_denoiser(real, cifar_subset):
    """p = H (one crop) and LS with k >= 2H - 1 (every window covers the image) are the global
    empirical denoiser."""
    train, x = real
    glob = EmpiricalDenoiser(train, dtype=torch.float64, prune=0)(x, SIGMAS)
    assert (PatchSetDenoiser(train, 16, dtype=torch.float64)(x, SIGMAS) - glob).abs().max() <= 1e-12
    assert (LocalScoreDenoiser(train, 31, dtype=torch.float64)(x, SIGMAS) - glob).abs().max() <= 1e-12
    full = np.ascontiguousarray(cifar_subset[:N_TRAIN])
    x32 = _decode(cifar_subset[4000:4002]) + 0.5 * torch.randn(2, 3, 32, 32, dtype=torch.float64)
    want = EmpiricalDenoiser(full, dtype=torch.float64, prune=0)(x32, 0.5)
    assert (PatchSetDenoiser(full, 32, dtype=torch.float64)(x32, 0.5) - want).abs().max() <= 1e-12


def test_schedule_maps_sigma_to_the_nearest_step(real):
    sched = StepSchedule([32, 23, 15, 3], sigmas=[80.0, 10.0, 1.0, 0.1])
    assert [sched.at(s) for s in (100.0, 50.0, 6.0, 0.9, 0.6, 0.002)] == [32, 32, 23, 15, 15, 3]
    default = StepSchedule([32] * 7 + [23, 15, 11, 7, 5] + [3] * 6)
    grid = edm_sigmas(18).tolist()
    assert [default.at(s) for s in grid] == default.sizes
    # a batch whose queries sit at different steps: each gets its own patch size
    train, x = real
    den = PatchSetDenoiser(train, [16, 5], sigmas=[3.0, 0.3], dtype=torch.float64)
    got = den(x[:2], torch.tensor([3.0, 0.3], dtype=torch.float64))
    y = _decode(train)
    want16 = pspc_oracle(x[:1], y, [3.0], 16)
    want5 = pspc_oracle(x[1:2], y, [0.3], 5)
    assert (got - torch.cat([want16, want5])).abs().max() <= 1e-10


def test_class_conditional_uses_the_class_images(real, cifar_subset):
    train, x = real
    labels = np.arange(N_TRAIN) % 3
    den = LocalScoreDenoiser(train, 3, equivariant=True, labels=labels, dtype=torch.float64)
    got = den(x, SIGMAS, class_labels=torch.tensor([2, 0, 2]))
    y = _decode(train)
    for j, k in enumerate([2, 0, 2]):
        want = els_oracle(x[j:j + 1], y[labels == k], SIGMAS[j:j + 1], 3)
        assert (got[j:j + 1] - want).abs().max() <= 1e-10
    pspc = PatchSetDenoiser(train, 8, labels=labels, dtype=torch.float64)
    got = pspc(x[:1], SIGMAS[:1], class_labels=torch.tensor([1]))
    assert (got - pspc_oracle(x[:1], y[labels == 1], SIGMAS[:1], 8)).abs().max() <= 1e-10


def test_streamed_chunks_are_exact(real, monkeypatch):
    """Candidate rows streamed in many small chunks merge to the one-chunk result (no per-chunk
    normalisation)."""
    from diffrepro.denoisers import local

    train, x = real
    whole = LocalScoreDenoiser(train, 3, equivariant=True, dtype=torch.float64)(x, SIGMAS)
    boxed = LocalScoreDenoiser(train, 5, dtype=torch.float64)(x, SIGMAS)
    monkeypatch.setattr(local, "_CHUNK_BYTES", 5000)
    monkeypatch.setattr(local, "_DENSE_BLOCK", 3 * 3 * 256 * 7)  # 7 images per chunk
    chunked = LocalScoreDenoiser(train, 3, equivariant=True, dtype=torch.float64)(x, SIGMAS)
    assert (whole - chunked).abs().max() <= 1e-12
    again = LocalScoreDenoiser(train, 5, dtype=torch.float64)(x, SIGMAS)
    assert (boxed - again).abs().max() <= 1e-12


@pytest.mark.parametrize("bad, match", [
    (dict(kernel_size=4), "odd"), (dict(kernel_size=[3, 0]), "positive"), (dict(kernel_size="3"), "positive"),
    (dict(kernel_size=3, borders=True), "equivariant=True"), (dict(kernel_size=3, sigmas=[1.0]), "sigmas"),
    (dict(kernel_size=[3, 5], sigmas=[1.0, 2.0, 3.0]), "sigmas must be 2")])
def test_bad_arguments_are_one_clear_error(real, bad, match):
    with pytest.raises(ValueError, match=match):
        LocalScoreDenoiser(real[0], **bad)


def test_bad_patch_and_pca_arguments(real):
    with pytest.raises(ValueError, match="patch_size must be <= the image size 16"):
        PatchSetDenoiser(real[0], 17)
    with pytest.raises(ValueError, match="temperature"):
        PCALocalityDenoiser(real[0], temperature=0)
    with pytest.raises(ValueError, match="mask_threshold"):
        PCALocalityDenoiser(real[0], mask_threshold=-1)


@pytest.mark.parametrize("model, flags", [
    ("pspc", ["--patch-size", "8,8,4,4", "--class", "1"]), ("ls", ["--patch-size", "3"]),
    ("els", ["--patch-size", "3"]), ("pca-locality", ["--mask-threshold", "0.05"])])
def test_generate_cli_runs_each_local_model(tmp_path, cifar_subset, model, flags):
    train = tmp_path / "train.npz"
    np.savez(train, images=np.ascontiguousarray(cifar_subset[:24, :, :8, :8]), labels=np.arange(24) % 3)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "diffrepro", "generate", "--train", str(train), "--denoiser", model, *flags,
           "--seeds", "0-1", "--steps", "4", "--outdir", str(out), "--no-progress"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    manifest = json.loads((out / "manifest.json").read_text())
    model_id = manifest["config"]["denoiser"]["model"]
    assert model_id["name"] == model
    if model == "pspc":  # the schedule refers to the run's own grid
        assert model_id["patch_size"] == {"sizes": [8, 8, 4, 4], "sigmas": manifest["sampler_detail"]["sigmas"][:-1]}
    assert manifest["status"] == "complete" and (out / "000001.png").exists()
    again = subprocess.run(cmd, check=True, capture_output=True, text=True)
    assert "0 generated, 2 reused" in again.stdout


def test_generate_cli_refuses_bad_local_flags(tmp_path, capsys):
    from diffrepro.cli import main

    base = ["generate", "--outdir", str(tmp_path / "o"), "--max-train", "8", "--no-progress"]
    for flags, message in ((["--denoiser", "pspc"], "--patch-size: missing"),
                           (["--denoiser", "ls", "--patch-size", "3,5"], "--patch-size: got 2 sizes"),
                           (["--denoiser", "els", "--patch-size", "x"], "--patch-size"),
                           (["--denoiser", "empirical", "--patch-size", "3"], "--patch-size: got '3'"),
                           (["--denoiser", "ls", "--patch-size", "3", "--dry-run"], "--dry-run")):
        code = main(base + flags)
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (flags, err)


def test_cli_choices_are_the_local_models():
    from diffrepro.cli.generate import LOCAL_CHOICES
    from diffrepro.denoisers.local import LOCAL_MODELS

    assert LOCAL_CHOICES == LOCAL_MODELS


def test_small_sigma_batch_is_finite_and_exact(real):
    """Three queries at σ = 0.01-0.1 in one call: each query has its own running max (a shared
    one, as in one reference module, underflows every weight of some query to 0/0)."""
    train, x = real
    sig = torch.tensor([0.01, 0.03, 0.1], dtype=torch.float64)
    want = els_oracle(x, _decode(train), sig, 3)
    got = LocalScoreDenoiser(train, 3, equivariant=True, dtype=torch.float64)(x, sig)
    assert (got - want).abs().max() <= 1e-10
    got32 = LocalScoreDenoiser(train, 3, equivariant=True)(x.float(), sig)
    assert bool(torch.isfinite(got32).all()) and (got32.double() - want).abs().max() <= 1e-4


def test_flow_velocity_at_t1_is_the_training_mean(real):
    """At t = 1 (σ = 1e30) every softmax is uniform: PSPC and LS return the training mean image,
    so the flow velocity is x − mean."""
    train, x = real
    mean = _decode(train).mean(0)
    for den in (PatchSetDenoiser(train, 5, dtype=torch.float64), LocalScoreDenoiser(train, 3, dtype=torch.float64)):
        v = den.velocity(x, 1.0)
        assert (v - (x - mean)).abs().max() <= 1e-12


def flex_oracle(x, y, sigma, masks, dtype=torch.float64):
    """Per pixel: the masked pixels' posterior mean over the same pixels of every image, added
    to the composite over the mask (Niedoba et al. 2024's PSPCDenoiser loop)."""
    x, y = x.to(dtype), y.to(dtype)
    b, c, h, _ = x.shape
    out, count = torch.zeros(b, c, h * h, dtype=dtype), torch.zeros(h * h, dtype=dtype)
    for m in masks:
        idx = np.flatnonzero(m)
        rows = y.reshape(len(y), c, -1)[:, :, idx]
        for j in range(b):
            out[j][:, idx] += _softmax_values(x[j].reshape(c, -1)[:, idx], rows, rows,
                                              float(sigma[j])).reshape(c, -1)
        count[idx] += 1
    return (out / count).reshape(x.shape)


def test_flex_matches_oracle(real):
    """Random heatmaps (no ties), thresholds 1 (every mask the whole image) and 0.3; the oracle's
    masks come from numpy: ascending sort, cumulative share >= 1 - threshold."""
    from diffrepro.denoisers import FlexPatchSetDenoiser

    train, x = real
    train, x = np.ascontiguousarray(train[:, :, :8, :8]), x[:, :, :8, :8].contiguous()
    heat = np.random.default_rng(0).random((2, 8, 8, 8, 8)) ** 4
    sig = [3.0, 0.3]

    def masks(t, thr):
        out = []
        for r in range(8):
            for col in range(8):
                h = heat[t, r, col].reshape(-1)
                order = np.argsort(h, kind="stable")
                keep = np.empty(64, bool)
                keep[order] = np.cumsum(h[order] / h.sum()) >= 1 - thr
                out.append(keep)
        return out

    s = torch.tensor([3.0, 0.3, 0.3], dtype=torch.float64)
    y = _decode(train)
    want = torch.cat([flex_oracle(x[:1], y, s[:1], masks(0, 1.0)), flex_oracle(x[1:], y, s[1:], masks(1, 0.3))])
    den = FlexPatchSetDenoiser(train, heat, [1.0, 0.3], sigmas=sig, dtype=torch.float64)
    assert (den(x, s) - want).abs().max() <= 1e-10
    assert den.fingerprint()["model"]["name"] == "pspc-flex"
    with pytest.raises(ValueError, match="heatmaps must have shape"):
        FlexPatchSetDenoiser(train, heat[:, :4], [1.0, 0.3], sigmas=sig)
