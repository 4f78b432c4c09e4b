# SPDX-License-Identifier: Apache-2.0
"""Certified pruning and commitment (``EmpiricalDenoiser(prune=1e-12)``) against the dense
denoiser (``prune=0``), side by side in one run: Heun 18 theoretical generations end to end
(:func:`diffrepro.generate`, PNGs and npz included), the same seeds and noise.

Cases (``DIFFREPRO_BENCH_SIZES``):

* real images: ``small`` 64 seeds over 1,024 rows; ``paper`` 1,000 seeds over the 5,170;
* augmented set (each image, its flip and 1-pixel shifts: 10 rows per image): ``small`` 32 seeds
  over 5,120 rows; ``paper`` 256 seeds over 51,700 rows, plus the torch peer (chunked GEMM and
  online log-sum-exp) timed on the first ``peer_calls`` evaluations and extrapolated.

Checked in every timed case: every quantised image identical to dense, float outputs within
1e-5, every committed seed committed to the training image nearest the dense output. Reported:
time ratio pruned/dense end to end (median of rounds, with each round's ratio) and inside the
denoiser calls only (the sampler's steps and the PNG/npz writes cost both runs the same), the
fraction of (query, row) pairs
computed, the bookkeeping (time inside the denoiser but outside the kernels) relative to the
dense time, the memory of the bounds of 256 queries over 1,000,000 rows, and the time
extrapolated to 10,000 seeds over 50,000 images.
"""
import time

import numpy as np
import pytest
import torch

from diffrepro import benchmarks, data, generation, noise, pruning
from diffrepro.denoisers import CallableDenoiser, EmpiricalDenoiser

STEPS = 18
NFE = generation.nfe("heun", STEPS)
SIZES = {"small": {"real": (64, 1024), "aug": (32, 512), "rounds": 3, "peer_calls": 3},
         "paper": {"real": (1000, None), "aug": (256, None), "rounds": 3, "peer_calls": 2}}
OUTPUTS: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The kernels run on their own workers; torch's intra-op pool only serves the sampler's
    elementwise float64 steps, and on a small, loaded machine its spinning threads cost both
    runs several seconds per trajectory (measured: 8 of 44 s on 2 cores). One thread for both."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sizes(bench_sizes):
    return SIZES[next(k for k, v in benchmarks.SIZES.items() if v is bench_sizes)]


def augment(images: np.ndarray) -> np.ndarray:
    """Each image, its horizontal flip, and both shifted by one pixel in each of the four
    directions (edge rows/columns repeated): 10 rows per image, in image-major order."""
    def shift(a, dy, dx):
        p = np.pad(a, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
        h, w = a.shape[2:]
        return p[:, :, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    out = []
    for a in (images, images[..., ::-1]):
        out += [a, *(shift(a, dy, dx) for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)))]
    return np.ascontiguousarray(np.stack(out, 1).reshape(-1, *images.shape[1:]))


@pytest.fixture(scope="module")
def sets(real_cifar, sizes):
    real = real_cifar.numpy()
    k, n = sizes["real"]
    ka, na = sizes["aug"]
    return {"real": (k, real[:n]), "aug": (ka, augment(real[:na]))}


def _run(den, seeds, outdir):
    start = time.perf_counter()
    generation.generate(den, seeds, outdir, steps=STEPS, noise_device="cpu", progress=False)
    return time.perf_counter() - start


def _check_same_generations(dense_dir, pruned_dir, train, records):
    """Quantised images identical, floats within 1e-5, committed rows = dense nearest rows."""
    _, a = generation.load_outputs(dense_dir)
    _, b = generation.load_outputs(pruned_dir)
    assert np.abs(a - b).max() <= 1e-5
    assert np.array_equal(data.quantize(torch.from_numpy(a)).numpy(),
                          data.quantize(torch.from_numpy(b)).numpy())
    flat = torch.from_numpy(train.reshape(len(train), -1))
    nearest = torch.cat([torch.cdist(torch.from_numpy(a[i:i + 256]).reshape(-1, flat.shape[1]).float(),
                                     flat.float() / 127.5 - 1).argmin(1) for i in range(0, len(a), 256)])
    fields = [pruning.batch_fields(records[i:i + NFE]) for i in range(0, len(records), NFE)]
    commit = np.concatenate([f["commit_index"] for f in fields])
    done = commit >= 0
    assert np.array_equal(commit[done], nearest.numpy()[done])
    return fields


@pytest.mark.parametrize("case", ["real", "aug"])
def bench_pruning_generate(benchmark, record, tmp_path_factory, sizes, sets, case):
    k, train = sets[case]
    seeds = f"0-{k - 1}"
    flops = NFE * benchmarks.denoiser_flops(k, len(train), train[0].size)
    label = f"generate Heun-18 K={k} N={len(train)} ({'real 5,170 subset' if case == 'real' else 'augmented'})"
    dens = {"dense": EmpiricalDenoiser(train, prune=0), "pruned": EmpiricalDenoiser(train)}
    warm = torch.zeros(1, *train.shape[1:], dtype=torch.float64)
    setup_seconds = {}
    for name, den in dens.items():  # the one-time row ordering happens here, not in the rounds
        t = time.perf_counter()
        den(warm, 1.0)
        setup_seconds[name] = time.perf_counter() - t
        den.pop_records()
    times = {"dense": [], "pruned": []}
    records = {"dense": [], "pruned": []}
    dirs = {}
    for name, den in dens.items():  # generate pops each batch's records: keep a copy of what it pops
        den.pop_records = lambda pop=den.pop_records, kept=records[name]: kept.extend(popped := pop()) or popped

    def one_round():
        for name, den in dens.items():  # interleaved: both see the same machine load
            dirs[name] = tmp_path_factory.mktemp(f"{case}-{name}")
            records[name].clear()
            times[name].append(_run(den, seeds, dirs[name]))

    benchmark.pedantic(one_round, rounds=sizes["rounds"], warmup_rounds=0)
    fields = _check_same_generations(dirs["dense"], dirs["pruned"], train, records["pruned"])
    dense_s, pruned_s = np.median(times["dense"]), np.median(times["pruned"])
    ratios = np.array(times["pruned"]) / np.array(times["dense"])
    book = sum(r["seconds"] - r["kernel_seconds"] for r in records["pruned"])
    dense_inside = sum(r["seconds"] for r in records["dense"])
    summary = pruning.summarize(fields, pruning.DEFAULT_PRUNE)
    inside = sum(r["seconds"] for r in records["pruned"]) / dense_inside
    note = (f"pruned/dense {np.median(ratios):.3f} (rounds {', '.join(f'{r:.3f}' for r in ratios)}); "
            f"inside the denoiser (last round) {inside:.3f}; "
            f"rows computed {summary['rows_computed_fraction']:.3f}; bookkeeping "
            f"{book / dense_inside:.1%} of dense denoiser time; committed {summary['committed']}/{k}, "
            f"commit σ quartiles {[round(v, 3) if v else v for v in summary['commit_sigma_quartiles']]}; "
            f"row ordering {setup_seconds['pruned'] - setup_seconds['dense']:.2f} s once")
    if case == "aug":
        pairs = 10_000 * 50_000 / (k * len(train))  # seeds x rows, relative to this case
        note += (f"; extrapolated to 10,000 seeds x 50,000 images: {pruned_s * pairs / 3600:.2f} h pruned, "
                 f"{dense_s * pairs / 3600:.2f} h dense")
    benchmark.extra_info.update(ratios=ratios.tolist(), note=note)
    record(label, "diffrepro", times["dense"], flops, note="dense (prune=0)")
    record(label, "diffrepro pruned (prune=1e-12)", times["pruned"], flops, note=note)
    OUTPUTS[case] = {"times": times, "summary": summary}


def bench_pruning_torch_peer(benchmark, record, sizes, sets):
    """The best torch peer (chunked GEMM + online log-sum-exp, float32) on the augmented set:
    the first ``peer_calls`` Heun evaluations timed, scaled to the whole trajectory (its cost
    per call does not depend on σ)."""
    k, train = sets["aug"]
    decoded = torch.from_numpy(train.reshape(len(train), -1)).float() / 127.5 - 1
    norm2 = decoded.square().sum(1)
    peer = CallableDenoiser(
        lambda x, sigma: benchmarks.torch_chunked_denoiser(x.reshape(x.shape[0], -1).float(), decoded,
                                                            float(sigma.reshape(-1)[0]), train_norm2=norm2
                                                            ).reshape(x.shape),
        img_channels=3, img_resolution=32)
    lat = noise.seed_latents(list(range(k)), (3, 32, 32))[0].double() * 80
    times = []

    def calls():
        start = time.perf_counter()
        for _ in range(sizes["peer_calls"]):
            peer(lat, 80.0)
        times.append((time.perf_counter() - start) / sizes["peer_calls"] * NFE)

    benchmark.pedantic(calls, rounds=1, warmup_rounds=0)
    flops = NFE * benchmarks.denoiser_flops(k, len(train), train[0].size)
    note = ""
    if "aug" in OUTPUTS:
        pruned = np.median(OUTPUTS["aug"]["times"]["pruned"])
        note = f"pruned diffrepro end to end is {times[0] / pruned:.1f}x faster (peer: denoiser calls only)"
    record(f"generate Heun-18 K={k} N={len(train)} (augmented)", "torch chunked peer (extrapolated)",
           times, flops, note=note)


def bench_pruning_bounds_memory():
    """The bounds of 256 queries over 1,000,000 rows: one float32 per (query, tile) = 8 MB."""
    b, n = 256, 1_000_000
    assert b * -(-n // pruning.TILE_ROWS) * np.dtype(np.float32).itemsize <= 1e9
