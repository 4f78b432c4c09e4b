# SPDX-License-Identifier: Apache-2.0
"""Shared fixtures: devices, kernel backends, the real CIFAR-10 sample, seeding."""
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import diffrepro

REPO = Path(__file__).resolve().parents[1]


def _devices():
    forced = os.environ.get("DIFFREPRO_TEST_DEVICE")
    if forced:
        return [forced]
    devs = ["cpu"]
    if torch.cuda.is_available() and diffrepro.build_info()["cuda_loaded"]:
        devs.append("cuda")
    return devs


@pytest.fixture(params=_devices())
def device(request):
    return request.param


def _kernel_backends():
    """The kernel backends this build can run: the CPU kernels, the CUDA kernels under the host
    emulator (no GPU needed), and the CUDA kernels on a GPU (marked `cuda`, skipped without one).
    DIFFREPRO_TEST_DEVICE=cpu keeps the host ones only, =cuda the GPU one only."""
    forced = os.environ.get("DIFFREPRO_TEST_DEVICE")
    names = []
    if forced in (None, "", "cpu"):
        names.append("cpu")
        if importlib.util.find_spec("diffrepro._cuda_emu") is not None:
            names.append("emu")
    if forced in (None, "", "cuda"):
        names.append(pytest.param("cuda", marks=pytest.mark.cuda))
    return names


@pytest.fixture(params=_kernel_backends())
def backend(request):
    """A helpers.Backend: where tensors go, the ops keyword arguments that select it, and the
    tile/thread/split configurations that exercise its merges."""
    from helpers import BACKENDS

    return BACKENDS[request.param]


def pytest_collection_modifyitems(config, items):
    has_gpu = "cuda" in _devices()
    skip = pytest.mark.skip(reason="needs a CUDA GPU and a CUDA build of diffrepro")
    for item in items:
        if "cuda" in item.keywords and not has_gpu:
            item.add_marker(skip)


def test_data_dir() -> Path:
    return Path(os.environ.get("DIFFREPRO_TEST_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def cifar_subset():
    """uint8 [5170, 3, 32, 32] real CIFAR-10 training images (../shared/data)."""
    path = test_data_dir() / "cifar10-train-subset.npz"
    if not path.exists():
        msg = f"real CIFAR-10 sample not found at {path} (set DIFFREPRO_TEST_DATA)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    with np.load(path) as f:
        return f["images"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
