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


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for a test module of tiny tensors: as fast, and far faster when the
    CPU is shared (OpenMP threads spin-waiting on busy cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
