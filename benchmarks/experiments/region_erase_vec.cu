// Experiment (not part of the library): region_erase on CUDA with 16-byte vectors and 8-16 times
// more elements per block than csrc/ops/cuda/region_erase.cu, whose kernel reaches 12-31 % of an
// H100's copy bandwidth (benchmarks/RESULTS.md). What it changes:
//   - each thread moves kVecs 16-byte vectors (8 bf16 elements each) instead of kPerThread single
//     elements, and issues their loads before it stages the ops, so the loads' latency overlaps the
//     staging (which reads offsets, then rects, and synchronises the block);
//   - a block covers kThreads * kVecs vectors (4096 bf16 elements instead of 1024), so the staging
//     of the image's ops is paid 4 times less often;
//   - an element's pixel is stepped from the vector's first element instead of divided per element.
// Out-of-place only, dense NCHW or channels_last, an image's element count a multiple of the vector
// width and 16-byte-aligned storage (true of the Batch's views); anything else is refused.
// benchmarks/experiments/region_erase_vec.py builds it on a GPU host, checks it against the
// library's op bit for bit, and times both.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "ops/region.h"

namespace {

constexpr int kThreads = 256;
constexpr int kVecs = 2;

template <typename word_t>
__global__ void erase_vec_kernel(const uint4* __restrict__ in, uint4* __restrict__ out, word_t fill, int C,
                                 int H, int W, bool nhwc, int vecs_per_image, const float* __restrict__ rects,
                                 const bool* __restrict__ erase, const int64_t* __restrict__ offsets) {
  constexpr int kPer = 16 / sizeof(word_t);  // elements per vector
  static_assert(kPer <= 16, "at most 16 elements per vector (the hole bits are 32 wide)");
  const int b = blockIdx.y;
  const int v0 = blockIdx.x * kThreads * kVecs + threadIdx.x;
  const int64_t at0 = static_cast<int64_t>(b) * vecs_per_image;

  // 1. The loads first: nothing below depends on them until the selection.
  uint4 data[kVecs];
#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    const int v = v0 + j * kThreads;
    data[j] = v < vecs_per_image ? in[at0 + v] : make_uint4(0, 0, 0, 0);
  }

  // 2. Each element's pixel, stepped from the vector's first element.
  int px[kVecs][kPer], py[kVecs][kPer];
  const int plane = H * W;
#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    const int e = (v0 + j * kThreads) * kPer;
    int x, y, c;
    if (nhwc) {
      const int pixel = e / C;
      c = e - pixel * C;
      y = pixel / W;
      x = pixel - y * W;
    } else {
      const int in_plane = e % plane;
      c = 0;
      y = in_plane / W;
      x = in_plane - y * W;
    }
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      px[j][i] = x;
      py[j][i] = y;
      // the next element: the next channel (NHWC) or the next pixel (NCHW)
      if (nhwc && ++c < C) continue;
      c = 0;
      if (++x == W) {
        x = 0;
        if (++y == H) y = 0;  // NCHW: the next channel plane starts at row 0
      }
    }
  }

  // 3. The image's ops, staged through shared memory in chunks; the last op covering a pixel wins.
  unsigned hole[kVecs];
#pragma unroll
  for (int j = 0; j < kVecs; ++j) hole[j] = 0u;
  __shared__ int4 span[kThreads];
  __shared__ unsigned char flag[kThreads];
  const int64_t r0 = offsets[b], r1 = offsets[b + 1];
  for (int64_t c0 = r0; c0 < r1; c0 += kThreads) {
    const int n = static_cast<int>(r1 - c0 < kThreads ? r1 - c0 : kThreads);
    __syncthreads();  // the previous chunk is no longer read
    if (threadIdx.x < n) {
      const float* q = rects + 4 * (c0 + threadIdx.x);
      int64_t xa, xb, ya, yb;
      d3ssl::region::pixel_span(q[0], q[2], W, xa, xb);
      d3ssl::region::pixel_span(q[1], q[3], H, ya, yb);
      span[threadIdx.x] = make_int4(static_cast<int>(xa), static_cast<int>(xb), static_cast<int>(ya),
                                    static_cast<int>(yb));
      flag[threadIdx.x] = erase[c0 + threadIdx.x] ? 1 : 0;
    }
    __syncthreads();
    for (int r = 0; r < n; ++r) {
      const int4 o = span[r];
      const bool f = flag[r];
#pragma unroll
      for (int j = 0; j < kVecs; ++j) {
#pragma unroll
        for (int i = 0; i < kPer; ++i) {
          if (px[j][i] >= o.x && px[j][i] < o.y && py[j][i] >= o.z && py[j][i] < o.w) {
            hole[j] = f ? (hole[j] | (1u << i)) : (hole[j] & ~(1u << i));
          }
        }
      }
    }
  }

  // 4. Select and store whole vectors.
#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    const int v = v0 + j * kThreads;
    if (v >= vecs_per_image) continue;
    word_t w[kPer];
    memcpy(w, &data[j], 16);
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      if (hole[j] & (1u << i)) w[i] = fill;
    }
    uint4 r;
    memcpy(&r, w, 16);
    out[at0 + v] = r;
  }
}

at::Tensor region_erase_vec(const at::Tensor& images, const at::Tensor& rects, const at::Tensor& erase,
                            const at::Tensor& offsets, double fill) {
  d3ssl::region::check_images(images, "images");
  d3ssl::region::check_ops(images, rects, erase, offsets, "images");
  TORCH_CHECK(images.is_cuda(), "region_erase_vec: CUDA tensors only");
  const c10::cuda::CUDAGuard guard(images.device());
  const auto layout = d3ssl::region::layout_of(images);
  const auto format = d3ssl::region::memory_format(layout);
  TORCH_CHECK(images.is_contiguous(format), "region_erase_vec: dense NCHW or channels_last images only");
  const int64_t B = images.size(0), image = images.size(1) * images.size(2) * images.size(3);
  const int64_t per = 16 / images.element_size();
  TORCH_CHECK(image % per == 0, "region_erase_vec: an image's element count must be a multiple of ", per);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(images.const_data_ptr()) % 16 == 0,
              "region_erase_vec: storage must be 16-byte aligned");
  TORCH_CHECK(B <= 65535, "region_erase_vec: at most 65535 images");
  at::Tensor out = at::empty_like(images, format);
  if (B == 0 || image == 0) return out;
  const auto rects_c = rects.contiguous();
  const auto erase_c = erase.contiguous();
  const auto offsets_c = offsets.contiguous();
  const int vecs = static_cast<int>(image / per);
  const dim3 grid(static_cast<unsigned>((vecs + kThreads * kVecs - 1) / (kThreads * kVecs)),
                  static_cast<unsigned>(B));
  auto stream = c10::cuda::getCurrentCUDAStream();
  D3SSL_DISPATCH_WORD(images, "region_erase_vec", [&] {
    erase_vec_kernel<word_t><<<grid, kThreads, 0, stream>>>(
        static_cast<const uint4*>(images.const_data_ptr()), static_cast<uint4*>(out.data_ptr()),
        d3ssl::region::fill_bits<word_t>(fill, images.scalar_type()), static_cast<int>(images.size(1)),
        static_cast<int>(images.size(2)), static_cast<int>(images.size(3)),
        layout == d3ssl::region::Layout::NHWC, vecs, rects_c.const_data_ptr<float>(),
        erase_c.const_data_ptr<bool>(), offsets_c.const_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("region_erase_vec", &region_erase_vec, "region_erase with 16-byte vectors (experiment)");
}
