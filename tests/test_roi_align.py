"""RoIAlign: d3ssl.ops.roi_align against a float64 pure-PyTorch reference and against torchvision.

Tolerances (max abs difference, and relative to the value): float32 1e-5; float16 5e-3; bfloat16 2e-2
(one rounding of the output to the dtype's precision, the sums themselves being float32).
"""
import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision

from d3ssl.ops import RoIAlign, roi_align, roi_align_reference
from tests.conftest import DEVICES, ROOT

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}

N, C, H, W = 2, 6, 10, 12  # features
OUT = (3, 4)


def make_rois(spatial_scale, dtype=torch.float32, device="cpu", n_random=8):
    """[K, 5] boxes in input pixels: random ones, plus boxes partly and wholly outside the map, empty,
    inverted, and on the last pixel. Coordinates are exact in bfloat16 so that boxes of any dtype
    describe the same regions."""
    s = 1 / spatial_scale
    fixed = torch.tensor([
        [0, -6 * s, -4 * s, 5 * s, 7 * s],       # sticks out top-left
        [1, 2 * s, 3 * s, 40 * s, 30 * s],       # sticks out bottom-right
        [0, 30 * s, 25 * s, 40 * s, 44 * s],     # wholly outside
        [1, -20 * s, -9 * s, -2 * s, -1.5 * s],  # wholly outside, negative side
        [1, 3 * s, 3 * s, 3 * s, 3 * s],         # empty
        [0, 8 * s, 6 * s, 2 * s, 1 * s],         # inverted
        [1, 11 * s, 9 * s, 11.75 * s, 9.75 * s],  # the last pixel
    ])
    g = torch.Generator().manual_seed(1)
    corner = torch.rand(n_random, 2, generator=g) * torch.tensor([W, H]) - 1
    size = torch.rand(n_random, 2, generator=g) * torch.tensor([W, H]) * 0.8 + 0.5
    rand = torch.cat([torch.randint(0, N, (n_random, 1), generator=g).float(), corner * s, (corner + size) * s], 1)
    rois = torch.cat([fixed, rand])
    rois[:, 1:] = (rois[:, 1:] * 16).round() / 16  # multiples of 1/16: exact in every dtype used
    return rois.to(device=device, dtype=dtype)


def make_input(layout, dtype=torch.float32, device="cpu"):
    """Features [N, C, H, W] stored contiguous, channels_last, or permuted (non-contiguous)."""
    if layout == "permuted":
        x = torch.randn(N, H, C, W).permute(0, 2, 1, 3)  # neither NCHW- nor channels_last-contiguous
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    else:
        x = torch.randn(N, C, H, W)
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
    return x.to(device=device, dtype=dtype)


def assert_close(actual, expected, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=tol, rtol=tol)


LAYOUTS = ["contiguous", "channels_last", "permuted"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [-1, 1, 2])
def test_forward_backward_match_reference(device, layout, aligned, sampling_ratio):
    for spatial_scale in (1.0, 0.5):
        x = make_input(layout, device=device).requires_grad_()
        rois = make_rois(spatial_scale, device=device)
        out = roi_align(x, rois, OUT, spatial_scale, sampling_ratio, aligned)
        x_ref = x.detach().cpu().double().requires_grad_()
        ref = roi_align_reference(x_ref, rois.cpu(), OUT, spatial_scale, sampling_ratio, aligned)
        assert out.shape == (rois.shape[0], C, *OUT) and out.dtype == x.dtype and out.device == x.device
        assert_close(out, ref, torch.float32)
        # Boxes wholly outside the map pool to exactly zero; so do empty and inverted boxes when
        # aligned with adaptive sampling (0 samples). Not aligned, they are widened to 1x1 pixel, and
        # a fixed sampling_ratio samples them anyway, as torchvision does.
        assert (out[2:4].detach() == 0).all()
        assert bool((out[4:6].detach() == 0).all()) == (aligned and sampling_ratio <= 0)

        grad = torch.randn(out.shape, device=device)
        out.backward(grad)
        ref.backward(grad.cpu().double())
        assert x.grad.shape == x.shape
        assert_close(x.grad, x_ref.grad, torch.float32)


def channels_last_at_offset(channels, dtype, device, offset):
    """[N, channels, H, W] channels_last features whose data starts `offset` elements into its
    storage, so that 16-byte packs of channels are aligned (offset 0) or not (offset 1)."""
    flat = torch.randn(offset + N * H * W * channels, dtype=torch.float64).to(device=device, dtype=dtype)
    x = flat[offset:].view(N, H, W, channels).permute(0, 3, 1, 2)
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return x


# Channel counts and storage offsets that pick each width of the channels_last kernels' channel packs
# (16 bytes, 8, 4, or one channel at a time): 16 and 24 channels take whole 16-byte packs, 6 takes
# pairs, 5 single channels, and an offset of one element breaks the packs' alignment.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("channels, offset", [(16, 0), (24, 0), (6, 0), (5, 0), (16, 1)])
def test_channel_packs_match_reference(device, dtype, channels, offset):
    spatial_scale = 0.5
    x = channels_last_at_offset(channels, dtype, device, offset).requires_grad_()
    rois = make_rois(spatial_scale, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)
    out = roi_align(x, rois, OUT, spatial_scale, -1, True)
    assert out.is_contiguous(memory_format=torch.channels_last)
    x_ref = x.detach().cpu().double().requires_grad_()
    ref = roi_align_reference(x_ref, rois.cpu(), OUT, spatial_scale, -1, True)
    assert_close(out, ref, dtype)
    grad = torch.randn(out.shape, dtype=torch.float64).to(device=device, dtype=dtype)
    out.backward(grad)
    ref.backward(grad.cpu().double())
    assert_close(x.grad, x_ref.grad, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, rois_dtype", [(torch.float16, "same"), (torch.float16, "float32"),
                                               (torch.bfloat16, "same"), (torch.bfloat16, "float32"),
                                               (torch.float64, "same")])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_dtypes(device, dtype, layout, rois_dtype):
    # float32 boxes are accepted for 16-bit features (boxes in bf16 would be off by up to a pixel)
    spatial_scale = 0.5
    x = make_input(layout, dtype=dtype, device=device).requires_grad_()
    rois = make_rois(spatial_scale, dtype=dtype if rois_dtype == "same" else torch.float32, device=device)
    out = roi_align(x, rois, OUT, spatial_scale, -1, True)
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    x_ref = x.detach().cpu().double().requires_grad_()
    ref = roi_align_reference(x_ref, rois.cpu(), OUT, spatial_scale, -1, True)
    assert_close(out, ref, dtype)

    grad = torch.randn(out.shape, device=device, dtype=dtype)
    out.backward(grad)
    ref.backward(grad.cpu().double())
    assert x.grad.dtype == dtype
    assert_close(x.grad, x_ref.grad, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_matches_torchvision(device, layout, aligned, sampling_ratio):
    spatial_scale = 0.5
    x = make_input(layout, device=device).requires_grad_()
    x_tv = x.detach().clone().requires_grad_()
    rois = make_rois(spatial_scale, device=device)
    out = roi_align(x, rois, OUT, spatial_scale, sampling_ratio, aligned)
    out_tv = torchvision.ops.roi_align(x_tv, rois, OUT, spatial_scale, sampling_ratio, aligned)
    assert_close(out, out_tv, torch.float32)
    grad = torch.randn(out.shape, device=device)
    out.backward(grad)
    out_tv.backward(grad)
    assert_close(x.grad, x_tv.grad, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_list_of_boxes_and_module(device):
    x = make_input("channels_last", device=device)
    per_image = [torch.tensor([[1.0, 2.0, 9.0, 7.0], [0.0, 0.0, 11.5, 9.5]], device=device),
                 torch.tensor([[3.5, 1.25, 6.0, 8.0]], device=device)]
    out = roi_align(x, per_image, 5, 1.0, 2, True)
    expected = torchvision.ops.roi_align(x, per_image, 5, 1.0, 2, True)
    assert_close(out, expected, torch.float32)
    module = RoIAlign(5, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    assert torch.equal(module(x, per_image), out)
    assert "output_size=(5, 5)" in repr(module)
    # the default is aligned=True (torchvision's function defaults to False)
    assert torch.equal(roi_align(x, per_image, 5, sampling_ratio=2), out)


def test_gradcheck():
    for layout in ("contiguous", "channels_last"):
        for aligned, sampling_ratio in ((True, -1), (False, 2)):
            x = torch.randn(N, 2, 6, 7, dtype=torch.float64)
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_()
            rois = make_rois(0.5, dtype=torch.float64, n_random=3)
            assert torch.autograd.gradcheck(
                lambda t: roi_align(t, rois, (2, 3), 0.5, sampling_ratio, aligned), (x,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(device, layout):
    x = make_input(layout, device=device).requires_grad_()
    rois = make_rois(0.5, device=device, n_random=3)
    torch.library.opcheck(torch.ops.d3ssl.roi_align.default, (x, rois, 0.5, 3, 4, 2, True))
    grad = torch.randn(rois.shape[0], C, 3, 4, device=device)
    if layout == "channels_last":
        grad = grad.contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.d3ssl._roi_align_backward.default,
                          (grad, rois, 0.5, 3, 4, N, C, H, W, 2, False, layout == "channels_last"))


def test_torch_compile_fullgraph():
    # backend="aot_eager" traces forward and backward through the fake kernels and the registered
    # autograd exactly as inductor would, without the minutes of C++ compilation inductor needs.
    fn = torch.compile(lambda t, r: roi_align(t, r, OUT, 0.5, -1, True).square().sum(),
                       fullgraph=True, backend="aot_eager")
    x = make_input("channels_last").requires_grad_()
    x_eager = x.detach().clone().requires_grad_()
    rois = make_rois(0.5)
    loss = fn(x, rois)
    loss.backward()
    loss_eager = roi_align(x_eager, rois, OUT, 0.5, -1, True).square().sum()
    loss_eager.backward()
    torch.testing.assert_close(loss, loss_eager)
    torch.testing.assert_close(x.grad, x_eager.grad)
    # A second batch size recompiles with dynamic shapes: the sizes reach the ops as SymInts.
    x3 = torch.randn(N + 1, C, H, W).requires_grad_()
    x3_eager = x3.detach().clone().requires_grad_()
    fn(x3, rois).backward()
    roi_align(x3_eager, rois, OUT, 0.5, -1, True).square().sum().backward()
    torch.testing.assert_close(x3.grad, x3_eager.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_empty_boxes(device, layout):
    x = make_input(layout, device=device).requires_grad_()
    for boxes in (torch.empty(0, 5, device=device), [torch.empty(0, 4, device=device)] * N, []):
        out = roi_align(x, boxes, OUT, 0.5)
        assert out.shape == (0, C, *OUT) and out.dtype == x.dtype
        out.sum().backward()
        assert x.grad.shape == x.shape and (x.grad == 0).all()
        x.grad = None


def test_channels_last_is_read_in_place():
    """No layout copy of the features: the profiler sees no copy inside the op."""
    for dtype, rois_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32)):
        for layout in ("contiguous", "channels_last"):
            x = make_input(layout, dtype=dtype)
            rois = make_rois(0.5, dtype=rois_dtype)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                torch.ops.d3ssl.roi_align(x, rois, 0.5, 3, 4, -1, True)
            names = {e.name for e in prof.events()}
            assert "d3ssl::roi_align" in names
            assert not names & {"aten::copy_", "aten::clone", "aten::contiguous"}, names


# --- bad input -----------------------------------------------------------------------------------

def test_bad_input_raises_clearly():
    x = make_input("contiguous")
    rois = make_rois(1.0)
    with pytest.raises(ValueError, match="input must be a 4-D"):
        roi_align(x[0], rois, 3)
    with pytest.raises(ValueError, match=r"boxes must be a Tensor\[K, 5\]"):
        roi_align(x, rois[:, 1:], 3)
    with pytest.raises(ValueError, match=r"boxes\[1\] must be a Tensor\[L, 4\]"):
        roi_align(x, [rois[:2, 1:], rois[:2]], 3)
    with pytest.raises(TypeError, match="boxes must be"):
        roi_align(x, "boxes", 3)
    for size in (0, -2, (3, 0), (1, 2, 3)):
        with pytest.raises(ValueError, match="output_size"):
            roi_align(x, rois, size)
    with pytest.raises(TypeError, match="boxes must have input's dtype"):
        roi_align(x, rois.double(), 3)
    with pytest.raises(TypeError, match="boxes must have input's dtype"):
        roi_align(x.half(), rois.double(), 3)
    with pytest.raises(ValueError, match="boxes must be on input's device"):
        roi_align(x, rois.to("meta"), 3)
    for bad_index in (N, -1):
        bad = rois.clone()
        bad[3, 0] = bad_index
        with pytest.raises(RuntimeError, match=r"rois\[3, 0\] \(batch index\).*outside the input's batch of 2"):
            roi_align(x, bad, 3)


def test_bad_input_to_the_op_itself():
    """The compiled op checks its arguments too, for callers of torch.ops.d3ssl directly."""
    x = make_input("contiguous")
    rois = make_rois(1.0)
    op = torch.ops.d3ssl.roi_align
    with pytest.raises(RuntimeError, match="input must be a 4-D"):
        op(x[0], rois, 1.0, 3, 3, -1, True)
    with pytest.raises(RuntimeError, match=r"rois must be a \[K, 5\]"):
        op(x, rois[:, :4], 1.0, 3, 3, -1, True)
    with pytest.raises(RuntimeError, match="rois must have input's dtype"):
        op(x, rois.double(), 1.0, 3, 3, -1, True)
    with pytest.raises(RuntimeError, match="must be positive"):
        op(x, rois, 1.0, 0, 3, -1, True)
    with pytest.raises(RuntimeError, match=r"grad must have shape"):
        torch.ops.d3ssl._roi_align_backward(torch.zeros(rois.shape[0], C, 3, 2), rois, 1.0, 3, 3, N, C, H, W, -1,
                                            True, False)


@pytest.mark.cuda
def test_cuda_device_mismatch():
    x = make_input("contiguous", device="cuda")
    with pytest.raises(ValueError, match="boxes must be on input's device"):
        roi_align(x, make_rois(1.0), 3)
    with pytest.raises(RuntimeError, match="rois must be on the same device as input"):
        torch.ops.d3ssl.roi_align(x, make_rois(1.0), 1.0, 3, 3, -1, True)


@pytest.mark.cuda
def test_cuda_bad_batch_index_fails():
    # On the GPU the batch-index check is asynchronous (a device-side assert), which poisons the CUDA
    # context, so it runs in a process of its own.
    script = textwrap.dedent("""
        import torch, d3ssl
        from d3ssl.ops import roi_align
        x = torch.randn(2, 3, 8, 8, device="cuda")
        rois = torch.tensor([[5.0, 0, 0, 4, 4]], device="cuda")
        roi_align(x, rois, 2)
        torch.cuda.synchronize()
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "batch index" in proc.stderr or "device-side assert" in proc.stderr, proc.stderr
