"""Custom operators: documented wrappers over ``torch.ops.d3ssl``, with fake kernels and autograd.

Each op module also holds a pure-PyTorch reference implementation, the oracle of the tests (the
sampling ops' references are the ``*_reference`` functions of d3ssl.augment.samplers).
"""
from . import region  # noqa: F401  (region_erase, composite: fake kernels and wrappers)
from . import sampling  # noqa: F401  (the samplers' geometry: prc_plan, prm_plan, jitter_plan, shift_plan)
from .roi_align import RoIAlign, as_rois, roi_align, roi_align_reference  # noqa: F401
