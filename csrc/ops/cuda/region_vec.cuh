// The vector kernels of region_erase and composite on CUDA: the same ops as the element kernels of
// region_erase.cu and composite.cu, with each thread moving 16-byte vectors (8 bf16 elements, 4
// float32, 16 uint8) instead of single elements. Used when `vector_kernels()` is on (region.h) and
// the tensors allow it (`vectorisable`: dense, an image's element count a multiple of the vector
// width, 16-byte-aligned storage; true of the Batch's views); the element kernels serve the rest.
//
// What differs from the element kernels:
//   - a block covers kThreads * kVecs vectors (4,096 bf16 elements instead of 1,024), so an image's
//     ops are staged through shared memory 4 times less often per element;
//   - region_erase out of place issues its loads before it stages the ops, so that their latency
//     overlaps the staging; in place it reads only the vectors it must merge, and writes only
//     vectors with an erased element;
//   - an element's pixel is stepped from its vector's first element instead of divided per element;
//   - composite reads the shifted foreground as the two aligned vectors around it and funnel-shifts
//     the bytes into place (an image's shift is the same for all of its elements).
#pragma once

#include <cstdint>
#include <cstring>

#include "ops/region.h"

namespace d3ssl {
namespace region {
namespace vec {

constexpr int kThreads = 256;
constexpr int kVecs = 2;  // vectors per thread

// Whether `t` (an image batch the kernels are about to read or write, dense in its layout) can be
// moved as 16-byte vectors: an image's element count a multiple of the vector width, the storage
// 16-byte aligned (then every image starts aligned), and the element index of a block's last
// vector within int range.
inline bool vectorisable(const at::Tensor& t) {
  const int64_t per = 16 / t.element_size();
  const int64_t image = t.size(1) * t.size(2) * t.size(3);
  TORCH_INTERNAL_ASSERT(t.is_contiguous(memory_format(layout_of(t))), "vectorisable: a dense tensor");
  return image % per == 0 && image + int64_t{kThreads} * kVecs * per < (int64_t{1} << 31) &&
         reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

// Pixels of the kPer elements of each of a thread's kVecs vectors (vector v0 + j * kThreads),
// stepped from each vector's first element (NHWC: channel, then x, then y; NCHW: x, then y,
// wrapping to row 0 at the next channel's plane).
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
// hole[j]: element i of vector j; an erase op sets it, a restore op clears it, the last op covering
// a pixel wins). Ops are staged through shared memory in chunks of kThreads as pixel spans clipped
// to the window [x_lo, x_hi) x [y_lo, y_hi). Every thread of the block must call it.
template <int kPer>
__device__ inline void replay_vectors(const float* __restrict__ rects, const bool* __restrict__ erase,
                                      int64_t r0, int64_t r1, int H, int W, int x_lo, int x_hi, int y_lo,
                                      int y_hi, const int (&px)[kVecs][kPer], const int (&py)[kVecs][kPer],
                                      unsigned (&hole)[kVecs]) {
  __shared__ int4 span[kThreads];
  __shared__ unsigned char flag[kThreads];
  for (int64_t c0 = r0; c0 < r1; c0 += kThreads) {
    const int n = static_cast<int>(r1 - c0 < kThreads ? r1 - c0 : kThreads);
    __syncthreads();  // the previous chunk is no longer read
    if (threadIdx.x < n) {
      const float* q = rects + 4 * (c0 + threadIdx.x);
      int64_t xa, xb, ya, yb;
      pixel_span(q[0], q[2], W, xa, xb);
      pixel_span(q[1], q[3], H, ya, yb);
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

// A vector of kPer copies of `fill`.
template <typename word_t>
__device__ inline uint4 fill_vector(word_t fill) {
  constexpr int kPer = 16 / sizeof(word_t);
  word_t w[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) w[i] = fill;
  uint4 r;
  memcpy(&r, w, 16);
  return r;
}

// `data` with the elements whose hole bit is set replaced by `fill`.
template <typename word_t>
__device__ inline uint4 merge_fill(uint4 data, unsigned hole, word_t fill) {
  constexpr int kPer = 16 / sizeof(word_t);
  word_t w[kPer];
  memcpy(w, &data, 16);
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    if (hole & (1u << i)) w[i] = fill;
  }
  uint4 r;
  memcpy(&r, w, 16);
  return r;
}

// region_erase. `in` and `out` are the same storage in place (hence no __restrict__ on them).
template <typename word_t>
__global__ void erase_kernel(const uint4* in, uint4* out, bool inplace, word_t fill, int C, int H, int W,
                             bool nhwc, int vecs_per_image, const float* __restrict__ rects,
                             const bool* __restrict__ erase, const int64_t* __restrict__ offsets,
                             int64_t num_rects) {
  constexpr int kPer = 16 / sizeof(word_t);  // elements per vector
  static_assert(kPer <= 16, "at most 16 elements per vector (the hole bits are 32 wide)");
  constexpr unsigned kAll = (1u << kPer) - 1u;
  const int b = blockIdx.y;
  const int v0 = blockIdx.x * kThreads * kVecs + threadIdx.x;
  const int64_t at0 = static_cast<int64_t>(b) * vecs_per_image;

  // Out of place, the loads first: nothing below depends on them until the selection.
  uint4 data[kVecs];
  if (!inplace) {
#pragma unroll
    for (int j = 0; j < kVecs; ++j) {
      const int v = v0 + j * kThreads;
      data[j] = v < vecs_per_image ? in[at0 + v] : make_uint4(0, 0, 0, 0);
    }
  }
  int px[kVecs][kPer], py[kVecs][kPer];
  vector_pixels<kPer>(v0, C, H, W, nhwc, px, py);
  unsigned hole[kVecs];
#pragma unroll
  for (int j = 0; j < kVecs; ++j) hole[j] = 0u;
  int64_t r0, r1;
  op_range(offsets, b, num_rects, r0, r1);
  replay_vectors<kPer>(rects, erase, r0, r1, H, W, 0, W, 0, H, px, py, hole);

#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    const int v = v0 + j * kThreads;
    if (v >= vecs_per_image) continue;
    if (inplace) {
      if (hole[j] == 0u) continue;  // nothing erased: leave the vector as it is
      out[at0 + v] = hole[j] == kAll ? fill_vector(fill) : merge_fill(in[at0 + v], hole[j], fill);
    } else {
      out[at0 + v] = merge_fill(data[j], hole[j], fill);
    }
  }
}

// The 16 bytes starting `bytes` (0..15) bytes into the 32 bytes lo:hi (little-endian).
__device__ inline uint4 bytes_from(uint4 lo, uint4 hi, int bytes) {
  const unsigned u[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
  const int r = (bytes & 3) * 8;
  unsigned o[4];
  switch (bytes >> 2) {  // constant register indices in every case
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

// composite: out = background where the mask's hole bit is set, else the foreground shifted by the
// image's shift (see composite.cu; the mask starts all background and is clipped to where the
// shifted foreground exists).
template <typename word_t>
__global__ void composite_kernel(const uint4* __restrict__ fg, const uint4* __restrict__ bg,
                                 uint4* __restrict__ out, const int64_t* __restrict__ bg_index, int64_t num_bg,
                                 const int64_t* __restrict__ shift, int C, int H, int W, bool nhwc,
                                 int vecs_per_image, const float* __restrict__ rects,
                                 const bool* __restrict__ erase, const int64_t* __restrict__ offsets,
                                 int64_t num_rects) {
  constexpr int kPer = 16 / sizeof(word_t);
  constexpr unsigned kAll = (1u << kPer) - 1u;
  const int b = blockIdx.y;
  const int v0 = blockIdx.x * kThreads * kVecs + threadIdx.x;
  const CompositeImage geo = composite_image(bg_index, num_bg, shift, b, H, W);
  const int moved = (geo.dy * W + geo.dx) * (nhwc ? C : 1);  // element distance from source to output

  int px[kVecs][kPer], py[kVecs][kPer];
  vector_pixels<kPer>(v0, C, H, W, nhwc, px, py);
  unsigned hole[kVecs];
#pragma unroll
  for (int j = 0; j < kVecs; ++j) hole[j] = kAll;
  int64_t r0, r1;
  op_range(offsets, b, num_rects, r0, r1);
  replay_vectors<kPer>(rects, erase, r0, r1, H, W, geo.x_lo, geo.x_hi, geo.y_lo, geo.y_hi, px, py, hole);

  const int64_t at0 = static_cast<int64_t>(b) * vecs_per_image;
  const int64_t bg0 = geo.source * vecs_per_image;
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
      // Foreground elements read fg at (element - moved), inside this image; of the two aligned
      // vectors around it, one may lie past the image only where no foreground element reads it.
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

// The launch grid: x over an image's vectors, y over the images.
inline dim3 grid(int64_t B, int vecs_per_image) {
  return dim3(static_cast<unsigned>((vecs_per_image + kThreads * kVecs - 1) / (kThreads * kVecs)),
              static_cast<unsigned>(B));
}

}  // namespace vec
}  // namespace region
}  // namespace d3ssl
