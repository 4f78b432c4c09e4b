# SPDX-License-Identifier: Apache-2.0
"""Tests of diffrepro.noise: per-seed noise, seed parsing, banks, slerp, planes, seed split."""

import math
import os
import re

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from diffrepro import noise as N
from diffrepro.generation import format_seeds


def test_seed_latents_follow_per_seed_generators():
    seeds = [0, 7, 2**32 + 7, 123456]
    lat, labels = N.seed_latents(seeds, (3, 4, 4))
    assert lat.dtype == torch.float32 and lat.shape == (4, 3, 4, 4) and labels is None
    for k, s in enumerate(seeds):
        g = torch.Generator("cpu").manual_seed(s % 2**32)
        torch.testing.assert_close(lat[k], torch.randn([3, 4, 4], generator=g), rtol=0, atol=0)
    # seed s and s + 2**32 share a stream; the batch composition does not matter
    torch.testing.assert_close(lat[1], lat[2], rtol=0, atol=0)
    torch.testing.assert_close(N.seed_latents([123456], (3, 4, 4))[0][0], lat[3], rtol=0, atol=0)


def test_class_labels_drawn_after_noise_from_same_generator():
    lat, labels = N.seed_latents([5, 6], (1, 2, 2), label_dim=10)
    for k, s in enumerate([5, 6]):
        g = torch.Generator("cpu").manual_seed(s)
        torch.testing.assert_close(lat[k], torch.randn([1, 2, 2], generator=g), rtol=0, atol=0)
        c = int(torch.randint(10, size=[], generator=g))
        assert labels[k].tolist() == [1.0 if j == c else 0.0 for j in range(10)]
    _, fixed = N.seed_latents([5, 6], (1, 2, 2), label_dim=10, class_idx=3)
    assert fixed[:, 3].tolist() == [1.0, 1.0] and float(fixed.sum()) == 2.0


def test_stacked_generator_randn_like():
    rnd = N.StackedRandomGenerator("cpu", [1, 2])
    x = torch.zeros(2, 3, dtype=torch.float64)
    out = rnd.randn_like(x)
    assert out.dtype == torch.float64 and out.shape == (2, 3)
    with pytest.raises(ValueError, match="size\\[0\\] must equal the number of seeds \\(2\\)"):
        rnd.randn([3, 1])


def test_parse_seeds():
    assert N.parse_seeds("0-3,100, 200-201") == [0, 1, 2, 3, 100, 200, 201]
    assert N.parse_seeds("5") == [5]
    assert N.parse_seeds([3, 1]) == [3, 1]
    assert len(N.parse_seeds("100000-109999")) == 10000
    with pytest.raises(ValueError, match="start <= end, got '5-3'"):
        N.parse_seeds("5-3")
    with pytest.raises(ValueError, match="got item 'x'"):
        N.parse_seeds("1,x")
    with pytest.raises(ValueError, match="got item ''"):
        N.parse_seeds("1,,2")
    with pytest.raises(ValueError, match="got item '-1'"):
        N.parse_seeds("-1")


# --- seed lists: properties (hypothesis) ---------------------------------------------------------
# The oracle reads EDM's grammar character by character (no regex, no int() on non-ASCII digits):
# items separated by ',', surrounding whitespace ignored, each 'a' or 'a-b' with ASCII digits, a <= b.
_ASCII_DIGITS = set("0123456789")


def _oracle_item(item: str):
    """(lo, hi) of a valid item, or the error kind: 'item' (not the grammar) or 'range' (b < a)."""
    lo, sep, hi = item.partition("-")
    hi = hi if sep else lo
    if not lo or not hi or not set(lo) <= _ASCII_DIGITS or not set(hi) <= _ASCII_DIGITS:
        return "item"
    return (int(lo), int(hi)) if int(lo) <= int(hi) else "range"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 10**9), min_size=1, max_size=40))
def test_format_seeds_then_parse_seeds_is_the_identity(seeds):
    text = format_seeds(seeds)
    assert N.parse_seeds(text) == seeds
    assert re.fullmatch(r"[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*", text, flags=re.ASCII)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="0123456789-, \t\n+x³٣", max_size=16))
def test_parse_seeds_accepts_exactly_edm_syntax_and_quotes_the_bad_item(text):
    items = [part.strip() for part in text.split(",")]
    parsed = [_oracle_item(item) for item in items]
    bad = next((k for k, p in enumerate(parsed) if isinstance(p, str)), None)
    if bad is None:
        assume(sum(hi - lo + 1 for lo, hi in parsed) <= 100_000)
        assert N.parse_seeds(text) == [s for lo, hi in parsed for s in range(lo, hi + 1)]
        return
    expected = "got item" if parsed[bad] == "item" else "start <= end, got"
    with pytest.raises(ValueError, match=f"{expected} {re.escape(repr(items[bad]))} in "):
        N.parse_seeds(text)


def test_noise_bank_round_trip(tmp_path):
    bank = N.NoiseBank.generate("10-14,3", (2, 3, 3))
    path = tmp_path / "bank.npz"
    bank.save(path)
    assert sorted(os.listdir(tmp_path)) == ["bank.npz"]  # no temporary file left behind
    with np.load(path) as z:
        assert z["latents"].dtype == np.float32 and z["latents"].shape == (6, 2, 3, 3)
        assert z["seeds"].dtype == np.int64 and z["seeds"].tolist() == [10, 11, 12, 13, 14, 3]
    back = N.NoiseBank.load(path)
    torch.testing.assert_close(back.latents, bank.latents, rtol=0, atol=0)
    torch.testing.assert_close(back.get([3, 12]), N.seed_latents([3, 12], (2, 3, 3))[0], rtol=0, atol=0)
    assert len(back) == 6
    with pytest.raises(KeyError,
                       match=r"seeds not in the noise bank: \[99, 98\] \(2 missing; the bank holds 6 seeds\)"):
        back.get([3, 99, 98])
    bank.save(path)  # overwriting works
    assert sorted(os.listdir(tmp_path)) == ["bank.npz"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_noise_bank_file_honours_the_umask(tmp_path, umask):
    """A saved bank gets 0o666 less the umask, like a plain ``open(path, "w")`` (not mkstemp's 0600)."""
    plain = tmp_path / "plain"
    saved = os.umask(umask)
    try:
        N.NoiseBank.generate("0-1", (1, 2, 2)).save(tmp_path / "bank.npz")
        plain.write_bytes(b"")
    finally:
        os.umask(saved)
    assert (tmp_path / "bank.npz").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o666 & ~umask


def test_noise_bank_validation(tmp_path):
    with pytest.raises(TypeError, match="latents must be float32, got torch.float64"):
        N.NoiseBank(torch.zeros(2, 1, 1, 1, dtype=torch.float64), [0, 1])
    with pytest.raises(ValueError, match="seeds must have one entry per latent \\(2\\), got 3"):
        N.NoiseBank(torch.zeros(2, 1, 1, 1), [0, 1, 2])
    with pytest.raises(ValueError, match="seeds must be unique"):
        N.NoiseBank(torch.zeros(2, 1, 1, 1), [4, 4])
    bad = tmp_path / "bad.npz"
    np.savez(bad, latents=np.zeros((1, 1, 1, 1), np.float32))
    with pytest.raises(KeyError, match="has no array 'seeds'"):
        N.NoiseBank.load(bad)


def test_slerp_endpoints_and_norm():
    g = torch.Generator().manual_seed(0)
    e0, e1 = torch.randn(3, 8, 8, generator=g), torch.randn(3, 8, 8, generator=g)
    torch.testing.assert_close(N.slerp(e0, e1, 0.0), e0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(N.slerp(e0, e1, 1.0), e1, rtol=1e-6, atol=1e-6)
    # orthogonal equal-norm vectors: slerp keeps the norm, lerp drops it by 1/sqrt(2) at the middle
    a = torch.zeros(4, dtype=torch.float64)
    b = torch.zeros(4, dtype=torch.float64)
    a[0], b[1] = 2.0, 2.0
    alphas = torch.linspace(0, 1, 11)
    out = N.slerp(a, b, alphas)
    assert out.shape == (11, 4)
    torch.testing.assert_close(out.norm(dim=1), torch.full((11,), 2.0, dtype=torch.float64), rtol=1e-12, atol=0)
    mid = N.slerp(a, b, 0.5)
    torch.testing.assert_close(mid, torch.tensor([math.sqrt(2), math.sqrt(2), 0, 0], dtype=torch.float64))
    # the formula with sin(theta) in the denominator (the slerp of Shoemake 1985)
    theta = torch.arccos((e0 * e1).sum().double() / (e0.double().norm() * e1.double().norm()))
    want = (torch.sin(0.3 * theta) * e0.double() + torch.sin(0.7 * theta) * e1.double()) / torch.sin(theta)
    torch.testing.assert_close(N.slerp(e0, e1, 0.7).double(), want, rtol=1e-6, atol=1e-6)


def test_slerp_lerp_fallback_and_batched():
    a = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    out = N.slerp(a, 2 * a, 0.25)  # parallel: sin(theta) = 0 -> lerp
    torch.testing.assert_close(out, 1.25 * a)
    e0 = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    e1 = torch.tensor([[0.0, 1.0], [-1.0, 0.0 + 1e-3]], dtype=torch.float64)
    out = N.slerp(e0, e1, 0.5, batched=True)
    torch.testing.assert_close(out[0], torch.tensor([1, 1], dtype=torch.float64) / math.sqrt(2))
    assert out[1].norm().item() == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(ValueError, match="e1 must have the shape of e0"):
        N.slerp(e0, e1[:1], 0.5)


def test_noise_plane():
    g = torch.Generator().manual_seed(1)
    e1, e2, e3 = (torch.randn(3, 4, 4, generator=g) for _ in range(3))
    plane = N.noise_plane(e1, e2, e3, [0.0, 1.0, 0.5], [0.0, 1.0])
    assert plane.shape == (3, 2, 3, 4, 4)
    torch.testing.assert_close(plane[0, 0], e1)
    torch.testing.assert_close(plane[1, 0], e2)
    torch.testing.assert_close(plane[0, 1], e3)
    torch.testing.assert_close(plane[2, 1], e1 + 0.5 * (e2 - e1) + (e3 - e1))
    default = N.noise_plane(e1, e2, e3)
    assert default.shape == (100, 100, 3, 4, 4)
    renorm = N.noise_plane(e1, e2, e3, [1 / 3], [1 / 3], renormalize=True)
    target = (e1.norm() + e2.norm() + e3.norm()) / 3
    assert renorm[0, 0].norm().item() == pytest.approx(target.item(), rel=1e-5)
    centroid = N.noise_plane(e1, e2, e3, [1 / 3], [1 / 3])
    assert centroid[0, 0].norm().item() < 0.8 * target.item()  # not renormalised by default


def test_split_seeds_matches_edm():
    seeds = list(range(1000))
    batches = [N.split_seeds(seeds, 64, 4, r) for r in range(4)]
    # EDM: num_batches = ((S - 1) // (batch * world) + 1) * world
    num_batches = ((1000 - 1) // (64 * 4) + 1) * 4
    ref = torch.as_tensor(seeds).tensor_split(num_batches)
    for r in range(4):
        assert [b.tolist() for b in batches[r]] == [b.tolist() for b in ref[r::4]]
    flat = sorted(int(s) for rank in batches for b in rank for s in b)
    assert flat == seeds
    assert all(len(b) <= 64 for rank in batches for b in rank)
    assert [b.tolist() for b in N.split_seeds([1, 2, 3], 2)] == [[1, 2], [3]]
    with pytest.raises(ValueError, match="rank must be an int in \\[0, world_size=2\\), got 2"):
        N.split_seeds(seeds, 64, 2, 2)
    with pytest.raises(ValueError, match="batch must be an int >= 1, got 0"):
        N.split_seeds(seeds, 0)


def test_seed_filename():
    assert N.seed_filename(123) == "000123.png"
    assert N.seed_filename(123, subdirs=True) == "000000/000123.png"
    assert N.seed_filename(104321, subdirs=True) == "104000/104321.png"
    assert N.seed_filename(1234567) == "1234567.png"
    with pytest.raises(ValueError, match="seed must be a non-negative int, got -1"):
        N.seed_filename(-1)
