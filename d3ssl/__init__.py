"""d3ssl: De-coupling and De-positioning Dense Self-supervised Learning.

Importing the package loads the compiled operator library (d3ssl._C) once; its ops are then
available as ``torch.ops.d3ssl.*`` and through the documented wrappers in :mod:`d3ssl.ops`.
"""
from ._library import build_info, cpu_kernels_threaded, cuda_kernels_available, load_library

__version__ = "0.1.0"

load_library()

from . import ops  # noqa: E402,F401  (registers fake kernels and autograd for the compiled ops)

__all__ = ["build_info", "cpu_kernels_threaded", "cuda_kernels_available", "ops", "__version__"]
