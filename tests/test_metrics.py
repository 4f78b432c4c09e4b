# SPDX-License-Identifier: Apache-2.0
"""Metrics: exact counts on constructed sets, float64 oracles, faiss, streaming, plots."""
import math

import faiss
import numpy as np
import pytest
import torch

from diffrepro import metrics, plots
from diffrepro.sscd import Features, save_features

Z = 1.959963984540054


def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# --------------------------------------------------------------------------------------------
# Wilson interval
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,n", [(0, 10), (10, 10), (3, 10), (81, 263), (5000, 10000), (1, 1)])
def test_wilson_interval_is_the_root_pair_of_the_score_equation(k, n):
    # (p - p̂)² = z² p (1 - p) / n  <=>  (1 + z²/n) p² - (2p̂ + z²/n) p + p̂² = 0
    ph = k / n
    a, b, c = 1 + Z * Z / n, -(2 * ph + Z * Z / n), ph * ph
    disc = math.sqrt(b * b - 4 * a * c)
    lo, hi = metrics.wilson_interval(k, n)
    assert lo == pytest.approx(max(0.0, (-b - disc) / (2 * a)), abs=1e-12)
    assert hi == pytest.approx(min(1.0, (-b + disc) / (2 * a)), abs=1e-12)


def test_wilson_bounds_are_exactly_0_and_1_at_the_edges():
    """At k = 0 the lower root of the score equation is p = 0 exactly (c = p̂² = 0), at k = n the upper
    is 1; the formula's two terms cancel there and left ~1e-16 (printed as 1.1e-16 instead of 0)."""
    for n in range(1, 2001):
        assert metrics.wilson_interval(0, n)[0] == 0.0 and metrics.wilson_interval(n, n)[1] == 1.0, n


def test_wilson_interval_closed_form_edges_and_errors():
    assert metrics.wilson_interval(0, 10) == pytest.approx((0.0, Z * Z / (10 + Z * Z)), abs=1e-12)
    assert metrics.wilson_interval(10, 10) == pytest.approx((10 / (10 + Z * Z), 1.0), abs=1e-12)
    with pytest.raises(ValueError, match="n must be >= 1"):
        metrics.wilson_interval(0, 0)
    with pytest.raises(ValueError, match="k must be in"):
        metrics.wilson_interval(11, 10)


# --------------------------------------------------------------------------------------------
# RP, MAE
# --------------------------------------------------------------------------------------------
# Integer vectors whose cosines are exact in float64: <(3,4),(5,0)>/(5*5) = 15/25 = 0.6 exactly.
A_ROWS = np.array([[3, 4], [3, 4], [3, 4], [1, 0], [0, 1]], np.float32)
B_ROWS = np.array([[5, 0], [4, 3], [0, 7], [3, 4], [-3, 4]], np.float32)
# sims:              0.6 (=tau) 0.96   0.8     0.6 (=tau)  0.8        -> 3 of 5 strictly above 0.6


def test_rp_counts_strictly_above_tau_and_pairs_by_id():
    ids = np.array([10, 11, 12, 13, 14])
    perm = np.array([3, 0, 4, 2, 1])
    res = metrics.rp((A_ROWS, ids), Features(B_ROWS[perm], ids[perm], {}))
    assert res["count"] == 3 and res["n"] == 5 and res["rp"] == 0.6
    np.testing.assert_array_equal(res["ids"], ids)
    np.testing.assert_array_equal(res["sim"], [0.6, 0.96, 0.8, 0.6, 0.8])
    assert res["ci95"] == metrics.wilson_interval(3, 5)
    assert metrics.rp((A_ROWS, ids), (B_ROWS, ids), tau=0.59)["count"] == 5


def test_rp_accepts_feature_files_and_names_missing_ids(tmp_path):
    save_features(tmp_path / "a.npz", A_ROWS, np.arange(5), {"model": "a"})
    save_features(tmp_path / "b.npz", B_ROWS, np.arange(5), {"model": "b"})
    assert metrics.rp(tmp_path / "a.npz", str(tmp_path / "b.npz"))["count"] == 3
    with pytest.raises(ValueError, match=r"b lacks \[4\], a lacks \[7\]"):
        metrics.rp((A_ROWS, np.arange(5)), (B_ROWS, np.array([0, 1, 2, 3, 7])))
    with pytest.raises(ValueError, match="unique"):
        metrics.rp((A_ROWS, np.zeros(5, int)), (B_ROWS, np.arange(5)))
    with pytest.raises(ValueError, match="no ids"):
        metrics.rp(Features(A_ROWS, None, {}), (B_ROWS, np.arange(5)))
    with pytest.raises(ValueError, match="D=2 but b has D=3"):
        metrics.rp((A_ROWS, np.arange(5)), (np.ones((5, 3)), np.arange(5)))


def test_mae_score_is_signed_strict_and_pairs_by_id():
    d = 3 * 4 * 4
    q1 = np.zeros((4, 3, 4, 4), np.uint8)
    q2 = np.zeros_like(q1)
    q2[0] = 15                      # MAE exactly 15 -> not counted (strict <)
    q2[1] = 14                      # 14 -> counted
    q1[2] = 255                     # 255 - 0: wrap-around in uint8 would give 1
    q2[3].reshape(-1)[: d // 2] = 29  # mean 14.5 -> counted
    res = metrics.mae_score(q1, q2)
    np.testing.assert_array_equal(res["mae"], [15.0, 14.0, 255.0, 14.5])
    assert (res["count"], res["n"], res["mae_score"]) == (2, 4, 0.5)
    perm = np.array([2, 0, 3, 1])
    res_ids = metrics.mae_score(q1, q2[perm], ids1=np.arange(4), ids2=perm)
    np.testing.assert_array_equal(res_ids["mae"], res["mae"])
    with pytest.raises(TypeError, match="q2 must be uint8"):
        metrics.mae_score(q1, q2.astype(np.float32))


# --------------------------------------------------------------------------------------------
# GL (SSCD): float64 oracle, faiss, memmap streaming, threshold equality, ties
# --------------------------------------------------------------------------------------------
def _oracle_gl(gen, train, tau):
    sims = unit(gen) @ unit(train).T
    return sims.max(1), sims.argmax(1), 1.0 - np.mean(sims.max(1) > tau)


def test_gl_sscd_matches_float64_oracle_faiss_and_memmap_streaming(tmp_path):
    rng = np.random.default_rng(0)
    train = unit(rng.standard_normal((1000, 32))).astype(np.float32)
    # Half the generations are noisy copies of training rows, so both branches of tau occur.
    gen = np.concatenate([train[rng.integers(0, 1000, 30)] + 0.08 * rng.standard_normal((30, 32)),
                          rng.standard_normal((20, 32))]).astype(np.float32)
    max_sim, arg, gl = _oracle_gl(gen, train, 0.6)
    res = metrics.gl_sscd(gen, train)
    np.testing.assert_array_equal(res["nn_index"], arg)
    np.testing.assert_allclose(res["max_sim"], max_sim, rtol=0, atol=1e-12)
    assert res["gl"] == pytest.approx(gl, abs=1e-15)
    assert res["count"] == int(np.sum(max_sim > 0.6)) and res["n"] == 50
    assert res["memorised_fraction"] == pytest.approx(1 - gl)
    assert res["memorised_ci95"] == metrics.wilson_interval(res["count"], res["n"])
    assert res["gl_ci95"] == pytest.approx((1 - res["memorised_ci95"][1], 1 - res["memorised_ci95"][0]))

    index = faiss.IndexFlatIP(32)
    index.add(train)
    _, fi = index.search(unit(gen).astype(np.float32), 1)
    np.testing.assert_array_equal(res["nn_index"], fi[:, 0])

    np.save(tmp_path / "train.npy", train)
    mm = np.load(tmp_path / "train.npy", mmap_mode="r")
    for refs in (tmp_path / "train.npy", mm, [mm[:333], tmp_path / "train.npy"]):
        streamed = metrics.gl_sscd(gen, refs, chunk_rows=97)
        # Shards: indices are global over the concatenation [train[:333], train]; the duplicated
        # rows resolve to their first copy.
        expect = res["nn_index"] + (333 if isinstance(refs, list) else 0) * (res["nn_index"] >= 333)
        np.testing.assert_array_equal(streamed["nn_index"], expect)
        np.testing.assert_allclose(streamed["max_sim"], max_sim, rtol=0, atol=1e-12)


def test_gl_sscd_threshold_equality_and_ties():
    train = np.array([[3, 4], [5, 0], [4, 3], [4, 3]], np.float32)  # rows 2 and 3 duplicate
    gen = np.array([[1, 0], [0, 1], [-1, 0]], np.float32)
    res = metrics.gl_sscd(gen, train, chunk_rows=1)
    np.testing.assert_array_equal(res["nn_index"], [1, 0, 0])
    np.testing.assert_array_equal(res["max_sim"], [1.0, 0.8, -0.6])
    assert res["count"] == 2 and res["gl"] == pytest.approx(1 / 3)
    # Duplicates (rows 1 and 2 here) resolve to the lowest index, also across chunks.
    res = metrics.gl_sscd(np.array([[1, 0], [4, 3]], np.float32), train[[0, 2, 3]], chunk_rows=1)
    np.testing.assert_array_equal(res["max_sim"], [0.8, 1.0])
    np.testing.assert_array_equal(res["nn_index"], [1, 1])
    # (1,0) vs (3,4): cosine exactly 0.6 = tau is not memorised (strict >).
    res = metrics.gl_sscd(np.array([[1, 0]], np.float32), train[[0]])
    assert res["max_sim"][0] == 0.6 and res["count"] == 0 and res["gl"] == 1.0


# --------------------------------------------------------------------------------------------
# GL (nearest neighbour)
# --------------------------------------------------------------------------------------------
def test_gl_nn_matches_float64_oracle_on_real_images(cifar_subset, tmp_path):
    train_u8 = np.ascontiguousarray(cifar_subset[:400])
    train = train_u8.reshape(400, -1) / 127.5 - 1.0
    rng = np.random.default_rng(1)
    gen = np.clip(train[rng.integers(0, 400, 25)] + 0.1 * rng.standard_normal((25, train.shape[1])), -1, 1)
    d2 = ((gen[:, None, :] - train[None]) ** 2).sum(-1)
    arg = d2.argmin(1)
    dist = np.sqrt(d2[np.arange(25), arg])
    np.save(tmp_path / "train_u8.npy", train_u8)
    # uint8 rows are decoded exactly in float64; float32 rows carry their own rounding (~6e-8).
    for refs, rtol in ((train_u8, 1e-12), (tmp_path / "train_u8.npy", 1e-12), (train.astype(np.float32), 1e-6)):
        res = metrics.gl_nn(gen.reshape(25, 3, 32, 32), refs, chunk_rows=64)
        np.testing.assert_array_equal(res["nn_index"], arg)
        np.testing.assert_allclose(res["dist"], dist, rtol=rtol)
        assert res["gl_nn"] == pytest.approx(np.mean(dist / np.linalg.norm(gen, axis=1)), rel=1e-7)
    nn_norm = np.linalg.norm(train[arg], axis=1)
    assert metrics.gl_nn(gen, train_u8, normalize="nn")["gl_nn"] == pytest.approx(np.mean(dist / nn_norm))
    assert metrics.gl_nn(gen, train_u8, normalize="none")["gl_nn"] == pytest.approx(np.mean(dist))
    # Quantising a training image gives it back exactly: distance 0 to itself.
    assert metrics.gl_nn(train[:3], train_u8, quantize=True)["gl_nn"] == 0.0
    with pytest.raises(ValueError, match="normalize must be"):
        metrics.gl_nn(gen, train_u8, normalize="y")


# --------------------------------------------------------------------------------------------
# Conditional, between-model, manifold RP and similarity matrices
# --------------------------------------------------------------------------------------------
def test_rp_cond_and_rp_between_counts():
    ids = np.arange(5)
    a = {0: (A_ROWS, ids), 1: (A_ROWS, ids)}
    b = {0: (B_ROWS, ids), 1: (A_ROWS[::-1], ids[::-1])}           # class 1 identical -> 5 hits
    res = metrics.rp_cond(a, b)
    assert (res["count"], res["n"]) == (8, 10) and res["per_class"] == {0: 0.6, 1: 1.0}
    with pytest.raises(ValueError, match="same classes"):
        metrics.rp_cond(a, {0: (B_ROWS, ids)})
    uncond = (A_ROWS, ids)
    cond = {"cat": (B_ROWS, ids), "dog": (np.array([[5, 0], [5, 0], [0, 5], [0, 5], [0, 5]], np.float32), ids)}
    res = metrics.rp_between(uncond, cond)
    # max over classes: [0.6, 0.96, 0.8, 0.6, 1.0] -> 3 hits; best class of pair 4 is dog.
    np.testing.assert_array_equal(res["max_sim"], [0.6, 0.96, 0.8, 0.6, 1.0])
    assert res["count"] == 3 and list(res["best_class"]) == ["cat", "cat", "cat", "cat", "dog"]


def test_rp_manifold_slerps_noises_and_scores_pairs():
    g = torch.Generator().manual_seed(0)
    e0, e1 = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    seen = []

    def flat(x):
        seen.append(torch.as_tensor(x).clone())
        return torch.as_tensor(x).reshape(len(x), -1)

    res = metrics.rp_manifold(lambda e: e, lambda e: e, e0, e1, features_fn=flat, alphas=[0.0, 0.5, 1.0])
    assert (res["count"], res["n"], res["rp_manifold"]) == (12, 12, 1.0)
    torch.testing.assert_close(seen[0], e0, rtol=0, atol=1e-6)
    torch.testing.assert_close(seen[-1], e1, rtol=0, atol=1e-6)
    # Midpoint of each pair's slerp: (e0 + e1) sin(θ/2) / sin θ, θ per pair.
    f0, f1 = e0.reshape(4, -1).double(), e1.reshape(4, -1).double()
    theta = torch.arccos((f0 * f1).sum(1) / (f0.norm(dim=1) * f1.norm(dim=1)))[:, None]
    expect = (f0 + f1) * torch.sin(theta / 2) / torch.sin(theta)
    torch.testing.assert_close(seen[2].reshape(4, -1).double(), expect, rtol=0, atol=1e-6)
    res = metrics.rp_manifold(lambda e: e, lambda e: -e, e0, e1, features_fn=flat, alphas=[0.3])
    assert res["count"] == 0 and res["rp_per_alpha"].tolist() == [0.0]


def test_similarity_matrix_rp_and_mae():
    ids = np.arange(5)
    items = [(A_ROWS, ids), (B_ROWS, ids), (A_ROWS, ids)]
    res = metrics.similarity_matrix(items, "rp", names=["x", "y", "z"])
    expect = np.array([[1, 0.6, 1], [0.6, 1, 0.6], [1, 0.6, 1]])
    np.testing.assert_array_equal(res["matrix"], expect)
    assert res["count"][0, 1] == res["count"][1, 0] == 3 and res["n"][0, 0] == 0
    np.testing.assert_array_equal(res["ci95"][0, 1], metrics.wilson_interval(3, 5))
    q = np.zeros((2, 3, 2, 2), np.uint8)
    # pairs (0,1): MAE 20, (0,2): 10, (1,2): 10 -> scores 0, 1, 1; mixed ids/no-ids is an error
    with pytest.raises(ValueError, match="ids1 and ids2 must be given together"):
        metrics.similarity_matrix([q, (q + 10, [0, 1])], "mae")
    res = metrics.similarity_matrix([(q, [0, 1]), (q + 20, [1, 0]), (q + 10, [0, 1])], "mae")
    np.testing.assert_array_equal(res["matrix"], [[1, 0, 1], [0, 1, 1], [1, 1, 1]])


# --------------------------------------------------------------------------------------------
# Linearity, score error, weights
# --------------------------------------------------------------------------------------------
def test_linearity_score_linear_map_and_nonlinear_oracle():
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(6, 3, 2, 2, generator=g), torch.randn(6, 3, 2, 2, generator=g)
    A = torch.randn(12, 12, generator=g, dtype=torch.float64)
    calls = []

    def lin(x):
        calls.append(1)
        return (x.reshape(len(x), -1).double() @ A.T).reshape(x.shape)

    res = metrics.linearity_score(lin, x1, x2)
    assert len(calls) == 2 + 5
    np.testing.assert_allclose(res["cos"], 1.0, atol=1e-12)
    np.testing.assert_allclose(res["nmse"], 0.0, atol=1e-7)
    np.testing.assert_allclose(res["alpha"] ** 2 + res["beta"] ** 2, 1.0)

    f = torch.tanh
    res = metrics.linearity_score(f, x1, x2, a_values=[0.5], nmse_squared=True)
    X1, X2 = x1.reshape(6, -1).double().numpy(), x2.reshape(6, -1).double().numpy()
    al = be = math.sqrt(0.5)
    out = np.tanh((al * x1 + be * x2).reshape(6, -1).double().numpy())
    tgt = al * np.tanh(X1) + be * np.tanh(X2)
    cos = (out * tgt).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(tgt, axis=1)
    nm = (np.linalg.norm(out - tgt, axis=1) / np.linalg.norm(tgt, axis=1)) ** 2
    np.testing.assert_allclose(res["cos"], [cos.mean()], rtol=1e-6)
    np.testing.assert_allclose(res["nmse"], [nm.mean()], rtol=1e-5)
    n_calls = []

    def flip(x):  # identity on x1, x2; minus identity on the mixtures -> cos = -1
        n_calls.append(1)
        return x if len(n_calls) <= 2 else -x

    np.testing.assert_allclose(metrics.linearity_score(flip, x1, x2)["cos"], -1.0, atol=1e-6)
    n_calls.clear()
    np.testing.assert_allclose(metrics.linearity_score(flip, x1, x2, abs_cos=True)["cos"], 1.0, atol=1e-6)


def test_score_error_rmse_and_nmse():
    x = torch.randn(10, 3, 4, 4, dtype=torch.float64)

    def d1(x, s):
        return x + 0.05

    def d2(x, s):
        return x

    res = metrics.score_error(d1, d2, x, 1.0)
    assert res["rmse"] == pytest.approx(0.05, abs=1e-15)
    expect = (0.05 ** 2 * 48 / (x.reshape(10, -1) ** 2).sum(1)).mean().item()
    assert res["nmse"] == pytest.approx(expect, rel=1e-12)
    batched = metrics.score_error(d1, d2, x, 1.0, batch_size=3)
    np.testing.assert_allclose(batched["rmse_per_sample"], res["rmse_per_sample"])


def test_weight_nmse_and_sv_alignment():
    W_G = np.eye(4)
    W_L = np.diag([1.0, 1.0, 1.0, 0.0])
    assert metrics.weight_nmse(W_L, W_G)["nmse"] == pytest.approx(0.25)
    assert metrics.weight_nmse(W_L, W_G, squared=False)["nmse"] == pytest.approx(0.5)

    rng = np.random.default_rng(0)
    U, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    gains = np.array([0.9, 0.7, 0.5, 0.3, 0.2, 0.1])
    W = U @ np.diag(gains) @ U.T
    res = metrics.sv_alignment(W, U, K=4)
    np.testing.assert_allclose(res["alignment"], 1.0, atol=1e-12)
    np.testing.assert_allclose(res["overlap"], 1.0, atol=1e-12)
    np.testing.assert_allclose(res["principal_angles"], 0.0, atol=1e-6)
    np.testing.assert_allclose(res["singular_values"], gains[:4], atol=1e-12)
    perm = np.array([3, 0, 5, 1, 4, 2])
    res_lam = metrics.sv_alignment(W, U[:, perm], K=4, lam=gains[perm])
    np.testing.assert_allclose(res_lam["alignment"], 1.0, atol=1e-12)
    # Rotate the first two eigenvectors by theta: per-index alignment cos(theta), 2-D subspace intact.
    theta = 0.3
    R = np.eye(6)
    R[:2, :2] = [[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]]
    res = metrics.sv_alignment(W, U @ R, K=3)
    np.testing.assert_allclose(res["alignment"], [math.cos(theta), math.cos(theta), 1.0], atol=1e-12)
    np.testing.assert_allclose(res["overlap"], [math.cos(theta) ** 2, 1.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(res["principal_angles"], 0.0, atol=1e-6)
    res = metrics.sv_alignment(W, U @ R, K=1)
    np.testing.assert_allclose(res["principal_angles"], [theta], atol=1e-12)


# --------------------------------------------------------------------------------------------
# Hyperplane map and plots
# --------------------------------------------------------------------------------------------
def test_hyperplane_map_labels_anchors_and_saves(tmp_path):
    g = torch.Generator().manual_seed(0)
    e1, e2, e3 = (torch.randn(3, 4, 4, generator=g) for _ in range(3))

    def flat(x):
        return torch.as_tensor(x).reshape(len(x), -1)

    res = metrics.hyperplane_map(lambda e: e, flat, e1, e2, e3, n=5, lo=0.0, hi=1.0, batch_size=7,
                                 path=tmp_path / "map.npz")
    assert res["label"].shape == (5, 5) and res["sim"].shape == (5, 5)
    assert res["label"][0, 0] == 0 and res["label"][4, 0] == 1 and res["label"][0, 4] == 2
    np.testing.assert_allclose([res["sim"][0, 0], res["sim"][4, 0], res["sim"][0, 4]], 1.0, atol=1e-6)
    with np.load(tmp_path / "map.npz") as f:
        assert sorted(f.files) == ["alpha", "beta", "label", "sim"]
        np.testing.assert_array_equal(f["label"], res["label"])
    pytest.importorskip("matplotlib")
    plots.plot_hyperplane_map(tmp_path / "map.npz", tmp_path / "map.png")
    assert (tmp_path / "map.png").stat().st_size > 0


def test_descriptors_without_a_direction_are_refused_naming_the_row(tmp_path):
    rng = np.random.default_rng(7)
    a = rng.standard_normal((5, 8)).astype(np.float32)
    ids = np.arange(100, 105)
    b = a.copy()
    b[3] = 0
    with pytest.raises(ValueError, match=r"b: row 3 \(id 103\) is all zero"):
        metrics.rp((a, ids), (b, ids))
    b[3], b[1, 0] = a[3], np.nan
    with pytest.raises(ValueError, match=r"b: row 1 \(id 101\) is NaN or infinite \(1 such rows\)"):
        metrics.rp((a, ids), (b, ids))
    gen = a.copy()
    gen[2, 5] = np.inf
    with pytest.raises(ValueError, match="gen_features: row 2 is NaN or infinite"):
        metrics.gl_sscd(gen, a)
    # streamed training descriptors: each chunk is checked, naming the file and the row in it
    train = rng.standard_normal((40, 8)).astype(np.float32)
    train[33] = np.nan
    np.save(tmp_path / "t.npy", train)
    for refs in (str(tmp_path / "t.npy"), np.load(tmp_path / "t.npy", mmap_mode="r")):
        with pytest.raises(ValueError, match=r"t.npy': row 33 is NaN or infinite"):
            metrics.gl_sscd(a, refs, chunk_rows=8)
    with pytest.raises(ValueError, match=r"reference shard 1: row 33 is NaN"):
        metrics.gl_sscd(a, [a, train], chunk_rows=8)
    images = rng.uniform(-1, 1, (6, 1, 2, 2))
    bad = images.copy()
    bad[4, 0, 1, 1] = np.nan
    with pytest.raises(ValueError, match="gen: row 4 is NaN or infinite"):
        metrics.gl_nn(bad, images.astype(np.float32))
    with pytest.raises(ValueError, match="reference set: row 4 is NaN or infinite"):
        metrics.gl_nn(images, bad.astype(np.float32))


def _positions(canvas, tile):
    """Top-left corners where ``tile`` [h, w, 3] occurs exactly in ``canvas``."""
    windows = np.lib.stride_tricks.sliding_window_view(canvas, tile.shape)[:, :, 0]
    return [tuple(p) for p in np.argwhere((windows == tile).all(axis=(-3, -2, -1)))]


def test_nn_grid_labels_which_row_is_the_generation_and_which_the_nearest_training_image(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (6, 3, 8, 8), dtype=np.uint8)
    gen = rng.integers(0, 256, (5, 3, 8, 8), dtype=np.uint8)
    nn = np.array([5, 4, 3, 2, 4])
    plots.nn_grid(gen, train, nn, tmp_path / "grid.png", per_row=3, scale=1, gen_ids=[10, 11, 12, 13, 14],
                  dist=[0.1, 0.2, 0.3, 0.4, 0.5])
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]  # written atomically
    with Image.open(tmp_path / "grid.png") as im:
        canvas = np.asarray(im.convert("RGB"))
    tiles = []
    for j in range(5):  # each generation once, its nearest training image right below it
        (gy, gx), = _positions(canvas, gen[j].transpose(1, 2, 0))
        below = [y for y, x in _positions(canvas, train[nn[j]].transpose(1, 2, 0)) if x == gx and y > gy]
        tiles.append((gy, min(below), gx))
    left = min(x for _, _, x in tiles)
    gen_rows = sorted({gy for gy, _, _ in tiles})
    train_rows = sorted({ty for _, ty, _ in tiles})
    band = train_rows[0] - gen_rows[0]
    assert len(gen_rows) == len(train_rows) == 2 and left > 20
    assert all(ty - gy == band for gy, ty, _ in tiles) and gen_rows[1] == train_rows[0] + band

    def label(top):
        crop = canvas[top:top + band, :left].min(axis=2)
        assert (crop < 128).sum() > 20, "no label beside the row"
        return crop

    assert np.array_equal(label(gen_rows[0]), label(gen_rows[1]))
    assert np.array_equal(label(train_rows[0]), label(train_rows[1]))
    assert not np.array_equal(label(gen_rows[0]), label(train_rows[0]))  # two different words
    for gy, ty, gx in tiles:  # captions (seed, training index and distance) under every tile
        for y in (gy, ty):
            assert (canvas[y + 8:y + band, gx:gx + 8] < 128).any()
    with pytest.raises(ValueError, match="gen_ids must have 5 entries"):
        plots.nn_grid(gen, train, nn, tmp_path / "bad.png", gen_ids=[1])


def test_plots_write_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    plots.plot_similarity_matrix(np.eye(3), tmp_path / "sim.png", names=list("abc"), title="RP")
    plots.plot_score_vs_sigma([0.1, 1.0, 10.0], {"cos": [1.0, 0.9, 0.95]}, tmp_path / "lin.png", hline=0.6)
    for name in ("sim.png", "lin.png"):
        assert (tmp_path / name).stat().st_size > 0
    with pytest.raises(ValueError, match=r"curves\['cos'\] must have shape"):
        plots.plot_score_vs_sigma([0.1, 1.0], {"cos": [1.0]}, tmp_path / "bad.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lin.png", "sim.png"]  # no temporary file left
