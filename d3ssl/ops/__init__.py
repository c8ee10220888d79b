"""Custom operators: documented wrappers over ``torch.ops.d3ssl``, with fake kernels and autograd.

Each op module also holds a pure-PyTorch reference implementation, the oracle of the tests.
"""
from . import region  # noqa: F401  (region_erase, composite: fake kernels and wrappers)
from .roi_align import RoIAlign, roi_align, roi_align_reference  # noqa: F401
