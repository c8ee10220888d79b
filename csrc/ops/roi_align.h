// RoIAlign pieces shared by the CPU and CUDA kernels: argument checks, the per-RoI sampling
// geometry and the bilinear weights of one sample point. Both backends use these so that their
// sampling is the same, and the same as torchvision's:
//   - aligned shifts the box by -0.5 pixel (pixel centres at integer + 0.5);
//   - not aligned, a box is at least 1x1 pixel;
//   - sampling_ratio <= 0 takes ceil(roi_size / pooled_size) samples per bin along each axis;
//   - a sample with y < -1, y > H, x < -1 or x > W contributes zero; otherwise it is clamped into
//     the map and interpolated from its four neighbours.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace d3ssl {
namespace roi_align_detail {

// Where one RoI's bins and samples lie on the feature map (feature-map pixels, after spatial_scale).
template <typename T>
struct RoiGeometry {
  T start_h, start_w;   // top-left corner of the RoI
  T bin_h, bin_w;       // size of one output bin
  int64_t grid_h, grid_w;  // samples per bin along each axis
  T inv_count;          // 1 / (samples per bin), the average's weight
};

template <typename T>
C10_HOST_DEVICE inline RoiGeometry<T> roi_geometry(const T* roi, T spatial_scale, int64_t pooled_height,
                                                   int64_t pooled_width, int64_t sampling_ratio,
                                                   bool aligned) {
  RoiGeometry<T> g;
  const T offset = aligned ? T(0.5) : T(0);
  g.start_w = roi[1] * spatial_scale - offset;
  g.start_h = roi[2] * spatial_scale - offset;
  T roi_w = roi[3] * spatial_scale - offset - g.start_w;
  T roi_h = roi[4] * spatial_scale - offset - g.start_h;
  if (!aligned) {
    // torchvision's legacy behaviour: malformed boxes are forced to 1x1.
    roi_w = roi_w > T(1) ? roi_w : T(1);
    roi_h = roi_h > T(1) ? roi_h : T(1);
  }
  g.bin_h = roi_h / static_cast<T>(pooled_height);
  g.bin_w = roi_w / static_cast<T>(pooled_width);
  g.grid_h = sampling_ratio > 0 ? sampling_ratio : static_cast<int64_t>(ceil(roi_h / static_cast<T>(pooled_height)));
  g.grid_w = sampling_ratio > 0 ? sampling_ratio : static_cast<int64_t>(ceil(roi_w / static_cast<T>(pooled_width)));
  // An empty or inverted box has no samples; its bins are 0 (count 1 as in torchvision).
  if (g.grid_h < 0) g.grid_h = 0;
  if (g.grid_w < 0) g.grid_w = 0;
  const int64_t count = g.grid_h * g.grid_w;
  g.inv_count = T(1) / static_cast<T>(count > 0 ? count : 1);
  return g;
}

// Sample point iy of bin ph (and ix of bin pw).
template <typename T>
C10_HOST_DEVICE inline T sample_y(const RoiGeometry<T>& g, int64_t ph, int64_t iy) {
  return g.start_h + static_cast<T>(ph) * g.bin_h +
         (static_cast<T>(iy) + T(0.5)) * g.bin_h / static_cast<T>(g.grid_h);
}

template <typename T>
C10_HOST_DEVICE inline T sample_x(const RoiGeometry<T>& g, int64_t pw, int64_t ix) {
  return g.start_w + static_cast<T>(pw) * g.bin_w +
         (static_cast<T>(ix) + T(0.5)) * g.bin_w / static_cast<T>(g.grid_w);
}

// The four neighbours of a sample point, as pixel indices y * width + x, and their weights. The
// GPU kernels use 32-bit indices when the tensors allow it (I = int32_t).
template <typename T, typename I = int64_t>
struct Bilinear {
  I p1, p2, p3, p4;  // (y_low, x_low), (y_low, x_high), (y_high, x_low), (y_high, x_high)
  T w1, w2, w3, w4;
};

// False when the sample lies outside [-1, H] x [-1, W]: it then contributes nothing.
template <typename T, typename I>
C10_HOST_DEVICE inline bool bilinear(T y, T x, I height, I width, Bilinear<T, I>& b) {
  if (y < T(-1) || y > static_cast<T>(height) || x < T(-1) || x > static_cast<T>(width)) return false;
  if (y <= T(0)) y = T(0);
  if (x <= T(0)) x = T(0);
  I y_low = static_cast<I>(y);
  I x_low = static_cast<I>(x);
  I y_high, x_high;
  if (y_low >= height - 1) {
    y_high = y_low = height - 1;
    y = static_cast<T>(y_low);
  } else {
    y_high = y_low + 1;
  }
  if (x_low >= width - 1) {
    x_high = x_low = width - 1;
    x = static_cast<T>(x_low);
  } else {
    x_high = x_low + 1;
  }
  const T ly = y - static_cast<T>(y_low), lx = x - static_cast<T>(x_low);
  const T hy = T(1) - ly, hx = T(1) - lx;
  b.p1 = y_low * width + x_low;
  b.p2 = y_low * width + x_high;
  b.p3 = y_high * width + x_low;
  b.p4 = y_high * width + x_high;
  b.w1 = hy * hx;
  b.w2 = hy * lx;
  b.w3 = ly * hx;
  b.w4 = ly * lx;
  return true;
}

// Host-side checks shared by both backends' forward kernels. `op` names the op in messages.
inline void check_forward_args(const at::Tensor& input, const at::Tensor& rois, int64_t pooled_height,
                               int64_t pooled_width, const char* op) {
  TORCH_CHECK(input.dim() == 4, op, ": input must be a 4-D tensor [N, C, H, W], got ", input.dim(),
              "-D of shape ", input.sizes());
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, op,
              ": rois must be a [K, 5] tensor of (batch index, x1, y1, x2, y2), got shape ", rois.sizes());
  TORCH_CHECK(rois.device() == input.device(), op, ": rois must be on the same device as input (",
              input.device(), "), got ", rois.device());
  const auto dt = input.scalar_type(), rt = rois.scalar_type();
  TORCH_CHECK(rt == dt || (rt == at::kFloat && (dt == at::kHalf || dt == at::kBFloat16)), op,
              ": rois must have input's dtype (", dt, "), or float32 for a float16/bfloat16 input; got ", rt);
  TORCH_CHECK(pooled_height > 0 && pooled_width > 0, op,
              ": pooled_height and pooled_width (output_size) must be positive, got (", pooled_height, ", ",
              pooled_width, ")");
}

inline void check_backward_args(const at::Tensor& grad, const at::Tensor& rois, int64_t pooled_height,
                                int64_t pooled_width, int64_t batch_size, int64_t channels, int64_t height,
                                int64_t width, const char* op) {
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, op, ": rois must be a [K, 5] tensor, got shape ",
              rois.sizes());
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == rois.size(0) && grad.size(1) == channels &&
                  grad.size(2) == pooled_height && grad.size(3) == pooled_width,
              op, ": grad must have shape [K, C, pooled_height, pooled_width] = [", rois.size(0), ", ", channels,
              ", ", pooled_height, ", ", pooled_width, "], got ", grad.sizes());
  TORCH_CHECK(rois.device() == grad.device(), op, ": rois must be on the same device as grad (", grad.device(),
              "), got ", rois.device());
  TORCH_CHECK(batch_size >= 0 && channels >= 0 && height >= 0 && width >= 0, op,
              ": batch_size, channels, height and width must be non-negative");
}

// channels_last inputs are read in place; anything else is read as a contiguous NCHW tensor (no
// copy when it already is one). The output takes the layout that was read.
inline bool reads_channels_last(const at::Tensor& input) {
  return input.is_contiguous(at::MemoryFormat::ChannelsLast) && !input.is_contiguous();
}

inline at::MemoryFormat layout(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

}  // namespace roi_align_detail
}  // namespace d3ssl
