# SPDX-License-Identifier: Apache-2.0
"""Kernel backends, test data factories, a stand-in SSCD model and the tolerance rules (float64
oracle, naive float32 baseline, argmax rule)."""
import os
import subprocess
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Backend:
    """One way to run the kernels through the public ops (see the `backend` fixture)."""

    name: str  # "cpu", "emu" (CUDA kernels on host threads) or "cuda"
    device: str  # where input tensors must live
    kw: dict  # keyword arguments of diffrepro.ops that select the backend
    variants: tuple  # tuning keyword arguments: tile sizes, workers, tile configs, splits

    def put(self, *tensors):
        moved = tuple(t.to(self.device) for t in tensors)
        return moved if len(moved) > 1 else moved[0]


BACKENDS = {
    "cpu": Backend("cpu", "cpu", {}, ({}, {"_tile": 1, "_workers": 3}, {"_tile": 7, "_workers": 2},
                                         {"_tile": 64, "_workers": 4})),
    # Tile configuration 2 (8x8 tiles on one warp) reaches every tile edge with few OS threads;
    # 0 and 1 are the production configurations.
    "emu": Backend("emu", "cpu", {"_emulate": True}, ({"_config": 2, "_splits": 1}, {"_config": 2, "_splits": 3},
                                                      {"_config": 1, "_splits": 2}, {"_config": 0})),
    "cuda": Backend("cuda", "cuda", {}, ({}, {"_config": 0, "_splits": 4}, {"_config": 1, "_splits": 2},
                                         {"_config": 2, "_splits": 3})),
}


def naive_float32_denoiser(x, y, sigma):
    """What a researcher writes in float32 torch (paper 2's OptimEDM): softmax of -cdist^2."""
    x = x.float().reshape(x.shape[0], -1)
    y = y.float().reshape(y.shape[0], -1)
    sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1)
    logits = -torch.cdist(x, y) ** 2 / (2 * sigma**2)
    return torch.softmax(logits, 1) @ y


def assert_f32_accuracy(out, oracle, naive):
    """Tolerance rule (flash-attention's tests): err(kernel) <= 2 err(naive float32 torch) + 1e-6
    against the float64 oracle, and never above 1e-4."""
    err = (out.double().reshape(oracle.shape) - oracle).abs().max().item()
    err_naive = (naive.double().reshape(oracle.shape) - oracle).abs().max().item()
    bound = min(2 * err_naive + 1e-6, 1e-4)
    assert err <= bound, f"max error {err:.3e} > bound {bound:.3e} (naive float32 error {err_naive:.3e})"


def assert_f64_accuracy(out, oracle):
    err = (out.reshape(oracle.shape) - oracle).abs().max().item()
    assert err <= 1e-10, f"float64 max error {err:.3e} > 1e-10"


def assert_argmax_rule(values, indices, ref_scores, tol, largest=True):
    """Argmax rule (faiss's compareIndices): where the top-2 gap exceeds tol, indices match; otherwise the score
    at the returned index equals the best within tol. ref_scores: [Q, N] float64 exact scores."""
    best = ref_scores.max(1).values if largest else ref_scores.min(1).values
    got = ref_scores.gather(1, indices[:, :1].long()).squeeze(1)
    assert torch.all((got - best).abs() <= tol), "returned neighbour is not within tol of the best"
    srt = torch.sort(ref_scores, 1, descending=largest).values
    gap = (srt[:, 0] - srt[:, 1]).abs()
    exact = torch.argmax(ref_scores, 1) if largest else torch.argmin(ref_scores, 1)
    clear = gap > tol
    assert torch.equal(indices[clear, 0].long(), exact[clear])


def near_tie_rows(images, n, d, seed=2):
    """Real CIFAR-10 rows with constructed nearest-row near-ties, for the nearest-row rule (the
    float64-nearest row, the lowest index among exact duplicates). Pairs (lo, hi) share a row
    but for one coordinate one float32 ulp apart, which the float32 scores cannot resolve: "far"
    moves row hi towards the query (hi is nearer), "near" away from it (lo is nearer), "dup"
    leaves an exact duplicate (lo wins). Returns (queries [5, d], rows [n, d], expected nearest
    indices); needs n >= 300."""
    y = torch.from_numpy(images[:n]).reshape(n, -1)[:, :d].float() / 127.5 - 1
    gen = torch.Generator().manual_seed(seed)
    pairs = [(3, 70, "far"), (5, 6, "far"), (64, 299, "near"), (130, 131, "far"), (1, 257, "dup")]
    x = torch.stack([y[lo] for lo, _, _ in pairs]) + 0.02 * torch.randn(len(pairs), d, generator=gen)
    want = []
    for q, (lo, hi, kind) in enumerate(pairs):
        y[hi] = y[lo]
        if kind != "dup":
            j = int((x[q] - y[lo]).abs().argmax())
            y[hi, j] = torch.nextafter(y[lo, j], x[q, j] if kind == "far" else 2 * y[lo, j] - x[q, j])
        want.append(hi if kind == "far" else lo)
    # The two rows' scores differ by less than the float32 rounding of the scores themselves.
    d64 = ((x.double()[:, None] - y.double()[None]) ** 2).sum(-1)
    yc = (y - y.mean(0)).double()
    for q, (lo, hi, _) in enumerate(pairs):
        assert (d64[q, lo] - d64[q, hi]).abs() / 2 < 2**-24 * yc[lo].square().sum() / 2
    return x, y, want


class StubSSCD(torch.nn.Module):
    """conv -> ReLU -> GeM(p=3) -> linear -> L2 normalise: SSCD's head on a toy trunk."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, kernel_size=8, stride=8)
        self.fc = torch.nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).clamp(min=1e-6).pow(3.0).mean(dim=(2, 3)).pow(1.0 / 3.0)
        return F.normalize(self.fc(h), dim=1)


def save_stub_sscd(path, seed=1):
    """A small real TorchScript descriptor model (``torch.jit.script`` of :class:`StubSSCD`) saved at
    ``path``; returns the scripted module."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # torch >= 2.10 flags TorchScript as deprecated; SSCD ships it
        warnings.simplefilter("ignore", DeprecationWarning)
        model = torch.jit.script(StubSSCD().eval())
    model.save(str(path))
    return model


def output_tree(outdir) -> dict:
    """Relative path -> bytes of every output file except the manifest (it holds timings)."""
    out = {}
    for root, _dirs, files in os.walk(outdir):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), outdir)
            if rel != "manifest.json":
                with open(os.path.join(root, f), "rb") as fh:
                    out[rel] = fh.read()
    return out


def finish_processes(procs, timeout=120) -> list[tuple[int, str, str]]:
    """``(returncode, stdout, stderr)`` of each process, killing any still running after ``timeout`` s."""
    out = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            o, e = p.communicate()
        out.append((p.returncode, o, e))
    return out

