# SPDX-License-Identifier: Apache-2.0
"""End-to-end tests of ``diffrepro features | score | linearity | distill`` through
``diffrepro.cli.main`` on real files made in tmp_path, checked against exact constructions,
brute-force float64 numpy oracles and closed forms (Zhang et al. 2024; Li, Dai, Qu 2024)."""
import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import save_stub_sscd

from diffrepro import metrics
from diffrepro.cli import main
from diffrepro.data import save_png
from diffrepro.sscd import load_features, preprocess_images, save_features


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny matrices: with 2 OpenMP threads on a loaded 2-core machine each small torch op can
    wait milliseconds for a descheduled thread (measured 50x slower); one thread is exact too."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def run(*argv):
    assert main([str(a) for a in argv]) == 0


def read_json(path):
    return json.loads(Path(path).read_text())


def fail(*argv, status=2):
    """Run a command that must fail with a one-line user error (exit 2) or runtime error (exit 1);
    return its message."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse's own type and choice errors
            code = exc.code
    assert code == status, err.getvalue()
    return err.getvalue()


def write_pngs(folder, images, names):
    folder = Path(folder)
    for img, name in zip(images, names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        save_png(folder / name, img)
    return folder


# ----------------------------------------------------------------------------------------------
# features
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def stub_model(tmp_path):
    path = tmp_path / "stub.torchscript.pt"
    return path, save_stub_sscd(path)


def test_features_pairs_seed_ids_matches_direct_forward_and_is_cached(tmp_path, stub_model, capsys):
    model_path, model = stub_model
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 3, 16, 16), dtype=np.uint8)
    folder = write_pngs(tmp_path / "gen", images, ["000003.png", "000017.png", "000000/000123.png"])
    out = tmp_path / "gen.npz"
    run("features", f"--images={folder}", f"--model={model_path}", "--preprocess=p1_pil320", f"--out={out}",
        "--no-progress")
    feats = load_features(out)
    # sorted names: "000000/000123.png" < "000003.png" < "000017.png"
    np.testing.assert_array_equal(feats.ids, [123, 3, 17])
    assert feats.ids.dtype == np.int64
    order = [2, 0, 1]
    with torch.inference_mode():
        expected = F.normalize(model(preprocess_images(images[order], "p1_pil320")).double(), dim=1).numpy()
    np.testing.assert_allclose(feats.features, expected, atol=1e-6)
    assert feats.meta["preprocess"] == "p1_pil320" and feats.meta["n"] == 3

    stamp = out.stat().st_mtime_ns
    capsys.readouterr()
    run("features", f"--images={folder}", f"--model={model_path}", f"--out={out}", "--no-progress")
    assert "up to date" in capsys.readouterr().out and out.stat().st_mtime_ns == stamp
    # a changed image invalidates the file
    save_png(folder / "000003.png", 255 - images[0])
    run("features", f"--images={folder}", f"--model={model_path}", f"--out={out}", "--no-progress")
    assert not np.allclose(load_features(out).features[1], feats.features[1])

    other = write_pngs(tmp_path / "named", images[:2], ["cat.png", "dog.png"])
    run("features", f"--images={other}", f"--model={model_path}", f"--out={tmp_path / 'named.npz'}", "--no-progress")
    np.testing.assert_array_equal(load_features(tmp_path / "named.npz").ids, ["cat.png", "dog.png"])

    assert "--model" in fail("features", f"--images={folder}", f"--model={tmp_path / 'nope.pt'}", f"--out={out}")
    assert "--images" in fail("features", f"--images={tmp_path / 'nope'}", f"--model={model_path}", f"--out={out}")


# ----------------------------------------------------------------------------------------------
# score rp
# ----------------------------------------------------------------------------------------------
# Integer rows with exact float64 cosines: <(2,0),(3,4)>/(2*5) = 0.6 exactly, etc.
A_ROWS = np.array([[2, 0, 0], [2, 0, 0], [1, 0, 0], [1, 0, 0], [0, 0, 3], [0, 1, 0], [1, 0, 0]], np.float32)
B_ROWS = np.array([[3, 4, 0], [4, 3, 0], [12, 5, 0], [5, 12, 0], [0, 4, 3], [0, 1, 0], [-3, 4, 0]], np.float32)
SIMS = np.array([0.6, 0.8, 12 / 13, 5 / 13, 0.6, 1.0, -0.6])   # > 0.6: 3; > 0.8: 2; > 0.59: 5


def test_rp_exact_counts_strict_threshold_pairing_by_id(tmp_path):
    ids = np.array([100, 101, 102, 103, 104, 105, 1000000])
    perm = np.array([6, 3, 0, 5, 1, 4, 2])
    save_features(tmp_path / "a.npz", A_ROWS, ids)
    save_features(tmp_path / "b.npz", B_ROWS[perm], ids[perm])
    for tau, count in ((0.6, 3), (0.8, 2), (0.59, 5)):
        out = tmp_path / f"rp{tau}.json"
        run("score", "rp", f"--a={tmp_path / 'a.npz'}", f"--b={tmp_path / 'b.npz'}", f"--tau={tau}", f"--json={out}")
        res = read_json(out)
        assert res["count"] == count == int((SIMS > tau).sum())
        assert res["n"] == 7 and res["rp"] == count / 7 and res["tau"] == tau
        assert res["ci95"] == list(metrics.wilson_interval(count, 7))
    # default JSON location: next to the first input, or in --outdir
    run("score", "rp", f"--a={tmp_path / 'a.npz'}", f"--b={tmp_path / 'b.npz'}")
    assert read_json(tmp_path / "a__b.rp.json")["count"] == 3
    run("score", "rp", f"--a={tmp_path / 'a.npz'}", f"--b={tmp_path / 'b.npz'}", f"--outdir={tmp_path / 'o'}")
    assert (tmp_path / "o" / "a__b.rp.json").is_file()
    # per generation, beside the JSON: ids in ascending order and each pair's similarity
    with np.load(tmp_path / "a__b.rp.npz") as z:
        assert z["ids"].tolist() == sorted(ids.tolist())
        np.testing.assert_allclose(z["sim"], SIMS, rtol=0, atol=1e-12)


def test_rp_errors_name_the_argument(tmp_path):
    save_features(tmp_path / "a.npz", A_ROWS, np.arange(7))
    save_features(tmp_path / "b.npz", B_ROWS[:6], np.arange(6))
    msg = fail("score", "rp", f"--a={tmp_path / 'a.npz'}", f"--b={tmp_path / 'b.npz'}")
    assert "--a/--b" in msg and "[6]" in msg            # names the id b lacks
    np.savez(tmp_path / "legacy.npz", features=A_ROWS)   # P1's format: no ids
    msg = fail("score", "rp", f"--a={tmp_path / 'legacy.npz'}", f"--b={tmp_path / 'b.npz'}")
    assert msg.startswith("diffrepro score rp: error: --a:") and "ids" in msg
    assert "--tau" in fail("score", "rp", f"--a={tmp_path / 'a.npz'}", f"--b={tmp_path / 'b.npz'}", "--tau=2")
    assert "--b" in fail("score", "rp", f"--a={tmp_path / 'a.npz'}", f"--b={tmp_path / 'missing.npz'}")


# ----------------------------------------------------------------------------------------------
# score mae
# ----------------------------------------------------------------------------------------------
def test_mae_exact_counts_signed_difference_and_id_pairing(tmp_path):
    rng = np.random.default_rng(1)
    base = rng.integers(40, 200, (6, 3, 8, 8)).astype(np.int16)
    other = base.copy()
    other[0] += 0                       # MAE 0
    other[1] += 14                      # 14   (< 15)
    other[2] += 15                      # 15   (not < 15)
    other[3] -= 16                      # 16
    sign = np.where(np.arange(3 * 8 * 8).reshape(3, 8, 8) % 2 == 0, 1, -1)
    other[4] += 15 * sign               # mixed signs, MAE exactly 15
    base[5], other[5] = 250, 10         # MAE 240 (uint8 wrap-around would give 16)
    seeds = [2, 10, 11, 20, 33, 1000000]
    write_pngs(tmp_path / "a", base.astype(np.uint8), [f"{s:06d}.png" for s in seeds])
    # b: unpadded names, so its sorted order (10, 11, 1000000, 2, 20, 33) differs from a's
    write_pngs(tmp_path / "b", other.astype(np.uint8), [f"{s}.png" for s in seeds])
    out = tmp_path / "mae.json"
    run("score", "mae", f"--a={tmp_path / 'a'}", f"--b={tmp_path / 'b'}", f"--json={out}")
    res = read_json(out)
    assert res["count"] == 2 and res["n"] == 6 and res["thresh"] == 15.0
    assert res["ci95"] == list(metrics.wilson_interval(2, 6))
    run("score", "mae", f"--a={tmp_path / 'a'}", f"--b={tmp_path / 'b'}", "--thresh=15.5", f"--json={out}")
    assert read_json(out)["count"] == 4
    run("score", "mae", f"--a={tmp_path / 'a'}", f"--b={tmp_path / 'b'}")
    assert (tmp_path / "a__b.mae.json").is_file()

    write_pngs(tmp_path / "c", base[:5].astype(np.uint8), [f"{s:06d}.png" for s in seeds[:5]])
    msg = fail("score", "mae", f"--a={tmp_path / 'a'}", f"--b={tmp_path / 'c'}")
    assert "--a/--b" in msg and "1000000" in msg


# ----------------------------------------------------------------------------------------------
# score gl-sscd
# ----------------------------------------------------------------------------------------------
def _gl_oracle(gen, train, tau):
    g = np.asarray(gen, np.float64)
    t = np.asarray(train, np.float64)
    cos = (g @ t.T) / np.outer(np.linalg.norm(g, axis=1), np.linalg.norm(t, axis=1))
    return int((cos.max(axis=1) > tau).sum())


@pytest.fixture
def gl_sscd_files(tmp_path):
    rng = np.random.default_rng(2)
    D, N, Q = 16, 3000, 40
    train = rng.standard_normal((N, D)).astype(np.float32)
    train[:, 0] = 0.0                                    # random rows are orthogonal to e_0 ...
    train[1234] = 0.0
    train[1234, :2] = (3.0, 4.0)                         # ... except this one: cos with 2 e_0 is 0.6 exactly
    gen = rng.standard_normal((Q, D)).astype(np.float32)
    near = rng.choice(N, 15, replace=False)
    gen[:15] = train[near] + 0.3 * rng.standard_normal((15, D)).astype(np.float32)
    gen[15] = 0.0
    gen[15, 0] = 2.0
    save_features(tmp_path / "gen.npz", gen, np.arange(100, 100 + Q))
    np.save(tmp_path / "train32.npy", train)
    np.save(tmp_path / "train16.npy", train.astype(np.float16))
    save_features(tmp_path / "train.npz", train, np.arange(N))
    return tmp_path, gen, train


@pytest.mark.parametrize("train_file", ["train32.npy", "train16.npy", "train.npz"])
def test_gl_sscd_streams_memmap_and_matches_float64_oracle(gl_sscd_files, train_file):
    tmp_path, gen, train = gl_sscd_files
    ref = np.load(tmp_path / train_file, mmap_mode="r") if train_file.endswith(".npy") else train
    out = tmp_path / "gl.json"
    for tau in (0.6, 0.59, 0.8):
        run("score", "gl-sscd", f"--gen={tmp_path / 'gen.npz'}", f"--train={tmp_path / train_file}",
            f"--tau={tau}", "--chunk-rows=700", f"--json={out}")
        res = read_json(out)
        count = _gl_oracle(gen, ref, tau)
        assert res["count"] == count and res["n"] == 40 and res["n_train"] == 3000
        assert res["memorised_fraction"] == count / 40 and res["gl"] == 1 - count / 40
        lo, hi = metrics.wilson_interval(count, 40)
        assert res["memorised_ci95"] == [lo, hi]
        assert res["gl_ci95"] == pytest.approx([1 - hi, 1 - lo], abs=1e-15)
    # the constructed row sits exactly at 0.6: it counts at tau=0.59 but not at 0.6
    assert _gl_oracle(gen[15:16], ref, 0.6) == 0 and _gl_oracle(gen[15:16], ref, 0.59) == 1


def test_gl_sscd_errors(gl_sscd_files):
    tmp_path, _, train = gl_sscd_files
    np.save(tmp_path / "wrong_d.npy", train[:, :8])
    np.save(tmp_path / "ints.npy", np.zeros((4, 16), np.int32))
    gen = f"--gen={tmp_path / 'gen.npz'}"
    assert "D=8" in fail("score", "gl-sscd", gen, f"--train={tmp_path / 'wrong_d.npy'}")
    assert "--train" in fail("score", "gl-sscd", gen, f"--train={tmp_path / 'ints.npy'}")
    assert "--chunk-rows" in fail("score", "gl-sscd", gen, f"--train={tmp_path / 'train32.npy'}", "--chunk-rows=0")


# ----------------------------------------------------------------------------------------------
# score gl-nn
# ----------------------------------------------------------------------------------------------
def test_gl_nn_png_folder_and_float_npz_match_float64_oracle(tmp_path):
    rng = np.random.default_rng(3)
    train = rng.integers(0, 256, (200, 3, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "train.npz", images=train)
    gen = train[[5, 17, 150]].astype(np.int16) + rng.integers(-20, 21, (3, 3, 4, 4))
    gen = np.concatenate([np.clip(gen, 0, 255), rng.integers(0, 256, (5, 3, 4, 4))]).astype(np.uint8)
    write_pngs(tmp_path / "gen", gen, [f"{s:06d}.png" for s in range(8)])

    def oracle(x, normalize):
        x = x.reshape(len(x), -1)
        y = train.reshape(len(train), -1) / 127.5 - 1.0
        d = np.sqrt(((x[:, None, :] - y[None]) ** 2).sum(-1))
        nn = y[d.argmin(1)]
        dist = d.min(1)
        den = {"x": np.linalg.norm(x, axis=1), "nn": np.linalg.norm(nn, axis=1), "none": 1.0}[normalize]
        return float((dist / den).mean())

    out = tmp_path / "glnn.json"
    for normalize in ("x", "nn", "none"):
        run("score", "gl-nn", f"--gen={tmp_path / 'gen'}", f"--train={tmp_path / 'train.npz'}",
            f"--normalize={normalize}", f"--json={out}")
        res = read_json(out)
        assert res["n"] == 8 and res["n_train"] == 200 and res["normalize"] == normalize
        assert res["gl_nn"] == pytest.approx(oracle(gen / 127.5 - 1.0, normalize), rel=1e-12)

    xf = rng.uniform(-1, 1, (6, 3, 4, 4))
    np.savez(tmp_path / "gen_float.npz", x=xf)
    run("score", "gl-nn", f"--gen={tmp_path / 'gen_float.npz'}", f"--train={tmp_path / 'train.npz'}")
    assert read_json(tmp_path / "gen_float__train.gl-nn.json")["gl_nn"] == pytest.approx(oracle(xf, "x"), rel=1e-12)

    np.savez(tmp_path / "small.npz", images=train[:, :, :2, :2])
    assert "--gen and --train" in fail("score", "gl-nn", f"--gen={tmp_path / 'gen'}",
                                       f"--train={tmp_path / 'small.npz'}")


# ----------------------------------------------------------------------------------------------
# score matrix
# ----------------------------------------------------------------------------------------------
def test_matrix_rp_and_mae_with_heatmap(tmp_path):
    ids = np.arange(7)
    rows = [A_ROWS, B_ROWS, B_ROWS[:, [1, 0, 2]]]
    files = []
    for i, r in enumerate(rows):
        files.append(tmp_path / f"m{i}.npz")
        save_features(files[-1], r, ids)
    run("score", "matrix", "--features", *files, "--metric=rp", "--names", "A", "B", "C")
    res = read_json(tmp_path / "m0__m1__m2.rp-matrix.json")
    m = np.array(res["matrix"])
    assert res["names"] == ["A", "B", "C"] and np.array_equal(m, m.T) and np.all(np.diag(m) == 1)
    for i in range(3):
        for j in range(i + 1, 3):
            assert m[i, j] == metrics.rp((rows[i], ids), (rows[j], ids))["rp"]
    assert res["count"][0][1] == 3 and res["n"][0][1] == 7
    assert Path(res["png"]).is_file() and Path(res["png"]).stat().st_size > 0

    rng = np.random.default_rng(4)
    base = rng.integers(40, 200, (4, 3, 8, 8))
    folders = []
    for i, shift in enumerate((0, 10, 20)):
        folders.append(write_pngs(tmp_path / f"img{i}", (base + shift).astype(np.uint8),
                                  [f"{s:06d}.png" for s in range(4)]))
    png = tmp_path / "mae.png"
    run("score", "matrix", "--features", *folders, "--metric=mae", f"--png={png}", f"--json={tmp_path / 'mae.json'}")
    m = np.array(read_json(tmp_path / "mae.json")["matrix"])
    np.testing.assert_array_equal(m, [[1, 1, 0], [1, 1, 1], [0, 1, 1]])   # MAE 10, 20, 10 vs 15
    assert png.is_file()
    assert "--names" in fail("score", "matrix", "--features", *files, "--names", "A")


# ----------------------------------------------------------------------------------------------
# linearity
# ----------------------------------------------------------------------------------------------
def _tiny_sets(tmp_path, n_train=64, n_held=20, seed=5):
    rng = np.random.default_rng(seed)
    # correlated pixels so that the covariance has structure
    basis = rng.standard_normal((6, 48))
    def draw(n):
        z = rng.standard_normal((n, 6)) @ basis * 20 + 128 + rng.standard_normal((n, 48)) * 8
        return np.clip(np.rint(z), 0, 255).astype(np.uint8).reshape(n, 3, 4, 4)
    train, held = draw(n_train), draw(n_held)
    np.savez(tmp_path / "train.npz", images=train)
    np.savez(tmp_path / "held.npz", images=held)
    return train, held


def _wiener(train, sigma):
    y = train.reshape(len(train), -1) / 127.5 - 1.0
    mu = y.mean(0)
    cov = (y - mu).T @ (y - mu) / len(y)
    W = np.linalg.solve(cov + sigma**2 * np.eye(len(mu)), cov).T   # Σ (Σ + σ²I)⁻¹ (both symmetric)
    return W, mu - W @ mu


def test_linearity_of_the_gaussian_denoiser_matches_its_affine_closed_form(tmp_path):
    train, held = _tiny_sets(tmp_path)
    P = 10
    out = tmp_path / "lin.json"
    run("linearity", "--denoiser=gaussian", f"--train={tmp_path / 'train.npz'}", f"--images={tmp_path / 'held.npz'}",
        "--sigmas=0.1,1,10", f"--pairs={P}", "--seed=0", f"--json={out}")
    res = read_json(out)
    assert Path(res["png"]).is_file()
    a = np.array(res["a"])
    np.testing.assert_allclose(a, [0.99, 0.8675, 0.745, 0.6225, 0.5])
    y = held.reshape(len(held), -1) / 127.5 - 1.0
    eps = torch.randn((2, 2 * P, 3, 4, 4), generator=torch.Generator().manual_seed(0),
                      dtype=torch.float64).numpy().reshape(2, 2 * P, -1)
    for i, sigma in enumerate([0.1, 1.0, 10.0]):
        W, b = _wiener(train, sigma)
        x1, x2 = y[:P] + sigma * eps[0, :P], y[P:] + sigma * eps[1, P:]
        for j, av in enumerate(a):
            al, be = math.sqrt(av), math.sqrt(1 - av)
            f_mix = (al * x1 + be * x2) @ W.T + b
            target = al * (x1 @ W.T + b) + be * (x2 @ W.T + b)        # = f_mix + (α + β − 1) b
            cos = (f_mix * target).sum(1) / np.linalg.norm(f_mix, axis=1) / np.linalg.norm(target, axis=1)
            nmse = np.linalg.norm(f_mix - target, axis=1) / np.linalg.norm(target, axis=1)
            assert res["cos"][i][j] == pytest.approx(cos.mean(), abs=1e-9)
            assert res["nmse"][i][j] == pytest.approx(nmse.mean(), abs=1e-9)
    assert "--sigmas" in fail("linearity", "--denoiser=gaussian", f"--train={tmp_path / 'train.npz'}",
                              f"--images={tmp_path / 'held.npz'}", "--sigmas=0,1")
    assert "--images" in fail("linearity", "--denoiser=gaussian", f"--train={tmp_path / 'train.npz'}",
                              f"--images={tmp_path / 'held.npz'}", "--pairs=11")


def test_linearity_of_the_empirical_denoiser_at_huge_sigma_is_the_constant_mean(tmp_path):
    _tiny_sets(tmp_path)
    out = tmp_path / "lin.json"
    run("linearity", "--denoiser=empirical", f"--train={tmp_path / 'train.npz'}", f"--images={tmp_path / 'held.npz'}",
        "--sigmas=1e5", "--pairs=10", "--dtype=float64", f"--json={out}")
    res = read_json(out)
    # D ≈ μ for every input: f(αx1+βx2) = μ, target (α+β)μ -> cos 1, nmse |1 − α − β| / (α + β)
    a = np.array(res["a"])
    s = np.sqrt(a) + np.sqrt(1 - a)
    np.testing.assert_allclose(res["cos"][0], 1.0, atol=1e-6)
    np.testing.assert_allclose(res["nmse"][0], np.abs(1 - s) / s, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# distill
# ----------------------------------------------------------------------------------------------
def test_distilling_the_gaussian_denoiser_recovers_its_weights(tmp_path):
    train, _ = _tiny_sets(tmp_path)
    out, model = tmp_path / "d.json", tmp_path / "lin.npz"
    run("distill", "--denoiser=gaussian", f"--train={tmp_path / 'train.npz'}", f"--images={tmp_path / 'held.npz'}",
        "--sigmas=0.5,2", "--M=960", f"--out={model}", f"--json={out}")
    res = read_json(out)
    assert res["inputs"] == "held-out --images + noise" and res["M"] == 960
    assert max(res["weight_nmse"]) < 1e-20
    with np.load(model) as z:
        assert set(z.files) >= {"W_eff", "b", "sigma", "mode", "M"}
        np.testing.assert_array_equal(z["sigma"], [0.5, 2.0])
        np.testing.assert_array_equal(z["M"], [960, 960])
        assert list(z["mode"]) == ["lstsq", "lstsq"]
        for i, sigma in enumerate((0.5, 2.0)):
            W, b = _wiener(train, sigma)
            np.testing.assert_allclose(z["W_eff"][i], W, atol=1e-9)
            np.testing.assert_allclose(z["b"][i], b, atol=1e-9)
    assert "--M" in fail("distill", "--denoiser=gaussian", f"--train={tmp_path / 'train.npz'}",
                         f"--images={tmp_path / 'held.npz'}", "--sigmas=1", "--M=40")


def test_distilling_the_empirical_denoiser_on_noisy_training_inputs_approaches_wiener(tmp_path):
    _tiny_sets(tmp_path)
    train = f"--train={tmp_path / 'train.npz'}"
    nmse = {}
    for M in (640, 64 * 300):
        out = tmp_path / f"d{M}.json"
        run("distill", "--denoiser=empirical", train, f"--images={tmp_path / 'train.npz'}", "--sigmas=0.5",
            f"--M={M}", "--dtype=float64", f"--json={out}", f"--out={tmp_path / 'm.npz'}")
        res = read_json(out)
        assert res["inputs"] == "training images + noise"
        nmse[M] = res["weight_nmse"][0]
    # P2 Thm 1 / tower property: the fit converges to the Wiener filter as M grows
    assert nmse[64 * 300] < 0.02 and nmse[64 * 300] < nmse[640] / 4
    # on held-out inputs the empirical denoiser's best affine fit is a different map
    run("distill", "--denoiser=empirical", train, f"--images={tmp_path / 'held.npz'}", "--sigmas=0.5",
        f"--M={20 * 300}", f"--json={tmp_path / 'h.json'}", f"--out={tmp_path / 'h.npz'}")
    assert read_json(tmp_path / "h.json")["weight_nmse"][0] > nmse[64 * 300]


def test_distill_adam_mode_writes_its_models_and_needs_lr_off_the_p2_grid(tmp_path):
    _tiny_sets(tmp_path)
    args = ["distill", "--denoiser=gaussian", f"--train={tmp_path / 'train.npz'}", f"--images={tmp_path / 'held.npz'}"]
    run(*args, "--mode=adam", "--sigmas=80", "--epochs=3", f"--out={tmp_path / 'adam.npz'}",
        f"--json={tmp_path / 'a.json'}")
    with np.load(tmp_path / "adam.npz") as z:
        assert list(z["mode"]) == ["adam"] and list(z["M"]) == [60] and z["W_eff"].shape == (1, 48, 48)
    assert read_json(tmp_path / "a.json")["M"] == 60
    assert "--lr" in fail(*args, "--mode=adam", "--sigmas=0.3", "--epochs=1")


def test_gl_sscd_accepts_p1_style_files_without_ids(gl_sscd_files):
    tmp_path, gen, train = gl_sscd_files
    np.savez(tmp_path / "p1_gen.npz", features=gen)
    np.savez(tmp_path / "p1_train.npz", features=train)
    run("score", "gl-sscd", f"--gen={tmp_path / 'p1_gen.npz'}", f"--train={tmp_path / 'p1_train.npz'}")
    assert read_json(tmp_path / "p1_gen__p1_train.gl-sscd.json")["count"] == _gl_oracle(gen, train, 0.6)


def test_rp_pair_by_row_for_files_without_ids(tmp_path):
    np.savez(tmp_path / "a.npz", features=A_ROWS)
    np.savez(tmp_path / "b.npz", features=B_ROWS)
    assert "--pair-by row" in fail("score", "rp", f"--a={tmp_path / 'a.npz'}", f"--b={tmp_path / 'b.npz'}")
    run("score", "rp", f"--a={tmp_path / 'a.npz'}", f"--b={tmp_path / 'b.npz'}", "--pair-by=row")
    res = read_json(tmp_path / "a__b.rp.json")
    assert res["count"] == int((SIMS > 0.6).sum()) and res["n"] == 7 and res["pair_by"] == "row"
    np.savez(tmp_path / "c.npz", features=B_ROWS[:5])
    assert "needs the same number" in fail("score", "rp", f"--a={tmp_path / 'a.npz'}", f"--b={tmp_path / 'c.npz'}",
                                           "--pair-by=row")


def test_rp_refuses_descriptors_of_different_models(tmp_path):
    ids = np.arange(7)
    save_features(tmp_path / "a.npz", A_ROWS, ids, {"model_sha256": "aaa", "preprocess": "p1_pil320"})
    save_features(tmp_path / "b.npz", B_ROWS, ids, {"model_sha256": "bbb", "preprocess": "p1_pil320"})
    save_features(tmp_path / "c.npz", B_ROWS, ids, {"model_sha256": "aaa", "preprocess": "torch320"})
    for other in ("b", "c"):
        msg = fail("score", "rp", f"--a={tmp_path / 'a.npz'}", f"--b={tmp_path / f'{other}.npz'}")
        assert "different models or preprocessing" in msg and msg.count("\n") == 1
        assert not (tmp_path / f"a__{other}.rp.json").exists()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        run("score", "rp", f"--a={tmp_path / 'a.npz'}", f"--b={tmp_path / 'b.npz'}", "--allow-mixed-models")
    assert "warning: comparing descriptors of different models" in err.getvalue()
    assert read_json(tmp_path / "a__b.rp.json")["mixed_models"] is True
