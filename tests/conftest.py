"""Test setup: Triton's interpreter when there is no GPU (set before any kernel module is imported),
seeded RNGs, and the ``gpu`` marker."""

import os
import random

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible to torch)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from a clean torch.compile cache: the layers' ``forward`` code objects are shared by every
    test, and the suite's compile tests together would otherwise pass dynamo's recompile limit (8 per code object)
    and fail a ``fullgraph=True`` case depending on test order."""
    yield
    torch._dynamo.reset()


@pytest.fixture
def device() -> torch.device:
    """The device kernels are tested on: CUDA when present, else CPU under the interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")
