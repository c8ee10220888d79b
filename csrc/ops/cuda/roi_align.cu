// RoIAlign on the GPU: forward and backward, NCHW or channels_last read in place.
//
// One thread per output element. In channels_last the channel is the fastest index of the thread
// grid, so neighbouring threads read neighbouring channels of the same pixel (coalesced) and share
// the same RoI and bin, whose sample geometry they recompute (cheap arithmetic, no divergence).
// The backward scatters with atomics into a float32 (float64 for double) buffer, cast at the end.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ceil_div.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ops/roi_align.h"

namespace d3ssl {
namespace {

using namespace roi_align_detail;

constexpr int kThreads = 256;

// Output element `index` in memory order -> (k, c, ph, pw); and where pixel p of image b, channel c
// lies in a [N, C, H, W] tensor of that layout: base + p * pixel_stride.
struct Layout {
  int64_t channels, height, width, pooled_height, pooled_width;

  template <bool kChannelsLast>
  __device__ void split(int64_t index, int64_t& k, int64_t& c, int64_t& ph, int64_t& pw) const {
    if (kChannelsLast) {  // [K, PH, PW, C]
      c = index % channels;
      index /= channels;
      pw = index % pooled_width;
      index /= pooled_width;
      ph = index % pooled_height;
      k = index / pooled_height;
    } else {  // [K, C, PH, PW]
      pw = index % pooled_width;
      index /= pooled_width;
      ph = index % pooled_height;
      index /= pooled_height;
      c = index % channels;
      k = index / channels;
    }
  }

  template <bool kChannelsLast>
  __device__ int64_t base(int64_t b, int64_t c) const {
    return kChannelsLast ? b * height * width * channels + c : (b * channels + c) * height * width;
  }

  template <bool kChannelsLast>
  __device__ int64_t pixel_stride() const {
    return kChannelsLast ? channels : 1;
  }
};

template <typename scalar_t, typename acc_t, bool kChannelsLast>
__global__ void roi_align_forward_kernel(int64_t total, const scalar_t* __restrict__ input,
                                         const acc_t* __restrict__ rois, acc_t spatial_scale, int64_t batch_size,
                                         Layout l, int64_t sampling_ratio, bool aligned,
                                         scalar_t* __restrict__ output) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; index < total;
       index += stride) {
    int64_t k, c, ph, pw;
    l.split<kChannelsLast>(index, k, c, ph, pw);
    const acc_t* roi = rois + k * 5;
    const int64_t b = static_cast<int64_t>(roi[0]);
    acc_t sum = 0;
    // A bad batch index is reported by the Python wrapper's asynchronous check; here it only must
    // not read outside the input.
    if (b >= 0 && b < batch_size) {
      const RoiGeometry<acc_t> g =
          roi_geometry(roi, spatial_scale, l.pooled_height, l.pooled_width, sampling_ratio, aligned);
      const scalar_t* in = input + l.base<kChannelsLast>(b, c);
      const int64_t ps = l.pixel_stride<kChannelsLast>();
      for (int64_t iy = 0; iy < g.grid_h; ++iy) {
        const acc_t y = sample_y(g, ph, iy);
        for (int64_t ix = 0; ix < g.grid_w; ++ix) {
          Bilinear<acc_t> s;
          if (!bilinear(y, sample_x(g, pw, ix), l.height, l.width, s)) continue;
          sum += s.w1 * static_cast<acc_t>(in[s.p1 * ps]) + s.w2 * static_cast<acc_t>(in[s.p2 * ps]) +
                 s.w3 * static_cast<acc_t>(in[s.p3 * ps]) + s.w4 * static_cast<acc_t>(in[s.p4 * ps]);
        }
      }
      sum *= g.inv_count;
    }
    output[index] = static_cast<scalar_t>(sum);
  }
}

template <typename scalar_t, typename acc_t, bool kChannelsLast>
__global__ void roi_align_backward_kernel(int64_t total, const scalar_t* __restrict__ grad,
                                          const acc_t* __restrict__ rois, acc_t spatial_scale, int64_t batch_size,
                                          Layout l, int64_t sampling_ratio, bool aligned,
                                          acc_t* __restrict__ grad_input) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; index < total;
       index += stride) {
    int64_t k, c, ph, pw;
    l.split<kChannelsLast>(index, k, c, ph, pw);
    const acc_t* roi = rois + k * 5;
    const int64_t b = static_cast<int64_t>(roi[0]);
    if (b < 0 || b >= batch_size) continue;
    const RoiGeometry<acc_t> g =
        roi_geometry(roi, spatial_scale, l.pooled_height, l.pooled_width, sampling_ratio, aligned);
    const acc_t gv = static_cast<acc_t>(grad[index]) * g.inv_count;
    acc_t* gi = grad_input + l.base<kChannelsLast>(b, c);
    const int64_t ps = l.pixel_stride<kChannelsLast>();
    for (int64_t iy = 0; iy < g.grid_h; ++iy) {
      const acc_t y = sample_y(g, ph, iy);
      for (int64_t ix = 0; ix < g.grid_w; ++ix) {
        Bilinear<acc_t> s;
        if (!bilinear(y, sample_x(g, pw, ix), l.height, l.width, s)) continue;
        atomicAdd(gi + s.p1 * ps, s.w1 * gv);
        atomicAdd(gi + s.p2 * ps, s.w2 * gv);
        atomicAdd(gi + s.p3 * ps, s.w3 * gv);
        atomicAdd(gi + s.p4 * ps, s.w4 * gv);
      }
    }
  }
}

unsigned int num_blocks(int64_t total) {
  // Grid-stride loops cover the rest; the cap keeps the grid size valid for any total.
  return static_cast<unsigned int>(std::min<int64_t>(at::ceil_div<int64_t>(total, kThreads), int64_t(1) << 30));
}

at::Tensor roi_align_forward_cuda(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                                  int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio,
                                  bool aligned) {
  check_forward_args(input, rois, pooled_height, pooled_width, "roi_align");
  TORCH_CHECK(input.is_cuda(), "roi_align: the CUDA kernel got input on ", input.device());
  const c10::cuda::CUDAGuard device_guard(input.device());

  const bool channels_last = reads_channels_last(input);
  const at::Tensor in = channels_last ? input : input.contiguous();
  const int64_t num_rois = rois.size(0);
  const Layout l{input.size(1), input.size(2), input.size(3), pooled_height, pooled_width};
  at::Tensor output = at::empty({num_rois, l.channels, pooled_height, pooled_width},
                                input.options().memory_format(layout(channels_last)));
  const int64_t total = output.numel();
  if (total == 0) return output;
  if (l.height == 0 || l.width == 0) return output.zero_();

  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "roi_align_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor rois_acc = rois.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const auto launch = [&](auto kernel) {
      kernel<<<num_blocks(total), kThreads, 0, stream>>>(
          total, in.const_data_ptr<scalar_t>(), rois_acc.const_data_ptr<acc_t>(), static_cast<acc_t>(spatial_scale),
          input.size(0), l, sampling_ratio, aligned, output.mutable_data_ptr<scalar_t>());
    };
    if (channels_last) {
      launch(roi_align_forward_kernel<scalar_t, acc_t, true>);
    } else {
      launch(roi_align_forward_kernel<scalar_t, acc_t, false>);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

at::Tensor roi_align_backward_cuda(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale,
                                   int64_t pooled_height, int64_t pooled_width, int64_t batch_size,
                                   int64_t channels, int64_t height, int64_t width, int64_t sampling_ratio,
                                   bool aligned, bool channels_last) {
  check_backward_args(grad, rois, pooled_height, pooled_width, batch_size, channels, height, width,
                      "_roi_align_backward");
  TORCH_CHECK(grad.is_cuda(), "_roi_align_backward: the CUDA kernel got grad on ", grad.device());
  const c10::cuda::CUDAGuard device_guard(grad.device());

  const auto fmt = layout(channels_last);
  const auto acc_type = at::toOpMathType(grad.scalar_type());
  // Atomics accumulate in float (double for double); 16-bit grads are cast at the end. (at::zeros
  // would ignore the memory format, hence empty + zero_.)
  at::Tensor grad_acc =
      at::empty({batch_size, channels, height, width}, grad.options().dtype(acc_type).memory_format(fmt)).zero_();
  const int64_t total = grad.numel();
  if (grad_acc.numel() > 0 && total > 0) {
    const at::Tensor g = grad.contiguous(fmt);
    const Layout l{channels, height, width, pooled_height, pooled_width};
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const at::Tensor rois_acc = rois.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
      const auto launch = [&](auto kernel) {
        kernel<<<num_blocks(total), kThreads, 0, stream>>>(
            total, g.const_data_ptr<scalar_t>(), rois_acc.const_data_ptr<acc_t>(), static_cast<acc_t>(spatial_scale),
            batch_size, l, sampling_ratio, aligned, grad_acc.mutable_data_ptr<acc_t>());
      };
      if (channels_last) {
        launch(roi_align_backward_kernel<scalar_t, acc_t, true>);
      } else {
        launch(roi_align_backward_kernel<scalar_t, acc_t, false>);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return grad_acc.scalar_type() == grad.scalar_type() ? grad_acc : grad_acc.to(grad.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(d3ssl, CUDA, m) {
  m.impl("roi_align", &roi_align_forward_cuda);
  m.impl("_roi_align_backward", &roi_align_backward_cuda);
}

}  // namespace d3ssl
