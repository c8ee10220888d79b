// Experiment (not part of the library): region_erase and composite on CUDA with 16-byte vectors and
// more elements per block than csrc/ops/cuda/{region_erase,composite}.cu, whose kernels reach 12-31 %
// of an H100's copy bandwidth (benchmarks/RESULTS.md). What changes:
//   - each thread moves kVecs 16-byte vectors (8 bf16 elements each) instead of kPerThread single
//     elements; region_erase issues its loads before it stages the ops, so their latency overlaps
//     the staging (which reads offsets, then rects, and synchronises the block);
//   - a block covers kThreads * kVecs vectors (4096 bf16 elements instead of 1024), so the staging
//     of the image's ops is paid 4 times less often;
//   - an element's pixel is stepped from the vector's first element instead of divided per element;
//   - composite reads the shifted foreground as the two aligned vectors around it, and funnel-shifts
//     the bytes into place (the shift is the same for a whole image).
// Out-of-place only, dense NCHW or channels_last, an image's element count a multiple of the vector
// width and 16-byte-aligned storage (true of the Batch's views); anything else is refused.
// benchmarks/experiments/region_vec.py builds it on a GPU host, checks it against the library's
// ops bit for bit, and times both.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "ops/region.h"

namespace {

constexpr int kThreads = 256;
constexpr int kVecs = 2;

// Pixels of the kPer elements of each of a thread's kVecs vectors, stepped from each vector's first
// element (NHWC: channel, then x, then y; NCHW: x, then y, wrapping to row 0 at a new plane).
template <int kPer>
__device__ inline void vector_pixels(int v0, int C, int H, int W, bool nhwc, int (&px)[kVecs][kPer],
                                     int (&py)[kVecs][kPer]) {
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
      if (nhwc && ++c < C) continue;
      c = 0;
      if (++x == W) {
        x = 0;
        if (++y == H) y = 0;
      }
    }
  }
}

// Replays ops [r0, r1) of the block's image onto the hole bits of the thread's elements (bit i of
// hole[j]: element i of vector j), staged through shared memory in chunks of kThreads; spans are
// clipped to the window [x_lo, x_hi) x [y_lo, y_hi). Every thread of the block must call it.
template <int kPer>
__device__ inline void replay_vectors(const float* __restrict__ rects, const bool* __restrict__ erase, int64_t r0,
                                      int64_t r1, int H, int W, int x_lo, int x_hi, int y_lo, int y_hi,
                                      const int (&px)[kVecs][kPer], const int (&py)[kVecs][kPer],
                                      unsigned (&hole)[kVecs]) {
  __shared__ int4 span[kThreads];
  __shared__ unsigned char flag[kThreads];
  for (int64_t c0 = r0; c0 < r1; c0 += kThreads) {
    const int n = static_cast<int>(r1 - c0 < kThreads ? r1 - c0 : kThreads);
    __syncthreads();  // the previous chunk is no longer read
    if (threadIdx.x < n) {
      const float* q = rects + 4 * (c0 + threadIdx.x);
      int64_t xa, xb, ya, yb;
      d3ssl::region::pixel_span(q[0], q[2], W, xa, xb);
      d3ssl::region::pixel_span(q[1], q[3], H, ya, yb);
      span[threadIdx.x] = make_int4(max(static_cast<int>(xa), x_lo), min(static_cast<int>(xb), x_hi),
                                    max(static_cast<int>(ya), y_lo), min(static_cast<int>(yb), y_hi));
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
}

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
  vector_pixels<kPer>(v0, C, H, W, nhwc, px, py);

  // 3. The image's ops; the last op covering a pixel wins.
  unsigned hole[kVecs];
#pragma unroll
  for (int j = 0; j < kVecs; ++j) hole[j] = 0u;
  replay_vectors<kPer>(rects, erase, offsets[b], offsets[b + 1], H, W, 0, W, 0, H, px, py, hole);

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

// 16 bytes starting `bytes` (0..15) bytes into the 32 bytes lo:hi (little-endian).
__device__ inline uint4 bytes_from(uint4 lo, uint4 hi, int bytes) {
  const unsigned u[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
  const int q = bytes >> 2, r = (bytes & 3) * 8;
  unsigned o[4];
  switch (q) {  // constant register indices in every case
    case 0:
#pragma unroll
      for (int k = 0; k < 4; ++k) o[k] = __funnelshift_r(u[k], u[k + 1], r);
      break;
    case 1:
#pragma unroll
      for (int k = 0; k < 4; ++k) o[k] = __funnelshift_r(u[k + 1], u[k + 2], r);
      break;
    case 2:
#pragma unroll
      for (int k = 0; k < 4; ++k) o[k] = __funnelshift_r(u[k + 2], u[k + 3], r);
      break;
    default:
#pragma unroll
      for (int k = 0; k < 4; ++k) o[k] = __funnelshift_r(u[k + 3], u[k + 4], r);
      break;
  }
  return make_uint4(o[0], o[1], o[2], o[3]);
}

template <typename word_t>
__global__ void composite_vec_kernel(const uint4* __restrict__ fg, const uint4* __restrict__ bg,
                                     uint4* __restrict__ out, const int64_t* __restrict__ bg_index, int64_t num_bg,
                                     const int64_t* __restrict__ shift, int C, int H, int W, bool nhwc,
                                     int vecs_per_image, const float* __restrict__ rects,
                                     const bool* __restrict__ erase, const int64_t* __restrict__ offsets) {
  constexpr int kPer = 16 / sizeof(word_t);
  constexpr unsigned kAll = kPer == 32 ? ~0u : ((1u << kPer) - 1u);
  const int b = blockIdx.y;
  const int v0 = blockIdx.x * kThreads * kVecs + threadIdx.x;
  const auto geo = d3ssl::region::composite_image(bg_index, num_bg, shift, b, H, W);
  const int64_t source = geo.source;
  const int moved = (geo.dy * W + geo.dx) * (nhwc ? C : 1);  // element distance from source to output

  int px[kVecs][kPer], py[kVecs][kPer];
  vector_pixels<kPer>(v0, C, H, W, nhwc, px, py);

  // The mask starts all hole (background); a set op clears the bit, an erase op sets it. Spans are
  // clipped to where the shifted foreground exists.
  unsigned hole[kVecs];
#pragma unroll
  for (int j = 0; j < kVecs; ++j) hole[j] = kAll;
  replay_vectors<kPer>(rects, erase, offsets[b], offsets[b + 1], H, W, geo.x_lo, geo.x_hi, geo.y_lo, geo.y_hi, px, py,
                       hole);

  const int64_t at0 = static_cast<int64_t>(b) * vecs_per_image;
  const int64_t bg0 = source * vecs_per_image;
#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    const int v = v0 + j * kThreads;
    if (v >= vecs_per_image) continue;
    const unsigned h = hole[j];
    word_t w[kPer];
    if (h != 0u) {
      const uint4 g = bg[bg0 + v];
      memcpy(w, &g, 16);
    }
    if (h != kAll) {
      // Set elements read fg at (element - moved), inside this image; the aligned vectors around
      // it may reach past the image only where no set element reads them.
      const int s0 = v * kPer - moved;
      const int a = s0 >= 0 ? s0 / kPer : -((-s0 + kPer - 1) / kPer);
      const int off = s0 - a * kPer;
      const uint4 zero = make_uint4(0, 0, 0, 0);
      const uint4 lo = a >= 0 && a < vecs_per_image ? fg[at0 + a] : zero;
      const uint4 hi = a + 1 >= 0 && a + 1 < vecs_per_image ? fg[at0 + a + 1] : zero;
      const uint4 f4 = bytes_from(lo, hi, off * static_cast<int>(sizeof(word_t)));
      word_t f[kPer];
      memcpy(f, &f4, 16);
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        if (!(h & (1u << i))) w[i] = f[i];
      }
    }
    uint4 r;
    memcpy(&r, w, 16);
    out[at0 + v] = r;
  }
}

// The checks both host functions share: dense, vector-divisible, aligned images on the GPU.
void check_vectorisable(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, ": CUDA tensors only");
  const auto format = d3ssl::region::memory_format(d3ssl::region::layout_of(t));
  TORCH_CHECK(t.is_contiguous(format), name, ": dense NCHW or channels_last images only");
  const int64_t per = 16 / t.element_size();
  TORCH_CHECK((t.size(1) * t.size(2) * t.size(3)) % per == 0, name,
              ": an image's element count must be a multiple of ", per);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0, name,
              ": storage must be 16-byte aligned");
  TORCH_CHECK(t.size(0) <= 65535, name, ": at most 65535 images");
}

at::Tensor composite_vec(const at::Tensor& fg, const at::Tensor& bg, const at::Tensor& bg_index,
                         const at::Tensor& shift, const at::Tensor& rects, const at::Tensor& erase,
                         const at::Tensor& offsets) {
  d3ssl::region::check_composite(fg, bg, bg_index, shift, rects, erase, offsets);
  check_vectorisable(fg, "composite_vec");
  check_vectorisable(bg, "composite_vec");
  const auto layout = d3ssl::region::layout_of(fg);
  TORCH_CHECK(d3ssl::region::layout_of(bg) == layout, "composite_vec: bg must have fg's layout");
  const c10::cuda::CUDAGuard guard(fg.device());
  at::Tensor out = at::empty_like(fg, d3ssl::region::memory_format(layout));
  const int64_t B = fg.size(0), image = fg.size(1) * fg.size(2) * fg.size(3);
  if (B == 0 || image == 0) return out;
  const auto bg_index_c = bg_index.contiguous();
  const auto shift_c = shift.contiguous();
  const auto rects_c = rects.contiguous();
  const auto erase_c = erase.contiguous();
  const auto offsets_c = offsets.contiguous();
  const int vecs = static_cast<int>(image / (16 / fg.element_size()));
  const dim3 grid(static_cast<unsigned>((vecs + kThreads * kVecs - 1) / (kThreads * kVecs)),
                  static_cast<unsigned>(B));
  auto stream = c10::cuda::getCurrentCUDAStream();
  D3SSL_DISPATCH_WORD(fg, "composite_vec", [&] {
    composite_vec_kernel<word_t><<<grid, kThreads, 0, stream>>>(
        static_cast<const uint4*>(fg.const_data_ptr()), static_cast<const uint4*>(bg.const_data_ptr()),
        static_cast<uint4*>(out.data_ptr()), bg_index_c.const_data_ptr<int64_t>(), bg.size(0),
        shift_c.const_data_ptr<int64_t>(), static_cast<int>(fg.size(1)), static_cast<int>(fg.size(2)),
        static_cast<int>(fg.size(3)), layout == d3ssl::region::Layout::NHWC, vecs, rects_c.const_data_ptr<float>(),
        erase_c.const_data_ptr<bool>(), offsets_c.const_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor region_erase_vec(const at::Tensor& images, const at::Tensor& rects, const at::Tensor& erase,
                            const at::Tensor& offsets, double fill) {
  d3ssl::region::check_images(images, "images");
  d3ssl::region::check_ops(images, rects, erase, offsets, "images");
  check_vectorisable(images, "region_erase_vec");
  const c10::cuda::CUDAGuard guard(images.device());
  const auto layout = d3ssl::region::layout_of(images);
  const auto format = d3ssl::region::memory_format(layout);
  const int64_t B = images.size(0), image = images.size(1) * images.size(2) * images.size(3);
  const int64_t per = 16 / images.element_size();
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
  m.def("composite_vec", &composite_vec, "composite with 16-byte vectors (experiment)");
}
