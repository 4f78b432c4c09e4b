# SPDX-License-Identifier: Apache-2.0
"""SSCD extraction through real TorchScript loading of a stand-in descriptor scripted here."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from diffrepro import sscd
from diffrepro.sscd import SSCDExtractor, preprocess_images

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

MEAN = np.array([0.485, 0.456, 0.406]).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225]).reshape(3, 1, 1)


class StandIn(nn.Module):
    """SSCD's head on a tiny trunk: conv-conv -> GeM (p=3) -> Linear -> L2 normalise."""

    def __init__(self, dim: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 5, stride=4, padding=2)
        self.conv2 = nn.Conv2d(16, 48, 3, stride=2, padding=1)
        self.fc = nn.Linear(48, dim)

    def gem(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return x.clamp(min=1e-6).pow(3.0).mean(dim=(2, 3)).pow(1.0 / 3.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.fc(self.gem(x)), dim=1)


def script_standin(path, calibration=None) -> StandIn:
    """Script a seeded stand-in to ``path``. With calibration images, the linear bias centres the
    pooled features (as PCA whitening would), so that unrelated images get spread-out similarities."""
    torch.manual_seed(0)
    model = StandIn().eval()
    if calibration is not None:
        with torch.no_grad():
            model.fc.bias.copy_(-(model.fc.weight @ model.gem(preprocess_images(calibration, "torch320")).mean(0)))
    torch.jit.script(model).save(str(path))
    return model


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "standin.torchscript.pt"
    script_standin(path)
    return path


def random_images(n, h=32, w=32, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, c, h, w), dtype=np.uint8)


def pil_oracle(images, size):
    """P1's pipeline written out: ToPILImage -> Resize (PIL bilinear) -> ToTensor -> Normalize, float64."""
    out = []
    for im in images:
        pil = Image.fromarray(im.transpose(1, 2, 0)).resize(size, Image.BILINEAR)
        out.append((np.asarray(pil).transpose(2, 0, 1) / 255.0 - MEAN) / STD)
    return np.stack(out)


# --------------------------------------------------------------------------------------------
def test_presets_match_written_out_pipelines():
    x = random_images(3)
    np.testing.assert_allclose(preprocess_images(x, "p1_pil320").numpy(), pil_oracle(x, (320, 320)), atol=1e-6)
    ref = F.interpolate(torch.from_numpy(x).double() / 255, size=(320, 320), mode="bilinear",
                        align_corners=False, antialias=False).numpy()
    np.testing.assert_allclose(preprocess_images(x, "torch320").numpy(), (ref - MEAN) / STD, atol=1e-5)
    wide = random_images(2, h=32, w=48)
    out = preprocess_images(wide, "short288")
    assert out.shape == (2, 3, 288, 432)
    np.testing.assert_allclose(out.numpy(), pil_oracle(wide, (432, 288)), atol=1e-6)
    assert preprocess_images(random_images(1), "short288").shape == (1, 3, 288, 288)
    with pytest.raises(ValueError, match="preset must be one of"):
        preprocess_images(x, "bicubic")


def test_extractor_loads_torchscript_and_matches_eager_model(model_path):
    eager = script_standin(model_path.with_name("again.pt"))
    x = random_images(5)
    feats = SSCDExtractor(model_path, batch_size=2, progress=False)(x)
    assert feats.dtype == np.float32 and feats.shape == (5, 64)
    np.testing.assert_allclose(np.linalg.norm(feats.astype(np.float64), axis=1), 1.0, atol=1e-6)
    with torch.no_grad():
        ref = eager.double()(torch.from_numpy(pil_oracle(x, (320, 320)))).numpy()
    np.testing.assert_allclose(feats, ref, atol=1e-5)
    # Tensors are accepted and batching does not change the result.
    np.testing.assert_allclose(SSCDExtractor(model_path, progress=False)(torch.from_numpy(x)), feats, atol=1e-6)


def test_extractor_rejects_bad_inputs_and_replicates_grey_on_request(model_path):
    ext = SSCDExtractor(model_path, progress=False)
    grey = random_images(2, c=1)
    with pytest.raises(ValueError, match="C=3 channels.*got C=1.*grey_to_rgb=True"):
        ext(grey)
    with pytest.raises(TypeError, match="must be uint8.*got dtype float32"):
        ext(grey.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        ext(grey[0])
    with pytest.raises(ValueError, match="N=0"):
        ext(random_images(0))
    with pytest.raises(FileNotFoundError, match="model_path: no such file"):
        SSCDExtractor(model_path.with_name("missing.pt"))
    with pytest.raises(ValueError, match="preprocess must be one of"):
        SSCDExtractor(model_path, preprocess="pil224")
    rgb = SSCDExtractor(model_path, grey_to_rgb=True, progress=False)(grey)
    np.testing.assert_array_equal(rgb, ext(np.repeat(grey, 3, axis=1)))


def test_feature_cache_keys_and_atomic_files(model_path, tmp_path, monkeypatch):
    x = random_images(4)
    cache = tmp_path / "cache"
    ext = SSCDExtractor(model_path, cache=cache, progress=False)
    first = ext(x)
    files = sorted(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"

    def boom(_):
        raise AssertionError("the network ran although the features were cached")

    monkeypatch.setattr(ext, "_extract", boom)
    np.testing.assert_array_equal(ext(x), first)
    # A different preset, different pixels or a different model are different keys.
    SSCDExtractor(model_path, cache=cache, preprocess="torch320", progress=False)(x)
    y = x.copy()
    y[0, 0, 0, 0] ^= 1
    ext2 = SSCDExtractor(model_path, cache=cache, progress=False)
    ext2(y)
    other = tmp_path / "other.pt"
    torch.manual_seed(1)
    torch.jit.script(StandIn().eval()).save(str(other))
    SSCDExtractor(other, cache=cache, progress=False)(x)
    assert len(list(cache.iterdir())) == 4  # no leftover temporary files
    loaded = sscd.load_features(files[0])
    assert loaded.meta["preprocess"] == "p1_pil320" and loaded.meta["model_sha256"] == ext.model_sha256
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    SSCDExtractor(model_path, cache=True, progress=False)(x)
    assert len(list((tmp_path / "th" / "diffrepro_cache").iterdir())) == 1


def test_feature_files_roundtrip(tmp_path):
    f = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    sscd.save_features(tmp_path / "gen.npz", f, sscd.ids_from_names(["000123.png", "00/000007.png", "5.png"]),
                       {"model": "edm", "tau": 0.6})
    got = sscd.load_features(tmp_path / "gen.npz")
    np.testing.assert_array_equal(got.features, f)
    assert got.ids.dtype == np.int64 and got.ids.tolist() == [123, 7, 5]
    assert got.meta == {"model": "edm", "tau": 0.6}
    sscd.save_features(tmp_path / "train.npz", f, sscd.ids_from_names(["img1.png", "img2.png", "a.jpg"]))
    assert sscd.load_features(tmp_path / "train.npz").ids.tolist() == ["img1.png", "img2.png", "a.jpg"]
    np.savez(tmp_path / "legacy.npz", features=f)  # P1's format: features only
    legacy = sscd.load_features(tmp_path / "legacy.npz")
    assert legacy.ids is None and legacy.meta == {}
    with pytest.raises(ValueError, match=r"ids must have shape \[3\]"):
        sscd.save_features(tmp_path / "bad.npz", f, [1, 2])
    with pytest.raises(ValueError, match="unique"):
        sscd.save_features(tmp_path / "bad.npz", f, [1, 1, 2])
    assert not os.path.exists(tmp_path / "bad.npz")


def test_torch320_vs_p1_pil320_on_real_cifar(cifar_subset, tmp_path):
    """The measurement quoted in diffrepro.sscd's docstring (stand-in network, not SSCD)."""
    path = tmp_path / "centred.pt"
    script_standin(path, calibration=cifar_subset[1000:1128])
    x = cifar_subset[:128]
    f_pil = SSCDExtractor(path, preprocess="p1_pil320", progress=False)(x).astype(np.float64)
    f_t = SSCDExtractor(path, preprocess="torch320", progress=False)(x).astype(np.float64)
    iu = np.triu_indices(len(x), 1)
    s_pil, s_t = (f_pil @ f_pil.T)[iu], (f_t @ f_t.T)[iu]
    delta = np.abs(s_pil - s_t)
    assert np.quantile(s_pil, 0.05) < 0.0 and np.quantile(s_pil, 0.95) > 0.6  # similarities are spread out
    assert delta.mean() < 2e-3 and np.quantile(delta, 0.99) < 5e-3 and delta.max() < 1e-2
    assert np.mean((s_pil > 0.6) != (s_t > 0.6)) < 1e-3
    assert np.min((f_pil * f_t).sum(1)) > 0.9999


def test_damaged_cache_entry_is_recomputed(model_path, tmp_path):
    """Cache entries are written atomically, so two jobs filling one entry at once leave one whole
    file; an entry damaged outside diffrepro is recomputed, with one warning, and rewritten."""
    x = random_images(3)
    cache = tmp_path / "cache"
    first = SSCDExtractor(model_path, cache=cache, progress=False)(x)
    (entry,) = cache.iterdir()
    entry.write_bytes(entry.read_bytes()[:40])
    with pytest.warns(UserWarning, match="unreadable"):
        again = SSCDExtractor(model_path, cache=cache, progress=False)(x)
    np.testing.assert_array_equal(again, first)
    np.testing.assert_array_equal(sscd.load_features(entry).features, first)
