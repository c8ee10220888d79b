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
# chunk (256) in one image; NCHW vectors that straddle two channel planes (C=4, H*W=12: 48
# elements, whole vectors of every element size; C=2, H*W=9: float64 only, the others fall back).
SHAPES = [(4, 3, 16, 24, [5, 0, 9, 3]), (2, 3, 64, 80, [300, 7]), (2, 4, 3, 4, [4, 3]),
          (2, 2, 3, 3, [3, 2])]
SHAPE_IDS = ["small", "blocks", "planes", "planes-odd"]


def _vectorisable(x):
    return x[0].numel() % (16 // x.element_size()) == 0


def _kernel_names(fn):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return " ".join(e.name for e in prof.events())


def _ran_vector_kernel(fn, expected):
    names = _kernel_names(fn)
    assert ("vec::" in names) == expected, names


def _with_set_first(rects, erase, offsets, h, w):
    """The CSR ops with a set op over the image's central half first in every image, so that the
    composite shows foreground in each."""
    rows, flags, counts = [], [], []
    for i in range(len(offsets) - 1):
        a, b = int(offsets[i]), int(offsets[i + 1])
        rows += [torch.tensor([[w / 4, h / 4, 3 * w / 4 + 1, 3 * h / 4 + 1]]), rects[a:b]]
        flags += [torch.tensor([False]), erase[a:b]]
        counts.append(b - a + 1)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.tensor(counts).cumsum(0)])
    return torch.cat(rows).float(), torch.cat(flags), offsets


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
    for mark in (pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS),
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
        _ran_vector_kernel(lambda: region_erase(x, rects, erase, offsets, fill), _vectorisable(x))
        out = region_erase(x, rects, erase, offsets, fill)
        into = region_erase(x, rects, erase, offsets, fill, out=torch.empty_like(x))
        y = x.clone(memory_format=torch.preserve_format)
        region_erase_(y, rects, erase, offsets, fill)
        z = x.clone(memory_format=torch.preserve_format)
        region_erase(z, rects, erase, offsets, fill, out=z)  # out= the input: in place
    for result in (out, into, y, z):
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
    # a vector), one past the image and one below -W
    shift = torch.tensor([[1, 1], [-1, 0], [1, -1], [w + 2, 0], [-w - 3, 1]][:b], device="cuda")
    ops = _with_set_first(*_ops(b, h, w, per_image, seed=4), h, w)
    rects, erase, offsets = (t.cuda() for t in ops)
    args = (fg, bg, bg_index, shift, rects, erase, offsets)
    ref = composite_reference(*args).cpu()
    # every image within the shift shows foreground, none shows only its background
    for i in range(min(b, 3)):
        assert (ref[i] != bg[int(bg_index[i])].cpu()).any()
    with vector_kernels(True):
        _ran_vector_kernel(lambda: composite(*args), _vectorisable(fg))
        out = composite(*args)
        into = composite(*args, out=torch.empty_like(fg))
    assert torch.equal(out.cpu(), ref) and torch.equal(into.cpu(), ref)


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_composite_at_every_byte_offset(dtype, layout):
    """One image per horizontal shift in [-16, 16]: the foreground's elements move by every
    residue of the vector width (C=3 and 16 are coprime), so every case of the byte funnel, the
    aligned one included, shows foreground."""
    dxs = list(range(-16, 17))
    b, c, h, w = len(dxs), 3, 4, 32
    fg = _images(b, c, h, w, dtype, "cuda", layout, seed=5)
    bg = _images(2, c, h, w, dtype, "cuda", layout, seed=6)
    shift = torch.tensor([[dx, 0] for dx in dxs], device="cuda")
    bg_index = torch.arange(b, device="cuda") % 2
    rects = torch.tensor([[0.0, 0, w, h], [5, 1, 9, 3]]).repeat(b, 1).cuda()  # set all, one hole
    erase = torch.tensor([False, True]).repeat(b).cuda()
    offsets = torch.arange(b + 1, device="cuda") * 2
    args = (fg, bg, bg_index, shift, rects, erase, offsets)
    ref = composite_reference(*args).cpu()
    with vector_kernels(True):
        _ran_vector_kernel(lambda: composite(*args), True)
        assert torch.equal(composite(*args).cpu(), ref)


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
        # an aligned input into an unaligned out=
        names = _kernel_names(lambda: region_erase(x, rects, erase, offsets, out=shifted))
        assert "erase_kernel" in names and "vec::" not in names
        assert torch.equal(shifted.cpu(), region_erase_reference(x, rects, erase, offsets).cpu())
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
