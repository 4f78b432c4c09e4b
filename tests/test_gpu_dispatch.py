# SPDX-License-Identifier: Apache-2.0
"""The GPU dispatch (diffrepro._gpu_dispatch) on CPU tensors: the chosen engine runs the full call,
the probe runs both on a row prefix, the product setting reaches the BLAS engine, bad settings are
one clear error. The fused kernels are stood in for by a recorder (they need a GPU); the BLAS
engine is real and its result is compared with a direct call."""
import pytest
import torch

from diffrepro import _blas_engine, _engine, _gpu_dispatch


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(0)
    y = torch.rand(300, 48, generator=g) * 2 - 1
    x = y[:5] + 0.1 * torch.randn(5, 48, generator=g)
    inv = torch.full((5,), 100.0, dtype=torch.float64)
    return x, y, inv, y.double().mean(0).float()


def recorder(calls, clock=None, cost=0.0):
    def fused(n):
        calls.append(n)
        if clock is not None:
            clock.now += cost * n

    return fused


def test_env_blas_runs_the_blas_engine(problem, monkeypatch):
    monkeypatch.setenv(_engine.ENV_VAR, "blas")
    x, y, inv, c = problem
    calls = []
    got = _gpu_dispatch.empirical_denoiser(x, y, inv, c, 7, recorder(calls), chooser=_engine.EngineChooser())
    want = _blas_engine.denoiser_state(x, y, inv, c, 7)
    assert calls == []
    for name, value in want.items():
        assert torch.equal(got[name], value), name


def test_env_fused_runs_the_fused_call_once(problem, monkeypatch):
    monkeypatch.setenv(_engine.ENV_VAR, "fused")
    x, y, inv, c = problem
    calls = []
    assert _gpu_dispatch.empirical_denoiser(x, y, inv, c, 0, recorder(calls), chooser=_engine.EngineChooser()) is None
    assert calls == [300]
    calls.clear()
    assert _gpu_dispatch.nn_search(x, y, 3, "ip", 0, recorder(calls), chooser=_engine.EngineChooser()) is None
    assert calls == [300]


def test_auto_probes_both_then_runs_the_winner(problem, monkeypatch):
    monkeypatch.delenv(_engine.ENV_VAR, raising=False)
    x, y, inv, c = problem
    clock = Clock()
    chooser = _engine.EngineChooser(timer=clock)
    calls = []
    # Fused costs fake time, the BLAS engine none: BLAS wins, fused ran only as a probe.
    got = _gpu_dispatch.empirical_denoiser(x, y, inv, c, 0, recorder(calls, clock, 1e-6), chooser=chooser)
    assert calls == [300, 300, 300] and got is not None  # probe rows = N here (N < 4,096)
    assert chooser.last["empirical_denoiser"]["engine"] == "blas"
    # Now make the BLAS engine the slow one (a new chooser: no cached choice).
    real = _blas_engine.search_state

    def slow(*a, **kw):
        clock.now += 1.0
        return real(*a, **kw)

    monkeypatch.setattr(_blas_engine, "search_state", slow)
    calls.clear()
    chooser = _engine.EngineChooser(timer=clock)
    assert _gpu_dispatch.nn_search(x, y, 3, "l2", 0, recorder(calls, clock, 1e-6), chooser=chooser) is None
    assert calls == [300, 300, 300, 300]  # warm-up + 2 timed probes, then the real call
    key = next(iter(chooser.timings))
    assert key.op == "nn_search" and key.metric == "l2" and key.device == "cpu"


def test_product_setting_reaches_the_blas_engine(problem, monkeypatch):
    monkeypatch.setenv(_engine.ENV_VAR, "blas")
    monkeypatch.setenv(_engine.PRODUCT_ENV_VAR, "3xtf32")
    x, y, inv, c = problem
    got = _gpu_dispatch.empirical_denoiser(x, y, inv, c, 0, recorder([]), chooser=_engine.EngineChooser())
    want = _blas_engine.denoiser_state(x, y, inv, c, 0, product="3xtf32")
    assert torch.equal(got["weighted_sum"], want["weighted_sum"])
    assert _engine.EngineChooser().report()["blas_product"] == "3xtf32"
    monkeypatch.setenv(_engine.PRODUCT_ENV_VAR, "fp8")
    with pytest.raises(ValueError, match="DIFFREPRO_CUDA_PRODUCT: got 'fp8', expected one of fp32, 3xtf32, 3xbf16"):
        _gpu_dispatch.empirical_denoiser(x, y, inv, c, 0, recorder([]), chooser=_engine.EngineChooser())


def test_probe_rows():
    # Q = 256, D = 3,072: 4 Q D = 3.1 MFLOP per row -> ~16,000 rows for 5e10 flops.
    assert _gpu_dispatch.probe_rows(50_000, 4.0 * 256 * 3072) == 15_894
    assert _gpu_dispatch.probe_rows(50_000, 4.0 * 10_000 * 3072) == 4096  # never below 4,096 rows
    assert _gpu_dispatch.probe_rows(1000, 1.0) == 1000  # never above N
    assert _gpu_dispatch.device_label(torch.device("cpu")) == "cpu"
