# SPDX-License-Identifier: Apache-2.0
"""Split-precision products: float32 accuracy from tensor cores that multiply 10-bit (TF32) or
7-bit (BF16) significands, by splitting each operand into a high and a low part,
``a = a_hi + a_lo``, and summing three products (the 3xTF32 scheme of CUTLASS; Ootomo & Yokota,
"Recovering single precision accuracy from Tensor Cores while surpassing the FP32 theoretical
peak performance", IJHPCA 2022):

    a b ~ a_hi b_hi + a_hi b_lo + a_lo b_hi        (a_lo b_lo, of relative size 2^-2p, dropped)

The three products are one GEMM over a threefold inner dimension,
``[a_hi, a_hi, a_lo] [b_hi; b_lo; b_hi]``, accumulated in float32.

Written so that the CPU reproduces the arithmetic: the parts are float32 tensors whose
significands are rounded (round to nearest, ties away from zero, as ``cvt.rna.tf32.f32``) to
``p`` explicit bits by integer masking; products of two such numbers are exact in float32
(2 (p + 1) <= 24 bits), so a float32 GEMM of the parts equals the tensor-core products up to the
order of the float32 accumulation. On CUDA the same parts run on tensor cores: TF32 through
``torch.backends.cuda.matmul.allow_tf32`` (the parts are exact TF32 values, so the hardware's
own input conversion loses nothing), BF16 through ``torch.mm(..., out_dtype=torch.float32)``.

3xTF32 keeps 2 x 11 = 22 significant bits of each operand, close to float32's 24; 3xBF16 keeps
2 x 8 = 16, so its products carry errors of ~2^-16 relative: measured against the tolerance
rule in tests/test_split_precision.py and docs/cuda.md (opt-in, never the default).
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["PRODUCTS", "MANTISSA_BITS", "UNIT_ROUNDOFF", "round_mantissa", "split", "split_matmul"]

PRODUCTS = ("fp32", "3xtf32", "3xbf16")
# Explicit significand bits of the tensor-core input formats.
MANTISSA_BITS = {"3xtf32": 10, "3xbf16": 7}
# Relative rounding error of one product term: float32's unit roundoff; the split products add
# the dropped a_lo b_lo term and the rounding of the low parts (2 x 2^-22 and 2 x 2^-16).
UNIT_ROUNDOFF = {"fp32": 2.0**-24, "3xtf32": 2.0**-21, "3xbf16": 2.0**-15, "float64": 2.0**-53}


def round_mantissa(t: torch.Tensor, bits: int) -> torch.Tensor:
    """float32 values rounded to ``bits`` explicit significand bits (nearest, ties away from zero).

    Adding half a unit of the kept last place to the IEEE bit pattern and clearing the dropped
    bits rounds the magnitude (the pattern is sign-magnitude), carrying into the exponent when
    the significand overflows. Finite inputs only (the ops reject NaN/Inf)."""
    if t.dtype != torch.float32:
        raise TypeError(f"round_mantissa: expected a float32 tensor, got {t.dtype}")
    if not 0 < bits < 23:
        raise ValueError(f"bits: got {bits}, expected 1..22")
    drop = 23 - bits
    i = t.contiguous().view(torch.int32)
    return ((i + (1 << (drop - 1))) & ~((1 << drop) - 1)).view(torch.float32)


def split(t: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) with ``hi = round(t)``, ``lo = round(t - hi)`` (``t - hi`` is exact in float32)."""
    hi = round_mantissa(t, bits)
    return hi, round_mantissa(t - hi, bits)


@contextlib.contextmanager
def _tf32(enabled: bool):
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def split_matmul(a: torch.Tensor, b: torch.Tensor, product: str = "fp32") -> torch.Tensor:
    """``a @ b`` ([M, K] x [K, N]) with the given product: "fp32" is the plain GEMM in the inputs'
    dtype (float64 inputs always take it); "3xtf32" / "3xbf16" are the split products above."""
    if product == "fp32" or a.dtype == torch.float64:
        with _tf32(False):  # the plain float32 path must not silently become TF32
            return a @ b
    if product not in MANTISSA_BITS:
        raise ValueError(f"product: got {product!r}, expected one of {', '.join(PRODUCTS)}")
    a_hi, a_lo = split(a, MANTISSA_BITS[product])
    b_hi, b_lo = split(b, MANTISSA_BITS[product])
    a3 = torch.cat([a_hi, a_hi, a_lo], 1)
    b3 = torch.cat([b_hi, b_lo, b_hi], 0)
    if a.device.type != "cuda":
        return a3 @ b3
    if product == "3xtf32":
        with _tf32(True):
            return a3 @ b3
    return torch.mm(a3.to(torch.bfloat16), b3.to(torch.bfloat16), out_dtype=torch.float32)
