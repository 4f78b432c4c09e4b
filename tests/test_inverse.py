# SPDX-License-Identifier: Apache-2.0
"""Jacobian products of the denoisers and the inverse-problem solvers against float64 oracles:
finite differences, autograd of the dense reference, the Gaussian posterior in closed form."""
import json
import re
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from diffrepro import data, generation, inverse, samplers
from diffrepro.cli import inverse as cli_inverse
from diffrepro.denoisers import CallableDenoiser, EmpiricalDenoiser, GaussianDenoiser
from diffrepro.reference import empirical_denoiser_reference

F64 = torch.float64


@pytest.fixture(scope="module")
def small():
    """200 real CIFAR-10 images average-pooled to 3×8×8, as uint8 pixels and float64."""
    ds = data.default_dataset()
    pooled = F.avg_pool2d(data.decode(torch.from_numpy(ds.images[:200])), 4)
    u8 = data.quantize(pooled).numpy()
    return u8, data.decode(torch.from_numpy(u8)), np.asarray(ds.labels[:200])


def _noise(b, seed=0, scale=1.0):
    return scale * torch.randn(b, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _dense_reference(train, sigma):
    return lambda z: empirical_denoiser_reference(z, train, sigma).reshape(z.shape)


@pytest.mark.parametrize("chunk_rows", [None, 37])
def test_empirical_jvp_vjp_against_autograd_and_finite_differences(small, chunk_rows):
    u8, train, _ = small
    den = EmpiricalDenoiser(u8, dtype=F64, chunk_rows=chunk_rows)
    x, v = train[:3] + _noise(3, 1, 0.4), _noise(3, 2)
    for sigma in (0.15, 0.6, 3.0):
        ref = _dense_reference(u8, sigma)
        jvp = den.jvp(x, sigma, v)
        torch.testing.assert_close(jvp, torch.autograd.functional.jvp(ref, x, v)[1], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(den.vjp(x, sigma, v), torch.autograd.functional.vjp(ref, x, v)[1],
                                   rtol=1e-9, atol=1e-12)
        h = 1e-5
        fd = (ref(x + h * v) - ref(x - h * v)) / (2 * h)
        torch.testing.assert_close(jvp, fd, rtol=1e-5, atol=1e-7)


def test_empirical_jvp_per_sample_sigma_and_classes(small):
    u8, train, labels = small
    den = EmpiricalDenoiser(u8, labels=labels, dtype=F64)
    x, v, sigma = _noise(3, 3, 1.5), _noise(3, 4), torch.tensor([0.3, 1.0, 5.0], dtype=F64)
    classes = torch.tensor([2, 2, 9])
    out = den.jvp(x, sigma, v, classes)
    for i, c in enumerate(classes.tolist()):
        ref = _dense_reference(u8[labels == c], float(sigma[i]))
        torch.testing.assert_close(out[i:i + 1], torch.autograd.functional.jvp(ref, x[i:i + 1], v[i:i + 1])[1],
                                   rtol=1e-9, atol=1e-12)


def test_gaussian_jacobian_is_the_posterior_covariance(small):
    """Tweedie: ∂D/∂x̃ = Cov[x0 | x̃]/σ², with Cov[x0 | x̃] = Σ − Σ (Σ + σ² I)⁻¹ Σ (dense solve)."""
    _, train, _ = small
    den = GaussianDenoiser.from_data(train)
    y = train.reshape(200, -1)
    cov = torch.from_numpy(np.cov(y.numpy(), rowvar=False, bias=True))
    x, v = _noise(2, 5), _noise(2, 6)
    for sigma in (0.05, 0.5, 4.0):
        post = cov - cov @ torch.linalg.solve(cov + sigma**2 * torch.eye(192, dtype=F64), cov)
        ref = (v.reshape(2, -1) @ post / sigma**2).reshape(v.shape)
        torch.testing.assert_close(den.jvp(x, sigma, v), ref, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(den.vjp(x, sigma, v), ref, rtol=1e-8, atol=1e-10)


def test_autograd_fallback_for_network_adapters(small):
    """A float64 torch "network" (the dense reference) behind CallableDenoiser: autograd products
    equal the empirical denoiser's exact ones."""
    u8, _, _ = small
    net = CallableDenoiser(lambda x, sigma: empirical_denoiser_reference(x, u8, sigma).reshape(x.shape),
                           img_channels=3, img_resolution=8)
    exact = EmpiricalDenoiser(u8, dtype=F64)
    x, v, sigma = _noise(2, 7), _noise(2, 8), torch.tensor([0.4, 2.0], dtype=F64)
    torch.testing.assert_close(net.jvp(x, sigma, v), exact.jvp(x, sigma, v), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(net.vjp(x, sigma, v), exact.vjp(x, sigma, v), rtol=1e-9, atol=1e-12)
    assert not net(x, sigma).requires_grad  # sampling builds no graph
    with pytest.raises(ValueError, match="v must be a tensor of x's shape"):
        exact.jvp(x, sigma, v[:1])


@pytest.mark.parametrize("task", inverse.TASKS)
def test_operators_are_linear_with_their_adjoints(task):
    op = inverse.make_operator(task, 8, seed=3)
    x, x2 = _noise(2, 9), _noise(2, 10)
    y = torch.randn_like(op(x))
    torch.testing.assert_close(inverse._dot(op(x), y), inverse._dot(x, op.adjoint(y)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op(2 * x - x2), 2 * op(x) - op(x2), rtol=1e-12, atol=1e-12)


def test_operator_definitions():
    x = _noise(1, 11)
    np.testing.assert_allclose(inverse.make_operator("sr4", 8)(x).numpy(),
                               x.numpy().reshape(1, 3, 2, 4, 2, 4).mean((3, 5)), rtol=1e-13)
    box = inverse.make_operator("inpaint-box", 8)
    assert box.mask.sum() == 64 - 16 and box.mask[2:6, 2:6].sum() == 0
    rand = inverse.make_operator("inpaint-random", 8, missing=0.5, seed=1)
    assert 16 < rand.mask.sum() < 48
    blur = inverse.GaussianBlur(1.0)
    assert abs(float(blur.kernel.sum()) - 1) < 1e-14 and blur.size == 7
    flat = torch.ones(1, 1, 16, 16, dtype=F64)
    torch.testing.assert_close(blur(flat)[..., 3:13, 3:13], flat[..., 3:13, 3:13])  # interior of a constant
    with pytest.raises(ValueError, match="task must be"):
        inverse.make_operator("colorize", 8)
    with pytest.raises(ValueError, match="divisible"):
        inverse.make_operator("sr4", 6)


def _conditional_mean(train, observed, y_obs):
    """E[x0_u | x0_o = y_o] of N(μ, Σ): μ_u + Σ_uo Σ_oo⁺ (y_o − μ_o) (dense, pseudo-inverse)."""
    rows = train.reshape(len(train), -1)
    mu = rows.mean(0)
    cov = torch.from_numpy(np.cov(rows.numpy(), rowvar=False, bias=True))
    o, u = observed, ~observed
    out = torch.empty(rows.shape[1], dtype=F64)
    out[o] = y_obs
    out[u] = mu[u] + cov[u][:, o] @ torch.linalg.pinv(cov[o][:, o], hermitian=True, rtol=1e-12) @ (y_obs - mu[o])
    return out


def test_gaussian_posterior_mean_closed_form(small):
    _, train, _ = small
    gauss = GaussianDenoiser.from_data(train)
    x0 = train[150:151]
    op = inverse.make_operator("inpaint-box", 8)
    observed = op.mask.expand(3, 8, 8).reshape(-1).bool()
    ref = _conditional_mean(train, observed, x0.reshape(-1)[observed])
    torch.testing.assert_close(inverse.gaussian_posterior_mean(gauss, op, op(x0)).reshape(-1), ref,
                               rtol=1e-6, atol=1e-7)
    # With noise: μ + Σ Aᵀ (A Σ Aᵀ + s² I)⁻¹ (y − A μ), A as an explicit matrix.
    op, s = inverse.make_operator("sr2", 8), 0.05
    a = op(torch.eye(192, dtype=F64).reshape(192, 3, 8, 8)).reshape(192, -1).T
    rows = train.reshape(200, -1)
    cov = torch.from_numpy(np.cov(rows.numpy(), rowvar=False, bias=True))
    y = op(x0).reshape(-1)
    ref = rows.mean(0) + cov @ a.T @ torch.linalg.solve(a @ cov @ a.T + s**2 * torch.eye(len(a), dtype=F64),
                                                         y - a @ rows.mean(0))
    torch.testing.assert_close(inverse.gaussian_posterior_mean(gauss, op, op(x0), s).reshape(-1), ref,
                               rtol=1e-8, atol=1e-9)


def test_moment_posterior_denoiser_is_exact_for_the_gaussian(small):
    """For x0 ~ N(μ, Σ), x̃ = x0 + σ n and y = A x0 + s m, E[x0 | x̃, y] in closed form (two linear-
    Gaussian observations) equals the moment-projected posterior denoiser."""
    _, train, _ = small
    gauss = GaussianDenoiser.from_data(train)
    rows = train.reshape(200, -1)
    mu, cov = rows.mean(0), torch.from_numpy(np.cov(rows.numpy(), rowvar=False, bias=True))
    op, s = inverse.make_operator("deblur", 8), 0.05
    a = op(torch.eye(192, dtype=F64).reshape(192, 3, 8, 8)).reshape(192, -1).T
    y = op(train[7:8])
    post = inverse.PosteriorDenoiser(gauss, op, y, likelihood="moment", noise_std=s, cg_iters=400, cg_tol=1e-12)
    x = _noise(2, 12, 1.0) + train[7:8]
    h = torch.cat([torch.eye(192, dtype=F64), a])
    for sigma in (0.1, 1.0):
        noise = torch.block_diag(sigma**2 * torch.eye(192, dtype=F64), s**2 * torch.eye(192, dtype=F64))
        obs = torch.cat([x.reshape(2, -1), y.reshape(1, -1).expand(2, -1)], 1)
        gain = torch.linalg.solve(h @ cov @ h.T + noise, h @ cov).T
        ref = mu + (obs - mu @ h.T) @ gain.T
        torch.testing.assert_close(post(x, sigma).reshape(2, -1), ref, rtol=1e-6, atol=1e-6)


def test_dps_correction_against_autograd(small):
    """D_y − D = −ζ σ² ∇_x̃ ‖y − A D(x̃)‖ (autograd of the dense reference)."""
    u8, train, _ = small
    den = EmpiricalDenoiser(u8, dtype=F64)
    op, zeta, sigma = inverse.make_operator("sr2", 8), 0.7, 0.8
    y = op(train[3:4])
    post = inverse.PosteriorDenoiser(den, op, y, likelihood="dps", zeta=zeta)
    x = train[3:5] + _noise(2, 13, 0.5)
    ref = _dense_reference(u8, sigma)
    z = x.clone().requires_grad_(True)
    grad = torch.autograd.grad((y - op(ref(z))).reshape(2, -1).norm(dim=1).sum(), z)[0]
    torch.testing.assert_close(post(x, sigma), ref(x) - zeta * sigma**2 * grad, rtol=1e-9, atol=1e-11)
    eps = _noise(2, 14)
    off = inverse.PosteriorDenoiser(den, op, y, likelihood="dps", zeta=0.0)
    assert torch.equal(samplers.sample(off, eps, steps=6), samplers.sample(den, eps, steps=6))


def test_moment_solver_recovers_a_training_image_from_its_box_inpainting(small):
    """The empirical posterior given a noiseless half-masked training image is that image: every
    seed's deterministic solution lands on it (the memorisation regime of paper 1, §4)."""
    u8, train, _ = small
    den = EmpiricalDenoiser(u8, dtype=F64)
    op = inverse.make_operator("inpaint-box", 8)
    post = inverse.PosteriorDenoiser(den, op, op(train[17:18]), likelihood="moment", noise_std=0.01, cg_iters=10)
    out = samplers.sample(post, _noise(4, 15), sampler="euler", steps=12)
    d2 = ((out.reshape(4, 1, -1) - train.reshape(1, 200, -1)) ** 2).sum(-1)
    assert d2.argmin(1).tolist() == [17] * 4
    unguided = samplers.sample(den, _noise(4, 15), sampler="euler", steps=12)
    assert 17 not in ((unguided.reshape(4, 1, -1) - train.reshape(1, 200, -1)) ** 2).sum(-1).argmin(1).tolist()


def test_posterior_denoiser_validation(small):
    u8, train, _ = small
    den = EmpiricalDenoiser(u8, dtype=F64)
    op = inverse.make_operator("sr2", 8)
    with pytest.raises(ValueError, match="likelihood must be"):
        inverse.PosteriorDenoiser(den, op, op(train[:1]), likelihood="gibbs")
    with pytest.raises(ValueError, match="zeta must be"):
        inverse.PosteriorDenoiser(den, op, op(train[:1]), likelihood="dps", zeta=-1.0)
    with pytest.raises(TypeError, match="denoiser must be a Denoiser"):
        inverse.PosteriorDenoiser(lambda x, s: x, op, op(train[:1]))


class _Scale(inverse.LinearOperator):
    """A diagonal operator with given weights (a user-defined operator)."""

    name = "scale"

    def __init__(self, weights):
        self.weights = weights

    def forward(self, x):
        return x * self.weights

    adjoint = forward


@pytest.mark.parametrize("likelihood", ["moment", "dps"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_measurement_is_refused(small, likelihood, bad):
    """A NaN or Inf anywhere in y used to stop the conjugate gradients at once (or zero the DPS step)
    and return exactly the prior's samples, reported as a complete run."""
    u8, train, _ = small
    den, op = EmpiricalDenoiser(u8, dtype=F64), inverse.make_operator("inpaint-box", 8)
    for where in [(0, 0, 0, 0), (0, 2, 7, 5)]:
        y = op(train[:1])
        y[where] = bad
        with pytest.raises(ValueError, match=rf"^measurement: got 1 non-finite entries .*{re.escape(str(where))}"):
            inverse.PosteriorDenoiser(den, op, y, likelihood=likelihood)
    if likelihood == "moment":  # the closed form checks alike
        with pytest.raises(ValueError, match="^measurement: got 1 non-finite"):
            inverse.gaussian_posterior_mean(GaussianDenoiser.from_data(train), op, y)


def test_operators_with_non_finite_entries_are_refused(small):
    u8, train, _ = small
    den = EmpiricalDenoiser(u8, dtype=F64)
    mask = torch.ones(8, 8, dtype=F64)
    mask[3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"^mask must hold only 0 and 1, got 1 other entries \(e.g. nan\)"):
        inverse.Inpainting(mask)
    weights = torch.ones(3, 8, 8, dtype=F64)
    weights[1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match=r"^operator 'scale': A x of a finite image .* 1 non-finite entries"):
        inverse.PosteriorDenoiser(den, _Scale(weights), train[:1])


@pytest.mark.parametrize("case,message", [
    ("one-channel measurement", r"^measurement: got shape \(1, 1, 8, 8\), expected \[B, 3, 8, 8\]"),
    ("small mask", r"^mask: got shape \(4, 4\), expected \(8, 8\) or \(3, 8, 8\) for images of shape "
                   r"\(3, 8, 8\)"),
    ("low-resolution measurement", r"^measurement: got shape \(1, 3, 4, 4\), expected \[B, 3, 8, 8\]"),
    ("sr factor", r"^factor: got 3, expected a divisor of the image height and width \(8 x 8"),
    ("sr measurement size", r"^measurement: got shape \(1, 3, 8, 8\), expected \[B, 3, 4, 4\]"),
    ("blur measurement size", r"^measurement: got shape \(1, 3, 4, 4\), expected \[B, 3, 8, 8\]"),
    ("user operator", r"^operator 'scale' does not apply to images of shape \(3, 8, 8\)"),
])
def test_shapes_are_checked_before_any_file_is_written(small, tmp_path, case, message):
    """Each operator's shapes against the images, in the constructor: a one-channel measurement of RGB
    images used to broadcast silently into another problem, and a 4x4 mask or a [1, 3, 4, 4]
    inpainting measurement failed inside torch after generate had written its manifest."""
    u8, train, _ = small
    den = EmpiricalDenoiser(u8, dtype=F64)
    box, x = inverse.make_operator("inpaint-box", 8), train[:1]
    op, y = {
        "one-channel measurement": (box, box(x)[:, :1]),
        "small mask": (inverse.Inpainting(torch.ones(4, 4)), x[..., :4, :4]),
        "low-resolution measurement": (box, x[..., :4, :4]),
        "sr factor": (inverse.AveragePool(3), F.avg_pool2d(x, 3)),
        "sr measurement size": (inverse.AveragePool(2), x),
        "blur measurement size": (inverse.GaussianBlur(1.0), x[..., ::2, ::2]),
        "user operator": (_Scale(torch.ones(3, 4, 4, dtype=F64)), x[..., :4, :4]),
    }[case]
    with pytest.raises(ValueError, match=message):
        post = inverse.PosteriorDenoiser(den, op, y)
        generation.generate(post, "0", tmp_path / "out", steps=2, info={"case": case}, progress=False)
    assert not (tmp_path / "out").exists()


def test_one_measurement_per_sample_must_match_the_batch(small):
    u8, train, _ = small
    den, op = EmpiricalDenoiser(u8, dtype=F64), inverse.make_operator("sr2", 8)
    post = inverse.PosteriorDenoiser(den, op, op(train[:3]), likelihood="moment", cg_iters=2)
    assert post(train[:3], 0.5).shape == (3, 3, 8, 8)
    with pytest.raises(ValueError, match=r"^measurement: holds 3 measurements, expected 1 or one per sample of the "
                                         r"batch \(2\)"):
        post(train[:2], 0.5)


# ------------------------------------------------------------------------------------------------
# diffrepro inverse (real subprocesses)


def _run(*args):
    return subprocess.run([sys.executable, "-m", "diffrepro", "inverse", *map(str, args)], capture_output=True,
                          text=True, timeout=600)


def test_cli_writes_the_generate_layout_and_resumes(tmp_path):
    """SR2 of a training image with the empirical posterior: every seed's PNG is that image, the
    float outputs load with generation.load_outputs, and a rerun reuses everything."""
    out = tmp_path / "inv"
    args = ["--task", "sr2", "--outdir", out, "--max-train", 30, "--target-index", 4, "--seeds", "0-2",
            "--steps", 4, "--cg-iters", 8, "--no-progress"]
    run = _run(*args)
    assert run.returncode == 0, run.stderr
    seeds, images = generation.load_outputs(out)
    assert seeds.tolist() == [0, 1, 2] and images.shape == (3, 3, 32, 32)
    target = data.default_dataset().images[4]
    for s in seeds:
        with PIL.Image.open(out / f"{s:06d}.png") as img:
            png = np.asarray(img.convert("RGB")).transpose(2, 0, 1)
        assert np.abs(png.astype(int) - target.astype(int)).max() <= 1
    extra = np.load(out / "inverse.npz")
    assert extra["measurement"].shape == (1, 3, 16, 16) and extra["preview"].shape == (1, 3, 32, 32)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["denoiser"]["inverse"]["operator"] == {"name": "sr2", "factor": 2}
    again = _run(*args)
    assert again.returncode == 0 and "0 computed, 3 reused" in again.stdout


def test_cli_gaussian_writes_the_posterior_mean(tmp_path):
    out = tmp_path / "gauss"
    run = _run("--task", "inpaint-box", "--denoiser", "gaussian", "--outdir", out, "--max-train", 40,
               "--seeds", "0", "--steps", 3, "--cg-iters", 4, "--no-progress")
    assert run.returncode == 0, run.stderr
    assert np.load(out / "inverse.npz")["posterior_mean"].shape == (1, 3, 32, 32)


@pytest.mark.parametrize("args,message", [
    (["--target-index", 999], "--target-index: got 999, expected a row in [0, 500)"),
    (["--train", "/nonexistent"], "--train: no such file or folder"),
    (["--sigma-min", 5, "--sigma-max", 1], "--sigma-min/--sigma-max"),
    (["--denoiser", "gaussian", "--dtype", "float32"], "--dtype"),
])
def test_cli_usage_errors(tmp_path, args, message):
    run = _run("--task", "sr4", "--outdir", tmp_path / "x", *args)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffrepro inverse: error: ") and message in lines[0]


def test_cli_choices_match_the_library():
    assert cli_inverse.TASK_CHOICES == inverse.TASKS and cli_inverse.LIKELIHOOD_CHOICES == inverse.LIKELIHOODS


def test_cli_refuses_images_the_operator_cannot_measure_before_writing(tmp_path):
    """Non-square training images: one line naming --train, exit 2, no output folder (was a traceback)."""
    np.save(tmp_path / "wide.npy", np.random.default_rng(0).integers(0, 256, (6, 3, 8, 4), dtype=np.uint8))
    run = _run("--task", "sr2", "--train", tmp_path / "wide.npy", "--outdir", tmp_path / "out", "--seeds", "0",
               "--no-progress")
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [
        "diffrepro inverse: error: --train: train must have N >= 1 square images, got shape (6, 3, 8, 4)"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("denoiser,likelihood,products", [("empirical", "moment", 2 * 7 + 1),
                                                          ("empirical", "dps", 1), ("gaussian", "moment", 15)])
def test_cli_dry_run_prints_the_plan_and_cost_and_writes_nothing(tmp_path, denoiser, likelihood, products):
    """The plan of generate (seeds, batches, NFE) plus the posterior's Jacobian products in the
    estimate: 4 N d flops per denoiser call and 6 N d per product (empirical), 4 d² per call or
    product plus the fit and the exact posterior mean (Gaussian); nothing is written."""
    out = tmp_path / "inv"
    run = _run("--task", "sr2", "--outdir", out, "--max-train", 30, "--seeds", "0-9", "--batch", 4, "--steps", 5,
               "--cg-iters", 7, "--denoiser", denoiser, "--likelihood", likelihood, "--dry-run")
    assert run.returncode == 0, run.stderr
    assert not out.exists() and not list(tmp_path.iterdir())
    lines = dict(line.split(None, 1) for line in run.stdout.strip().splitlines() if " " in line)
    assert lines["seeds"].startswith("10 (0-9) in 3 batches of <= 4; to compute: 10 seeds in 3 batches")
    assert lines["NFE"].startswith(f"9 per sample, each 1 denoiser call + {products} Jacobian products")
    n, d, nfe, todo = 30, 3 * 32 * 32, 9, 10
    if denoiser == "empirical":
        flops = (4 * n * d + 6 * n * d * products) * nfe * todo
    else:
        r, m = min(n, d), 3 * 16 * 16
        flops = 2 * n * r * d + 9 * r**3 + 4 * d * d * (1 + products) * nfe * todo + 2 * r * r * m + 9 * r**3
    assert lines["estimate"].startswith(f"{flops / 1e9:.1f} GFLOP at ")
    assert re.search(r"\): ~(\d+\.\d s|\d+ s|\d+ min \d\d s|\d+ h \d\d min); memory", lines["estimate"])
    assert run.stdout.strip().endswith("dry run: nothing written")


def test_cli_dry_run_refuses_what_the_run_would_refuse(tmp_path):
    run = _run("--task", "sr4", "--outdir", tmp_path / "x", "--target-index", 999, "--dry-run")
    assert run.returncode == 2 and "--target-index: got 999" in run.stderr and not (tmp_path / "x").exists()


def test_cli_progress_without_a_terminal(tmp_path):
    """stderr is a pipe: progress lines (here every call: the interval set to 0), none with --no-progress."""
    wrapper = ("import sys\nfrom diffrepro import generation\ngeneration._PROGRESS_SECONDS = 0.0\n"
               "from diffrepro.cli import main\nsys.exit(main(sys.argv[1:]))")
    args = ["inverse", "--task", "sr2", "--max-train", 20, "--seeds", "0-1", "--steps", 3, "--cg-iters", 2]
    runs = [subprocess.run([sys.executable, "-c", wrapper, *map(str, args), "--outdir", tmp_path / name, *extra],
                           capture_output=True, text=True, timeout=600)
            for name, extra in (("shown", []), ("quiet", ["--no-progress"]))]
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    lines = runs[0].stderr.strip().splitlines()
    assert [re.search(r"\((\d+)%\)", line).group(1) for line in lines[:-1]] == ["20", "40", "60", "80"], lines
    assert lines[-1].startswith("generate: 2/2 images in ")
    assert runs[1].stderr == ""


def test_blur_kernels_wider_than_the_images_can_use_are_refused(small):
    """A 3-std kernel wider than 2 x side - 1 pixels (taps that never reach a pixel; --blur-std 1e6 built a
    6e6 x 6e6 kernel): refused naming blur_std (make_operator) or the kernel size (any GaussianBlur)."""
    u8, train, _ = small
    assert inverse.make_operator("deblur", 8, blur_std=7 / 3).size == 15  # the widest that fits 8x8: 2 x 8 - 1
    with pytest.raises(ValueError, match=r"^blur_std: got 2.4, expected a std in \(0, 2.333\] for 8x8 images"):
        inverse.make_operator("deblur", 8, blur_std=2.4)
    with pytest.raises(ValueError, match=r"^kernel size: got 17 \(std 1.0\), expected at most 15 for images of shape "
                                         r"\(3, 8, 8\)"):
        inverse.PosteriorDenoiser(EmpiricalDenoiser(u8, dtype=F64), inverse.GaussianBlur(1.0, size=17), train[:1])
    run = _run("--task", "deblur", "--blur-std", 1e6, "--outdir", "unused", "--dry-run")
    assert run.returncode == 2
    assert run.stderr.startswith("diffrepro inverse: error: --blur-std: blur_std: got 1000000.0")
