# SPDX-License-Identifier: Apache-2.0
"""The README's pipeline end to end through real ``python -m diffrepro`` processes on real outputs:
two ``generate`` runs (the empirical denoiser with Euler, which copies training images, and the
Gaussian one with Heun, which does not), ``features`` of both and of the training images with a
small real TorchScript model, then ``score rp``, ``gl-sscd``, ``gl-nn``, ``mae`` and ``matrix``, each
number checked against an independent numpy computation on the files themselves (PNGs read with PIL,
feature files with ``np.load``). Every process runs under umask 027: every output must be 0640."""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from helpers import save_stub_sscd

from diffrepro import data

SEEDS = list(range(16))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFREPRO_NUM_THREADS": "1"}


def run_all(*commands):
    """Run the ``diffrepro`` commands concurrently under umask 027; all must succeed."""
    procs = [subprocess.Popen([sys.executable, "-m", "diffrepro", *map(str, argv)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=ENV, preexec_fn=lambda: os.umask(0o027))
             for argv in commands]
    for argv, proc in zip(commands, procs):
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, (argv, out, err)


def read_pngs(folder):
    """uint8 [S, C, H, W] of the per-seed PNGs, read with PIL (not diffrepro's reader)."""
    return np.stack([np.asarray(PIL.Image.open(folder / f"{s:06d}.png")).transpose(2, 0, 1) for s in SEEDS])


def read_features(path):
    with np.load(path) as z:
        return z["features"].astype(np.float64), z["ids"]


def cosine(a, b):
    return (a @ b.T) / np.outer(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1))


def split_threshold(values):
    """A threshold in a clear gap (> 1e-6) between observed values, nearest their median, so that the
    strict comparisons split the set and rounding cannot move a value across it."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    gaps = np.flatnonzero(np.diff(v) > 1e-6)
    assert len(gaps), f"no clear gap to split {v}"
    k = gaps[np.argmin(np.abs(gaps + 0.5 - (len(v) - 1) / 2))]
    return float((v[k] + v[k + 1]) / 2)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipeline")
    np.savez(d / "train.npz", images=data.default_dataset().images[:64])
    common = ["--train", d / "train.npz", "--seeds", "0-15", "--steps", "4", "--batch", "8", "--no-progress"]
    run_all(["generate", *common, "--sampler", "euler", "--outdir", d / "euler"],
            ["generate", *common, "--denoiser", "gaussian", "--sampler", "heun", "--outdir", d / "gauss"])
    save_stub_sscd(d / "sscd.pt")
    run_all(*(["features", "--images", d / src, "--model", d / "sscd.pt", "--out", d / f"{name}.npz", "--no-progress"]
              for src, name in (("euler", "f_euler"), ("gauss", "f_gauss"), ("train.npz", "f_train"))))
    return d


def test_generate_folders_give_features_of_exactly_their_seeds(pipeline):
    for name in ("f_euler", "f_gauss"):
        feats, ids = read_features(pipeline / f"{name}.npz")
        assert ids.dtype == np.int64 and sorted(ids.tolist()) == SEEDS and feats.shape == (16, 16)
    _, ids = read_features(pipeline / "f_train.npz")
    assert ids.tolist() == list(range(64))
    assert (pipeline / "euler" / "grid.png").is_file()  # there, but not read as a generation


def test_scores_on_generate_outputs_match_independent_numpy(pipeline):
    d = pipeline
    fa, ida = read_features(d / "f_euler.npz")
    fb, idb = read_features(d / "f_gauss.npz")
    ft, _ = read_features(d / "f_train.npz")
    pair_sim = np.diag(cosine(fa[np.argsort(ida)], fb[np.argsort(idb)]))  # seed order (ids are the seeds)
    max_sim = cosine(fb, ft).max(axis=1)  # the Gaussian generations' rows in file order
    train = data.default_dataset().images[:64]
    ga, gb = read_pngs(d / "euler"), read_pngs(d / "gauss")
    mae = np.abs(ga.astype(np.int64) - gb.astype(np.int64)).reshape(16, -1).mean(axis=1)
    y = train.reshape(64, -1) / 127.5 - 1
    xs = {name: g.reshape(16, -1) / 127.5 - 1 for name, g in (("euler", ga), ("gauss", gb))}
    dists = {name: np.linalg.norm(x[:, None, :] - y[None, :, :], axis=2) for name, x in xs.items()}
    tau, tau_gl, thresh = split_threshold(pair_sim), split_threshold(max_sim), split_threshold(mae)

    out = d / "scores"
    run_all(["score", "rp", "--a", d / "f_euler.npz", "--b", d / "f_gauss.npz", "--tau", tau,
             "--json", out / "rp.json"],
            ["score", "gl-sscd", "--gen", d / "f_gauss.npz", "--train", d / "f_train.npz", "--tau", tau_gl,
             "--json", out / "gl-sscd.json"],
            *(["score", "gl-nn", "--gen", d / name, "--train", d / "train.npz", "--json", out / f"gl-nn-{name}.json"]
              for name in xs),
            ["score", "mae", "--a", d / "euler", "--b", d / "gauss", "--thresh", thresh, "--json", out / "mae.json"],
            ["score", "matrix", "--features", d / "f_euler.npz", d / "f_gauss.npz", "--tau", tau,
             "--json", out / "matrix.json"])
    result = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    # RP: same-seed cosine of the saved descriptors, strictly above tau
    assert result["rp"]["count"] == int((pair_sim > tau).sum()) and 0 < result["rp"]["count"] < 16
    assert result["rp"]["n"] == 16
    with np.load(out / "rp.npz") as z:
        assert z["ids"].tolist() == SEEDS
        np.testing.assert_allclose(z["sim"], pair_sim, atol=1e-12)
    # GL (SSCD): 1 - fraction with a training descriptor of cosine > tau
    memorised = int((max_sim > tau_gl).sum())
    assert result["gl-sscd"]["count"] == memorised and 0 < memorised < 16
    assert result["gl-sscd"]["gl"] == 1 - memorised / 16
    with np.load(out / "gl-sscd.npz") as z:
        np.testing.assert_array_equal(z["ids"], idb)
        np.testing.assert_allclose(z["max_sim"], max_sim, atol=1e-12)
    # GL (nearest neighbour, Li, Dai, Qu eq. 14) on the PNGs, in seed order; distance 0 = an exact copy
    train_bytes = {t.tobytes() for t in train}
    for name, g in (("euler", ga), ("gauss", gb)):
        dist = dists[name]
        with np.load(out / f"gl-nn-{name}.npz") as z:
            assert z["ids"].tolist() == SEEDS
            np.testing.assert_array_equal(dist[np.arange(16), z["nn_index"]], dist.min(axis=1))
            np.testing.assert_allclose(z["dist"], dist.min(axis=1), atol=1e-12)
            copies = [img.tobytes() in train_bytes for img in g]
            assert ((z["dist"] == 0) == copies).all()
        np.testing.assert_allclose(result[f"gl-nn-{name}"]["gl_nn"],
                                   np.mean(dist.min(axis=1) / np.linalg.norm(xs[name], axis=1)), rtol=1e-12)
    assert result["gl-nn-euler"]["gl_nn"] < 0.05 < result["gl-nn-gauss"]["gl_nn"]  # memorising vs not
    # MAE score on the PNGs
    assert result["mae"]["count"] == int((mae < thresh).sum()) and 0 < result["mae"]["count"] < 16
    np.testing.assert_allclose(result["mae"]["mean_mae"], mae.mean(), rtol=1e-12)
    # the matrix's off-diagonal entry is the pair's RP
    assert result["matrix"]["matrix"][0][1] == result["matrix"]["matrix"][1][0] == result["rp"]["rp"]


def test_every_output_honours_the_umask(pipeline):
    files = [p for p in Path(pipeline).rglob("*") if p.is_file() and p.suffix != ".pt" and p.name != "train.npz"]
    assert len(files) > 40  # PNGs, batches, manifests, grids, features, scores and their npz, a heatmap
    modes = {str(p.relative_to(pipeline)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {"0o640"}, modes
