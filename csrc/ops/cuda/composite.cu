// composite on CUDA: one pass over the batch. A block covers a tile of one image's elements; the
// image's ops stream through shared memory (see region.h) onto a mask that starts empty and is
// clipped to where the shifted foreground exists. Each output element reads either the
// foreground element its pixel came from or the background element at its own place. With the
// vector kernels on (region.h), batches that allow it go to region_vec.cuh's kernel instead.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ops/cuda/region_vec.cuh"
#include "ops/region.h"

namespace d3ssl {
namespace {

using region::kPerThread;
using region::kThreads;
using region::Layout;

template <typename word_t>
__global__ void composite_kernel(const word_t* __restrict__ fg, const word_t* __restrict__ bg,
                                 word_t* __restrict__ out, const int64_t* __restrict__ bg_index,
                                 int64_t num_bg, const int64_t* __restrict__ shift,
                                 region::Geometry g, const float* __restrict__ rects,
                                 const bool* __restrict__ erase,
                                 const int64_t* __restrict__ offsets, int64_t num_rects) {
  const int b = blockIdx.y;
  const int H = g.H, W = g.W;
  const int image = g.C * H * W;
  const int base = blockIdx.x * kThreads * kPerThread + threadIdx.x;
  const region::CompositeImage geo = region::composite_image(bg_index, num_bg, shift, b, H, W);
  const int64_t source = geo.source;

  region::TileState s;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int e = base + i * kThreads;
    s.hole[i] = 1;  // the mask starts empty
    if (e < image) {
      region::element_pixel(e, g, s.x[i], s.y[i]);
    } else {
      s.x[i] = s.y[i] = -1;
    }
  }
  int64_t r0, r1;
  region::op_range(offsets, b, num_rects, r0, r1);
  int tile_y0, tile_y1;
  const int tile_e0 = blockIdx.x * kThreads * kPerThread;
  region::tile_rows(tile_e0, min(tile_e0 + kThreads * kPerThread, image) - 1, g, tile_y0, tile_y1);
  region::replay_tile(s, rects, erase, r0, r1, H, W, geo.x_lo, geo.x_hi, geo.y_lo, geo.y_hi, tile_y0,
                       tile_y1);
  const int moved = (geo.dy * W + geo.dx) * (g.nhwc ? g.C : 1);  // element distance from source to output
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int e = base + i * kThreads;
    if (e >= image) continue;
    out[static_cast<int64_t>(b) * image + e] =
        s.hole[i] ? bg[source * image + e] : fg[static_cast<int64_t>(b) * image + (e - moved)];
  }
}

// Writes the composite of the dense fg_c, bg_c (layout `layout`) into out.
void launch(const at::Tensor& fg_c, const at::Tensor& bg_c, const at::Tensor& bg_index,
            const at::Tensor& shift, const at::Tensor& rects, const at::Tensor& erase,
            const at::Tensor& offsets, const at::Tensor& out, Layout layout) {
  const int64_t B = fg_c.size(0);
  const int64_t image = fg_c.size(1) * fg_c.size(2) * fg_c.size(3);
  if (B == 0 || image == 0) return;
  TORCH_CHECK(B <= 65535, "composite: at most 65535 images per call on CUDA, got ", B);
  const auto bg_index_c = bg_index.contiguous();
  const auto shift_c = shift.contiguous();
  const auto rects_c = rects.contiguous();
  const auto erase_c = erase.contiguous();
  const auto offsets_c = offsets.contiguous();
  const dim3 grid(static_cast<unsigned>((image + kThreads * kPerThread - 1) / (kThreads * kPerThread)),
                  static_cast<unsigned>(B));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool nhwc = layout == Layout::NHWC;
  if (region::vector_kernels() && region::vec::vectorisable(fg_c) && region::vec::vectorisable(bg_c) &&
      region::vec::vectorisable(out)) {
    const int vecs = static_cast<int>(image / (16 / fg_c.element_size()));
    D3SSL_DISPATCH_WORD(fg_c, "composite", [&] {
      region::vec::composite_kernel<word_t><<<region::vec::grid(B, vecs), region::vec::kThreads, 0, stream>>>(
          static_cast<const uint4*>(fg_c.const_data_ptr()), static_cast<const uint4*>(bg_c.const_data_ptr()),
          static_cast<uint4*>(out.data_ptr()), bg_index_c.const_data_ptr<int64_t>(), bg_c.size(0),
          shift_c.const_data_ptr<int64_t>(), static_cast<int>(fg_c.size(1)), static_cast<int>(fg_c.size(2)),
          static_cast<int>(fg_c.size(3)), nhwc, vecs, rects_c.const_data_ptr<float>(),
          erase_c.const_data_ptr<bool>(), offsets_c.const_data_ptr<int64_t>(), rects.size(0));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return;
  }
  D3SSL_DISPATCH_WORD(fg_c, "composite", [&] {
    composite_kernel<word_t><<<grid, kThreads, 0, stream>>>(
        static_cast<const word_t*>(fg_c.const_data_ptr()),
        static_cast<const word_t*>(bg_c.const_data_ptr()), static_cast<word_t*>(out.data_ptr()),
        bg_index_c.const_data_ptr<int64_t>(), bg_c.size(0), shift_c.const_data_ptr<int64_t>(),
        region::make_geometry(fg_c, nhwc), rects_c.const_data_ptr<float>(),
        erase_c.const_data_ptr<bool>(), offsets_c.const_data_ptr<int64_t>(), rects.size(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor composite_cuda(const at::Tensor& fg, const at::Tensor& bg, const at::Tensor& bg_index,
                          const at::Tensor& shift, const at::Tensor& rects, const at::Tensor& erase,
                          const at::Tensor& offsets) {
  region::check_composite(fg, bg, bg_index, shift, rects, erase, offsets);
  c10::cuda::CUDAGuard guard(fg.device());
  const Layout layout = region::layout_of(fg);
  const auto format = region::memory_format(layout);
  const auto fg_c = fg.contiguous(format);  // copies only for odd strides
  const auto bg_c = bg.contiguous(format);  // copies when bg's layout differs from fg's
  auto out = at::empty_like(fg_c, format);
  launch(fg_c, bg_c, bg_index, shift, rects, erase, offsets, out, layout);
  return out;
}

void composite_out_cuda(const at::Tensor& fg, const at::Tensor& bg, const at::Tensor& bg_index,
                        const at::Tensor& shift, const at::Tensor& rects, const at::Tensor& erase,
                        const at::Tensor& offsets, const at::Tensor& out) {
  region::check_composite(fg, bg, bg_index, shift, rects, erase, offsets);
  const Layout layout = region::layout_of(fg);
  region::check_out(out, fg, layout, "fg");
  c10::cuda::CUDAGuard guard(fg.device());
  const auto format = region::memory_format(layout);
  const auto fg_c = fg.contiguous(format);
  const auto bg_c = bg.contiguous(format);
  region::check_out_apart(out, fg_c, bg_c);
  launch(fg_c, bg_c, bg_index, shift, rects, erase, offsets, out, layout);
}

}  // namespace

TORCH_LIBRARY_IMPL(d3ssl, CUDA, m) {
  m.impl("composite", &composite_cuda);
  m.impl("composite_out", &composite_out_cuda);
}

}  // namespace d3ssl
