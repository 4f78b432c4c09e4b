# SPDX-License-Identifier: Apache-2.0
"""Shared fixtures: devices, the real CIFAR-10 sample, seeding."""
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
