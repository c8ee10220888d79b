// region_erase on CUDA: one pass over the batch. A block covers a tile of one image's elements;
// the image's ops stream through shared memory (see region.h) and each element ends erased when
// the last op covering its pixel erases. Erased elements get the fill bits; the others are copied
// (out-of-place) or left untouched (in-place, so only erased elements are written). With the vector
// kernels on (region.h), batches that allow it go to region_vec.cuh's kernel instead.
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
__global__ void region_erase_kernel(const word_t* __restrict__ in, word_t* __restrict__ out,
                                    bool inplace, word_t fill, region::Geometry g,
                                    const float* __restrict__ rects, const bool* __restrict__ erase,
                                    const int64_t* __restrict__ offsets, int64_t num_rects) {
  const int b = blockIdx.y;
  const int H = g.H, W = g.W;
  const int image = g.C * H * W;
  const int base = blockIdx.x * kThreads * kPerThread + threadIdx.x;
  region::TileState s;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int e = base + i * kThreads;
    s.hole[i] = 0;
    if (e < image) {
      region::element_pixel(e, g, s.x[i], s.y[i]);
    } else {
      s.x[i] = s.y[i] = -1;  // covered by no span
    }
  }
  int64_t r0, r1;
  region::op_range(offsets, b, num_rects, r0, r1);
  int tile_y0, tile_y1;
  const int tile_e0 = blockIdx.x * kThreads * kPerThread;
  region::tile_rows(tile_e0, min(tile_e0 + kThreads * kPerThread, image) - 1, g, tile_y0, tile_y1);
  region::replay_tile(s, rects, erase, r0, r1, H, W, 0, W, 0, H, tile_y0, tile_y1);
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int e = base + i * kThreads;
    if (e >= image) continue;
    const int64_t at = static_cast<int64_t>(b) * image + e;
    if (s.hole[i]) {
      out[at] = fill;
    } else if (!inplace) {
      out[at] = in[at];
    }
  }
}

void launch(const at::Tensor& images, const at::Tensor& out, const at::Tensor& rects,
            const at::Tensor& erase, const at::Tensor& offsets, double fill, Layout layout) {
  const int64_t B = images.size(0);
  const int64_t image = images.size(1) * images.size(2) * images.size(3);
  if (B == 0 || image == 0) return;
  TORCH_CHECK(B <= 65535, "region_erase: at most 65535 images per call on CUDA, got ", B);
  const auto rects_c = rects.contiguous();
  const auto erase_c = erase.contiguous();
  const auto offsets_c = offsets.contiguous();
  const dim3 grid(static_cast<unsigned>((image + kThreads * kPerThread - 1) / (kThreads * kPerThread)),
                  static_cast<unsigned>(B));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool inplace = images.is_same(out);
  const bool nhwc = layout == Layout::NHWC;
  if (region::vector_kernels() && region::vec::vectorisable(images) && region::vec::vectorisable(out)) {
    const int vecs = static_cast<int>(image / (16 / images.element_size()));
    D3SSL_DISPATCH_WORD(images, "region_erase", [&] {
      region::vec::erase_kernel<word_t><<<region::vec::grid(B, vecs), region::vec::kThreads, 0, stream>>>(
          static_cast<const uint4*>(images.const_data_ptr()), static_cast<uint4*>(out.data_ptr()), inplace,
          region::fill_bits<word_t>(fill, images.scalar_type()), static_cast<int>(images.size(1)),
          static_cast<int>(images.size(2)), static_cast<int>(images.size(3)), nhwc, vecs,
          rects_c.const_data_ptr<float>(), erase_c.const_data_ptr<bool>(), offsets_c.const_data_ptr<int64_t>(),
          rects.size(0));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return;
  }
  D3SSL_DISPATCH_WORD(images, "region_erase", [&] {
    region_erase_kernel<word_t><<<grid, kThreads, 0, stream>>>(
        static_cast<const word_t*>(images.const_data_ptr()), static_cast<word_t*>(out.data_ptr()),
        inplace, region::fill_bits<word_t>(fill, images.scalar_type()),
        region::make_geometry(images, nhwc), rects_c.const_data_ptr<float>(),
        erase_c.const_data_ptr<bool>(), offsets_c.const_data_ptr<int64_t>(), rects.size(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor region_erase_cuda(const at::Tensor& images, const at::Tensor& rects,
                             const at::Tensor& erase, const at::Tensor& offsets, double fill) {
  region::check_images(images, "images");
  region::check_ops(images, rects, erase, offsets, "images");
  c10::cuda::CUDAGuard guard(images.device());
  const Layout layout = region::layout_of(images);
  const auto in = images.contiguous(region::memory_format(layout));  // a copy only for odd strides
  auto out = at::empty_like(in, region::memory_format(layout));
  launch(in, out, rects, erase, offsets, fill, layout);
  return out;
}

void region_erase_inplace_cuda(const at::Tensor& images, const at::Tensor& rects,
                                      const at::Tensor& erase, const at::Tensor& offsets,
                                      double fill) {
  region::check_images(images, "images");
  region::check_ops(images, rects, erase, offsets, "images");
  c10::cuda::CUDAGuard guard(images.device());
  const Layout layout = region::layout_of(images);
  if (images.is_contiguous(region::memory_format(layout))) {
    launch(images, images, rects, erase, offsets, fill, layout);
  } else {  // odd strides: work on a dense copy and write it back
    auto dense = images.contiguous(region::memory_format(layout));
    launch(dense, dense, rects, erase, offsets, fill, layout);
    images.copy_(dense);
  }
}

void region_erase_out_cuda(const at::Tensor& images, const at::Tensor& rects,
                           const at::Tensor& erase, const at::Tensor& offsets, double fill,
                           const at::Tensor& out) {
  region::check_images(images, "images");
  region::check_ops(images, rects, erase, offsets, "images");
  const Layout layout = region::layout_of(images);
  region::check_out(out, images, layout, "images");
  if (region::out_is_input(out, images, "images")) {
    region_erase_inplace_cuda(images, rects, erase, offsets, fill);
    return;
  }
  c10::cuda::CUDAGuard guard(images.device());
  const auto in = images.contiguous(region::memory_format(layout));  // a copy only for odd strides
  launch(in, out, rects, erase, offsets, fill, layout);
}

}  // namespace

TORCH_LIBRARY_IMPL(d3ssl, CUDA, m) {
  m.impl("region_erase", &region_erase_cuda);
  m.impl("region_erase_", &region_erase_inplace_cuda);
  m.impl("region_erase_out", &region_erase_out_cuda);
}

}  // namespace d3ssl
