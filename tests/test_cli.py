# SPDX-License-Identifier: Apache-2.0
"""The command line's error policy and behaviours, through real ``python -m diffrepro`` processes on
real (and really damaged) files: one line and exit 2 for a usage error, one line naming the file and
exit 1 for a damaged input, 130 and how to resume on Ctrl-C, one-line warnings, tracebacks kept for
bugs, help without torch, dry runs that write nothing, optional plotting."""
import argparse
import errno
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import save_stub_sscd

from diffrepro import data
from diffrepro.cli import _common, build_parser
from diffrepro.sscd import save_features

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFREPRO_NUM_THREADS": "1"}


def cli(*argv, env=None, wrapper=None, timeout=300):
    """Run ``python -m diffrepro ARGV`` (or ``python -c WRAPPER ARGV``) and return the finished process."""
    head = ["-m", "diffrepro"] if wrapper is None else ["-c", wrapper]
    return subprocess.run([sys.executable, *head, *map(str, argv)], capture_output=True, text=True,
                          env=env or ENV, timeout=timeout)


def one_line(proc, status, *needles):
    """The process exited with ``status`` and printed exactly one stderr line holding every needle."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == status and len(lines) == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and "usage:" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def truncate(path, keep):
    raw = Path(path).read_bytes()
    Path(path).write_bytes(raw[:keep if keep >= 0 else len(raw) + keep])


def rand_images(n, c=3, r=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, c, r, r), dtype=np.uint8)


def png_folder(folder, images, first_seed=0):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for k, img in enumerate(images):
        data.save_png(folder / f"{first_seed + k:06d}.png", img)
    return folder


# ----------------------------------------------------------------------------------------------
# damaged inputs: one line naming the file, exit 1, nothing written
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    d = tmp_path_factory.mktemp("damaged")
    good = rand_images(4)
    png_folder(d / "pngs", good)
    bad = png_folder(d / "pngs_truncated", good)
    truncate(bad / "000002.png", -40)  # PIL: "image file is truncated"
    data.write_edm_zip(d / "set.zip", good)
    (d / "trunc.zip").write_bytes((d / "set.zip").read_bytes()[:300])
    data.write_cifar_batches(d / "cifar" / "cifar-10-batches-py", rand_images(20, r=32), np.arange(20) % 10)
    with tarfile.open(d / "cifar.tar.gz", "w:gz") as tar:
        tar.add(d / "cifar" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    (d / "trunc.tar.gz").write_bytes((d / "cifar.tar.gz").read_bytes()[:2000])
    truncate(d / "cifar" / "cifar-10-batches-py" / "data_batch_1", 500)  # a truncated pickle
    np.savez(d / "set.npz", images=good)
    (d / "trunc.npz").write_bytes((d / "set.npz").read_bytes()[:-100])
    np.save(d / "set.npy", good)
    (d / "trunc.npy").write_bytes((d / "set.npy").read_bytes()[:200])
    np.savez(d / "gen.npz", x=good / 127.5 - 1)
    (d / "trunc_gen.npz").write_bytes((d / "gen.npz").read_bytes()[:150])
    feats = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    meta = {"model_sha256": "0" * 64, "preprocess": "p1_pil320"}
    save_features(d / "feat.npz", feats, np.arange(4), meta)
    (d / "trunc_feat.npz").write_bytes((d / "feat.npz").read_bytes()[:-60])
    labelled = png_folder(d / "bad_json", good)
    (labelled / "dataset.json").write_text('{"labels": [["000000.png", 1]')
    return d


# Most cases read the damaged file as the first input of `score mae`, so that the command fails before it
# imports torch (seconds saved per case); every reader is the same for every command.
DAMAGED_CASES = {
    "zip": (["score", "mae", "--a", "trunc.zip", "--b", "set.zip"], ["--a", "trunc.zip", "EDM dataset zip"]),
    "png": (["score", "mae", "--a", "pngs_truncated", "--b", "pngs"],
            ["--a", "000002.png", "image file is truncated"]),
    "tar.gz": (["score", "mae", "--a", "trunc.tar.gz", "--b", "pngs"], ["--a", "trunc.tar.gz", "tar archive"]),
    "cifar pickle": (["score", "mae", "--a", "cifar/cifar-10-batches-py", "--b", "pngs"],
                     ["--a", "data_batch_1", "CIFAR-10 python batch"]),
    "npz": (["score", "mae", "--a", "trunc.npz", "--b", "pngs"], ["--a", "trunc.npz", ".npz archive"]),
    "npy": (["score", "mae", "--a", "trunc.npy", "--b", "pngs"], ["--a", "trunc.npy", ".npy array"]),
    "generations npz": (["score", "gl-nn", "--gen", "trunc_gen.npz", "--train", "set.npz"],
                        ["--gen", "trunc_gen.npz", ".npz of generations"]),
    "feature file": (["score", "rp", "--a", "trunc_feat.npz", "--b", "feat.npz"],
                     ["--a", "trunc_feat.npz", "feature file"]),
    "dataset.json": (["score", "mae", "--a", "bad_json", "--b", "pngs"], ["--a", "dataset.json", "JSON"]),
}


@pytest.mark.parametrize("case", DAMAGED_CASES)
def test_a_damaged_input_is_one_line_naming_the_file_and_nothing_is_written(damaged, tmp_path, case):
    argv, needles = DAMAGED_CASES[case]
    argv = [a if a.startswith("-") or a in ("score", "mae", "rp", "gl-nn") else damaged / a for a in argv]
    out = tmp_path / "out"
    line = one_line(cli(*argv, "--outdir", out), 1, *needles, "diffrepro score")
    assert "truncated or corrupt" in line or "truncated" in line
    assert not out.exists() or not list(out.iterdir())


def test_a_model_file_that_is_not_a_model_fails_before_any_image_is_decoded(damaged, tmp_path):
    not_a_model = damaged / "pngs" / "000000.png"
    out = tmp_path / "f.npz"
    line = one_line(cli("features", "--images", damaged / "pngs_truncated", "--model", not_a_model,
                        "--out", out, "--no-progress"), 1, "--model", "000000.png", "TorchScript")
    assert "000002.png" not in line and not out.exists()  # the truncated image was never reached


# ----------------------------------------------------------------------------------------------
# usage errors: one line, exit 2, no usage block
# ----------------------------------------------------------------------------------------------
def test_usage_errors_are_one_line_without_a_usage_block(tmp_path):
    one_line(cli("score", "rp"), 2, "the following arguments are required: --a, --b",
             "see 'diffrepro score rp --help'")
    one_line(cli("score", "rp", "--a", "x.npz", "--b", "y.npz", "--tau", "2"), 2, "--tau", "got '2'", "[-1, 1]")
    one_line(cli("score", "mae", "--a", tmp_path / "missing", "--b", tmp_path), 2, "--a", "no such file", "missing")
    # the parent of generate runs is refused rather than read with their grid.png files
    run = png_folder(tmp_path / "runs" / "heun", rand_images(2))
    data.save_png(run / "grid.png", rand_images(1, r=16)[0])
    (run / "manifest.json").write_text(json.dumps({"config": {"seeds": "0-1"}, "status": "complete"}))
    one_line(cli("score", "mae", "--a", tmp_path / "runs", "--b", run), 2, "--a", "generate runs", "heun")
    # a data set given as --out by mistake is never overwritten
    np.savez(tmp_path / "train.npz", images=rand_images(2))
    before = (tmp_path / "train.npz").read_bytes()
    one_line(cli("features", "--images", run, "--model", tmp_path / "train.npz", "--out", tmp_path / "train.npz"),
             2, "--out", "not a feature file", "refusing to overwrite")
    assert (tmp_path / "train.npz").read_bytes() == before


def test_outputs_never_replace_a_file_diffrepro_did_not_write(tmp_path):
    gen = png_folder(tmp_path / "gen", rand_images(3))
    np.savez(tmp_path / "gen.npz", x=rand_images(3) / 127.5 - 1)
    np.savez(tmp_path / "train.npz", images=rand_images(5))
    before = (tmp_path / "train.npz").read_bytes()
    # --json train.json would put the per-generation file at train.npz: the training set
    one_line(cli("score", "gl-nn", "--gen", tmp_path / "gen.npz", "--train", tmp_path / "train.npz",
                 "--json", tmp_path / "train.json"),
             2, "--json (its .npz beside it)", "train.npz", "not written by diffrepro", "refusing to overwrite")
    assert (tmp_path / "train.npz").read_bytes() == before and not (tmp_path / "train.json").exists()
    (tmp_path / "notes.json").write_text('{"my": "notes"}')
    one_line(cli("score", "mae", "--a", gen, "--b", gen, "--json", tmp_path / "notes.json"), 2, "--json", "notes.json")
    assert json.loads((tmp_path / "notes.json").read_text()) == {"my": "notes"}
    for _ in range(2):  # a result diffrepro wrote is replaced by the rerun
        proc = cli("score", "mae", "--a", gen, "--b", gen, "--json", tmp_path / "mae.json")
        assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "mae.json").read_text())["mae_score"] == 1.0


def test_what_counts_as_written_by_diffrepro(tmp_path):
    from diffrepro import plots

    _common.write_json(tmp_path / "ours.json", {"metric": "rp", "rp": 0.5})
    (tmp_path / "theirs.json").write_text('{"rp": 0.5}')
    (tmp_path / "broken.json").write_text('{"metric": ')
    np.savez(tmp_path / "ours.npz", ids=np.arange(2), nn_index=np.arange(2), max_sim=np.ones(2))
    np.savez(tmp_path / "theirs.npz", ids=np.arange(2), nn_index=np.arange(2), max_sim=np.ones(2), extra=np.ones(1))
    (tmp_path / "broken.npz").write_bytes((tmp_path / "ours.npz").read_bytes()[:-40])
    data.save_png(tmp_path / "theirs.png", rand_images(1)[0])
    ours = {"ours.json", "ours.npz"}
    if plots.available():
        plots.plot_similarity_matrix(np.eye(2), tmp_path / "ours.png")
        ours.add("ours.png")
    assert {p.name for p in tmp_path.iterdir() if _common.written_by_diffrepro(p)} == ours


# ----------------------------------------------------------------------------------------------
# Ctrl-C: exit 130, says how to resume
# ----------------------------------------------------------------------------------------------
def _interrupt_while_reading(argv, fifo, timeout=300):
    """Start ``diffrepro ARGV``, wait until it opens ``fifo`` (an image it is decoding), send SIGINT."""
    proc = subprocess.Popen([sys.executable, "-m", "diffrepro", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + timeout
    while True:
        try:  # succeeds once the command has the FIFO open for reading
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as exc:
            if exc.errno != errno.ENXIO or proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"the command never opened the FIFO: {proc.communicate()}") from exc
            time.sleep(0.05)
    try:
        proc.send_signal(signal.SIGINT)
        try:  # the main thread, interrupted in its read, raises KeyboardInterrupt at once
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass  # the signal went to another (torch) thread: Python acts on it when the read returns
    finally:
        os.close(fd)  # end of file for the reader
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.parametrize("command", ["features", "linearity"])
def test_ctrl_c_exits_130_and_says_how_to_resume(tmp_path, command):
    folder = png_folder(tmp_path / "images", rand_images(2, r=16))
    os.mkfifo(folder / "000009.png")  # blocks the reader until the test opens it
    if command == "features":
        save_stub_sscd(tmp_path / "model.pt")
        argv = ["features", "--images", folder, "--model", tmp_path / "model.pt", "--out", tmp_path / "f.npz",
                "--no-progress"]
    else:
        np.savez(tmp_path / "held.npz", images=rand_images(4, r=16))
        argv = ["linearity", "--denoiser", "empirical", "--train", folder, "--images", tmp_path / "held.npz",
                "--pairs", "2", "--sigmas", "1", "--outdir", tmp_path / "out", "--no-progress"]
    status, err = _interrupt_while_reading(argv, folder / "000009.png")
    assert status == 130, err
    assert f"diffrepro {command}: interrupted" in err and "rerun the same command to resume" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "f.npz").exists() and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# warnings, bugs, version, help
# ----------------------------------------------------------------------------------------------
def test_a_warning_is_one_line(tmp_path):
    feats = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    for name in ("a", "b"):  # no metadata: written by another tool
        np.savez(tmp_path / f"{name}.npz", features=feats, ids=np.arange(5))
    proc = cli("score", "rp", "--a", tmp_path / "a.npz", "--b", tmp_path / "b.npz", "--json", tmp_path / "rp.json")
    assert proc.returncode == 0, proc.stderr
    one_line(proc, 0, "diffrepro score rp: warning:", "no model/preprocessing metadata")
    assert "UserWarning" not in proc.stderr and json.loads((tmp_path / "rp.json").read_text())["rp"] == 1.0


def test_an_internal_bug_keeps_its_traceback(tmp_path):
    wrapper = ("import sys, diffrepro.data\n"
               "def bug(*args, **kwargs):\n    raise KeyError('an internal bug')\n"
               "diffrepro.data.load_dataset = bug\n"
               "from diffrepro.cli import main\nsys.exit(main(sys.argv[1:]))")
    folder = png_folder(tmp_path / "pngs", rand_images(2))
    proc = cli("score", "mae", "--a", folder, "--b", folder, wrapper=wrapper)
    assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr
    assert "KeyError: 'an internal bug'" in proc.stderr


def test_version_and_help_do_not_import_torch():
    from importlib.metadata import version

    proc = cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"diffrepro {version('diffrepro')}"
    wrapper = ("import sys\nfrom diffrepro.cli import main\n"
               "for argv in (['--help'], ['score', 'rp', '--help'], ['features', '--help'], ['generate', '--help']):\n"
               "    try:\n        main(argv)\n    except SystemExit as exc:\n        assert exc.code == 0, argv\n"
               "print('torch imported:', 'torch' in sys.modules)")
    proc = cli(wrapper=wrapper)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("torch imported: False") and "usage: diffrepro" in proc.stdout


def _all_parsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_parsers(sub)


def test_every_flag_has_help_and_shows_its_default():
    parsers = list(_all_parsers(build_parser()))
    assert len(parsers) >= 14  # diffrepro, its 8 commands, and score's 5 sub-commands
    for parser in parsers:
        assert issubclass(parser.formatter_class, _common.HelpFormatter), parser.prog
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):  # each command has a one-line help
                assert all(choice.help for choice in action._choices_actions), parser.prog
                continue
            if action.dest in ("help", "version"):
                continue
            assert action.help and action.help.strip(), f"{parser.prog} {action.option_strings}: no help"
            shown = formatter._get_help_string(action)
            assert action.required or "default" in shown, f"{parser.prog} {action.option_strings}: no default"


def test_ctrl_c_during_features_keeps_finished_chunks_and_the_rerun_resumes(tmp_path):
    """What the Ctrl-C message promises: the chunks finished before the interrupt are kept (atomic part
    files of this run), the rerun computes only the rest, and the result equals an uninterrupted run."""
    save_stub_sscd(tmp_path / "model.pt")
    np.savez(tmp_path / "imgs.npz", images=data.default_dataset().images[:200])
    argv = ["features", "--images", tmp_path / "imgs.npz", "--model", tmp_path / "model.pt", "--batch-size", "8",
            "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "diffrepro", *map(str, argv), "--out", str(tmp_path / "f.npz")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob("f.rows-*.npz")):  # the first finished chunk
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "finished outputs are kept, rerun the same command to resume" in err, err
    rows = [tuple(map(int, p.name.split(".")[1].split("-")[1:])) for p in tmp_path.glob("f.rows-*.npz")]
    kept = sum(b - a for a, b in rows)
    assert 0 < kept < 200 and not (tmp_path / "f.npz").exists()
    rerun = cli(*argv, "--out", tmp_path / "f.npz")
    assert rerun.returncode == 0 and f"{200 - kept} computed, {kept} from part files" in rerun.stdout, rerun
    assert not list(tmp_path.glob("f.rows-*"))  # assembled and removed
    whole = cli(*argv, "--out", tmp_path / "one.npz")
    assert whole.returncode == 0 and "200 computed, 0 from part files" in whole.stdout
    with np.load(tmp_path / "f.npz") as resumed, np.load(tmp_path / "one.npz") as once:
        assert np.array_equal(resumed["features"], once["features"]) and np.array_equal(resumed["ids"], once["ids"])
        assert json.loads(str(resumed["meta"])) == json.loads(str(once["meta"]))


# ----------------------------------------------------------------------------------------------
# dry runs, large outputs, optional plotting, bench
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_sets(tmp_path):
    np.savez(tmp_path / "train.npz", images=rand_images(24, c=1, r=4, seed=3))
    np.savez(tmp_path / "held.npz", images=rand_images(48, c=1, r=4, seed=4))
    return tmp_path / "train.npz", tmp_path / "held.npz"


@pytest.mark.parametrize("command", ["features", "linearity", "distill"])
def test_dry_runs_print_the_cost_and_write_nothing(tmp_path, tiny_sets, command):
    train, held = tiny_sets
    if command == "features":
        save_stub_sscd(tmp_path / "model.pt")
        png_folder(tmp_path / "gen", rand_images(3, r=16))
        argv = ["features", "--images", tmp_path / "gen", "--model", tmp_path / "model.pt",
                "--out", tmp_path / "f.npz"]
    else:
        argv = [command, "--denoiser", "empirical", "--train", train, "--images", held, "--sigmas", "1,2",
                *(["--pairs", "4"] if command == "linearity" else ["--M", "40"])]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    proc = cli(*argv, "--dry-run", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "nothing written" in proc.stdout and ("images/s" in proc.stdout or "GFLOP" in proc.stdout)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_format_duration_prints_hours_minutes_seconds():
    from diffrepro._estimate import format_duration

    cases = {0.04: "0.0 s", 3.33: "3.3 s", 42.4: "42 s", 192.0: "3 min 12 s", 3599.4: "59 min 59 s",
             1167556.0: "324 h 19 min", float("inf"): "unknown"}  # 1167556 s = 324 h 19.26 min
    assert {s: format_duration(s) for s in cases} == cases


def _estimate_gflop(stdout: str) -> float:
    return float(stdout.split("estimate ")[1].split(" GFLOP")[0]) if "estimate " in stdout else \
        float(stdout.split("~")[1].split(" GFLOP")[0])


def test_linearity_gaussian_dry_run_counts_the_fit_and_prints_a_measured_duration(tmp_path):
    """The dry run of the Gaussian model counts its fit (covariance 2 N d^2, eigh 9 d^3) and every call
    (4 d^2 per projection and back), prints the time at the measured rates in h/min/s, and fits nothing."""
    n, c, r = 800, 3, 16
    d = c * r * r
    np.savez(tmp_path / "train.npz", images=rand_images(n, c=c, r=r, seed=3))
    np.savez(tmp_path / "held.npz", images=rand_images(8, c=c, r=r, seed=4))
    proc = cli("linearity", "--denoiser", "gaussian", "--train", tmp_path / "train.npz", "--images",
               tmp_path / "held.npz", "--pairs", "4", "--sigmas", "0.5,1,2", "--dry-run", "--outdir", tmp_path / "o")
    assert proc.returncode == 0, proc.stderr
    evaluations = 3 * 4 * (2 + 5)  # sigmas x pairs x (x1, x2 and the five mixes)
    flops = evaluations * 4 * d * d + 2 * n * d * d + 9 * d ** 3
    assert f"{evaluations} denoiser evaluations" in proc.stdout and "fitted on 800 images first" in proc.stdout
    assert abs(_estimate_gflop(proc.stdout) - flops / 1e9) <= 0.05 + 1e-3 * flops / 1e9, (proc.stdout, flops / 1e9)
    assert "measured rates" in proc.stdout and "100 GFLOP/s" not in proc.stdout
    assert re.search(r"~(\d+\.\d s|\d+ s|\d+ min \d\d s|\d+ h \d\d min) at", proc.stdout), proc.stdout
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("denoiser", ["empirical", "gaussian"])
def test_generate_dry_run_counts_both_terms_of_guidance(tmp_path, denoiser):
    """Classifier-free guidance evaluates the unconditional and the class model at every step: the
    estimate counts both (the class's rows for the empirical denoiser, two fits and two calls for the
    Gaussian model, whose guided trajectory has no closed form)."""
    real = data.default_dataset()
    n, d, seeds, nfe = 60, 3 * 32 * 32, 10_000, 35  # Heun 18: 35 evaluations per sample
    labels = real.labels[:n]
    n_class = int((labels == 3).sum())
    np.savez(tmp_path / "train.npz", images=real.images[:n], labels=labels)
    base = ["generate", "--train", tmp_path / "train.npz", "--denoiser", denoiser, "--seeds", f"0-{seeds - 1}",
            "--dry-run", "--outdir", tmp_path / "o"]
    plain, guided = cli(*base), cli(*base, "--class", "3", "--guidance", "2")
    assert plain.returncode == 0 and guided.returncode == 0, plain.stderr + guided.stderr

    def fit(rows):  # the Gaussian fit of `rows` images (rows < d: the Gram matrix, its eigh, back-projection)
        return 4 * rows * rows * d + 9 * rows ** 3

    if denoiser == "empirical":
        want_plain, want_guided = 4 * n * d * nfe * seeds, 4 * (n + n_class) * d * nfe * seeds
    else:
        want_plain = 4 * d * d * seeds + fit(n)  # closed form: one projection per sample
        want_guided = 2 * 4 * d * d * nfe * seeds + fit(n) + fit(n_class)
    for proc, want in ((plain, want_plain), (guided, want_guided)):
        assert abs(_estimate_gflop(proc.stdout) - want / 1e9) <= 0.05 + 1e-3 * want / 1e9, (proc.stdout, want / 1e9)
    assert "unconditional and class 3" in guided.stdout and not (tmp_path / "o").exists()


def test_distill_warns_before_writing_large_models(tmp_path, tiny_sets):
    train, held = tiny_sets
    wrapper = ("import sys\nimport diffrepro.cli.analysis as analysis\nanalysis._LARGE_OUTPUT_BYTES = 1000\n"
               "from diffrepro.cli import main\nsys.exit(main(sys.argv[1:]))")
    proc = cli("distill", "--denoiser", "empirical", "--train", train, "--images", held, "--sigmas", "1",
               "--M", "40", "--out", tmp_path / "models.npz", "--json", tmp_path / "d.json", "--no-progress",
               wrapper=wrapper)
    # 1 sigma x (16 x 16 + 16) float64 = 2176 bytes > the 1000-byte threshold set above
    one_line(proc, 0, "diffrepro distill: warning:", "1 x 16 x 16 float64", "MiB on disk")
    assert (tmp_path / "models.npz").is_file() and (tmp_path / "d.json").is_file()


@pytest.fixture
def no_matplotlib(tmp_path):
    """An environment in which ``import matplotlib`` fails, as where it is not installed."""
    blocker = tmp_path / "blocker" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'matplotlib'\")\n")
    return {**ENV, "PYTHONPATH": os.pathsep.join([str(blocker.parent), ENV.get("PYTHONPATH", "")])}


def test_without_matplotlib_linearity_and_matrix_write_their_json_and_skip_the_plot(tmp_path, tiny_sets,
                                                                                    no_matplotlib):
    train, held = tiny_sets
    proc = cli("linearity", "--denoiser", "gaussian", "--train", train, "--images", held, "--pairs", "4",
               "--sigmas", "0.5,2", "--json", tmp_path / "lin.json", "--no-progress", env=no_matplotlib)
    one_line(proc, 0, "diffrepro linearity: warning:", "plot was skipped")
    result = json.loads((tmp_path / "lin.json").read_text())
    assert len(result["cos_main"]) == 2 and "png" not in result and not list(tmp_path.glob("*.png"))

    meta = {"model_sha256": "0" * 64, "preprocess": "p1_pil320"}
    feats = np.random.default_rng(2).standard_normal((3, 6, 8)).astype(np.float32)
    for k in range(3):
        save_features(tmp_path / f"m{k}.npz", feats[k], np.arange(6), meta)
    proc = cli("score", "matrix", "--features", *(tmp_path / f"m{k}.npz" for k in range(3)),
               "--json", tmp_path / "mat.json", env=no_matplotlib)
    one_line(proc, 0, "diffrepro score matrix: warning:", "heatmap was skipped")
    result = json.loads((tmp_path / "mat.json").read_text())
    assert np.array(result["matrix"]).shape == (3, 3) and "png" not in result and not list(tmp_path.glob("*.png"))


def test_linearity_plot_says_what_it_was_computed_on(tmp_path, tiny_sets):
    import PIL.Image

    train, held = tiny_sets
    proc = cli("linearity", "--denoiser", "empirical", "--train", train, "--images", held, "--pairs", "4",
               "--sigmas", "0.5,2", "--json", tmp_path / "lin.json", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    with PIL.Image.open(tmp_path / "lin.png") as img:
        assert img.info.get("Title") == ("linearity of the empirical denoiser of 24 images of train: 4 pairs of held, "
                                         "noisy inputs")


def test_bench_says_why_a_faiss_row_has_no_time(no_matplotlib, monkeypatch):
    """A peer that could not run prints the reason on screen, not nan (here faiss cannot be imported,
    as where it is not installed)."""
    from diffrepro.benchmarks import faiss_row, format_table

    blocker = Path(no_matplotlib["PYTHONPATH"].split(os.pathsep)[0]) / "faiss"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'faiss'\")\n")
    monkeypatch.setenv("PYTHONPATH", no_matplotlib["PYTHONPATH"])
    row = faiss_row("nn_search Q=8", "faiss (default env)", 8, 32, 16, 1, 1, None, 1e6)
    assert row["skipped"] == "faiss is not installed (pip install faiss-cpu)"
    rows = [{"case": "nn_search Q=8", "impl": "diffrepro", "seconds": 0.5, "min": 0.4, "max": 0.7, "rounds": 1,
             "gflops": 2.0}, row]
    text = format_table(rows)
    assert "skipped: faiss is not installed (pip install faiss-cpu)" in text and "nan" not in text


def test_bench_table_shows_rounds_and_spread():
    from diffrepro.benchmarks import format_table

    rows = [{"case": "denoiser", "impl": "diffrepro", "seconds": 0.5, "min": 0.4, "max": 0.7, "rounds": 5,
             "gflops": 10.0},
            {"case": "denoiser", "impl": "torch", "seconds": 2.0, "min": 1.5, "max": 2.5, "rounds": 5, "gflops": 2.5}]
    header, ours, peer = format_table(rows).splitlines()
    assert "median s" in header and "min-max s" in header and "rounds" in header
    assert ours.split()[-5:] == ["0.5000", "0.4000-0.7000", "5", "10.0", "1.00x"]
    assert peer.split()[-5:] == ["2.0000", "1.5000-2.5000", "5", "2.5", "4.00x"]  # 2.0 / 0.5


@pytest.mark.parametrize("argv", [["generate", "--seeds", "0"], ["demo"], ["score", "mae", "--a", "A", "--b", "B"],
                                  ["linearity", "--denoiser", "gaussian", "--train", "T", "--images", "I"]])
def test_outdir_that_is_a_file_is_one_usage_error_naming_it(tmp_path, argv):
    (tmp_path / "taken").write_text("a file")
    proc = cli(*argv, "--outdir", tmp_path / "taken")
    one_line(proc, 2, f"diffrepro {' '.join(a for a in argv[:2] if not a.startswith('-'))}: error: --outdir: got "
                      f"the file '{tmp_path / 'taken'}', expected a folder")
    assert (tmp_path / "taken").read_text() == "a file"


def test_bad_thread_count_names_the_variable(tmp_path):
    proc = cli("generate", "--seeds", "0", "--outdir", tmp_path / "out", env={**ENV, "DIFFREPRO_NUM_THREADS": "abc"})
    one_line(proc, 2, "error: DIFFREPRO_NUM_THREADS: got 'abc', expected an integer >= 1")
    assert not (tmp_path / "out").exists()


def test_image_paths_in_folders_print_as_paths(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    data.save_png(folder / "a.png", rand_images(1, r=8)[0])
    data.save_png(folder / "b.png", rand_images(1, r=16)[0])
    with pytest.raises(ValueError) as err:
        data.load_dataset(str(folder) + "/")
    assert f"image {folder / 'b.png'} has shape" in str(err.value) and f"but {folder / 'a.png'} has" in str(err.value)
    assert ":b.png" not in str(err.value) and ":a.png" not in str(err.value)


# ----------------------------------------------------------------------------------------------
# descriptors without a direction, JSON without NaN
# ----------------------------------------------------------------------------------------------
def test_nan_or_zero_descriptor_rows_are_refused_naming_the_file_and_row(tmp_path):
    meta = {"model_sha256": "0" * 64, "preprocess": "p1_pil320"}
    feats = np.random.default_rng(3).standard_normal((6, 8)).astype(np.float32)
    save_features(tmp_path / "a.npz", feats, np.arange(10, 16), meta)
    nan = feats.copy()
    nan[4, 2] = np.nan
    save_features(tmp_path / "b.npz", nan, np.arange(10, 16), meta)
    one_line(cli("score", "rp", "--a", tmp_path / "a.npz", "--b", tmp_path / "b.npz", "--outdir", tmp_path / "o"),
             2, "--b", "b.npz", "row 4 (id 14)", "NaN or infinite")
    # memory-mapped training descriptors are checked chunk by chunk as they stream
    train = np.random.default_rng(4).standard_normal((50, 8)).astype(np.float32)
    train[37] = 0
    np.save(tmp_path / "train.npy", train)
    proc = cli("score", "gl-sscd", "--gen", tmp_path / "a.npz", "--train", tmp_path / "train.npy",
               "--chunk-rows", "16", "--outdir", tmp_path / "o")
    warning, error = proc.stderr.strip().splitlines()  # a .npy carries no model metadata: one warning first
    assert proc.returncode == 2 and "warning: --train: no model/preprocessing metadata" in warning
    for needle in ("error: --train:", "train.npy", "row 37", "all zero"):
        assert needle in error
    assert not (tmp_path / "o").exists()


def test_json_output_never_holds_nan(tmp_path):
    _common.write_json(tmp_path / "r.json", {"a": float("nan"), "b": [1.0, np.float32("inf")],
                                             "c": np.array([np.nan, 2.0])})

    def refuse(constant):
        raise AssertionError(f"{constant} in the JSON")

    assert json.loads((tmp_path / "r.json").read_text(), parse_constant=refuse) == \
        {"a": None, "b": [1.0, None], "c": [None, 2.0]}
