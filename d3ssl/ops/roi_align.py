"""RoIAlign (Mask R-CNN) with torchvision's semantics, over d3ssl's compiled kernels.

``roi_align`` is a drop-in replacement for ``torchvision.ops.roi_align`` (same arguments, same
sampling, same treatment of boxes outside the map), except that ``aligned`` defaults to True: the
model pools C4 features with pixel-centre alignment. Differences from torchvision that only widen
what is accepted:

- float16 / bfloat16 features may come with float32 boxes (box coordinates in bf16 would be rounded
  by up to a pixel), and the op runs in that precision under autocast instead of upcasting;
- channels_last features are read in place and the result is channels_last too.

Boxes are in input pixels (before ``spatial_scale``), (x1, y1, x2, y2).
"""
import math
from typing import List, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = ["roi_align", "RoIAlign", "roi_align_reference", "as_rois"]

BoxesArg = Union[Tensor, Sequence[Tensor]]


def _pair(output_size) -> Tuple[int, int]:
    if isinstance(output_size, (int, torch.SymInt)):
        size = (output_size, output_size)
    else:
        size = tuple(output_size)
        if len(size) != 2:
            raise ValueError(f"roi_align: output_size must be an int or (height, width), got {output_size!r}")
    if not all(s > 0 for s in size):
        raise ValueError(f"roi_align: output_size must be positive, got {output_size!r}")
    return size


def as_rois(boxes: BoxesArg, input: Tensor) -> Tensor:
    """[K, 5] (batch index, x1, y1, x2, y2) from a [K, 5] tensor or a list of per-image [L, 4]
    (`input`: the features they index, whose dtype and device an empty list takes)."""
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.size(1) != 5:
            raise ValueError("roi_align: boxes must be a Tensor[K, 5] of (batch index, x1, y1, x2, y2) or a "
                             f"list of Tensor[L, 4], got a tensor of shape {tuple(boxes.shape)}")
        return boxes
    if not isinstance(boxes, (list, tuple)):
        raise TypeError(f"roi_align: boxes must be a Tensor[K, 5] or a list of Tensor[L, 4], got {type(boxes)}")
    for i, b in enumerate(boxes):
        if not isinstance(b, Tensor) or b.dim() != 2 or b.size(1) != 4:
            shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
            raise ValueError(f"roi_align: boxes[{i}] must be a Tensor[L, 4] of (x1, y1, x2, y2), got {shape}")
    if len(boxes) == 0:
        return torch.empty((0, 5), dtype=input.dtype, device=input.device)
    concat = torch.cat(list(boxes), dim=0)
    ids = torch.cat([torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)], dim=0)
    return torch.cat([ids, concat], dim=1)


def roi_align(input: Tensor, boxes: BoxesArg, output_size: Union[int, Tuple[int, int]],
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = True) -> Tensor:
    """Average of bilinearly interpolated samples in each bin of each box.

    Args:
        input: features [N, C, H, W], float32/float16/bfloat16/float64, NCHW or channels_last.
        boxes: Tensor[K, 5] of (batch index, x1, y1, x2, y2), or a list of N Tensor[L_i, 4] of
            (x1, y1, x2, y2); coordinates in input-image pixels, mapped onto the feature map by
            ``spatial_scale``. Same device as ``input``; same dtype (or float32 for a 16-bit input).
        output_size: (height, width) of each pooled region, or one int for both.
        spatial_scale: feature-map pixels per box unit (1/16 for C4 features of image-pixel boxes).
        sampling_ratio: samples per bin along each axis; <= 0 takes ceil(box size / output size).
        aligned: shift boxes by -0.5 pixel so that pixel centres sit at integer + 0.5.

    Returns:
        [K, C, output_height, output_width] in ``input``'s dtype and memory format.
    """
    if not isinstance(input, Tensor) or input.dim() != 4:
        shape = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
        raise ValueError(f"roi_align: input must be a 4-D tensor [N, C, H, W], got {shape}")
    pooled_height, pooled_width = _pair(output_size)
    rois = as_rois(boxes, input)
    if rois.device != input.device:
        raise ValueError(f"roi_align: boxes must be on input's device ({input.device}), got {rois.device}")
    low_precision = input.dtype in (torch.float16, torch.bfloat16)
    if rois.dtype != input.dtype and not (low_precision and rois.dtype == torch.float32):
        raise TypeError(f"roi_align: boxes must have input's dtype ({input.dtype})"
                        f"{' or float32' if low_precision else ''}, got {rois.dtype}")
    # Batch indices are checked by the kernels: the CPU one raises; the CUDA one fails a device-side
    # assert (checking on the host would cost a synchronisation), like an out-of-range index in torch.
    return torch.ops.d3ssl.roi_align(input, rois, float(spatial_scale), pooled_height, pooled_width,
                                     int(sampling_ratio), bool(aligned))


class RoIAlign(nn.Module):
    """Module form of :func:`roi_align` (as ``torchvision.ops.RoIAlign``)."""

    def __init__(self, output_size: Union[int, Tuple[int, int]], spatial_scale: float = 1.0,
                 sampling_ratio: int = -1, aligned: bool = True):
        super().__init__()
        self.output_size = _pair(output_size)
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input: Tensor, boxes: BoxesArg) -> Tensor:
        return roi_align(input, boxes, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}")


# --- fake kernels and autograd -------------------------------------------------------------------

def _reads_channels_last(input: Tensor) -> bool:
    # Mirrors reads_channels_last in csrc/ops/roi_align.h: the kernels read channels_last in place and
    # anything else as contiguous NCHW; the output keeps the layout that was read.
    return input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous()


def _memory_format(channels_last: bool):
    return torch.channels_last if channels_last else torch.contiguous_format


@torch.library.register_fake("d3ssl::roi_align")
def _roi_align_fake(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    torch._check(input.dim() == 4, lambda: f"roi_align: input must be 4-D, got {input.dim()}-D")
    torch._check(rois.dim() == 2 and rois.size(1) == 5, lambda: "roi_align: rois must be [K, 5]")
    torch._check(rois.device == input.device, lambda: "roi_align: rois must be on input's device")
    return torch.empty((rois.size(0), input.size(1), pooled_height, pooled_width), dtype=input.dtype,
                       device=input.device, memory_format=_memory_format(_reads_channels_last(input)))


@torch.library.register_fake("d3ssl::_roi_align_backward")
def _roi_align_backward_fake(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels,
                             height, width, sampling_ratio, aligned, channels_last):
    torch._check(rois.dim() == 2 and rois.size(1) == 5, lambda: "_roi_align_backward: rois must be [K, 5]")
    return torch.empty((batch_size, channels, height, width), dtype=grad.dtype, device=grad.device,
                       memory_format=_memory_format(channels_last))


def _setup_context(ctx, inputs, output):
    input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = inputs
    ctx.save_for_backward(rois)
    ctx.input_shape = input.shape
    ctx.channels_last = _reads_channels_last(input)
    ctx.params = (spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)


def _backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = ctx.params
    batch_size, channels, height, width = ctx.input_shape
    grad_input = torch.ops.d3ssl._roi_align_backward(
        grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width,
        sampling_ratio, aligned, ctx.channels_last)
    return grad_input, None, None, None, None, None, None


torch.library.register_autograd("d3ssl::roi_align", _backward, setup_context=_setup_context)


# --- reference -----------------------------------------------------------------------------------

def _axis_samples(start: Tensor, bin_size: Tensor, pooled: int, grid: int, size: int):
    """Sample coordinates along one axis and their interpolation: (low index, high index, low weight,
    high weight), each [pooled * grid], zero weights for samples outside [-1, size]."""
    dtype = start.dtype
    p = torch.arange(pooled, dtype=dtype).repeat_interleave(grid)
    i = torch.arange(grid, dtype=dtype).repeat(pooled)
    # Same operation order as the kernels, in the same precision, so bins and grids agree exactly.
    coord = start + p * bin_size + (i + 0.5) * bin_size / grid
    valid = (coord >= -1) & (coord <= size)
    coord = coord.clamp(min=0).double()
    low = coord.floor().long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    high = torch.where(at_edge, low, low + 1)
    coord = torch.where(at_edge, low.double(), coord)
    frac = coord - low.double()
    return low, high, (1 - frac) * valid, frac * valid


def roi_align_reference(input: Tensor, boxes: BoxesArg, output_size: Union[int, Tuple[int, int]],
                        spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = True) -> Tensor:
    """Pure-PyTorch RoIAlign with the same semantics as :func:`roi_align`, for tests.

    Loops over boxes in Python; bilinear interpolation is separable, so each box is two gathers and
    two weighted sums. Differentiable; computes in float64 and returns float64 [K, C, PH, PW].
    Box geometry (bin sizes, sample counts) is computed in the kernels' precision (float32, or float64
    for float64 boxes) so that the number of samples per bin matches them exactly."""
    pooled_height, pooled_width = _pair(output_size)
    rois = as_rois(boxes, input)
    geometry_dtype = torch.float64 if rois.dtype == torch.float64 else torch.float32
    rois = rois.detach().cpu().to(geometry_dtype)
    x = input.to(torch.float64)
    _, channels, height, width = x.shape
    scale = torch.tensor(spatial_scale, dtype=geometry_dtype)
    offset = 0.5 if aligned else 0.0
    out = []
    for roi in rois:
        b = int(roi[0])
        if height == 0 or width == 0:
            out.append(x.new_zeros(channels, pooled_height, pooled_width))
            continue
        start_w, start_h = roi[1] * scale - offset, roi[2] * scale - offset
        roi_w = roi[3] * scale - offset - start_w
        roi_h = roi[4] * scale - offset - start_h
        if not aligned:
            roi_w, roi_h = roi_w.clamp(min=1), roi_h.clamp(min=1)
        bin_h, bin_w = roi_h / pooled_height, roi_w / pooled_width
        grid_h = sampling_ratio if sampling_ratio > 0 else max(int(math.ceil(float(roi_h / pooled_height))), 0)
        grid_w = sampling_ratio if sampling_ratio > 0 else max(int(math.ceil(float(roi_w / pooled_width))), 0)
        if grid_h == 0 or grid_w == 0:
            out.append(x.new_zeros(channels, pooled_height, pooled_width))
            continue
        y_lo, y_hi, wy_lo, wy_hi = _axis_samples(start_h, bin_h, pooled_height, grid_h, height)
        x_lo, x_hi, wx_lo, wx_hi = _axis_samples(start_w, bin_w, pooled_width, grid_w, width)
        wy_lo, wy_hi, wx_lo, wx_hi = (w.to(x.device) for w in (wy_lo, wy_hi, wx_lo, wx_hi))
        f = x[b]                                                                  # [C, H, W]
        rows = f[:, y_lo, :] * wy_lo[:, None] + f[:, y_hi, :] * wy_hi[:, None]   # [C, PH*gh, W]
        vals = rows[:, :, x_lo] * wx_lo + rows[:, :, x_hi] * wx_hi                # [C, PH*gh, PW*gw]
        vals = vals.reshape(channels, pooled_height, grid_h, pooled_width, grid_w)
        out.append(vals.sum(dim=(2, 4)) / (grid_h * grid_w))
    if not out:
        return x.new_zeros(0, channels, pooled_height, pooled_width)
    return torch.stack(out)
