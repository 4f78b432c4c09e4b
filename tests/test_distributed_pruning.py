# SPDX-License-Identifier: Apache-2.0
"""Certified pruning over a training set sharded across real gloo processes: every rank takes the
same decisions from all-reduced numbers, and the result is the one-process one (dense output up to
float rounding, the same committed rows at the same σ), while each rank skips rows."""

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from diffrepro import data, distributed, generation, pruning
from diffrepro.denoisers import EmpiricalDenoiser

N_ROWS = 300
SIGMAS = (20.0, 5.0, 2.0, 1.0, 0.5, 0.2)


@pytest.fixture
def one_thread(monkeypatch):
    monkeypatch.setenv("DIFFREPRO_NUM_THREADS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _setup():
    ds = data.default_dataset()
    images, labels = ds.images[:N_ROWS], ds.labels[:N_ROWS].copy()
    labels[labels == 9] = 8
    labels[:40] = 9  # class 9 lives on the first shard only
    gen = torch.Generator().manual_seed(3)
    start = data.decode(torch.from_numpy(images[[5, 120, 250, 33]]))
    noise = torch.randn(start.shape, generator=gen, dtype=torch.float64)
    return images, labels, start, noise


def _calls(den, start, noise, class_labels=None):
    """A trajectory-like sequence of calls: the same noise shrinking towards its images."""
    outs, records = [], []
    for sigma in SIGMAS:
        x = (start + sigma * noise).float()
        outs.append(den(x, sigma, class_labels).double().numpy())
        records += den.pop_records()
    return np.stack(outs), records


def _worker(rank, world, store, outdir, queue):
    ctx = distributed.init(init_method=f"file://{store}", rank=rank, world_size=world, timeout=60)
    images, labels, start, noise = _setup()
    lo, hi = distributed.shard_bounds(N_ROWS, world, rank)
    den = distributed.ShardedEmpiricalDenoiser(images[lo:hi], lo, ctx, labels=labels[lo:hi], label_dim=11)
    dense = distributed.ShardedEmpiricalDenoiser(images[lo:hi], lo, ctx, labels=labels[lo:hi], label_dim=10,
                                                 prune=0)
    got = {}
    for name, cl in (("uncond", None), ("class9", torch.full((4,), 9))):
        out, records = _calls(den, start, noise, cl)
        got[name] = {"out": out, "dense": _calls(dense, start, noise, cl)[0],
                     "commit_index": np.stack([r["commit_index"] for r in records]),
                     "commit_sigma": np.stack([r["commit_sigma"] for r in records]),
                     "nearest": np.stack([r["nearest"] for r in records]),
                     "rows_fraction": np.array([r["rows_fraction"] for r in records]),
                     "skipped_bound": np.stack([r["skipped_bound"] for r in records])}
    try:  # a different prune on one rank: refused on every rank
        distributed.ShardedEmpiricalDenoiser(images[lo:hi], lo, ctx, prune=1e-12 if rank == 0 else 1e-6)
        got["mixed_prune"] = None
    except ValueError as exc:
        got["mixed_prune"] = str(exc)
    try:  # class 10 has no row on any shard: the same clear error on every rank
        den(start.float(), 1.0, torch.full((4,), 10))
        got["empty_class"] = None
    except ValueError as exc:
        got["empty_class"] = str(exc)
    got["same_on_all_ranks"] = all(np.array_equal(o, got["uncond"]["out"])
                                   for o in ctx.all_gather_object(got["uncond"]["out"]))
    # Two batches of 4 seeds: the bounds of the first batch must not leak into the second.
    m = generation.generate(den, "0-7", outdir, steps=12, batch=4, context=ctx, progress=False)
    got["status"], got["commitment"] = m["status"], m.get("commitment")
    ctx.close()
    if rank == 0:
        queue.put(got)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_pruning_equals_one_process(tmp_path, one_thread, world):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = mp.start_processes(_worker, args=(world, tmp_path / "store", tmp_path / "sharded", queue),
                               nprocs=world, join=False, start_method="spawn")
    got = queue.get(timeout=300)  # before joining: rank 0 exits only once its result is taken
    while not procs.join(timeout=120):
        pass
    assert got["same_on_all_ranks"]
    assert got["mixed_prune"] == "prune must be the same on every rank, got values from 1e-12 to 1e-06"
    assert got["empty_class"] == "class_labels ask for class 10, which has no training rows"

    images, labels, start, noise = _setup()
    for name, cl in (("uncond", None), ("class9", torch.full((4,), 9))):
        one = EmpiricalDenoiser(images, labels=labels, label_dim=10)
        out, records = _calls(one, start, noise, cl)
        dense, _ = _calls(EmpiricalDenoiser(images, labels=labels, label_dim=10, prune=0), start, noise, cl)
        g = got[name]
        assert np.abs(g["dense"] - dense).max() <= 1e-5, name  # the sharded dense path (prune=0)
        assert np.abs(g["out"] - dense).max() <= 1e-5, name
        assert np.abs(g["out"] - out).max() <= 1e-5, name
        # The same decisions as one process: nearest rows, commitments and their σ.
        assert np.array_equal(g["nearest"], np.stack([r["nearest"] for r in records])), name
        assert np.array_equal(g["commit_index"], np.stack([r["commit_index"] for r in records])), name
        assert np.array_equal(g["commit_sigma"], np.stack([r["commit_sigma"] for r in records]), equal_nan=True)
        assert (g["commit_index"][-1] >= 0).all(), name  # every query committed by σ = 0.2
        # Rows skipped: at σ = 20 none; at σ = 0.2 a committed query costs one row (class 9: two of
        # the four queries commit in that very call, after computing its 40 rows).
        assert g["rows_fraction"][0] == 1.0 and g["rows_fraction"][-1] < (0.1 if cl is None else 0.6), name
        assert g["skipped_bound"].max() < pruning.DEFAULT_PRUNE, name
        if cl is not None:  # the class's nearest rows are rows of class 9 (all on shard 0)
            assert set(g["nearest"].ravel()) <= set(np.flatnonzero(labels == 9))

    # generate(): equal to the one-process pruned run, commitment summary in the manifest.
    assert got["status"] == "complete" and got["commitment"]["committed"] > 0
    generation.generate(EmpiricalDenoiser(images), "0-7", tmp_path / "one", steps=12, batch=4, progress=False)
    a, b = generation.load_outputs(tmp_path / "sharded")[1], generation.load_outputs(tmp_path / "one")[1]
    assert np.abs(a - b).max() <= 1e-5
    for i in (0, 4):
        with np.load(tmp_path / "sharded" / "batches" / f"batch-{i:06d}.npz") as s, \
                np.load(tmp_path / "one" / "batches" / f"batch-{i:06d}.npz") as o:
            assert np.array_equal(s["commit_index"], o["commit_index"])
