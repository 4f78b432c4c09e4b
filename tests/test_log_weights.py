# SPDX-License-Identifier: Apache-2.0
"""Per-row log-weights in the empirical denoiser: weights exp(-||x/s - y_i||^2 / 2 sigma^2 + lw_i)
on every backend, in partial + merge chunking, pruned vs dense, and as a weighted training set
(integer counts via log(count) equal physically duplicated rows). Oracles: float64 brute force
(diffrepro.reference, and physically duplicated rows)."""

import math

import numpy as np
import pytest
import torch
from helpers import assert_f32_accuracy, assert_f64_accuracy

import diffrepro
from diffrepro import data, reference
from diffrepro.denoisers import EmpiricalDenoiser

N = 150
SIGMAS = [0.08, 0.3, 1.0, 4.0, 20.0, 0.15]


def _problem(cifar_subset, seed=0, excluded=True, side=32):
    """Real CIFAR rows (uint8; side < 32: crops, for fast float64 checks), queries near some of
    them, log-weights in [-4, 4] with some -inf."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.from_numpy(cifar_subset[:N, :, :side, :side].copy())
    y = rows.reshape(N, -1).double() / 127.5 - 1
    pick = torch.tensor([3, 40, 77, 120, 9, 141])
    x = y[pick] + 0.2 * torch.randn(len(pick), y.shape[1], generator=gen, dtype=torch.float64)
    lw = 8 * torch.rand(N, generator=gen, dtype=torch.float64) - 4
    if excluded:
        lw[::7] = -math.inf
        lw[40] = -math.inf  # a query's own row excluded
    return rows, x, torch.tensor(SIGMAS, dtype=torch.float64), lw


def _naive_f32(x, y, sigma, lw):
    x, y = x.float().reshape(len(x), -1), y.float().reshape(len(y), -1)
    logits = -torch.cdist(x, y) ** 2 / (2 * sigma.float()[:, None] ** 2) + lw.float()[None]
    return torch.softmax(logits, 1) @ y


def test_log_weights_match_oracle(backend, cifar_subset):
    rows, x, sigma, lw = _problem(cifar_subset)
    oracle = reference.empirical_denoiser_reference(x, rows, sigma, log_weights=lw)
    naive = _naive_f32(x, rows.double() / 127.5 - 1, sigma, lw)
    for variant in backend.variants[:2]:
        kw = {**backend.kw, **variant}
        out32 = diffrepro.empirical_denoiser(*backend.put(x.float(), rows), sigma, log_weights=lw.float(), **kw)
        assert_f32_accuracy(out32.cpu(), oracle, naive)
        out64 = diffrepro.empirical_denoiser(*backend.put(x, rows), sigma, log_weights=lw, **kw)
        assert_f64_accuracy(out64.cpu(), oracle)


def test_log_weights_info_and_chunk_merges(backend, cifar_subset):
    """Partial states over three chunks merge to the oracle's output, log-normaliser, n_eff and
    nearest row (the row of largest weight: never an excluded row), in every merge order."""
    rows, x, sigma, lw = _problem(cifar_subset, seed=1, side=16)
    oracle = reference.empirical_denoiser_reference(x, rows, sigma, log_weights=lw)
    info = reference.empirical_denoiser_info_reference(x, rows, sigma, log_weights=lw)
    unweighted = reference.empirical_denoiser_info_reference(x, rows, sigma)
    assert (info["nearest_index"] != unweighted["nearest_index"]).any()  # the weights change the mode
    assert bool(torch.isfinite(lw[info["nearest_index"]]).all())
    cuts = [0, 31, 32, 95, N]  # a one-row chunk too
    for variant in backend.variants[:2]:
        kw = {**backend.kw, **variant}
        parts = [diffrepro.empirical_denoiser_partial(*backend.put(x, rows[a:b]), sigma, row_offset=a,
                                                      log_weights=lw[a:b], **kw)
                 for a, b in zip(cuts[:-1], cuts[1:])]
        for order in ([0, 1, 2, 3], [3, 1, 0, 2]):
            state = parts[order[0]]
            for i in order[1:]:
                state = diffrepro.merge_states(state, parts[i])
            out, got = diffrepro.finalize(state)
            assert_f64_accuracy(out.cpu(), oracle)
            assert torch.equal(got["nearest_index"].cpu(), info["nearest_index"])
            torch.testing.assert_close(got["nearest_sqdist"].cpu(), info["nearest_sqdist"], rtol=1e-12, atol=0)
            torch.testing.assert_close(got["log_normalizer"].cpu(), info["log_normalizer"], rtol=1e-12, atol=0)
            torch.testing.assert_close(got["n_eff"].cpu(), info["n_eff"], rtol=1e-9, atol=0)


def test_duplicate_counts_equal_duplicated_rows(backend, cifar_subset):
    """A weighted training set with integer counts c_i (log-weights log c_i, 0 excluded) is the
    training set with each row repeated c_i times (the oracle runs on the repeated rows)."""
    rows, x, sigma, _ = _problem(cifar_subset, seed=2)
    rows = rows[:60]
    counts = torch.from_numpy(np.random.default_rng(5).integers(0, 4, len(rows)))
    repeated = rows.repeat_interleave(counts, 0)
    oracle = reference.empirical_denoiser_reference(x, repeated, sigma)
    naive = _naive_f32(x, repeated.double() / 127.5 - 1, sigma, torch.zeros(len(repeated)))
    lw = counts.double().log()  # log 0 = -inf: the row is left out
    out64 = diffrepro.empirical_denoiser(*backend.put(x, rows), sigma, log_weights=lw, **backend.kw)
    assert_f64_accuracy(out64.cpu(), oracle)
    out32 = diffrepro.empirical_denoiser(*backend.put(x.float(), rows), sigma, log_weights=lw, **backend.kw)
    assert_f32_accuracy(out32.cpu(), oracle, naive)


def test_log_weights_refused(cifar_subset):
    rows, x, sigma, lw = _problem(cifar_subset)
    for bad, what in ((float("nan"), "nan"), (float("inf"), "inf")):
        w = lw.clone()
        w[5] = bad
        with pytest.raises(ValueError, match=f"log_weights must be finite or -inf .*got {what} at row 5"):
            diffrepro.empirical_denoiser(x, rows, sigma, log_weights=w)
    with pytest.raises(ValueError, match=r"log_weights must have shape \[150\]"):
        diffrepro.empirical_denoiser(x, rows, sigma, log_weights=lw[:-1])
    with pytest.raises(TypeError, match="log_weights"):
        diffrepro.empirical_denoiser(x, rows, sigma, log_weights=lw.to(torch.int64))
    with pytest.raises(ValueError, match="log_weights are -inf for all 150 rows"):
        diffrepro.empirical_denoiser(x, rows, sigma, log_weights=torch.full((N,), -math.inf))
    # A chunk whose rows are all excluded contributes nothing; alone it cannot be finalized.
    empty = diffrepro.empirical_denoiser_partial(x, rows[:10], sigma, log_weights=torch.full((10,), -math.inf))
    assert bool((empty.max_logit == -math.inf).all()) and bool((empty.nearest_index == -1).all())
    with pytest.raises(ValueError, match="log-weight -inf"):
        diffrepro.finalize(empty)
    rest = diffrepro.empirical_denoiser_partial(x, rows[10:], sigma, row_offset=10, log_weights=lw[10:])
    out, _ = diffrepro.finalize(diffrepro.merge_states(empty, rest))
    w = torch.cat([torch.full((10,), -math.inf, dtype=torch.float64), lw[10:]])
    assert_f64_accuracy(out, reference.empirical_denoiser_reference(x, rows, sigma, log_weights=w))
    # A NaN training value next to excluded rows is still named (its score must not be skipped).
    bad = rows[:8].reshape(8, -1).double() / 127.5 - 1
    bad[1, 5] = float("nan")
    w = torch.zeros(8, dtype=torch.float64)
    w[0] = -math.inf
    with pytest.raises(ValueError, match="train must be finite, got 1 NaN/Inf values"):
        diffrepro.empirical_denoiser(x, bad, sigma, log_weights=w, _tile=1)
    plain = diffrepro.empirical_denoiser_partial(x, rows[10:], sigma, row_offset=10)
    with pytest.raises(ValueError, match="computed with log_weights and one without"):
        diffrepro.merge_states(empty, plain)


def test_zero_log_weights_change_nothing(cifar_subset):
    """log_weights = 0 is the unweighted denoiser bit for bit (float64 path and nearest rows)."""
    rows, x, sigma, _ = _problem(cifar_subset, seed=3)
    st0 = diffrepro.empirical_denoiser_partial(x, rows, sigma)
    st1 = diffrepro.empirical_denoiser_partial(x, rows, sigma, log_weights=torch.zeros(N))
    out0, i0 = diffrepro.finalize(st0)
    out1, i1 = diffrepro.finalize(st1)
    assert torch.equal(i0["nearest_index"], i1["nearest_index"])
    assert_f64_accuracy(out1, out0)


# ---------------------------------------------------------------------------------------------
# EmpiricalDenoiser: pruned == dense == oracle, class-conditional slicing


def _trajectory(den, start, noise, labels=None):
    outs, nearest = [], []
    for s in (20.0, 5.0, 2.0, 1.0, 0.5, 0.2, 0.05):
        x = (start + s * noise).to(den.dtype)
        outs.append(den(x, s, labels).double())
        nearest.append(den.pop_records()[-1]["nearest"])
    return torch.stack(outs), np.stack(nearest)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_empirical_denoiser_log_weights_pruned_equals_dense(dtype):
    ds = data.default_dataset()
    images = ds.images[:300]
    rng = np.random.default_rng(0)
    lw = rng.uniform(-6, 2, 300)
    lw[rng.random(300) < 0.3] = -np.inf
    start = data.decode(torch.from_numpy(images[[4, 100, 250]]))
    noise = torch.randn(start.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    pruned = EmpiricalDenoiser(images, dtype=dtype, log_weights=lw)
    dense = EmpiricalDenoiser(images, dtype=dtype, log_weights=lw, prune=0)
    got, near_p = _trajectory(pruned, start, noise)
    ref, near_d = _trajectory(dense, start, noise)
    assert np.array_equal(near_p, near_d)
    assert np.isfinite(lw[near_p]).all()
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert (got - ref).abs().max() <= tol
    for k, s in enumerate((20.0, 5.0, 2.0, 1.0, 0.5, 0.2, 0.05)):
        x = (start + s * noise).to(dtype).double()
        oracle = reference.empirical_denoiser_reference(x, images, s, log_weights=lw)
        assert (ref[k].reshape(oracle.shape) - oracle).abs().max() <= tol


def test_empirical_denoiser_class_conditional_log_weights():
    """class_labels use their class's rows with those rows' log-weights (streamed chunks too)."""
    ds = data.default_dataset()
    images, labels = ds.images[:200], ds.labels[:200]
    lw = np.random.default_rng(2).uniform(-3, 3, 200)
    x = data.decode(torch.from_numpy(images[[1, 2, 3, 4]])) + 0.3
    cl = torch.tensor([labels[1], labels[2], 7, 7])
    for kw in ({"prune": 0}, {"prune": 0, "chunk_rows": 17}, {}):
        den = EmpiricalDenoiser(images, labels=labels, dtype=torch.float64, log_weights=lw, **kw)
        out = den(x, 0.7, cl)
        for q in range(4):
            rows = np.flatnonzero(labels == int(cl[q]))
            oracle = reference.empirical_denoiser_reference(x[q:q + 1], images[rows], 0.7, log_weights=lw[rows])
            assert (out[q].reshape(1, -1) - oracle).abs().max() <= 1e-10, kw


def test_empirical_denoiser_log_weights_jvp():
    """The exact Jacobian product with log-weights equals the finite difference of the denoiser."""
    ds = data.default_dataset()
    images = ds.images[:100]
    lw = np.random.default_rng(3).uniform(-2, 2, 100)
    lw[::5] = -np.inf
    den = EmpiricalDenoiser(images, dtype=torch.float64, log_weights=lw, prune=0)
    x = data.decode(torch.from_numpy(images[[7]])) + 0.4 * torch.randn(1, 3, 32, 32, dtype=torch.float64,
                                                                       generator=torch.Generator().manual_seed(0))
    v = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([1.5], dtype=torch.float64)
    jv = den.jvp(x, sigma, v)
    h = 1e-5
    fd = (reference.empirical_denoiser_reference(x + h * v, images, 1.5, log_weights=lw)
          - reference.empirical_denoiser_reference(x - h * v, images, 1.5, log_weights=lw)) / (2 * h)
    assert (jv.reshape(fd.shape) - fd).abs().max() <= 1e-7


def test_empirical_denoiser_log_weights_refused():
    images = data.default_dataset().images[:20]
    with pytest.raises(ValueError, match="log_weights are -inf for all 20 rows"):
        EmpiricalDenoiser(images, log_weights=np.full(20, -np.inf))
    with pytest.raises(ValueError, match=r"log_weights must have shape \[20\]"):
        EmpiricalDenoiser(images, log_weights=np.zeros(19))
    labels = np.arange(20) % 2
    lw = np.where(labels == 1, -np.inf, 0.0)
    den = EmpiricalDenoiser(images, labels=labels, log_weights=lw)
    with pytest.raises(ValueError, match="class 1, whose rows all have log-weight -inf"):
        den(torch.zeros(1, 3, 32, 32), 1.0, torch.tensor([1]))


def test_pruned_log_weights_through_the_cuda_kernel_emulated(cifar_subset):
    """The pruned path with log-weights on the emulated CUDA kernel (as on a GPU), in float64:
    within 1e-10 of the oracle, and the same decisions as the CPU pruned kernel."""
    pytest.importorskip("diffrepro._cuda_emu")
    images = cifar_subset[:300, :, :16, :16].copy()
    rng = np.random.default_rng(4)
    lw = rng.uniform(-5, 1, 300)
    lw[rng.random(300) < 0.25] = -np.inf
    emulated = EmpiricalDenoiser(images, dtype=torch.float64, log_weights=lw)
    rows = emulated._pruned_rows(None)
    rows.emulate, rows.cuda_config = True, 2
    on_cpu = EmpiricalDenoiser(images, dtype=torch.float64, log_weights=lw)
    start = data.decode(torch.from_numpy(images[[10, 200]]))
    noise = torch.randn(start.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for s in (10.0, 2.0, 0.5, 0.1):
        x = start + s * noise
        out = emulated(x, s)
        oracle = reference.empirical_denoiser_reference(x, images, s, log_weights=lw)
        assert (out.reshape(oracle.shape) - oracle).abs().max().item() <= 1e-10
        assert (out - on_cpu(x, s)).abs().max().item() <= 1e-10
    for a, b in zip(emulated.pop_records(), on_cpu.pop_records()):
        np.testing.assert_array_equal(a["nearest"], b["nearest"])
        assert a["rows_fraction"] == b["rows_fraction"]
    assert a["rows_fraction"] < 0.5  # the excluded rows' tiles and far tiles were skipped


# ---------------------------------------------------------------------------------------------
# Sharded over real gloo processes

SHARD_ROWS = 240


def _shard_problem():
    ds = data.default_dataset()
    images, labels = ds.images[:SHARD_ROWS], ds.labels[:SHARD_ROWS]
    rng = np.random.default_rng(6)
    lw = rng.uniform(-4, 2, SHARD_ROWS)
    lw[rng.random(SHARD_ROWS) < 0.3] = -np.inf
    lw[:80][labels[:80] == 3] = 0.0  # class 3 keeps rows on the first shard
    lw[80:][labels[80:] == 3] = -np.inf  # and only there
    start = data.decode(torch.from_numpy(images[[5, 100, 200]]))
    noise = torch.randn(start.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return images, labels, lw, start, noise


def _shard_calls(den, start, noise, cl=None):
    outs, nearest = [], []
    for s in (10.0, 2.0, 0.5, 0.1):
        outs.append(den((start + s * noise).float(), s, cl).double().numpy())
        nearest.append(den.pop_records()[-1]["nearest"])
    return np.stack(outs), np.stack(nearest)


def _shard_worker(rank, world, store, queue):
    from diffrepro import distributed

    ctx = distributed.init(init_method=f"file://{store}", rank=rank, world_size=world, timeout=60)
    images, labels, lw, start, noise = _shard_problem()
    lo, hi = distributed.shard_bounds(SHARD_ROWS, world, rank)
    got = {}
    for prune in (0, 1e-12):
        den = distributed.ShardedEmpiricalDenoiser(images[lo:hi], lo, ctx, labels=labels[lo:hi], label_dim=10,
                                                   prune=prune, log_weights=lw[lo:hi])
        got[prune] = [_shard_calls(den, start, noise, cl) for cl in (None, torch.full((3,), 3))]
    try:  # log-weights on one rank only: the same clear error on every rank
        distributed.ShardedEmpiricalDenoiser(images[lo:hi], lo, ctx, log_weights=lw[lo:hi] if rank == 0 else None)
        got["mixed"] = None
    except ValueError as exc:
        got["mixed"] = str(exc)
    ctx.close()
    if rank == 0:
        queue.put(got)


def test_sharded_log_weights_equal_one_process(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    monkeypatch.setenv("DIFFREPRO_NUM_THREADS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = mp.start_processes(_shard_worker, args=(2, tmp_path / "store", queue), nprocs=2, join=False,
                               start_method="spawn")
    got = queue.get(timeout=300)
    while not procs.join(timeout=120):
        pass
    assert got["mixed"] == "log_weights must be given on every rank or on none, got them on some ranks only"
    images, labels, lw, start, noise = _shard_problem()
    for i, cl in enumerate((None, torch.full((3,), 3))):
        one = EmpiricalDenoiser(images, labels=labels, label_dim=10, log_weights=lw, prune=0)
        out, nearest = _shard_calls(one, start, noise, cl)
        for prune in (0, 1e-12):
            s_out, s_nearest = got[prune][i]
            assert np.abs(s_out - out).max() <= 1e-5, (prune, i)
            assert np.array_equal(s_nearest, nearest), (prune, i)
        assert np.isfinite(lw[nearest]).all()
        if cl is not None:
            assert set(nearest.ravel()) <= set(np.flatnonzero((labels == 3) & np.isfinite(lw)))


def test_fingerprints_record_the_log_weights():
    """Runs resumed with other log-weights are not mistaken for the same run."""
    from diffrepro import distributed

    images = data.default_dataset().images[:20]
    lw = np.linspace(-1, 1, 20)
    plain, a, b = (EmpiricalDenoiser(images, log_weights=w).fingerprint() for w in (None, lw, lw + 1))
    assert "log_weights_sha256" not in plain and a["log_weights_sha256"] != b["log_weights_sha256"]
    shard = [distributed.ShardedEmpiricalDenoiser(images, 0, log_weights=w).fingerprint()["shards"][0]
             for w in (lw, lw + 1)]
    assert shard[0]["log_weights_sha256"] != shard[1]["log_weights_sha256"]
