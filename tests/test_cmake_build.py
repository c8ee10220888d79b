"""The CMake build: configure and build CMakeLists.txt (CPU kernels), load the library with
torch.ops.load_library and compare its roi_align against torchvision.

The comparison runs in a subprocess that does not import d3ssl: the package's own library and this
one both define the `d3ssl` op namespace, and one process may register it only once.
"""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

CHECK = textwrap.dedent("""
    import sys
    import torch, torchvision
    assert "d3ssl" not in sys.modules
    torch.ops.load_library(sys.argv[1])
    assert torch.ops.d3ssl._build_torch_version().split("+")[0] == torch.__version__.split("+")[0]
    assert torch.ops.d3ssl._build_intra_op_parallel() or not sys.platform.startswith("linux")
    torch.set_num_threads(1)
    assert torch.ops.d3ssl._intra_op_threads() == 1
    torch.manual_seed(0)
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 8, 9, 11).to(memory_format=fmt)
        xy = torch.rand(6, 2) * 40 - 8
        rois = torch.cat([torch.tensor([0, 1, 1, 0, 1, 0.])[:, None], xy, xy + torch.rand(6, 2) * 30], 1)
        for aligned in (True, False):
            ours = torch.ops.d3ssl.roi_align(x, rois, 0.25, 3, 4, -1, aligned)
            ref = torchvision.ops.roi_align(x, rois, (3, 4), 0.25, -1, aligned)
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
            grad = torch.randn_like(ref)
            gi = torch.ops.d3ssl._roi_align_backward(grad, rois, 0.25, 3, 4, 2, 8, 9, 11, -1, aligned,
                                                     fmt == torch.channels_last)
            xt = x.clone().requires_grad_()
            torchvision.ops.roi_align(xt, rois, (3, 4), 0.25, -1, aligned).backward(grad)
            torch.testing.assert_close(gi, xt.grad, atol=1e-5, rtol=1e-5)
    print("cmake library ok")
""")


def test_cmake_build_runs_roi_align(tmp_path):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed (pip install cmake)")
    build = tmp_path / "build"
    env = dict(os.environ)
    configure = [cmake, "-S", ROOT, "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DD3SSL_WITH_CUDA=OFF",
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DPython3_EXECUTABLE={sys.executable}"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    proc = subprocess.run(configure, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, f"cmake configure failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    jobs = os.environ.get("MAX_JOBS", "2")
    proc = subprocess.run([cmake, "--build", str(build), "-j", jobs], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, f"cmake build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    library = build / "libd3ssl_ops.so"
    assert library.is_file(), os.listdir(build)

    proc = subprocess.run([sys.executable, "-c", CHECK, str(library)], capture_output=True, text=True,
                          cwd=str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cmake library ok" in proc.stdout
