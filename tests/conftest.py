import os

import pytest
import torch

import d3ssl  # noqa: F401  (loads the operator library; fails the session clearly when not built)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and d3ssl.cuda_kernels_available():
        return
    why = ("no CUDA device visible to torch" if not torch.cuda.is_available()
           else "d3ssl was built without its CUDA kernels")
    skip = pytest.mark.skip(reason=why)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
