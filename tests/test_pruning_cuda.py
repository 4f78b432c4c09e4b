# SPDX-License-Identifier: Apache-2.0
"""The pruned CUDA empirical-denoiser kernel (``pruned_denoiser`` of ``diffrepro._cuda`` and
``diffrepro._cuda_emu``) against independent references: a float64 oracle built here from the
mask (softmax over the active (query, row) pairs only, nearest among the active rows, the two
best scores of every active tile) and the CPU ``pruned_denoiser`` given the same mask; then
:class:`diffrepro.pruning.PrunedRows` and :class:`EmpiricalDenoiser` with the kernel on the
emulator (or the GPU, marked ``cuda``) against the dense CPU path.

The emulator runs one OS thread per CUDA thread, so shapes are small and most cases use tile
configuration 2 (TQ = TN = 8, one warp); configurations 0 (TN = 32) and 1 (TN = 64) run with
tiny N.
"""

import importlib.util
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffrepro import _backend, ops, pruning
from diffrepro._validate import ROW_TYPES
from diffrepro.denoisers import EmpiricalDenoiser

TINY, LARGE, NARROW = 2, 0, 1  # tile configurations (empirical_denoiser_kernel.cuh)
UNTOUCHED = 7.0  # sentinel of tile_best / tile_second entries the kernel must not write
FIELDS = ("max_logit", "max_logit_lo", "sum_exp", "sum_exp_sq", "weighted_sum", "nearest_index", "nearest_sqdist")


def _emu_available():
    if importlib.util.find_spec("diffrepro._cuda_emu") is None:
        if os.environ.get("DIFFREPRO_EXPECT_CUDA_EMU") == "1":
            pytest.fail("DIFFREPRO_EXPECT_CUDA_EMU=1 but diffrepro._cuda_emu was not built")
        pytest.skip("diffrepro._cuda_emu not built (configure with DIFFREPRO_CUDA_EMULATOR=ON)")


@pytest.fixture(params=["emu", pytest.param("cuda", marks=pytest.mark.cuda)])
def backend(request):
    """Where the CUDA kernel runs: the emulator on host tensors, or the GPU."""
    if request.param == "emu":
        _emu_available()
    return request.param


@pytest.fixture
def emu():
    _emu_available()


# ------------------------------------------------------------------------------------------------
# Raw calls: one argument dict for every backend (as pruning.PrunedRows builds it)
# ------------------------------------------------------------------------------------------------
def _state(q, d, dtype, device):
    f64 = dict(dtype=torch.float64, device=device)
    return dict(max_logit=torch.empty(q, **f64), max_logit_lo=torch.empty(q, **f64), sum_exp=torch.empty(q, **f64),
                sum_exp_sq=torch.empty(q, **f64), weighted_sum=torch.empty(q, d, dtype=dtype, device=device),
                nearest_index=torch.empty(q, dtype=torch.int64, device=device), nearest_sqdist=torch.empty(q, **f64))


def _args(x, y, center, inv, out, row_offset):
    q, d = x.shape
    return dict(f64=x.dtype == torch.float64, x=x.data_ptr(), y=y.data_ptr(), y_type=ROW_TYPES[y.dtype], Q=q,
                N=y.shape[0], D=d, center=center.data_ptr(), inv_sigma2=inv.data_ptr(), row_offset=row_offset,
                **{k: v.data_ptr() for k, v in out.items()})


def run_pruned(where, x, y, center, inv, active, tile_rows, *, row_offset=0, config=TINY, splits=1):
    """pruned_denoiser on `where` ("cpu": the CPU kernel, "emu", "cuda"); host numpy results,
    tile_best / tile_second prefilled with UNTOUCHED."""
    dev = "cuda" if where == "cuda" else "cpu"
    x, y, center, inv = (t.to(dev).contiguous() for t in (x, y, center, inv))
    act = torch.from_numpy(np.ascontiguousarray(active, dtype=np.uint8)).to(dev)
    out = _state(x.shape[0], x.shape[1], x.dtype, dev)
    tb = torch.full(active.shape, UNTOUCHED, dtype=x.dtype, device=dev)
    ts = tb.clone()
    args = _args(x, y, center, inv, out, row_offset)
    prune = dict(active=act.data_ptr(), tile_rows=tile_rows, tile_best=tb.data_ptr(), tile_second=ts.data_ptr())
    q, n, d = x.shape[0], y.shape[0], x.shape[1]
    if where == "cpu":
        _backend.cpu.pruned_denoiser(args, prune, workers=2)
    elif where == "emu":
        emu = _backend.emu_module()
        ws = torch.empty(max(1, emu.pruned_denoiser_workspace_bytes(q, n, d, tile_rows, config=config,
                                                                      splits=splits)), dtype=torch.uint8)
        emu.pruned_denoiser(args, prune, ws.data_ptr(), config=config, splits=splits)
    else:
        cuda = _backend.cuda_module()
        ws = torch.empty(max(1, cuda.pruned_denoiser_workspace_bytes(q, n, d, tile_rows, config=config,
                                                                       splits=splits)), dtype=torch.uint8, device=dev)
        cuda.pruned_denoiser(args, prune, ws.data_ptr(), torch.cuda.current_stream().cuda_stream, config=config,
                             splits=splits)
        torch.cuda.synchronize()
    res = {k: v.cpu().numpy() for k, v in out.items()}
    return res, tb.cpu().numpy(), ts.cpu().numpy()


def run_dense(where, x, y, center, inv, *, row_offset=0, config=TINY, splits=1):
    """The dense CUDA kernel with the same centre (raw module call)."""
    dev = "cuda" if where == "cuda" else "cpu"
    x, y, center, inv = (t.to(dev).contiguous() for t in (x, y, center, inv))
    out = _state(x.shape[0], x.shape[1], x.dtype, dev)
    args = _args(x, y, center, inv, out, row_offset)
    mod = _backend.emu_module() if where == "emu" else _backend.cuda_module()
    ws = torch.empty(max(1, mod.empirical_denoiser_workspace_bytes(x.shape[0], y.shape[0], x.shape[1], config=config,
                                                                    splits=splits)), dtype=torch.uint8, device=dev)
    if where == "emu":
        mod.empirical_denoiser(args, ws.data_ptr(), config=config, splits=splits)
    else:
        mod.empirical_denoiser(args, ws.data_ptr(), torch.cuda.current_stream().cuda_stream, config=config,
                               splits=splits)
        torch.cuda.synchronize()
    return {k: v.cpu().numpy() for k, v in out.items()}


# ------------------------------------------------------------------------------------------------
# The float64 oracle of the mask's semantics (args.h, PruneArgs)
# ------------------------------------------------------------------------------------------------
def decode(y, dtype):
    """Rows as the kernels decode them (uint8: u / 127.5 - 1 in the compute dtype), in float64."""
    yy = y.to(dtype) / 127.5 - 1 if y.dtype == torch.uint8 else y.to(dtype)
    return yy.double()


def oracle(x, y, center, inv, active, tile_rows, row_offset=0):
    xd, yd, cd = x.double(), decode(y, x.dtype), center.double()
    n = yd.shape[0]
    tile_of = torch.arange(n) // tile_rows
    on = torch.from_numpy(np.asarray(active, dtype=bool))[:, tile_of]  # [Q, N]
    d2 = ((xd[:, None, :] - yd[None]) ** 2).sum(-1)
    logits = torch.where(on, -0.5 * d2 * inv.double()[:, None], -math.inf)
    m = logits.max(1).values
    empty = torch.isinf(m)
    p = torch.where(on, torch.exp(logits - torch.where(empty, 0.0, m)[:, None]), 0.0)
    masked = torch.where(on, d2, math.inf)
    nearest = torch.where(empty, -1, masked.argmin(1) + row_offset)  # argmin: first minimum = lowest index
    g = (xd - cd) @ (yd - cd).T - 0.5 * ((yd - cd) ** 2).sum(1)
    n_tiles = -(-n // tile_rows)
    best = np.full(np.shape(active), -np.inf)
    second = best.copy()
    for t in range(n_tiles):
        gt = g[:, t * tile_rows:(t + 1) * tile_rows]
        top = torch.topk(gt, min(2, gt.shape[1]), dim=1).values
        best[:, t] = top[:, 0].numpy()
        if gt.shape[1] > 1:
            second[:, t] = top[:, 1].numpy()
    return dict(max_logit=m.numpy(), sum_exp=p.sum(1).numpy(), sum_exp_sq=(p * p).sum(1).numpy(),
                weighted_sum=(p @ yd).numpy(), nearest_index=nearest.numpy(),
                nearest_sqdist=torch.where(empty, math.inf, masked.min(1).values).numpy(), empty=empty.numpy(),
                best=best, second=second)


def check_against_oracle(res, tb, ts, ref, active, f64, score_scale):
    """Kernel state vs the oracle: exact nearest row, the empty state where no tile is active,
    denoised output / normaliser / n_eff within the dtype's tolerance, tile scores within the
    rounding of a score (relative to the scores' scale), untouched entries left alone."""
    tol = 1e-10 if f64 else 2e-5
    empty = ref["empty"]
    np.testing.assert_array_equal(res["nearest_index"], ref["nearest_index"])
    assert np.isneginf(res["max_logit"][empty]).all() and (res["max_logit_lo"][empty] == 0).all()
    assert (res["sum_exp"][empty] == 0).all() and (res["weighted_sum"][empty] == 0).all()
    assert np.isposinf(res["nearest_sqdist"][empty]).all()
    full = ~empty
    np.testing.assert_allclose(res["nearest_sqdist"][full], ref["nearest_sqdist"][full], rtol=1e-12)
    den = res["weighted_sum"][full] / res["sum_exp"][full][:, None]
    den_ref = ref["weighted_sum"][full] / ref["sum_exp"][full][:, None]
    np.testing.assert_allclose(den, den_ref, atol=tol, rtol=0)
    lse = res["max_logit"][full] + res["max_logit_lo"][full] + np.log(res["sum_exp"][full])
    lse_ref = ref["max_logit"][full] + np.log(ref["sum_exp"][full])
    np.testing.assert_allclose(lse, lse_ref, rtol=tol, atol=tol)
    neff = res["sum_exp"][full] ** 2 / res["sum_exp_sq"][full]
    np.testing.assert_allclose(neff, ref["sum_exp"][full] ** 2 / ref["sum_exp_sq"][full], rtol=tol)
    act = np.asarray(active, dtype=bool)
    stol = (1e-12 if f64 else 1e-5) * score_scale
    np.testing.assert_allclose(tb[act].astype(np.float64), ref["best"][act], atol=stol, rtol=0)
    np.testing.assert_allclose(ts[act].astype(np.float64), ref["second"][act], atol=stol, rtol=0)
    assert (tb[~act] == UNTOUCHED).all() and (ts[~act] == UNTOUCHED).all()


def check_against_cpu(res, tb, ts, cpu, active, f64):
    """The CUDA kernel vs the CPU pruned kernel with the same mask (same contract, other code)."""
    np.testing.assert_array_equal(res["nearest_index"], cpu[0]["nearest_index"])
    np.testing.assert_array_equal(res["nearest_sqdist"], cpu[0]["nearest_sqdist"])
    full = cpu[0]["sum_exp"] > 0
    np.testing.assert_array_equal(np.isneginf(res["max_logit"]), np.isneginf(cpu[0]["max_logit"]))
    tol = 1e-10 if f64 else 2e-5
    np.testing.assert_allclose(res["weighted_sum"][full] / res["sum_exp"][full][:, None],
                               cpu[0]["weighted_sum"][full] / cpu[0]["sum_exp"][full][:, None], atol=tol)
    act = np.asarray(active, dtype=bool)
    np.testing.assert_array_equal(tb[~act], cpu[1][~act])
    np.testing.assert_array_equal(np.isneginf(ts[act]), np.isneginf(cpu[2][act]))
    scale = max(1.0, float(np.abs(cpu[1][act]).max(initial=0)))
    np.testing.assert_allclose(tb[act], cpu[1][act], atol=(1e-12 if f64 else 1e-5) * scale, rtol=0)


def problem(q, n, d, *, dtype=torch.float32, rows=torch.float32, seed=0, offset=0.0):
    gen = torch.Generator().manual_seed(seed)
    if rows == torch.uint8:
        y = torch.randint(0, 256, (n, d), generator=gen, dtype=torch.uint8)
    else:
        y = (torch.randn(n, d, generator=gen, dtype=torch.float64) + offset).to(rows)
    yd = decode(y, dtype)
    pick = torch.randint(0, n, (q,), generator=gen)
    x = (yd[pick] + 0.5 * torch.randn(q, d, generator=gen, dtype=torch.float64)).to(dtype)
    center = yd.mean(0).to(dtype)
    inv = torch.rand(q, generator=gen, dtype=torch.float64) * 2 + 0.2
    return x, y, center, inv


def random_mask(q, n_tiles, p, seed):
    return np.random.default_rng(seed).random((q, n_tiles)) < p


def full_check(backend, x, y, center, inv, active, tile_rows, *, row_offset=0, config=TINY, splits=1):
    res, tb, ts = run_pruned(backend, x, y, center, inv, active, tile_rows, row_offset=row_offset, config=config,
                             splits=splits)
    ref = oracle(x, y, center, inv, active, tile_rows, row_offset)
    f64 = x.dtype == torch.float64
    scale = float(np.abs(ref["best"][np.isfinite(ref["best"])]).max(initial=1.0))
    check_against_oracle(res, tb, ts, ref, active, f64, scale)
    cpu = run_pruned("cpu", x, y, center, inv, active, tile_rows, row_offset=row_offset)
    check_against_cpu(res, tb, ts, cpu, active, f64)
    return res, tb, ts


# ------------------------------------------------------------------------------------------------
# Kernel against the oracle and the CPU kernel
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,rows,tile_rows,splits,row_offset", [
    (torch.float32, torch.float32, 8, 1, 0),
    (torch.float32, torch.uint8, 16, 3, 17),
    (torch.float32, torch.float16, 24, 2, 0),
    (torch.float64, torch.float64, 16, 2, 5),
    (torch.float64, torch.uint8, 8, 4, 0),
])
def test_random_masks_match_oracle_and_cpu(backend, dtype, rows, tile_rows, splits, row_offset):
    """Random masks (a third active), ragged Q, N, D, the last tile shorter, several splits."""
    q, n, d = 11, 61, 13
    x, y, center, inv = problem(q, n, d, dtype=dtype, rows=rows, seed=splits)
    n_tiles = -(-n // tile_rows)
    active = random_mask(q, n_tiles, 0.35, seed=tile_rows)
    active[3] = False  # a query with no active tile
    active[5] = True   # one with all
    full_check(backend, x, y, center, inv, active, tile_rows, row_offset=row_offset, splits=splits)


def test_large_common_offset_is_centred(backend):
    """Rows and queries share an offset of 100: the centred products keep the tile scores exact
    enough for the bounds."""
    x, y, center, inv = problem(6, 40, 9, offset=100.0, seed=3)
    active = random_mask(6, 5, 0.5, seed=1)
    full_check(backend, x, y, center, inv, active, 8, splits=2)


@pytest.mark.parametrize("config,tile_rows", [(LARGE, 32), (NARROW, 64), (LARGE, 64), (-1, 64), (-1, 32)])
def test_production_configs(backend, config, tile_rows):
    """Configurations 0 (TN = 32) and 1 (TN = 64), forced or automatic, with tiny N."""
    q, n, d = 5, 150, 7
    x, y, center, inv = problem(q, n, d, rows=torch.uint8, seed=4)
    n_tiles = -(-n // tile_rows)
    active = random_mask(q, n_tiles, 0.5, seed=2)
    active[1] = False
    full_check(backend, x, y, center, inv, active, tile_rows, config=config, splits=0)


def test_all_active_equals_dense_kernel_bit_for_bit(backend):
    """Every pair active: the pruned kernel is the dense kernel (same plan: bit for bit)."""
    for dtype, config, splits, tile_rows, n in ((torch.float32, TINY, 1, 8, 45), (torch.float64, TINY, 1, 16, 45),
                                                (torch.float32, TINY, 2, 16, 64), (torch.float32, LARGE, 1, 32, 70)):
        x, y, center, inv = problem(9, n, 10, dtype=dtype, rows=torch.uint8, seed=6)
        active = np.ones((9, -(-n // tile_rows)), dtype=bool)
        res, _, _ = run_pruned(backend, x, y, center, inv, active, tile_rows, row_offset=3, config=config,
                               splits=splits)
        dense = run_dense(backend, x, y, center, inv, row_offset=3, config=config, splits=splits)
        for k in FIELDS:
            np.testing.assert_array_equal(res[k], dense[k], err_msg=f"{k} ({dtype}, config {config})")
        full_check(backend, x, y, center, inv, active, tile_rows, row_offset=3, config=config, splits=splits)


def test_no_active_tile_anywhere_gives_empty_states(backend):
    x, y, center, inv = problem(10, 30, 6, seed=7)
    active = np.zeros((10, 4), dtype=bool)
    res, tb, ts = run_pruned(backend, x, y, center, inv, active, 8, splits=2)
    assert np.isneginf(res["max_logit"]).all() and (res["sum_exp"] == 0).all()
    assert (res["weighted_sum"] == 0).all() and (res["nearest_index"] == -1).all()
    assert (tb == UNTOUCHED).all() and (ts == UNTOUCHED).all()


def test_duplicated_rows_tie_to_the_lowest_active_index(backend):
    """Exact duplicates inside a tile and across tiles: the lowest index among the active ones,
    and a tile holding two copies reports the same score as best and second."""
    q, n, d = 4, 40, 11
    x, y, center, inv = problem(q, n, d, rows=torch.uint8, seed=8)
    y[[5, 12, 30]] = y[21].clone()  # 5: tile 0, 12: tile 1, 21 and 30: tile 2 and 3 (tile_rows 8)
    y[22] = y[21].clone()   # a second copy inside tile 2
    x[:] = decode(y[21:22], torch.float32).to(x.dtype) + 0.01
    active = np.ones((q, 5), dtype=bool)
    active[1, 0] = False            # query 1: the copy at 12 wins
    active[2, :2] = False           # query 2: 21 (22 and 30 tie with it)
    active[3] = [False, False, False, True, False]  # query 3: only 30
    res, tb, ts = full_check(backend, x, y, center, inv, active, 8, splits=2)
    np.testing.assert_array_equal(res["nearest_index"], [5, 12, 21, 30])
    assert tb[2, 2] == ts[2, 2]


@pytest.mark.parametrize("tile_rows,config,ok", [
    (8, TINY, True), (24, TINY, True), (12, TINY, False), (12, -1, False), (16, LARGE, False),
    (32, LARGE, True), (96, LARGE, True), (40, -1, True), (50, TINY, True), (200, LARGE, True), (0, TINY, False)])
def test_tile_rows_rule(backend, tile_rows, config, ok):
    """tile_rows must be a multiple of the configuration's TN, or >= N (one tile): at and beyond
    the rule. Refused values raise the binding's message naming the rule."""
    q, n, d = 3, 50, 5
    x, y, center, inv = problem(q, n, d, seed=9)
    n_tiles = -(-n // max(tile_rows, 1))
    active = random_mask(q, n_tiles, 0.6, seed=3)
    active[:, 0] = True
    module = _backend.emu_module() if backend == "emu" else _backend.cuda_module()
    resolved = module.pruned_denoiser_config(q, n, tile_rows, config=config)
    if not ok:
        assert resolved == -1
        rule = ".*multiple of its row tile" if tile_rows else ""
        with pytest.raises(RuntimeError, match="invalid argument" + rule):
            run_pruned(backend, x, y, center, inv, active, tile_rows, config=config)
        return
    assert resolved >= 0
    full_check(backend, x, y, center, inv, active, tile_rows, config=config, splits=0)


def test_auto_config_falls_back_to_a_fitting_tile():
    """Automatic choice: the dense one (1 for Q <= 16, 0 above), then 0, then 2."""
    _emu_available()
    emu = _backend.emu_module()
    assert emu.pruned_denoiser_config(5, 1000, 128) == NARROW
    assert emu.pruned_denoiser_config(100, 1000, 128) == LARGE
    assert emu.pruned_denoiser_config(5, 1000, 32) == LARGE
    assert emu.pruned_denoiser_config(5, 1000, 8) == TINY
    assert emu.pruned_denoiser_config(5, 1000, 12) == -1
    assert emu.pruned_denoiser_config(5, 10, 12) == NARROW  # one tile covers all rows


_UNREAD_SCRIPT = r"""
import ctypes, mmap, sys
import numpy as np, torch
sys.path[:0] = [{tests!r}]
from test_pruning_cuda import problem, run_pruned, oracle
q, n, d, tr = 5, 32, 1024, 8  # one 4 KiB page per float32 row
buf = mmap.mmap(-1, n * d * 4 + mmap.PAGESIZE)
base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
start = (-base) % mmap.PAGESIZE
y_np = np.frombuffer(buf, dtype=np.float32, count=n * d, offset=start).reshape(n, d)
x, y, center, inv = problem(q, n, d, seed=11)
y_np[:] = y.numpy()
active = np.ones((q, 4), dtype=bool)
active[:, 2] = False      # tile 2: inactive for every query -> must not be read at all
active[1, 3] = False      # tile 3: partially active
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
assert libc.mprotect(base + start + 2 * tr * d * 4, tr * d * 4, 0) == 0  # PROT_NONE
res, tb, ts = run_pruned("emu", x, torch.from_numpy(y_np), center, inv, active, tr, config={config}, splits=2)
ref = oracle(x, y, center, inv, active, tr)
np.testing.assert_array_equal(res["nearest_index"], ref["nearest_index"])
print("ok")
"""


def test_tile_inactive_for_the_whole_block_is_never_read(emu, tmp_path):
    """A tile no query of the block wants costs nothing: its rows sit in a PROT_NONE page, so a
    single read (either product, a nearest candidate) would kill the process."""
    script = _UNREAD_SCRIPT.format(tests=os.path.dirname(__file__), config=TINY)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, (proc.returncode, proc.stderr[-2000:])


# ------------------------------------------------------------------------------------------------
# PrunedRows / EmpiricalDenoiser with the CUDA kernel
# ------------------------------------------------------------------------------------------------
def _small_cifar(images, n, res=8):
    """n real CIFAR-10 images box-downsampled to res x res (uint8, exact mean rounding)."""
    a = images[:n].astype(np.float64).reshape(n, 3, res, 32 // res, res, 32 // res).mean((3, 5))
    return np.rint(a).astype(np.uint8)


def _trajectory(sigmas, x0, step):
    """Euler steps of the probability-flow ODE dx/dsigma = (x - D(x)) / sigma."""
    x = x0
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = step(x, s)
        x = x + (s_next - s) * (x - d) / s
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pruned_rows_kernel_over_two_chunks_matches_oracle(emu, dtype):
    """PrunedRows._kernel on the emulator over two chunks (a resident one and a loader; both with
    a short last tile, the second at row_offset 50): output, n_eff, nearest flat position and the
    two best scores of every active tile, against float64 recomputation and the CPU kernel."""
    gen = torch.Generator().manual_seed(12)
    n, d, b = 95, 10, 7
    rows = torch.randint(0, 256, (n, d), generator=gen, dtype=torch.uint8)
    rows[70] = rows[2]  # a tie across chunks: the lower flat position wins
    chunks = [(rows[:50].contiguous(), np.arange(50)), (lambda: rows[50:].contiguous(), np.arange(50, n))]
    emu_rows = pruning.build_rows(chunks, dtype, 16, emulate=True)
    emu_rows.cuda_config, emu_rows.cuda_splits = TINY, 2
    cpu_rows = pruning.build_rows(chunks, dtype, 16)
    assert emu_rows.n_tiles == 7
    decoded = decode(rows, dtype)
    x = (decoded[torch.randint(0, n, (b,), generator=gen)] + 0.3 * torch.randn(b, d, generator=gen,
                                                                                dtype=torch.float64)).to(dtype)
    x[0] = decoded[2].to(dtype)
    active = np.random.default_rng(4).random((b, 7)) < 0.5
    active[0, [emu_rows.tile_of[2], emu_rows.tile_of[70]]] = True
    active[4] = False
    active[4, 5] = True  # only the second chunk
    inv = np.full(b, 1 / 0.4**2)
    state, best, second = emu_rows._kernel(x.numpy(), inv, active)
    state_cpu, best_cpu, second_cpu = cpu_rows._kernel(x.numpy(), inv, active)
    out, info = ops.finalize(state)
    out_cpu, info_cpu = ops.finalize(state_cpu)
    on = torch.from_numpy(active)[:, torch.from_numpy(emu_rows.tile_of)]
    d2 = torch.cdist(x.double(), decoded).square()
    w = torch.softmax(torch.where(on, -d2 * 0.5 / 0.4**2, -math.inf), 1)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert (out.double() - w @ decoded).abs().max().item() < tol
    assert (out.double() - out_cpu.double()).abs().max().item() < tol
    assert torch.allclose(info["n_eff"], 1 / w.square().sum(1), rtol=tol)
    nearest = torch.where(on, d2, math.inf).argmin(1)
    assert torch.equal(info["nearest_index"], nearest) and torch.equal(info["nearest_index"], info_cpu["nearest_index"])
    assert info["nearest_index"][0].item() == 2
    xc = x.double() - emu_rows.center.double()
    g = xc @ (decoded - emu_rows.center.double()).T - 0.5 * (decoded - emu_rows.center.double()).square().sum(1)
    for t in range(7):
        cols = torch.from_numpy(np.flatnonzero(emu_rows.tile_of == t))
        top = torch.topk(g[:, cols], 2, dim=1).values.numpy()
        sel = active[:, t]
        scale = 1e-5 if dtype == torch.float32 else 1e-12
        np.testing.assert_allclose(best[sel, t], top[sel, 0], atol=scale * (1 + np.abs(top).max()))
        np.testing.assert_allclose(second[sel, t], top[sel, 1], atol=scale * (1 + np.abs(top).max()))
        np.testing.assert_allclose(best[sel, t], best_cpu[sel, t], atol=scale * (1 + np.abs(top).max()))
        assert np.isneginf(best[~sel, t]).all() and np.isneginf(second[~sel, t]).all()


def test_pruned_rows_on_the_emulator_match_the_dense_cpu_path(emu, cifar_subset):
    """A short trajectory from sigma = 20 to 0.02 over 96 real CIFAR images (8 x 8): the pruned
    rows with the CUDA kernel under the emulator give the dense CPU output within 1e-5, compute
    the same (query, tile) pairs and commit to the same rows as the CPU kernel."""
    train = _small_cifar(cifar_subset, 96)
    flat = torch.from_numpy(train.reshape(96, -1))
    order = pruning.cluster_order(flat.numpy(), tile_rows=16)
    chunks = [(flat[torch.from_numpy(order)].contiguous(), order)]
    gpu_rows = pruning.build_rows(chunks, torch.float32, 16, emulate=True)
    gpu_rows.cuda_config = TINY
    cpu_rows = pruning.build_rows(chunks, torch.float32, 16)
    b = 4
    gen = torch.Generator().manual_seed(0)
    sigmas = np.geomspace(20.0, 0.02, 8)
    commits, fractions = [], []

    def step(x, s):
        sig = np.full(b, s)
        out_gpu, st_gpu = gpu_rows(x, sig, pruning.DEFAULT_PRUNE)
        mask_gpu, _ = gpu_rows.last_computed()
        out_cpu, st_cpu = cpu_rows(x, sig, pruning.DEFAULT_PRUNE)
        mask_cpu, _ = cpu_rows.last_computed()
        dense, _ = ops.finalize(ops.empirical_denoiser_partial(x, flat, torch.full((b,), s, dtype=torch.float64)))
        assert (out_gpu.double() - dense.double()).abs().max().item() < 1e-5
        assert (out_gpu.double() - out_cpu.double()).abs().max().item() < 1e-5
        np.testing.assert_array_equal(mask_gpu, mask_cpu)
        for key in ("nearest", "commit_index"):
            np.testing.assert_array_equal(st_gpu[key], st_cpu[key])
        commits.append(st_gpu["commit_index"].copy())
        fractions.append(mask_gpu.mean())
        return out_gpu

    x0 = 20.0 * torch.randn(b, flat.shape[1], generator=gen)
    _trajectory(sigmas, x0, step)
    assert min(fractions) < 1.0  # some pairs were skipped
    assert (commits[-1] >= 0).any()  # and some queries committed


def test_empirical_denoiser_prunes_through_the_cuda_kernel_emulated(emu, cifar_subset):
    """EmpiricalDenoiser's pruned path with its PrunedRows switched to the emulated CUDA kernel
    (as on a CUDA device): same outputs as the dense CPU denoiser, same records as pruning on the
    CPU kernel."""
    train = _small_cifar(cifar_subset, 100)
    emulated = EmpiricalDenoiser(train, prune=pruning.DEFAULT_PRUNE)
    rows = emulated._pruned_rows(None)
    rows.emulate, rows.cuda_config = True, TINY
    on_cpu = EmpiricalDenoiser(train, prune=pruning.DEFAULT_PRUNE)
    dense = EmpiricalDenoiser(train, prune=0)
    x = 10.0 * torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    for s in (10.0, 1.0, 0.1, 0.01):
        sigma = torch.full((3,), s, dtype=torch.float64)
        out = emulated(x, sigma)
        assert (out - dense(x, sigma)).abs().max().item() < 1e-5
        assert (out - on_cpu(x, sigma)).abs().max().item() < 1e-5
        x = out + s * 0.3 * (x - out) / 10.0
    rec_emu, rec_cpu = emulated.pop_records(), on_cpu.pop_records()
    for a, b in zip(rec_emu, rec_cpu):
        for key in ("nearest", "commit_index"):
            np.testing.assert_array_equal(a[key], b[key])
        assert a["rows_fraction"] == b["rows_fraction"]


@pytest.mark.cuda
def test_empirical_denoiser_on_cuda_prunes_and_matches_cpu(cifar_subset):
    """On a GPU: EmpiricalDenoiser(device="cuda") prunes with the CUDA kernel (rows fraction < 1
    late in a trajectory) and matches the dense CPU denoiser and the CPU pruned records."""
    train = cifar_subset[:600]
    gpu = EmpiricalDenoiser(train, device="cuda")
    cpu = EmpiricalDenoiser(train)
    dense = EmpiricalDenoiser(train, prune=0)
    x = 40.0 * torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    for s in np.geomspace(40.0, 0.01, 10):
        sigma = torch.full((4,), float(s), dtype=torch.float64)
        out = gpu(x.cuda(), sigma).cpu()
        assert (out - dense(x, sigma)).abs().max().item() < 1e-5
        assert (out - cpu(x, sigma)).abs().max().item() < 1e-5
        x = out + (x - out) * 0.5
    rec_gpu, rec_cpu = gpu.pop_records(), cpu.pop_records()
    assert rec_gpu[-1]["rows_fraction"] < 1.0
    for a, b in zip(rec_gpu, rec_cpu):
        np.testing.assert_array_equal(a["nearest"], b["nearest"])
        np.testing.assert_array_equal(a["commit_index"], b["commit_index"])


@pytest.mark.cuda
def test_class_conditional_empirical_denoiser_on_cuda_matches_cpu(cifar_subset):
    """Class-conditional pruning on a GPU: each class's rows gathered on the device."""
    train, labels = cifar_subset[:300], np.arange(300) % 3
    gpu = EmpiricalDenoiser(train, labels=labels, device="cuda")
    dense = EmpiricalDenoiser(train, labels=labels, prune=0)
    x = 30.0 * torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    classes = torch.tensor([0, 1, 2, 2, 1, 0])
    for s in (30.0, 3.0, 0.3, 0.03):
        sigma = torch.full((6,), s, dtype=torch.float64)
        out = gpu(x.cuda(), sigma, classes).cpu()
        ref = dense(x, sigma, classes)
        assert (out - ref).abs().max().item() < 1e-5
        x = out + (x - out) * 0.3
