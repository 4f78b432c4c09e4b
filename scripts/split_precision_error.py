# SPDX-License-Identifier: Apache-2.0
"""Error of the split-precision products against the float64 oracle on real CIFAR-10, per noise
level: the empirical denoiser's output through the BLAS engine with each product, next to naive
float32 torch (the tolerance rule's yardstick: err <= min(2 err(naive) + 1e-6, 1e-4)).

Runs on the CPU (the tensor-core arithmetic is emulated bit for bit, see diffrepro._split) or, with
--device cuda, on real tensor cores. Usage:
    python scripts/split_precision_error.py [--n 1000] [--q 16] [--device cpu] [--json out.json]
"""
import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from diffrepro import _blas_engine, ops, reference
from diffrepro._split import PRODUCTS

SIGMAS = (0.002, 0.01, 0.05, 0.2, 1.0, 5.0, 20.0, 80.0)


def naive_float32(x, y, sigma):
    logits = -torch.cdist(x, y) ** 2 / (2 * sigma**2)
    return torch.softmax(logits, 1) @ y


def measure(images: np.ndarray, n: int, q: int, device: str, sigmas=SIGMAS, products=PRODUCTS) -> list[dict]:
    """Rows: sigma, query kind (training rows or held-out rows, plus noise sigma), max abs error
    of naive float32 and of each product, and whether each product meets the tolerance rule."""
    y = torch.from_numpy(images[:n]).reshape(n, -1).float().div(127.5).sub(1)
    held = torch.from_numpy(images[-q:]).reshape(q, -1).float().div(127.5).sub(1)
    g = torch.Generator().manual_seed(0)
    rows = []
    for sigma in sigmas:
        for kind, clean in (("train", y[:: max(1, n // q)][:q]), ("held-out", held)):
            x = clean + sigma * torch.randn(clean.shape, generator=g)
            oracle = reference.empirical_denoiser_reference(x, y, sigma)
            err_naive = float((naive_float32(x, y, sigma).double() - oracle).abs().max())
            bound = min(2 * err_naive + 1e-6, 1e-4)
            row = dict(sigma=sigma, queries=kind, naive_fp32=err_naive, bound=bound)
            xd, yd = x.to(device), y.to(device)
            inv = torch.full((q,), sigma**-2.0, dtype=torch.float64, device=device)
            center = ops._center(yd, torch.float32)
            for product in products:
                st = ops.DenoiserState(**_blas_engine.denoiser_state(xd, yd, inv, center, product=product))
                out, _ = ops.finalize(st)
                err = float((out.cpu().double() - oracle).abs().max())
                row[product] = err
                row[product + "_ok"] = err <= bound
            rows.append(row)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = os.environ.get("DIFFREPRO_TEST_DATA", "../shared/data")
    p.add_argument("--data", default=f"{data}/cifar10-train-subset.npz")
    p.add_argument("--n", type=int, default=1000, help="training rows")
    p.add_argument("--q", type=int, default=16, help="queries per kind")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="also write the rows here")
    a = p.parse_args()
    with np.load(a.data) as f:
        rows = measure(f["images"], a.n, a.q, a.device)
    print(f"{'sigma':>7} {'queries':>9} {'naive fp32':>11} {'bound':>9} " + " ".join(f"{x:>14}" for x in PRODUCTS))
    for r in rows:
        cells = " ".join(f"{r[x]:>10.2e} {'ok' if r[x + '_ok'] else 'FAIL':>3}" for x in PRODUCTS)
        print(f"{r['sigma']:>7g} {r['queries']:>9} {r['naive_fp32']:>11.2e} {r['bound']:>9.2e} {cells}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(r[x + "_ok"] for r in rows for x in ("fp32",)) else 1


if __name__ == "__main__":
    sys.exit(main())
