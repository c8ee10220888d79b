"""Finds and loads the compiled operator library, and explains what is wrong when it cannot."""
import importlib.machinery
import json
import os
import warnings

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_loaded_path = None


class LibraryError(ImportError):
    pass


def _library_path():
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(_HERE, "_C" + suffix)
        if os.path.isfile(path):
            return path
    return None


def build_info():
    """What the compiled library was built against: {"torch", "cuda", "cuda_home", "arch", "openmp"}
    (openmp: whether setup.py compiled the CPU kernels with OpenMP)."""
    try:
        with open(os.path.join(_HERE, "_build_info.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def load_library():
    """Load d3ssl._C into torch.ops.d3ssl (once). Raises LibraryError with the fix on failure."""
    global _loaded_path
    if _loaded_path is not None:
        return _loaded_path
    path = _library_path()
    if path is None:
        raise LibraryError(
            "d3ssl's compiled operator library (d3ssl/_C*.so) was not found: the package has not been "
            "built. From the repository root run `pip install -e .` (or, with torch already installed "
            "and no network, `pip install --no-build-isolation --no-deps -e .`).")
    built = build_info().get("torch")
    try:
        torch.ops.load_library(path)
    except OSError as e:
        hint = (f"it was built against torch {built}, but torch {torch.__version__} is installed"
                if built and built != torch.__version__ else "it may be incomplete or stale")
        raise LibraryError(
            f"d3ssl could not load its operator library {path}: {hint}. Rebuild it with "
            f"`pip install --no-build-isolation -e .` in the repository root.\n(loader said: {e})") from e
    compiled_for = torch.ops.d3ssl._build_torch_version()
    if compiled_for.split("+")[0] != torch.__version__.split("+")[0]:
        raise LibraryError(
            f"d3ssl's operator library was built against torch {compiled_for}, but torch "
            f"{torch.__version__} is installed. Rebuild it with `pip install --no-build-isolation -e .`.")
    _loaded_path = path
    if not cpu_kernels_threaded() and build_info().get("openmp") is not False and torch.get_num_threads() > 1:
        warnings.warn(
            "d3ssl's operator library was compiled without OpenMP, so its CPU kernels run on one thread "
            f"instead of torch's {torch.get_num_threads()}: rebuild it with a compiler that supports "
            "-fopenmp (on Linux `pip install --no-build-isolation -e .` does; D3SSL_OPENMP=0 builds "
            "without it on purpose, and then this warning is not shown).",
            stacklevel=3)
    return path


def cpu_kernels_threaded():
    """True when the CPU kernels run on torch's intra-op threads; False when each runs on the calling
    thread: torch's threads are OpenMP's and the library was compiled without OpenMP (setup.py adds
    it on Linux unless D3SSL_OPENMP=0)."""
    return bool(torch.ops.d3ssl._build_intra_op_parallel())


def cuda_kernels_available():
    """True when the library was compiled with its CUDA kernels (a GPU is a separate question)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("d3ssl::roi_align", "CUDA")
