"""The CUDA region ops' vector kernels (csrc/ops/cuda/region_vec.cuh), switched on with
d3ssl.ops.region.vector_kernels: the same results as the loop references, bit for bit, in every
dtype, layout and variant; taken only where the tensors allow it, the element kernels otherwise."""
import os
import subprocess
import sys

import pytest
import torch

from d3ssl.ops.region import (composite, composite_reference, region_erase, region_erase_,
                              region_erase_reference, vector_kernels)
from tests.conftest import ROOT
from tests.test_region_ops import DTYPES, _images, _ops

cuda = pytest.mark.cuda

# (B, C, H, W, ops per image): small; several blocks per image with more ops than a shared-memory
# chunk (256) in one image; C=4, H*W=18: NCHW vectors that straddle two channel planes.
SHAPES = [(4, 3, 16, 24, [5, 0, 9, 3]), (2, 3, 64, 80, [300, 7]), (3, 4, 3, 6, [4, 4, 2])]


def _fill(dtype):
    return 7.0 if dtype == torch.uint8 else -1.5


def test_switch():
    before = vector_kernels.enabled()
    try:
        vector_kernels(False)
        with vector_kernels(True):
            assert vector_kernels.enabled()
            with vector_kernels(False):
                assert not vector_kernels.enabled()
            assert vector_kernels.enabled()
        assert not vector_kernels.enabled()
        vector_kernels(True)
        assert vector_kernels.enabled()
    finally:
        vector_kernels(before)
    with pytest.raises(TypeError, match="True or False"):
        vector_kernels(1)


@pytest.mark.parametrize("value, expected", [("1", True), ("0", False), (None, False)])
def test_switch_from_the_environment(value, expected):
    env = {k: v for k, v in os.environ.items() if k != "D3SSL_VECTOR_KERNELS"}
    if value is not None:
        env["D3SSL_VECTOR_KERNELS"] = value
    code = "from d3ssl.ops.region import vector_kernels; print(vector_kernels.enabled())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "PYTHONPATH": ROOT},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(expected)


def test_cpu_results_do_not_depend_on_the_switch():
    x = _images(4, 3, 16, 24, torch.float32, "cpu", "channels_last")
    rects, erase, offsets = _ops(4, 16, 24, [5, 0, 9, 3])
    with vector_kernels(True):
        on = region_erase(x, rects, erase, offsets, 0.5)
    assert torch.equal(on, region_erase_reference(x, rects, erase, offsets, 0.5))


def every_case(test):
    """The test on CUDA for every dtype, layout and shape of SHAPES."""
    for mark in (pytest.mark.parametrize("shape", SHAPES, ids=["small", "blocks", "planes"]),
                 pytest.mark.parametrize("layout", ["contiguous", "channels_last"]),
                 pytest.mark.parametrize("dtype", DTYPES), cuda):
        test = mark(test)
    return test


@every_case
def test_region_erase(dtype, layout, shape):
    b, c, h, w, per_image = shape
    x = _images(b, c, h, w, dtype, "cuda", layout)
    rects, erase, offsets = (t.cuda() for t in _ops(b, h, w, per_image))
    fill = _fill(dtype)
    ref = region_erase_reference(x, rects, erase, offsets, fill).cpu()
    with vector_kernels(True):
        out = region_erase(x, rects, erase, offsets, fill)
        into = region_erase(x, rects, erase, offsets, fill, out=torch.empty_like(x))
        y = x.clone(memory_format=torch.preserve_format)
        region_erase_(y, rects, erase, offsets, fill)
    for result in (out, into, y):
        assert torch.equal(result.cpu(), ref)
    assert out.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else
                             torch.contiguous_format)
    assert (ref != x.cpu()).any()


@every_case
def test_composite(dtype, layout, shape):
    b, c, h, w, per_image = shape
    fg = _images(b, c, h, w, dtype, "cuda", layout, seed=2)
    bg = _images(b + 1, c, h, w, dtype, "cuda", layout, seed=3)
    bg_index = (torch.arange(b, device="cuda") * 3 + 1) % (b + 1)
    # odd and even, negative and positive shifts (the foreground's bytes move by any amount within
    # a vector), and one past the image
    shift = torch.tensor([[3, 1], [-5, 2], [1, -1], [w + 2, 0]][:b], device="cuda")
    rects, erase, offsets = (t.cuda() for t in _ops(b, h, w, per_image, seed=4))
    args = (fg, bg, bg_index, shift, rects, erase, offsets)
    ref = composite_reference(*args).cpu()
    with vector_kernels(True):
        out = composite(*args)
        into = composite(*args, out=torch.empty_like(fg))
    assert torch.equal(out.cpu(), ref) and torch.equal(into.cpu(), ref)


def _kernel_names(fn):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return " ".join(e.name for e in prof.events())


@cuda
def test_vector_kernels_run_only_where_the_tensors_allow_them():
    x = _images(2, 3, 16, 24, torch.bfloat16, "cuda", "channels_last")
    rects, erase, offsets = (t.cuda() for t in _ops(2, 16, 24, [4, 4]))
    fg, bg = x, x.flip(0).contiguous(memory_format=torch.channels_last)
    shift = torch.tensor([[1, 2], [-3, 0]], device="cuda")
    index = torch.tensor([1, 0], device="cuda")
    with vector_kernels(True):
        assert "vec::erase_kernel" in _kernel_names(lambda: region_erase(x, rects, erase, offsets))
        assert "vec::composite_kernel" in _kernel_names(
            lambda: composite(fg, bg, index, shift, rects, erase, offsets))
        # 3 x 13 x 17 elements per image: not a whole number of 16-byte vectors
        odd = _images(2, 3, 13, 17, torch.bfloat16, "cuda", "channels_last")
        names = _kernel_names(lambda: region_erase(odd, rects, erase, offsets))
        assert "erase_kernel" in names and "vec::" not in names
        assert torch.equal(region_erase(odd, rects, erase, offsets).cpu(),
                           region_erase_reference(odd, rects, erase, offsets).cpu())
        # storage 2 bytes past a 16-byte boundary
        flat = torch.zeros(x.numel() + 1, dtype=x.dtype, device="cuda")
        shifted = flat[1:].view(2, 16, 24, 3).copy_(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        assert shifted.is_contiguous(memory_format=torch.channels_last) and shifted.data_ptr() % 16
        names = _kernel_names(lambda: region_erase(shifted, rects, erase, offsets))
        assert "erase_kernel" in names and "vec::" not in names
        assert torch.equal(region_erase(shifted, rects, erase, offsets).cpu(),
                           region_erase_reference(x, rects, erase, offsets).cpu())
    names = _kernel_names(lambda: region_erase(x, rects, erase, offsets))
    assert "erase_kernel" in names and "vec::" not in names  # switched off again


@cuda
def test_region_stage_is_the_same_with_either_kernels():
    from benchmarks.sections.region import make_batch
    from d3ssl.augment.stage import region_stage
    batch = make_batch(8, 64, "cuda", torch.bfloat16)
    outs = []
    for on in (False, True):
        with vector_kernels(on):
            gen = torch.Generator(device="cuda").manual_seed(3)
            outs.append(region_stage(batch, gen))
    for name, a in vars(outs[0]).items():
        b = getattr(outs[1], name)
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name
