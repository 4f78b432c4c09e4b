# SPDX-License-Identifier: Apache-2.0
"""Every JSON diffrepro writes parses with a strict parser: small real jobs of the commands that write
JSON (guided and inverse runs, whose denoisers accept every σ, used to write ``"sigma_max": Infinity``),
then every ``*.json`` they left and the JSON stored in their ``.npz`` files, read with ``json.loads``
refusing ``NaN``/``Infinity``. Non-finite floats are written as ``null`` (diffrepro.data.jsonable)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import save_stub_sscd

from diffrepro import data

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFREPRO_NUM_THREADS": "1"}


def strict_loads(text):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def cli(*commands):
    """Run the ``diffrepro`` commands concurrently; all must succeed. Returns the last one's stdout."""
    procs = [subprocess.Popen([sys.executable, "-m", "diffrepro", *map(str, argv)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=ENV) for argv in commands]
    for argv, proc in zip(commands, procs):
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, (argv, err)
    return out


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("json")
    images = np.random.default_rng(0).integers(0, 256, (24, 3, 8, 8), dtype=np.uint8)
    np.savez(d / "train.npz", images=images, labels=np.arange(24) % 3)
    np.savez(d / "held.npz", images=images[::-1].copy())
    save_stub_sscd(d / "sscd.pt")
    common = ["--train", d / "train.npz", "--seeds", "0-3", "--steps", "3", "--no-progress"]
    cli(["generate", *common, "--class", 1, "--guidance", 2, "--outdir", d / "guided"],
        ["generate", *common, "--outdir", d / "plain"],
        ["inverse", *common, "--task", "sr2", "--cg-iters", 2, "--outdir", d / "inverse"],
        ["inverse", *common, "--task", "inpaint-box", "--denoiser", "gaussian", "--outdir", d / "inverse_gauss"],
        ["linearity", "--denoiser", "gaussian", "--train", d / "train.npz", "--images", d / "held.npz",
         "--sigmas", "1,2", "--pairs", 4, "--outdir", d, "--no-progress"])
    cli(*(["features", "--images", d / name, "--model", d / "sscd.pt", "--out", d / f"{name}.npz", "--no-progress"]
          for name in ("guided", "plain")),
        ["score", "mae", "--a", d / "guided", "--b", d / "plain", "--outdir", d],
        ["score", "gl-nn", "--gen", d / "guided", "--train", d / "train.npz", "--outdir", d])
    cli(["score", "rp", "--a", d / "guided.npz", "--b", d / "plain.npz", "--outdir", d])
    return d


def test_every_json_file_is_strict(outputs):
    files = sorted(outputs.rglob("*.json"))
    names = {str(p.relative_to(outputs)) for p in files}
    assert {"guided/manifest.json", "inverse/manifest.json", "inverse_gauss/manifest.json",
            "plain/manifest.json"} <= names and len(names) >= 8, names
    for path in files:
        strict_loads(path.read_text())
    for name in ("guided", "inverse"):  # the denoisers accept every σ: no upper limit is null
        assert strict_loads((outputs / name / "manifest.json").read_text())["config"]["denoiser"]["sigma_max"] is None


def test_json_inside_npz_files_is_strict(outputs):
    checked = 0
    for path in sorted(outputs.rglob("*.npz")):
        with np.load(path) as z:
            for key in ("run", "meta"):
                if key in z.files:
                    strict_loads(str(z[key]))
                    checked += 1
    assert checked >= 6


def test_a_run_with_an_unbounded_denoiser_resumes(outputs):
    """The manifest holds null where the run's identity holds infinity: the rerun still recognises it."""
    again = cli(["generate", "--train", outputs / "train.npz", "--seeds", "0-3", "--steps", "3", "--no-progress",
                 "--class", 1, "--guidance", 2, "--outdir", outputs / "guided"])
    assert "(0 generated, 4 reused)" in again


def test_info_prints_strict_json():
    strict_loads(cli(["info"]))


def test_the_writer_refuses_what_it_cannot_encode_strictly(tmp_path):
    data.atomic_write_json(tmp_path / "a.json", {"inf": float("inf"), "x": [np.float32("nan"), -np.inf, 1.5]})
    assert strict_loads((tmp_path / "a.json").read_text()) == {"inf": None, "x": [None, None, 1.5]}
    with pytest.raises(ValueError, match="not JSON compliant"):  # a NaN slipping past jsonable is an error
        data.atomic_write_json(tmp_path / "b.json", {"x": object()}, default=lambda o: float("nan"))
    assert not (tmp_path / "b.json").exists()
