# SPDX-License-Identifier: Apache-2.0
"""Certified pruning and commitment of the empirical denoiser, against the float64 oracle and
the dense path: after every call the skipped rows' weights are recomputed densely in float64."""
import math

import numpy as np
import pytest
import torch

from diffrepro import data, noise, pruning, samplers
from diffrepro.denoisers import EmpiricalDenoiser
from diffrepro.ops import finalize
from diffrepro.reference import empirical_denoiser_reference

PRUNE = 1e-12


class Checked:
    """Calls a pruned denoiser and checks, per call, against float64 recomputations: the
    skipped rows carry less than ``prune`` of the largest weight (together), the reported bound
    covers them, and the output is the oracle's."""

    def __init__(self, den, train, labels=None):
        self.den, self.labels = den, labels
        self.train = torch.from_numpy(np.asarray(train)).reshape(len(train), -1).double() / 127.5 - 1
        self.calls, self.skipped_pairs = 0, 0

    def __getattr__(self, name):
        return getattr(self.den, name)

    def __call__(self, x, sigma, class_labels=None):
        out = self.den(x, sigma, class_labels)
        record = self.den._recorder.records[-1]
        b = x.shape[0]
        q = x.reshape(b, -1).to(self.den.dtype).double()  # the query the kernel saw
        sig = torch.as_tensor(sigma, dtype=torch.float64).expand(b)
        classes = None if class_labels is None else torch.as_tensor(class_labels).reshape(b, -1)
        if classes is not None and classes.shape[1] > 1:
            classes = classes.argmax(1)
        for key in list(self.den._pruned):
            mask, rows = self.den._pruned[key].last_computed()
            sel = np.arange(b) if key is None else np.flatnonzero(classes.reshape(-1).numpy() == key)
            if mask.shape[0] != len(sel):
                continue
            d2 = torch.cdist(q[sel], self.train[rows]).square()
            rel = torch.exp(-(d2 - d2.min(1, keepdim=True).values) / (2 * sig[sel, None] ** 2))
            skipped = (rel * torch.from_numpy(~mask)).sum(1)
            assert bool((skipped < PRUNE).all()), skipped.max()
            assert bool((skipped <= torch.from_numpy(record["skipped_bound"][sel]) * (1 + 1e-6) + 1e-300).all())
            self.skipped_pairs += int((~mask).sum())
        ref_rows = self.train if self.labels is None else None
        if ref_rows is not None:
            ref = empirical_denoiser_reference(q, ref_rows, sig)
            tol = 1e-5 if self.den.dtype == torch.float32 else 1e-10
            assert (out.reshape(b, -1).double() - ref).abs().max().item() < tol
        self.calls += 1
        return out


def _latents(n, seed=0):
    return noise.seed_latents(list(range(seed, seed + n)), (3, 32, 32))[0]


def test_edm_sampler_as_is_matches_dense_with_certificate(cifar_subset):
    train = cifar_subset[:400]
    dense = EmpiricalDenoiser(train, prune=0)
    pruned = Checked(EmpiricalDenoiser(train), train)
    lat = _latents(8)
    a = samplers.edm_sampler(dense, lat, num_steps=18)
    b = samplers.edm_sampler(pruned, lat, num_steps=18)
    assert pruned.calls == 35 and pruned.skipped_pairs > 0
    assert (a - b).abs().max().item() < 1e-5
    assert torch.equal(data.quantize(a), data.quantize(b))
    fields = pruning.batch_fields(pruned.den.pop_records())
    # Committed to the training image the dense trajectory ends on, from some σ > σ_min on.
    committed = fields["commit_index"] >= 0
    assert committed.mean() > 0.5
    final = torch.cdist(a.reshape(8, -1), torch.from_numpy(train).reshape(400, -1).double() / 127.5 - 1)
    assert np.array_equal(fields["commit_index"][committed], final.argmin(1).numpy()[committed])
    assert (fields["commit_sigma"][committed] > 0.002).all()
    assert fields["eval_rows_fraction"][-1] < 0.05 and fields["eval_rows_fraction"][0] == 1.0


def test_unrelated_batches_reversed_sigmas_and_far_jump(cifar_subset):
    train = cifar_subset[:400]
    den = Checked(EmpiricalDenoiser(train), train)
    y = torch.from_numpy(train[:8]).double() / 127.5 - 1
    gen = torch.Generator().manual_seed(1)
    x = y + 0.05 * torch.randn(y.shape, generator=gen, dtype=torch.float64)
    for sigma in (0.05, 0.05, 0.02):  # commits to the rows the queries were drawn from
        den(x, sigma)
    assert (den.den.pop_records()[-1]["commit_index"] == np.arange(8)).all()
    other = torch.from_numpy(train[200:208]).double() / 127.5 - 1  # an unrelated batch, same size
    den(other + 0.01 * torch.randn(other.shape, generator=gen, dtype=torch.float64), 0.02)
    assert (den.den.pop_records()[-1]["nearest"] == np.arange(200, 208)).all()
    for sigma in (0.01, 0.1, 1.0, 5.0, 40.0):  # reversed σ order at a fixed query
        den(x, sigma)
    far = x.clone()
    far[3] += 1e3  # jumps far away: every row is far, the bounds must let the right one through
    den(far, 0.02)
    den(x, 0.02)
    assert den.calls == 11


def test_duplicated_rows_are_tied_and_lowest_index_reported(cifar_subset):
    base = cifar_subset[:150]
    train = np.concatenate([base, base[:50], base[:10]])  # rows 150..199 and 200..209 repeat
    den = Checked(EmpiricalDenoiser(train), train)
    dense = EmpiricalDenoiser(train, prune=0)
    lat = _latents(6, seed=7)
    samplers.edm_sampler(den, lat, num_steps=12)
    samplers.edm_sampler(dense, lat, num_steps=12)
    got, want = den.den.pop_records()[-1]["nearest"], dense.pop_records()[-1]["nearest"]
    assert np.array_equal(train[got], train[want])  # the same image (float ties may differ in row)
    y = torch.from_numpy(base[:4]).double() / 127.5 - 1
    out = den(y + 1e-3, 0.01)  # a tie between three copies: their average, i.e. the row
    assert (out - y).abs().max().item() < 1e-5


def test_class_conditional_matches_oracle_per_class(cifar_subset):
    train, labels = cifar_subset[:300], np.arange(300) % 3
    dense = EmpiricalDenoiser(train, labels=labels, prune=0)
    den = EmpiricalDenoiser(train, labels=labels)
    checked = Checked(den, train, labels)
    lat = _latents(6, seed=3)
    classes = torch.tensor([0, 1, 2, 2, 1, 0])
    a = samplers.edm_sampler(dense, lat, classes, num_steps=12)
    b = samplers.edm_sampler(checked, lat, classes, num_steps=12)
    assert (a - b).abs().max().item() < 1e-5
    commit = pruning.batch_fields(den.pop_records())["commit_index"]
    assert (labels[commit[commit >= 0]] == classes.numpy()[commit >= 0]).all()


def test_float64_and_streaming_chunks_and_memmap(cifar_subset, tmp_path, monkeypatch):
    train = cifar_subset[:300]
    lat = _latents(5, seed=11)
    ref = samplers.edm_sampler(EmpiricalDenoiser(train, dtype=torch.float64, prune=0), lat, num_steps=10)
    f64 = Checked(EmpiricalDenoiser(train, dtype=torch.float64), train)
    assert (samplers.edm_sampler(f64, lat, num_steps=10) - ref).abs().max().item() < 1e-10
    chunked = Checked(EmpiricalDenoiser(train, dtype=torch.float64, chunk_rows=70), train)
    assert (samplers.edm_sampler(chunked, lat, num_steps=10) - ref).abs().max().item() < 1e-10
    np.save(tmp_path / "train.npy", train)
    monkeypatch.setattr("diffrepro.denoisers.empirical._RESIDENT_LIMIT_BYTES", 1000)
    mm = EmpiricalDenoiser(np.load(tmp_path / "train.npy", mmap_mode="r"), dtype=torch.float64,
                           chunk_rows=128)
    assert mm._memmap
    out = samplers.edm_sampler(Checked(mm, train), lat, num_steps=10)
    assert (out - ref).abs().max().item() < 1e-10
    assert pruning.batch_fields(mm.pop_records())["eval_rows_fraction"][-1] < 0.1


def test_prune_zero_is_the_dense_kernel_bit_for_bit(cifar_subset):
    # (float32 below the near-tie switch: the float64 kernel, see the near-duplicates test)
    import diffrepro as dr

    train = cifar_subset[:200]
    rows = torch.from_numpy(train).reshape(200, -1)
    x = torch.randn(7, 3, 32, 32, dtype=torch.float64)
    den = EmpiricalDenoiser(train, prune=0)
    for sigma, q in ((30.0, x.reshape(7, -1).float()), (0.7, x.reshape(7, -1))):
        want = dr.empirical_denoiser(q, rows, sigma)
        assert torch.equal(den(x, sigma).reshape(7, -1), want.double())


def test_committed_query_stays_committed_on_its_straight_line(cifar_subset):
    """Once committed at (x_k, σ_k), every point of x(σ) = y_j + (σ/σ_k)(x_k − y_j) keeps the
    commitment (O(D) per call) and returns y_j: the concavity argument of the module."""
    train = cifar_subset[:300]
    den = EmpiricalDenoiser(train, dtype=torch.float64)
    y = torch.from_numpy(train[:3]).double() / 127.5 - 1
    x_k = y + 0.3 * torch.randn(y.shape, dtype=torch.float64)
    sigma_k = 0.3
    den(x_k, sigma_k)
    rec = den.pop_records()[-1]
    assert (rec["commit_index"] == np.arange(3)).all()
    for sigma in np.geomspace(sigma_k, 1e-4, 25):
        out = den(y + (sigma / sigma_k) * (x_k - y), sigma)
        rec = den.pop_records()[-1]
        assert (rec["commit_index"] == np.arange(3)).all() and rec["rows_fraction"] == 1 / 300
        assert torch.equal(out, y.reshape(out.shape))
    margin = pruning.straight_line_margin(5.0, 3.0, 1.0, np.geomspace(1.0, 1e-6, 50), 1000, PRUNE)
    assert (margin > 0).all() == (pruning.straight_line_margin(5.0, 3.0, 1.0, 1.0, 1000, PRUNE) > 0)


def test_records_to_batch_fields_summary_and_plot(cifar_subset, tmp_path):
    train = cifar_subset[:200]
    den = EmpiricalDenoiser(train)
    samplers.edm_sampler(den, _latents(4), num_steps=8)
    fields = pruning.batch_fields(den.pop_records())
    assert fields["eval_n_eff"].shape == (15, 4) and fields["commit_index"].dtype == np.int64
    summary = pruning.summarize([fields, fields], PRUNE)
    assert summary["seeds"] == 8 and summary["prune"] == PRUNE
    assert summary["max_skipped_bound"] < PRUNE
    pruning.plot_commitment([fields], tmp_path / "commit.png")
    assert (tmp_path / "commit.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="records"):
        pruning.batch_fields([])


def test_bounds_of_256_queries_over_a_million_rows_fit_in_1gb():
    b, n = 256, 1_000_000
    assert b * math.ceil(n / pruning.TILE_ROWS) * np.dtype(np.float32).itemsize <= 1e9 / 100


@pytest.mark.parametrize("bad", [-1e-3, 1.0, float("nan"), "x"])
def test_prune_must_be_in_unit_interval(cifar_subset, bad):
    with pytest.raises((ValueError, TypeError), match="prune"):
        EmpiricalDenoiser(cifar_subset[:10], prune=bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tile_rows", [7, 64])
def test_pruned_kernel_restricted_to_active_tiles_matches_oracle(dtype, tile_rows):
    """The C++ kernel alone: random (query, tile) masks; output, n_eff and nearest row over the
    active rows only, and the two best scores of each active tile, against float64 recomputation."""
    gen = torch.Generator().manual_seed(5)
    n, d, b = 150, 24, 9
    rows = torch.randint(0, 256, (n, d), generator=gen, dtype=torch.uint8)
    rows[40] = rows[3]  # a tie across tiles: the lower index wins
    decoded = rows.double() / 127.5 - 1
    chunks = [(rows, np.arange(n))]
    pr = pruning.build_rows(chunks, dtype, tile_rows)
    x = (decoded[torch.randint(0, n, (b,), generator=gen)] + 0.3 * torch.randn(b, d, generator=gen,
                                                                                dtype=torch.float64)).to(dtype)
    x[0] = decoded[3].to(dtype)
    active = torch.rand(b, pr.n_tiles, generator=gen).numpy() < 0.5
    active[:, pr.tile_of[3]] = True
    sigma = 0.4
    state, best, second = pr._kernel(x.numpy(), np.full(b, sigma**-2), active)
    out, info = finalize(state)
    tile_of = torch.from_numpy(pr.tile_of)
    d2 = torch.cdist(x.double(), decoded).square()
    on = torch.from_numpy(active)[:, tile_of]
    logits = torch.where(on, -d2 / (2 * sigma**2), -math.inf)
    w = torch.softmax(logits, 1)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert (out.double() - w @ decoded).abs().max().item() < tol
    assert torch.allclose(info["n_eff"], 1 / w.square().sum(1), rtol=tol)
    assert info["nearest_index"][0].item() == 3
    masked = torch.where(on, d2, math.inf)
    assert torch.equal(info["nearest_index"][1:], masked[1:].argmin(1))
    xc2 = (x.double() - pr.center.double()).square().sum(1, keepdim=True)
    for t in range(pr.n_tiles):
        cols = torch.from_numpy(np.flatnonzero(pr.tile_of == t))
        top = torch.topk(-d2[:, cols], min(2, len(cols)), dim=1).values.neg()
        got = torch.from_numpy(xc2.numpy() - 2 * best[:, t:t + 1])
        sel = torch.from_numpy(active[:, t])
        assert torch.allclose(got[sel, 0], top[sel, 0], rtol=1e-4, atol=1e-3)
        if len(cols) > 1:
            got2 = torch.from_numpy(xc2.numpy() - 2 * second[:, t:t + 1])
            assert torch.allclose(got2[sel, 0], top[sel, 1], rtol=1e-4, atol=1e-3)
        assert np.isneginf(best[~active[:, t], t]).all()


@pytest.mark.parametrize("prune", [0.0, PRUNE])
@pytest.mark.parametrize("storage", ["uint8", "float32"])
def test_bad_query_is_one_clear_error_and_the_denoiser_still_works(cifar_subset, prune, storage):
    # Issue 17: a NaN query to the pruned path said "state has queries that saw no training
    # rows" and poisoned the bounds, so that every later call failed the same way. Both paths
    # now refuse it before touching any state, with the same message, and recover; a query
    # that fails inside the kernel (float32 rows: its distances overflow float32) leaves no
    # state either.
    train = cifar_subset[:96]
    rows = train if storage == "uint8" else (train / np.float32(127.5) - 1).astype(np.float32)
    den, fresh = EmpiricalDenoiser(rows, prune=prune), EmpiricalDenoiser(rows, prune=prune)
    x = _latents(3, seed=7).double() * 0.3
    nan, inf, huge, far = x.clone(), x.clone(), x.clone(), x.clone()
    nan[1, 0, 0, 0] = float("nan")
    inf[2] = float("inf")
    huge[0, 1, 2, 3] = 1e300
    far[1] = 1e38
    errors = [(nan, r"^x must be finite, got 1 NaN/Inf values in a torch.float64 tensor of shape \[3, 3, 32, 32\]"),
              (inf, r"^x must be finite, got 3072 NaN/Inf values")]
    if storage == "uint8":  # (calls this far run in float64: see the near-duplicates test)
        errors.append((huge, r"^x / s must have a squared norm finite in float64, got x up to 1e\+300"))
    else:
        errors += [(huge, r"^x / s must be finite in torch.float32, got x up to 1e\+300"),
                   (far, r"^x and train are finite but their squared distances overflow torch.float32")]
    assert torch.equal(den(x, 0.5), fresh(x, 0.5))
    for bad, message in errors:
        with pytest.raises(ValueError, match=message):
            den(bad, 0.2)
        with pytest.raises(ValueError, match=message):
            den.x0(bad, 0.2, s=2.0)
    for sigma in (0.2, 0.05):
        out = den(x, sigma)  # (a reset bounds state may compute more tiles than fresh's)
        assert torch.allclose(out, fresh(x, sigma), rtol=0, atol=1e-6)
        ref = empirical_denoiser_reference(x.float(), train, sigma)
        assert (out.reshape(3, -1) - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("prune", [0.0, PRUNE])
def test_float32_weights_of_near_duplicates_at_small_sigma_are_the_float64_oracles(cifar_subset, prune):
    # Issue 17: real images and a copy of each one level apart in one pixel, queries whose two
    # copies' logits differ by -2..2. At these sigma the float32 scores' rounding (~1e-3 / sigma^2
    # in logits) decided the copies' weights, differently on the dense and pruned paths; such
    # calls now run in float64 on both (the float32 error bound exceeds one logit there).
    base = cifar_subset[:50]
    twin = base.copy()
    first = twin.reshape(50, -1)[:, 0]
    twin.reshape(50, -1)[:, 0] = np.where(first < 255, first + 1, first - 1)
    train = np.concatenate([base, twin])
    y = torch.from_numpy(train).reshape(100, -1).double() / 127.5 - 1
    den = EmpiricalDenoiser(train, prune=prune)
    gen = torch.Generator().manual_seed(4)
    errors = {}
    for sigma in (0.3, 0.05, 0.01, 0.003):
        x = y[:8] + 0.3 * sigma * torch.randn(8, y.shape[1], generator=gen, dtype=torch.float64)
        gap = y[50:58, 0] - y[:8, 0]  # one level, either sign
        x[:, 0] = 0.5 * (y[:8, 0] + y[50:58, 0]) + torch.linspace(-2, 2, 8, dtype=torch.float64) * sigma**2 / gap
        out = den(x.reshape(8, 3, 32, 32), sigma).reshape(8, -1)
        errors[sigma] = (out - empirical_denoiser_reference(x, y, sigma)).abs().max().item()
    assert max(errors.values()) < 1e-6, errors
