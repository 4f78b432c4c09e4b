# SPDX-License-Identifier: Apache-2.0
"""The GPU engine choice (diffrepro._engine) with a fake clock: the faster engine is measured once
per shape class and cached, DIFFREPRO_CUDA_ENGINE overrides it, a bad value is one clear error."""
import pytest
import torch

from diffrepro import _engine
from diffrepro._engine import EngineChooser, ShapeClass


class FakeClock:
    """A clock that only moves when a fake engine 'runs' for its cost."""

    def __init__(self):
        self.now = 0.0
        self.calls = {}

    def __call__(self):
        return self.now

    def engine(self, name, cost):
        def run():
            self.calls[name] = self.calls.get(name, 0) + 1
            self.now += cost

        return run


def key(Q=256, N=50_000, D=3072, device="cuda:0 Fake GPU"):
    return ShapeClass.of("empirical_denoiser", device, torch.float32, torch.uint8, Q, N, D)


def test_auto_measures_once_per_shape_class_and_caches():
    clock = FakeClock()
    ch = EngineChooser(timer=clock, env={})
    probes = {"fused": clock.engine("fused", 3e-3), "blas": clock.engine("blas", 1e-3)}
    assert ch.choose(key(), probes) == "blas"
    assert clock.calls == {"fused": 3, "blas": 3}  # one warm-up and two timed calls each
    assert ch.last["empirical_denoiser"]["how"] == "auto (measured)"
    # Same class (Q 200 -> 256, N 40,000 -> 65,536): cached, no probe runs.
    assert ch.choose(key(Q=200, N=40_000), probes) == "blas"
    assert clock.calls == {"fused": 3, "blas": 3}
    assert ch.last["empirical_denoiser"]["how"] == "auto (cached)"
    rep = ch.report()
    assert rep["setting"] == "auto"
    [(name, entry)] = rep["choices"].items()
    assert "Q<=256 N<=65536 D<=4096" in name and entry["engine"] == "blas"
    assert entry["probe_seconds"] == pytest.approx({"fused": 3e-3, "blas": 1e-3})


def test_auto_choice_is_per_device_and_per_shape_class():
    clock = FakeClock()
    ch = EngineChooser(timer=clock, env={})
    assert ch.choose(key(), {"fused": clock.engine("fused", 2.0), "blas": clock.engine("blas", 1.0)}) == "blas"
    # Another device and a small-Q class measure afresh and may choose differently.
    other = {"fused": clock.engine("fused", 1.0), "blas": clock.engine("blas", 2.0)}
    assert ch.choose(key(device="cuda:1 Fake GPU"), other) == "fused"
    assert ch.choose(key(Q=4), other) == "fused"
    assert ch.choose(key(), other) == "blas"  # the first class keeps its cached choice
    assert len(ch.report()["choices"]) == 3


def test_exact_tie_goes_to_fused():
    clock = FakeClock()
    ch = EngineChooser(timer=clock, env={})
    assert ch.choose(key(), {"blas": clock.engine("blas", 1.0), "fused": clock.engine("fused", 1.0)}) == "fused"


def test_sync_runs_before_each_reading_of_the_clock():
    """The timer must see finished device work: sync after the warm-up and after each call."""
    clock = FakeClock()
    pending = []
    syncs = []

    def run():  # 'launches' work that only costs time when synchronised
        pending.append(1.0)

    def sync():
        syncs.append(len(pending))
        clock.now += sum(pending)
        pending.clear()

    ch = EngineChooser(timer=clock, env={}, repeats=2)
    ch.choose(key(), {"fused": run}, sync=sync)
    assert syncs == [1, 1, 1]
    assert ch.timings[key()] == {"fused": 1.0}


@pytest.mark.parametrize("value,expected", [("fused", "fused"), ("blas", "blas"), (" BLAS ", "blas")])
def test_env_override_skips_measurement(value, expected):
    clock = FakeClock()
    ch = EngineChooser(timer=clock, env={_engine.ENV_VAR: value})
    assert ch.choose(key(), {"fused": clock.engine("fused", 1.0), "blas": clock.engine("blas", 2.0)}) == expected
    assert clock.calls == {}
    assert ch.last["empirical_denoiser"] == {"engine": expected, "how": f"DIFFREPRO_CUDA_ENGINE={expected}",
                                             "shape_class": str(key())}


@pytest.mark.parametrize("value", ["", "auto", "AUTO"])
def test_env_auto_or_empty_measures(value):
    clock = FakeClock()
    ch = EngineChooser(timer=clock, env={_engine.ENV_VAR: value})
    assert ch.choose(key(), {"fused": clock.engine("fused", 1.0), "blas": clock.engine("blas", 2.0)}) == "fused"
    assert clock.calls == {"fused": 3, "blas": 3}


def test_bad_env_value_is_one_clear_error():
    ch = EngineChooser(env={_engine.ENV_VAR: "cublas"})
    with pytest.raises(ValueError) as exc:
        ch.choose(key(), {"fused": lambda: None})
    assert str(exc.value) == "DIFFREPRO_CUDA_ENGINE: got 'cublas', expected one of auto, fused, blas"
    # report() never raises: build_info() must always work.
    assert ch.report()["setting"].startswith("invalid (DIFFREPRO_CUDA_ENGINE: got 'cublas'")


def test_env_read_at_each_call(monkeypatch):
    """The process-wide chooser reads os.environ per call (no stale copy)."""
    monkeypatch.setenv(_engine.ENV_VAR, "blas")
    assert _engine.choose(key(device="cuda:9 env test"), {"fused": lambda: None}) == "blas"
    monkeypatch.setenv(_engine.ENV_VAR, "fused")
    assert _engine.choose(key(device="cuda:9 env test"), {"blas": lambda: None}) == "fused"
    assert _engine.report()["last"]["empirical_denoiser"]["engine"] == "fused"


def test_forced_wins_over_env_and_restores():
    clock = FakeClock()
    ch = EngineChooser(timer=clock, env={_engine.ENV_VAR: "fused"})
    with ch.forced("blas"):
        assert ch.choose(key(), {}) == "blas"
        assert ch.last["empirical_denoiser"]["how"] == "forced"
    assert ch.choose(key(), {}) == "fused"
    with pytest.raises(ValueError, match="engine: got 'gemm', expected one of fused, blas"):
        with ch.forced("gemm"):
            pass


def test_unknown_probe_engine_is_rejected():
    ch = EngineChooser(env={})
    with pytest.raises(ValueError, match="probes: got engines"):
        ch.choose(key(), {"cutlass": lambda: None})


def test_shape_class_buckets():
    a = ShapeClass.of("nn_search", "cuda:0 X", torch.float32, torch.float16, 10_000, 1_000_000, 512, k=10, metric="ip")
    b = ShapeClass.of("nn_search", "cuda:0 X", torch.float32, torch.float16, 9_000, 600_000, 500, k=16, metric="ip")
    assert a == b and (a.q, a.n, a.d, a.k) == (16384, 1 << 20, 512, 16)
    assert a != ShapeClass.of("nn_search", "cuda:0 X", torch.float32, torch.float16, 10_000, 1_000_000, 512, k=10,
                              metric="l2")
    assert "k<=16 ip" in str(a)


def test_build_info_reports_the_engine_setting(monkeypatch):
    import diffrepro

    monkeypatch.setenv(_engine.ENV_VAR, "blas")
    monkeypatch.setenv(_engine.PRODUCT_ENV_VAR, "3xtf32")
    rep = diffrepro.build_info()["cuda_engines"]
    assert rep["setting"] == "blas" and rep["blas_product"] == "3xtf32"
    assert set(rep) == {"setting", "blas_product", "last", "choices"}
