"""region_erase, region_erase_ and composite against their loop references."""
import pytest
import torch

from d3ssl.ops.region import (composite, composite_reference, region_erase, region_erase_,
                              region_erase_reference)
from tests.conftest import DEVICES

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.float64]


def _images(b, c, h, w, dtype, device, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 250, (b, c, h, w), generator=g) if dtype == torch.uint8 else \
        torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "permuted":  # dense but neither NCHW nor NHWC
        x = x.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    elif layout == "sliced":  # not dense
        x = torch.cat([x, x], 3)[..., :w]
    return x.to(device)


def _ops(b, h, w, per_image, seed=1):
    """Random CSR ops: rects partly or wholly outside, non-integer, zero-area, some images empty."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor(per_image)
    r = int(counts.sum())
    x = torch.rand(r, 2, generator=g) * (w + 8) - 4
    y = torch.rand(r, 2, generator=g) * (h + 8) - 4
    rects = torch.stack([x.min(1).values, y.min(1).values, x.max(1).values, y.max(1).values], 1)
    if r >= 3:
        rects[0, 2] = rects[0, 0]                      # zero width
        rects[1] = torch.tensor([w + 1.0, 2, w + 5, 6])  # wholly outside
        rects[2] = torch.tensor([-3.0, -3.0, w + 3.0, 0.5])  # partly outside, covers row 0 only
    erase = torch.rand(r, generator=g) < 0.6
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    return rects, erase, offsets


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_region_erase_matches_reference(device, dtype, layout):
    x = _images(4, 3, 13, 17, dtype, device, layout)
    rects, erase, offsets = (t.to(device) for t in _ops(4, 13, 17, [5, 0, 9, 3]))
    fill = 7.0 if dtype == torch.uint8 else -1.5
    out = region_erase(x, rects, erase, offsets, fill)
    ref = region_erase_reference(x, rects, erase, offsets, fill)
    assert out.dtype == x.dtype and out.device == x.device
    assert torch.equal(out.cpu(), ref.cpu())
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    assert (out.cpu() != x.cpu()).any()  # something was erased
    # in place: same result, same storage
    y = x.clone(memory_format=torch.preserve_format)
    ptr = y.data_ptr()
    res = region_erase_(y, rects, erase, offsets, fill)
    assert res is y and y.data_ptr() == ptr and torch.equal(y.cpu(), ref.cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["permuted", "sliced"])
def test_region_erase_odd_strides(device, layout):
    x = _images(3, 3, 9, 11, torch.float32, device, layout)
    rects, erase, offsets = (t.to(device) for t in _ops(3, 9, 11, [4, 4, 2]))
    ref = region_erase_reference(x, rects, erase, offsets, 0.0)
    assert torch.equal(region_erase(x, rects, erase, offsets).cpu(), ref.cpu())
    y = x.clone()
    if layout == "sliced":
        y = torch.cat([y, y], 3)[..., :11]
    region_erase_(y, rects, erase, offsets)
    assert torch.equal(y.cpu(), ref.cpu())


def test_pixel_rule_exact_at_centres():
    """A rect edge on a pixel centre: [x1,x2) includes the centre at x1, excludes the one at x2."""
    x = torch.ones(1, 1, 1, 6)
    rects = torch.tensor([[1.5, 0.0, 3.5, 1.0]])  # centres 1.5, 2.5 in; 3.5 out
    out = region_erase(x, rects, torch.tensor([True]), torch.tensor([0, 1]), 0.0)
    assert out.flatten().tolist() == [1, 0, 0, 1, 1, 1]
    rects = torch.tensor([[1.5000001, 0.0, 3.5000002, 1.0]])  # just past centres 1.5 and 3.5
    out = region_erase(x, rects, torch.tensor([True]), torch.tensor([0, 1]), 0.0)
    assert out.flatten().tolist() == [1, 1, 0, 0, 1, 1]


def test_later_op_wins_restore():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    rects = torch.tensor([[0.0, 0, 4, 4], [1, 1, 3, 3], [2, 2, 3, 3]])
    erase = torch.tensor([True, False, True])
    out = region_erase(x, rects, erase, torch.tensor([0, 3]), -1.0)[0, 0]
    expect = torch.full((4, 4), -1.0)
    expect[1:3, 1:3] = x[0, 0, 1:3, 1:3]
    expect[2, 2] = -1
    assert torch.equal(out, expect)


@pytest.mark.parametrize("device", DEVICES)
def test_region_erase_empty(device):
    x = _images(2, 3, 5, 5, torch.float32, device, "contiguous")
    none = torch.zeros(0, 4, device=device)
    noerase = torch.zeros(0, dtype=torch.bool, device=device)
    off = torch.zeros(3, dtype=torch.int64, device=device)
    out = region_erase(x, none, noerase, off)
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()
    empty = torch.zeros(0, 3, 5, 5, device=device)
    assert region_erase(empty, none, noerase, off[:1]).shape == empty.shape


@pytest.mark.parametrize("device", DEVICES)
def test_padded_form(device):
    x = _images(2, 3, 8, 8, torch.float32, device, "contiguous")
    rects = torch.tensor([[[1.0, 1, 4, 4], [0, 0, 0, 0]], [[2, 2, 8, 8], [3, 3, 5, 5]]], device=device)
    erase = torch.tensor([[True, True], [True, False]], device=device)
    out = region_erase(x, rects, erase)
    ref = region_erase_reference(x, rects.reshape(4, 4), erase.reshape(4),
                                 torch.tensor([0, 2, 4]), 0.0)
    assert torch.equal(out.cpu(), ref.cpu())


def _composite_args(device, dtype, layout, b=4, nbg=5, h=12, w=14):
    fg = _images(b, 3, h, w, dtype, device, layout, seed=2)
    bg = _images(nbg, 3, h, w, dtype, device, layout, seed=3)
    bg_index = torch.tensor([4, 0, 2, 2][:b], device=device) % nbg
    shift = torch.tensor([[2, 1], [-3, 0], [0, -2], [20, 3]][:b], device=device)  # last: all outside
    rects, erase, offsets = _ops(b, h, w, [6, 3, 0, 4][:b], seed=4)
    return fg, bg, bg_index, shift, rects.to(device), erase.to(device), offsets.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_composite_matches_reference(device, dtype, layout):
    args = _composite_args(device, dtype, layout)
    out = composite(*args)
    ref = composite_reference(*args)
    assert torch.equal(out.cpu(), ref.cpu())
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    fg, bg = args[0].cpu(), args[1].cpu()
    assert torch.equal(out[2].cpu(), bg[2])  # no ops: the background only
    assert torch.equal(out[3].cpu(), bg[2])  # shifted out of the image: the background only


@pytest.mark.parametrize("device", DEVICES)
def test_composite_set_and_clear(device):
    fg = torch.arange(36.0, device=device).reshape(1, 1, 6, 6)
    bg = -torch.ones(1, 1, 6, 6, device=device)
    rects = torch.tensor([[2.0, 1, 5, 4], [3, 2, 4, 3]], device=device)  # set a box, clear a hole
    erase = torch.tensor([False, True], device=device)
    out = composite(fg, bg, torch.tensor([0], device=device), torch.tensor([[1, -1]], device=device),
                    rects, erase, torch.tensor([0, 2], device=device))[0, 0].cpu()
    expect = -torch.ones(6, 6)
    expect[1:4, 2:5] = fg[0, 0, 2:5, 1:4].cpu()  # (x, y) shows fg (x - 1, y + 1)
    expect[2, 3] = -1
    assert torch.equal(out, expect)


@pytest.mark.parametrize("device", DEVICES)
def test_composite_mixed_layouts(device):
    fg, bg, *rest = _composite_args(device, torch.float32, "channels_last")
    bg = bg.contiguous()
    out = composite(fg, bg, *rest)
    assert torch.equal(out.cpu(), composite_reference(fg, bg, *rest).cpu())
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_bad_inputs():
    x = torch.zeros(2, 3, 8, 8)
    rects, erase, off = torch.zeros(2, 4), torch.ones(2, dtype=torch.bool), torch.tensor([0, 1, 2])
    op = torch.ops.d3ssl.region_erase
    with pytest.raises(RuntimeError, match="images must be a 4-D"):
        op(x[0], rects, erase, off, 0.0)
    with pytest.raises(RuntimeError, match="images must be float32"):
        op(x.int(), rects, erase, off, 0.0)
    with pytest.raises(RuntimeError, match=r"rects must be \[R,4\]"):
        op(x, rects[:, :3], erase, off, 0.0)
    with pytest.raises(RuntimeError, match="rects must be float32"):
        op(x, rects.double(), erase, off, 0.0)
    with pytest.raises(RuntimeError, match="erase must be bool"):
        op(x, rects, erase.int(), off, 0.0)
    with pytest.raises(RuntimeError, match=r"offsets must be \[B\+1\]"):
        op(x, rects, erase, off[:2], 0.0)
    with pytest.raises(RuntimeError, match="non-decreasing"):
        op(x, rects, erase, torch.tensor([0, 2, 1]), 0.0)
    with pytest.raises(RuntimeError, match="offsets\\[B\\] must equal"):
        op(x, rects, erase, torch.tensor([0, 1, 1]), 0.0)
    with pytest.raises(RuntimeError, match="fill must be an integer in"):
        op(x.to(torch.uint8), rects, erase, off, -1.0)
    fg = torch.zeros(2, 3, 8, 8)
    shift = torch.zeros(2, 2, dtype=torch.int64)
    cop = torch.ops.d3ssl.composite
    with pytest.raises(RuntimeError, match="bg_index\\[1\\] = 2 is out of range"):
        cop(fg, fg, torch.tensor([0, 2]), shift, rects, erase, off)
    with pytest.raises(RuntimeError, match="bg must have fg's dtype"):
        cop(fg, fg.half(), torch.tensor([0, 1]), shift, rects, erase, off)
    with pytest.raises(RuntimeError, match="bg must be"):
        cop(fg, fg[..., :4], torch.tensor([0, 1]), shift, rects, erase, off)
    with pytest.raises(RuntimeError, match="shift must be"):
        cop(fg, fg, torch.tensor([0, 1]), shift[:, :1], rects, erase, off)
    with pytest.raises(RuntimeError, match="bg_index must be int64"):
        cop(fg, fg, torch.tensor([0.0, 1.0]), shift, rects, erase, off)
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device"):
            op(x, rects.cuda(), erase, off, 0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = _images(2, 3, 6, 7, torch.float32, device, "channels_last")
    rects, erase, offsets = (t.to(device) for t in _ops(2, 6, 7, [3, 2]))
    torch.library.opcheck(torch.ops.d3ssl.region_erase.default, (x, rects, erase, offsets, 0.5))
    torch.library.opcheck(torch.ops.d3ssl.region_erase_.default,
                          (x.clone(memory_format=torch.preserve_format), rects, erase, offsets, 0.5))
    args = _composite_args(device, torch.float32, "contiguous", b=2, nbg=3)
    torch.library.opcheck(torch.ops.d3ssl.composite.default, args)


def test_torch_compile_fullgraph():
    x = _images(2, 3, 6, 7, torch.float32, "cpu", "channels_last")
    rects, erase, offsets = _ops(2, 6, 7, [3, 2])
    cargs = _composite_args("cpu", torch.float32, "contiguous", b=2, nbg=3)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, rects, erase, offsets, cargs):
        y = torch.ops.d3ssl.region_erase(x * 2, rects, erase, offsets, 0.0)
        z = x.clone()
        torch.ops.d3ssl.region_erase_(z, rects, erase, offsets, 1.0)
        return y + 1, z, torch.ops.d3ssl.composite(*cargs)

    y, z, c = f(x, rects, erase, offsets, cargs)
    assert torch.equal(y, region_erase_reference(x * 2, rects, erase, offsets, 0.0) + 1)
    assert torch.equal(z, region_erase_reference(x, rects, erase, offsets, 1.0))
    assert torch.equal(c, composite_reference(*cargs))


def test_cpu_kernels_are_compiled_for_torchs_threads():
    """Where torch's intra-op threads are OpenMP's (its Linux wheels), at::parallel_for runs a kernel
    on one thread unless the library was compiled with OpenMP: setup.py does that on Linux."""
    import sys

    import d3ssl
    if sys.platform.startswith("linux"):
        assert d3ssl.cpu_kernels_threaded()



def test_cpu_kernels_follow_torchs_thread_count():
    """The kernels' OpenMP runtime is torch's own: a second runtime would ignore set_num_threads."""
    import d3ssl
    if not d3ssl.cpu_kernels_threaded():
        pytest.skip("the CPU kernels were built to run on one thread")
    before = torch.get_num_threads()
    try:
        for n in (1, 3, 2):
            torch.set_num_threads(n)
            assert torch.ops.d3ssl._intra_op_threads() == n
    finally:
        torch.set_num_threads(before)


def test_cpu_kernels_give_the_same_result_on_any_number_of_threads():
    """Images (and RoIAlign's rows) are split between threads: each thread's share is its own."""
    from d3ssl.ops import roi_align
    x = _images(16, 3, 20, 24, torch.float32, "cpu", "channels_last")
    rects, erase, offsets = _ops(16, 20, 24, [5] * 16)
    cargs = _composite_args("cpu", torch.float32, "channels_last", b=4, nbg=5)
    rois = torch.cat([torch.arange(16.)[:, None], torch.rand(16, 2) * 10, 10 + torch.rand(16, 2) * 10], 1)
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append((region_erase(x, rects, erase, offsets, 0.5), composite(*cargs),
                         roi_align(x, rois, 5, 1.0, 2)))
    finally:
        torch.set_num_threads(before)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)
    assert torch.equal(outs[0][0], region_erase_reference(x, rects, erase, offsets, 0.5))
