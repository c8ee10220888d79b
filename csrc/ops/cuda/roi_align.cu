// RoIAlign on the GPU: forward and backward, NCHW or channels_last read in place.
//
// channels_last (the model's layout): one thread per output pixel and pack of V neighbouring
// channels, V = up to 16 bytes of them, so that a thread reads and writes whole 16-byte words, a
// warp covers contiguous memory, and the bin's sample geometry (divisions, clamps, weights) is
// computed once per V channels instead of once per channel. NCHW: one thread per output element.
// Indices are 32-bit whenever every offset fits (64-bit division is many times slower on the GPU).
// The backward scatters with atomics into a float32 (float64 for double) buffer, cast at the end;
// on sm_90 and later a pack's float atomics go out as float4/float2 vector atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ceil_div.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "ops/roi_align.h"

namespace d3ssl {
namespace {

using namespace roi_align_detail;

constexpr int kThreads = 256;

// V scalars moved as one memory access.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// Sizes of the feature map and of the pooled output, in the kernel's index type.
template <typename I>
struct Layout {
  I channels, height, width, pooled_height, pooled_width;
};

// A box whose batch index is outside the batch: a device-side assert (the same outcome the host
// check would need a synchronisation for), and the kernels never read or write through it.
template <typename I>
__device__ inline bool valid_batch_index(I b, I batch_size) {
  const bool ok = b >= 0 && b < batch_size;
  CUDA_KERNEL_ASSERT(ok && "roi_align: a batch index in boxes is outside the input's batch");
  return ok;
}

// f(pixel, weight) for the four neighbours of every sample of bin (ph, pw) that lies on the map;
// pixel = y * width + x.
template <typename acc_t, typename I, typename F>
__device__ inline void for_each_tap(const RoiGeometry<acc_t>& g, I ph, I pw, const Layout<I>& l, F&& f) {
  for (int64_t iy = 0; iy < g.grid_h; ++iy) {
    const acc_t y = sample_y(g, ph, iy);
    for (int64_t ix = 0; ix < g.grid_w; ++ix) {
      Bilinear<acc_t, I> s;
      if (!bilinear(y, sample_x(g, pw, ix), l.height, l.width, s)) continue;
      f(s.p1, s.w1);
      f(s.p2, s.w2);
      f(s.p3, s.w3);
      f(s.p4, s.w4);
    }
  }
}

// ---- channels_last: [N, H, W, C] in memory; output [K, PH, PW, C] --------------------------------

// Output pack `index` -> (k, ph, pw) and its first channel c.
template <typename I>
__device__ inline void split_nhwc(I index, I packs_per_pixel, I v, const Layout<I>& l, I& k, I& ph, I& pw, I& c) {
  I rest = index / packs_per_pixel;
  c = (index - rest * packs_per_pixel) * v;
  pw = rest % l.pooled_width;
  rest /= l.pooled_width;
  ph = rest % l.pooled_height;
  k = rest / l.pooled_height;
}

template <typename scalar_t, typename acc_t, int V>
__device__ inline void accumulate(acc_t (&sum)[V], const scalar_t* p, acc_t w) {
  const Pack<scalar_t, V> x = *reinterpret_cast<const Pack<scalar_t, V>*>(p);
#pragma unroll
  for (int v = 0; v < V; ++v) sum[v] += w * static_cast<acc_t>(x.v[v]);
}

// dst[v] += w * g[v] for the V channels of one pixel.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr bool kVectorAtomics = true;
#else
constexpr bool kVectorAtomics = false;
#endif

template <typename acc_t, int V>
__device__ inline void scatter(acc_t* dst, const acc_t (&g)[V], acc_t w) {
  constexpr bool kFloat = kVectorAtomics && std::is_same_v<acc_t, float>;
  if constexpr (kFloat && V % 4 == 0) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#pragma unroll
    for (int v = 0; v < V; v += 4) {
      atomicAdd(reinterpret_cast<float4*>(dst + v), make_float4(w * g[v], w * g[v + 1], w * g[v + 2], w * g[v + 3]));
    }
#endif
  } else if constexpr (kFloat && V % 2 == 0) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#pragma unroll
    for (int v = 0; v < V; v += 2) atomicAdd(reinterpret_cast<float2*>(dst + v), make_float2(w * g[v], w * g[v + 1]));
#endif
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v) atomicAdd(dst + v, w * g[v]);
  }
}

template <typename scalar_t, typename acc_t, typename I, int V>
__global__ void __launch_bounds__(kThreads)
    roi_align_forward_nhwc_kernel(I total, const scalar_t* __restrict__ input, const acc_t* __restrict__ rois,
                                  acc_t spatial_scale, I batch_size, Layout<I> l, int64_t sampling_ratio,
                                  bool aligned, scalar_t* __restrict__ output) {
  const I packs_per_pixel = l.channels / V;
  const I stride = static_cast<I>(blockDim.x) * gridDim.x;
  for (I index = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; index < total; index += stride) {
    I k, ph, pw, c;
    split_nhwc<I>(index, packs_per_pixel, V, l, k, ph, pw, c);
    const acc_t* roi = rois + k * 5;
    const I b = static_cast<I>(roi[0]);
    acc_t sum[V] = {};
    if (valid_batch_index(b, batch_size)) {
      const RoiGeometry<acc_t> g =
          roi_geometry(roi, spatial_scale, l.pooled_height, l.pooled_width, sampling_ratio, aligned);
      const scalar_t* in = input + b * l.height * l.width * l.channels + c;
      for_each_tap(g, ph, pw, l, [&](I p, acc_t w) { accumulate<scalar_t, acc_t, V>(sum, in + p * l.channels, w); });
#pragma unroll
      for (int v = 0; v < V; ++v) sum[v] *= g.inv_count;
    }
    Pack<scalar_t, V> out;
#pragma unroll
    for (int v = 0; v < V; ++v) out.v[v] = static_cast<scalar_t>(sum[v]);
    reinterpret_cast<Pack<scalar_t, V>*>(output)[index] = out;
  }
}

template <typename scalar_t, typename acc_t, typename I, int V>
__global__ void __launch_bounds__(kThreads)
    roi_align_backward_nhwc_kernel(I total, const scalar_t* __restrict__ grad, const acc_t* __restrict__ rois,
                                   acc_t spatial_scale, I batch_size, Layout<I> l, int64_t sampling_ratio,
                                   bool aligned, acc_t* __restrict__ grad_input) {
  const I packs_per_pixel = l.channels / V;
  const I stride = static_cast<I>(blockDim.x) * gridDim.x;
  for (I index = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; index < total; index += stride) {
    I k, ph, pw, c;
    split_nhwc<I>(index, packs_per_pixel, V, l, k, ph, pw, c);
    const acc_t* roi = rois + k * 5;
    const I b = static_cast<I>(roi[0]);
    if (b < 0 || b >= batch_size) continue;
    const RoiGeometry<acc_t> g =
        roi_geometry(roi, spatial_scale, l.pooled_height, l.pooled_width, sampling_ratio, aligned);
    const Pack<scalar_t, V> gp = reinterpret_cast<const Pack<scalar_t, V>*>(grad)[index];
    acc_t gv[V];
#pragma unroll
    for (int v = 0; v < V; ++v) gv[v] = static_cast<acc_t>(gp.v[v]) * g.inv_count;
    acc_t* gi = grad_input + b * l.height * l.width * l.channels + c;
    for_each_tap(g, ph, pw, l, [&](I p, acc_t w) { scatter<acc_t, V>(gi + p * l.channels, gv, w); });
  }
}

// ---- NCHW: [N, C, H, W]; output [K, C, PH, PW] ---------------------------------------------------

template <typename I>
__device__ inline void split_nchw(I index, const Layout<I>& l, I& k, I& c, I& ph, I& pw) {
  pw = index % l.pooled_width;
  index /= l.pooled_width;
  ph = index % l.pooled_height;
  index /= l.pooled_height;
  c = index % l.channels;
  k = index / l.channels;
}

template <typename scalar_t, typename acc_t, typename I>
__global__ void __launch_bounds__(kThreads)
    roi_align_forward_nchw_kernel(I total, const scalar_t* __restrict__ input, const acc_t* __restrict__ rois,
                                  acc_t spatial_scale, I batch_size, Layout<I> l, int64_t sampling_ratio,
                                  bool aligned, scalar_t* __restrict__ output) {
  const I stride = static_cast<I>(blockDim.x) * gridDim.x;
  for (I index = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; index < total; index += stride) {
    I k, c, ph, pw;
    split_nchw<I>(index, l, k, c, ph, pw);
    const acc_t* roi = rois + k * 5;
    const I b = static_cast<I>(roi[0]);
    acc_t sum = 0;
    if (valid_batch_index(b, batch_size)) {
      const RoiGeometry<acc_t> g =
          roi_geometry(roi, spatial_scale, l.pooled_height, l.pooled_width, sampling_ratio, aligned);
      const scalar_t* in = input + (b * l.channels + c) * l.height * l.width;
      for_each_tap(g, ph, pw, l, [&](I p, acc_t w) { sum += w * static_cast<acc_t>(in[p]); });
      sum *= g.inv_count;
    }
    output[index] = static_cast<scalar_t>(sum);
  }
}

template <typename scalar_t, typename acc_t, typename I>
__global__ void __launch_bounds__(kThreads)
    roi_align_backward_nchw_kernel(I total, const scalar_t* __restrict__ grad, const acc_t* __restrict__ rois,
                                   acc_t spatial_scale, I batch_size, Layout<I> l, int64_t sampling_ratio,
                                   bool aligned, acc_t* __restrict__ grad_input) {
  const I stride = static_cast<I>(blockDim.x) * gridDim.x;
  for (I index = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; index < total; index += stride) {
    I k, c, ph, pw;
    split_nchw<I>(index, l, k, c, ph, pw);
    const acc_t* roi = rois + k * 5;
    const I b = static_cast<I>(roi[0]);
    if (b < 0 || b >= batch_size) continue;
    const RoiGeometry<acc_t> g =
        roi_geometry(roi, spatial_scale, l.pooled_height, l.pooled_width, sampling_ratio, aligned);
    const acc_t gv = static_cast<acc_t>(grad[index]) * g.inv_count;
    acc_t* gi = grad_input + (b * l.channels + c) * l.height * l.width;
    for_each_tap(g, ph, pw, l, [&](I p, acc_t w) { atomicAdd(gi + p, w * gv); });
  }
}

unsigned int num_blocks(int64_t total) {
  // Grid-stride loops cover the rest; the cap keeps the grid size valid for any total.
  return static_cast<unsigned int>(std::min<int64_t>(at::ceil_div<int64_t>(total, kThreads), int64_t(1) << 30));
}

// 32-bit indices when every offset and every grid-stride step stays below 2^31.
template <typename F>
void with_index_type(int64_t largest_numel, F&& f) {
  if (largest_numel <= (int64_t(1) << 30)) {
    f(int32_t{});
  } else {
    f(int64_t{});
  }
}

bool is_aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(std::min<int64_t>(bytes, 16)) == 0;
}

// The widest pack (power of two, at most 16 bytes of scalar_t) that divides the channels and keeps
// every pack of `a` (scalar_t) and `b` (elements of b_bytes) aligned; then f(integral_constant<V>).
template <typename scalar_t, typename F>
void with_pack_width(int64_t channels, const void* a, const void* b, int64_t b_bytes, F&& f) {
  constexpr int kMax = 16 / sizeof(scalar_t) > 0 ? 16 / sizeof(scalar_t) : 1;
  int v = kMax;
  while (v > 1 && !(channels % v == 0 && is_aligned(a, v * sizeof(scalar_t)) && is_aligned(b, v * b_bytes))) v /= 2;
  if constexpr (kMax >= 8) {
    if (v == 8) return f(std::integral_constant<int, 8>{});
  }
  if constexpr (kMax >= 4) {
    if (v == 4) return f(std::integral_constant<int, 4>{});
  }
  if constexpr (kMax >= 2) {
    if (v == 2) return f(std::integral_constant<int, 2>{});
  }
  f(std::integral_constant<int, 1>{});
}

at::Tensor roi_align_forward_cuda(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                                  int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio,
                                  bool aligned) {
  check_forward_args(input, rois, pooled_height, pooled_width, "roi_align");
  TORCH_CHECK(input.is_cuda(), "roi_align: the CUDA kernel got input on ", input.device());
  const c10::cuda::CUDAGuard device_guard(input.device());

  const bool channels_last = reads_channels_last(input);
  const at::Tensor in = channels_last ? input : input.contiguous();
  const int64_t num_rois = rois.size(0), channels = input.size(1), height = input.size(2), width = input.size(3);
  at::Tensor output = at::empty({num_rois, channels, pooled_height, pooled_width},
                                input.options().memory_format(layout(channels_last)));
  const int64_t total = output.numel();
  if (total == 0) return output;
  if (height == 0 || width == 0) return output.zero_();

  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "roi_align_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor rois_acc = rois.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const scalar_t* in_ptr = in.const_data_ptr<scalar_t>();
    scalar_t* out_ptr = output.mutable_data_ptr<scalar_t>();
    with_index_type(std::max({total, in.numel(), rois.numel()}), [&](auto index_type) {
      using I = decltype(index_type);
      const Layout<I> l{static_cast<I>(channels), static_cast<I>(height), static_cast<I>(width),
                        static_cast<I>(pooled_height), static_cast<I>(pooled_width)};
      const I n = static_cast<I>(input.size(0));
      if (channels_last) {
        with_pack_width<scalar_t>(channels, in_ptr, out_ptr, sizeof(scalar_t), [&](auto pack) {
          constexpr int V = decltype(pack)::value;
          const I packs = static_cast<I>(total / V);
          roi_align_forward_nhwc_kernel<scalar_t, acc_t, I, V><<<num_blocks(packs), kThreads, 0, stream>>>(
              packs, in_ptr, rois_acc.const_data_ptr<acc_t>(), static_cast<acc_t>(spatial_scale), n, l,
              sampling_ratio, aligned, out_ptr);
        });
      } else {
        roi_align_forward_nchw_kernel<scalar_t, acc_t, I><<<num_blocks(total), kThreads, 0, stream>>>(
            static_cast<I>(total), in_ptr, rois_acc.const_data_ptr<acc_t>(), static_cast<acc_t>(spatial_scale), n,
            l, sampling_ratio, aligned, out_ptr);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
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
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const at::Tensor rois_acc = rois.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
      const scalar_t* grad_ptr = g.const_data_ptr<scalar_t>();
      acc_t* acc_ptr = grad_acc.mutable_data_ptr<acc_t>();
      with_index_type(std::max({total, grad_acc.numel(), rois.numel()}), [&](auto index_type) {
        using I = decltype(index_type);
        const Layout<I> l{static_cast<I>(channels), static_cast<I>(height), static_cast<I>(width),
                          static_cast<I>(pooled_height), static_cast<I>(pooled_width)};
        const I n = static_cast<I>(batch_size);
        if (channels_last) {
          with_pack_width<scalar_t>(channels, grad_ptr, acc_ptr, sizeof(acc_t), [&](auto pack) {
            constexpr int V = decltype(pack)::value;
            const I packs = static_cast<I>(total / V);
            roi_align_backward_nhwc_kernel<scalar_t, acc_t, I, V><<<num_blocks(packs), kThreads, 0, stream>>>(
                packs, grad_ptr, rois_acc.const_data_ptr<acc_t>(), static_cast<acc_t>(spatial_scale), n, l,
                sampling_ratio, aligned, acc_ptr);
          });
        } else {
          roi_align_backward_nchw_kernel<scalar_t, acc_t, I><<<num_blocks(total), kThreads, 0, stream>>>(
              static_cast<I>(total), grad_ptr, rois_acc.const_data_ptr<acc_t>(), static_cast<acc_t>(spatial_scale),
              n, l, sampling_ratio, aligned, acc_ptr);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
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
