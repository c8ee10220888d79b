"""Build of d3ssl and its operator library d3ssl._C.

The CUDA kernels are compiled whenever a CUDA toolkit is found, with or without a GPU; without a
toolkit the library is CPU-only. Environment variables:

  CUDA_HOME / CUDA_PATH   the toolkit (otherwise found from nvcc on PATH, then /usr/local/cuda)
  TORCH_CUDA_ARCH_LIST    GPU architectures (default: the visible GPU's, or "8.0;9.0" with none)
  D3SSL_WITH_CUDA=0       build CPU-only even when a toolkit is there
  D3SSL_OPENMP=0          compile the CPU kernels without OpenMP (they then run on one thread)
  MAX_JOBS                parallel compile jobs (ninja)
"""
import glob
import json
import os
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _toolkit_at(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def find_cuda_home():
    """The CUDA toolkit root, or None. `nvcc` on PATH may be a wrapper script outside the toolkit
    (`exec /usr/local/cuda-13.0/bin/nvcc "$@"`), so the script is read for the real path."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _toolkit_at(os.environ.get(var)):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidate = os.path.dirname(os.path.dirname(real))
        if _toolkit_at(candidate):
            return candidate
        try:
            with open(real, "rb") as f:
                head = f.read(4096).decode("utf-8", "ignore")
            for target in re.findall(r"(/\S+?)/bin/nvcc\b", head):
                if _toolkit_at(target):
                    return target
        except OSError:
            pass
    for candidate in ("/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)):
        if _toolkit_at(candidate):
            return candidate
    return None


with_cuda = os.environ.get("D3SSL_WITH_CUDA", "1") != "0"
cuda_home = find_cuda_home() if with_cuda else None
if cuda_home:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = cuda_home

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

if cuda_home and "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
    os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"


def openmp():
    """Whether the CPU kernels are compiled with OpenMP: on Linux, when torch's intra-op threads are
    OpenMP's (torch's Linux wheels; the compiler must take -fopenmp, as GCC does). D3SSL_OPENMP=0
    turns it off."""
    if os.environ.get("D3SSL_OPENMP", "1") == "0":
        return False
    if not (sys.platform.startswith("linux") and torch.backends.openmp.is_available()):
        return False
    if not _compiler_is_gcc():
        print("d3ssl: the C++ compiler is not GCC; building the CPU kernels without OpenMP (they will "
              "run on one thread; torch's OpenMP runtime is GCC's libgomp)")
        return False
    return True


def _compiler_is_gcc():
    """Whether the C++ compiler setuptools will call ($CXX, else c++) is GCC."""
    import subprocess
    cxx = os.environ.get("CXX", "c++").split()
    try:
        out = subprocess.run([*cxx, "--version"], capture_output=True, text=True, timeout=60).stdout.lower()
    except (OSError, subprocess.SubprocessError):
        return False
    return "clang" not in out and "free software foundation" in out


def openmp_runtime():
    """Link arguments for the OpenMP runtime: the copy bundled with torch when there is one, linked
    by its own soname (some wheels rename it), so that the process keeps the one runtime torch loaded
    and the kernels follow torch.set_num_threads; else the compiler's (-fopenmp)."""
    bundled = sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp*.so*")))
    return [bundled[0]] if bundled else ["-fopenmp"]


def extension():
    sources = ["csrc/d3ssl.cpp"] + sorted(glob.glob("csrc/ops/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/ops/cuda/*.cu"))
    version = torch.__version__.split("+")[0]
    define = [("D3SSL_TORCH_VERSION", f'"{torch.__version__}"')]
    cxx = ["-O3"]  # the C++ standard is the one torch.utils.cpp_extension picks for this torch
    link = []
    if openmp():
        # at::parallel_for is a header template: without -fopenmp it runs every CPU kernel on the
        # calling thread.
        cxx.append("-fopenmp")
        link += openmp_runtime()
    if cuda_home and cuda_sources:
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        print(f"d3ssl: building CPU and CUDA kernels (toolkit {cuda_home}, "
              f"arch {os.environ.get('TORCH_CUDA_ARCH_LIST', 'from the visible GPU')}, torch {version})")
        return cpp_extension.CUDAExtension(
            "d3ssl._C", sources + cuda_sources, define_macros=define,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link,
            include_dirs=[os.path.join(ROOT, "csrc")])
    reason = "D3SSL_WITH_CUDA=0" if not with_cuda else "no CUDA toolkit found"
    print(f"d3ssl: {reason}; building the CPU kernels only (torch {version})")
    return cpp_extension.CppExtension(
        "d3ssl._C", sources, define_macros=define, extra_compile_args={"cxx": cxx},
        extra_link_args=link, include_dirs=[os.path.join(ROOT, "csrc")])


class BuildExt(cpp_extension.BuildExtension):
    """Also records what the library was built against, for the import-time check."""

    def run(self):
        super().run()
        info = {"torch": torch.__version__, "cuda": bool(cuda_home and glob.glob("csrc/ops/cuda/*.cu")),
                "openmp": openmp(),
                "cuda_home": cuda_home, "arch": os.environ.get("TORCH_CUDA_ARCH_LIST")}
        with open(os.path.join(ROOT, "d3ssl", "_build_info.json"), "w") as f:
            json.dump(info, f)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExt.with_options(no_python_abi_suffix=False)},
)
