// Shared by the region_erase and composite kernels (CPU and CUDA): argument checks, the pixel rule,
// the memory layouts the kernels read, and the fill value as raw bits.
//
// Both ops only select whole elements (fill or input for region_erase, foreground or background for
// composite), never compute with them, so the kernels move elements as unsigned words of the
// element's size: one kernel per element size serves float32, float16, bfloat16, uint8, ...
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

namespace d3ssl {
namespace region {

// Memory layouts the kernels index directly. Any other strides are made NCHW-contiguous first.
enum class Layout { NCHW, NHWC };

inline Layout layout_of(const at::Tensor& t) {
  // A tensor can be both (C == 1, or H == W == 1); then both index formulas address the same
  // elements, and NCHW is taken.
  if (!t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast)) return Layout::NHWC;
  return Layout::NCHW;
}

inline at::MemoryFormat memory_format(Layout layout) {
  return layout == Layout::NHWC ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// Pixels [lo, hi) of an axis of n pixels that the interval [a, b) covers: pixel i is covered when
// its centre i + 0.5 lies in [a, b), i.e. i >= ceil(a - 0.5) and i < ceil(b - 0.5). Computed in
// double, where a - 0.5 is exact for every float32 a, so the rule holds to the last bit.
// NaN bounds cover nothing.
C10_HOST_DEVICE inline void pixel_span(float a, float b, int64_t n, int64_t& lo, int64_t& hi) {
  const double da = ::ceil(static_cast<double>(a) - 0.5);
  const double db = ::ceil(static_cast<double>(b) - 0.5);
  if (!(da == da) || !(db == db)) {  // NaN
    lo = hi = 0;
    return;
  }
  const double dn = static_cast<double>(n);
  lo = static_cast<int64_t>(da < 0.0 ? 0.0 : (da > dn ? dn : da));
  hi = static_cast<int64_t>(db < 0.0 ? 0.0 : (db > dn ? dn : db));
  if (hi < lo) hi = lo;
}

// An image tensor the kernels accept: [N,C,H,W], an element type they can copy, not too large
// for 32-bit in-image indexing.
inline void check_images(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, name, " must be a 4-D tensor [B,C,H,W], got shape ", t.sizes());
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble ||
                  s == at::kByte,
              name, " must be float32, float16, bfloat16, float64 or uint8, got ", s);
  TORCH_CHECK(t.size(1) * t.size(2) * t.size(3) < (int64_t(1) << 31), name,
              ": one image must have fewer than 2^31 elements, got shape ", t.sizes());
}

// The per-image ordered operation lists in CSR form.
inline void check_ops(const at::Tensor& images, const at::Tensor& rects, const at::Tensor& erase,
                      const at::Tensor& offsets, const char* images_name) {
  const int64_t batch = images.size(0);
  TORCH_CHECK(rects.dim() == 2 && rects.size(1) == 4,
              "rects must be [R,4] (x1,y1,x2,y2 in pixels), got shape ", rects.sizes());
  TORCH_CHECK(rects.scalar_type() == at::kFloat, "rects must be float32, got ", rects.scalar_type());
  TORCH_CHECK(erase.dim() == 1 && erase.size(0) == rects.size(0),
              "erase must be [R] with R = rects.size(0) = ", rects.size(0), ", got shape ",
              erase.sizes());
  TORCH_CHECK(erase.scalar_type() == at::kBool, "erase must be bool, got ", erase.scalar_type());
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == batch + 1,
              "offsets must be [B+1] with B = ", images_name, ".size(0) = ", batch,
              ", got shape ", offsets.sizes());
  TORCH_CHECK(offsets.scalar_type() == at::kLong, "offsets must be int64, got ",
              offsets.scalar_type());
  for (const auto* p : {&rects, &erase, &offsets}) {
    TORCH_CHECK(p->device() == images.device(), "rects, erase and offsets must be on ",
                images_name, "'s device (", images.device(), "), got ", p->device());
  }
}

// Shapes, dtypes and devices of composite's arguments (values are checked by each backend).
inline void check_composite(const at::Tensor& fg, const at::Tensor& bg, const at::Tensor& bg_index,
                            const at::Tensor& shift, const at::Tensor& rects,
                            const at::Tensor& erase, const at::Tensor& offsets) {
  region::check_images(fg, "fg");
  region::check_images(bg, "bg");
  TORCH_CHECK(bg.scalar_type() == fg.scalar_type(), "bg must have fg's dtype ", fg.scalar_type(),
              ", got ", bg.scalar_type());
  TORCH_CHECK(bg.device() == fg.device(), "bg must be on fg's device ", fg.device(), ", got ",
              bg.device());
  TORCH_CHECK(bg.size(1) == fg.size(1) && bg.size(2) == fg.size(2) && bg.size(3) == fg.size(3),
              "bg must be [N,C,H,W] with fg's C,H,W = ", fg.sizes().slice(1), ", got shape ",
              bg.sizes());
  const int64_t B = fg.size(0);
  TORCH_CHECK(bg_index.dim() == 1 && bg_index.size(0) == B,
              "bg_index must be [B] with B = fg.size(0) = ", B, ", got shape ", bg_index.sizes());
  TORCH_CHECK(bg_index.scalar_type() == at::kLong, "bg_index must be int64, got ",
              bg_index.scalar_type());
  TORCH_CHECK(shift.dim() == 2 && shift.size(0) == B && shift.size(1) == 2,
              "shift must be [B,2] (dx, dy pixels) with B = fg.size(0) = ", B, ", got shape ",
              shift.sizes());
  TORCH_CHECK(shift.scalar_type() == at::kLong, "shift must be int64, got ", shift.scalar_type());
  for (const auto* p : {&bg_index, &shift}) {
    TORCH_CHECK(p->device() == fg.device(), "bg_index and shift must be on fg's device ",
                fg.device(), ", got ", p->device());
  }
  check_ops(fg, rects, erase, offsets, "fg");
}

// `out` of an out variant: `like`'s shape, dtype and device, dense in `layout` (the memory format
// the kernels write), no internal overlap.
inline void check_out(const at::Tensor& out, const at::Tensor& like, Layout layout,
                      const char* like_name) {
  TORCH_CHECK(out.sizes() == like.sizes(), "out must have ", like_name, "'s shape ", like.sizes(),
              ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == like.scalar_type(), "out must have ", like_name, "'s dtype ",
              like.scalar_type(), ", got ", out.scalar_type());
  TORCH_CHECK(out.device() == like.device(), "out must be on ", like_name, "'s device ",
              like.device(), ", got ", out.device());
  TORCH_CHECK(out.is_contiguous(memory_format(layout)), "out must be dense in ", like_name,
              "'s memory format (", layout == Layout::NHWC ? "channels_last" : "contiguous",
              "), e.g. torch.empty_like(", like_name, "); got strides ", out.strides());
}

// Whether `out` is `in` itself (the in-place case); any other sharing of memory is an error,
// because the kernels read `in` while they write `out`.
inline bool out_is_input(const at::Tensor& out, const at::Tensor& in, const char* in_name) {
  const auto status = at::get_overlap_status(out, in);
  TORCH_CHECK(status == at::MemOverlapStatus::No || status == at::MemOverlapStatus::Full,
              "out must be ", in_name, " itself or share no memory with it");
  return status == at::MemOverlapStatus::Full;
}

// composite's `out`: each output image is assembled from another image of bg, so out must share
// no memory with fg or bg (given as the kernels read them).
inline void check_out_apart(const at::Tensor& out, const at::Tensor& fg, const at::Tensor& bg) {
  for (const auto* in : {&fg, &bg}) {
    TORCH_CHECK(at::get_overlap_status(out, *in) == at::MemOverlapStatus::No,
                "out must share no memory with fg or bg");
  }
}

// Values of offsets (host memory only): 0 = offsets[0] <= ... <= offsets[B] = R.
inline void check_offsets_values(const int64_t* off, int64_t batch, int64_t num_rects) {
  TORCH_CHECK(off[0] == 0, "offsets[0] must be 0, got ", off[0]);
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(off[b] <= off[b + 1], "offsets must be non-decreasing, got offsets[", b,
                "] = ", off[b], " > offsets[", b + 1, "] = ", off[b + 1]);
  }
  TORCH_CHECK(off[batch] == num_rects, "offsets[B] must equal the number of rects ", num_rects,
              ", got ", off[batch]);
}

// Whether the CUDA region_erase and composite use their vector kernels (cuda/region_vec.cuh) where
// the tensors allow it, instead of the element kernels. Off unless D3SSL_VECTOR_KERNELS=1 is set
// in the environment (read once, when the setting is first used); `_set_vector_kernels`
// (d3ssl.ops.region.vector_kernels) switches it. Defined in d3ssl.cpp.
bool vector_kernels();
bool set_vector_kernels(bool on);  // returns the previous setting

// Runs the lambda with word_t = the unsigned integer type of the element size of `t`.
#define D3SSL_DISPATCH_WORD(t, NAME, ...)                                                      \
  [&] {                                                                                        \
    switch ((t).element_size()) {                                                              \
      case 1: { using word_t = uint8_t; return __VA_ARGS__(); }                                \
      case 2: { using word_t = uint16_t; return __VA_ARGS__(); }                               \
      case 4: { using word_t = uint32_t; return __VA_ARGS__(); }                               \
      case 8: { using word_t = uint64_t; return __VA_ARGS__(); }                               \
      default: TORCH_CHECK(false, NAME, ": unsupported element size ", (t).element_size());    \
    }                                                                                          \
  }()

// The fill value converted to the images' dtype, as raw bits.
template <typename word_t>
word_t fill_bits(double fill, at::ScalarType dtype) {
  word_t bits = 0;
  if (dtype == at::kByte) {
    TORCH_CHECK(fill >= 0.0 && fill <= 255.0 && std::floor(fill) == fill,
                "fill must be an integer in [0, 255] for uint8 images, got ", fill);
  }
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, dtype, "fill_bits", [&] {
    TORCH_CHECK(sizeof(scalar_t) == sizeof(word_t), "fill_bits: element size mismatch");
    const scalar_t v = static_cast<scalar_t>(fill);
    std::memcpy(&bits, &v, sizeof(scalar_t) < sizeof(word_t) ? sizeof(scalar_t) : sizeof(word_t));
  });
  return bits;
}

// One image's ops on the host, cut into bands of rows that every op covers alike: op r covers the
// pixels of its rects[r] (the pixel rule above), clipped to a window [x_lo,x_hi) x [y_lo,y_hi), and
// the band boundaries are the rows where an op starts or ends (at most H + 1 of them). All rows of a
// band therefore end alike: a pixel is a hole (erased / background shows) when the last op covering
// it has erase[r] set, is kept when it has not, and has the caller's initial state when no op covers
// it. Each band lists the ops covering it, in order, so building a band's mask costs the widths of
// those ops, never a pass over every op or over the image.
struct PixelSpan {
  int64_t xa, xb, ya, yb;
  bool hole;
  int64_t band_begin, band_end;  // the bands [band_begin, band_end) the span covers
};

class Bands {
 public:
  void build(const float* rects, const bool* erase, int64_t r0, int64_t r1, int64_t H, int64_t W,
             int64_t x_lo, int64_t x_hi, int64_t y_lo, int64_t y_hi) {
    spans_.clear();
    ys_.assign({0, H});
    for (int64_t r = r0; r < r1; ++r) {
      const float* q = rects + 4 * r;
      PixelSpan s;
      pixel_span(q[0], q[2], W, s.xa, s.xb);
      pixel_span(q[1], q[3], H, s.ya, s.yb);
      s.xa = std::max(s.xa, x_lo);
      s.xb = std::min(s.xb, x_hi);
      s.ya = std::max(s.ya, y_lo);
      s.yb = std::min(s.yb, y_hi);
      if (s.xa >= s.xb || s.ya >= s.yb) continue;
      s.hole = erase[r];
      spans_.push_back(s);
      ys_.push_back(s.ya);
      ys_.push_back(s.yb);
    }
    std::sort(ys_.begin(), ys_.end());
    ys_.erase(std::unique(ys_.begin(), ys_.end()), ys_.end());
    // The ops covering each band, in op order (CSR): op s covers bands [band of ya, band of yb).
    const int64_t bands = size();
    const auto band_of = [&](int64_t y) {
      return static_cast<int64_t>(std::lower_bound(ys_.begin(), ys_.end(), y) - ys_.begin());
    };
    first_.assign(static_cast<size_t>(bands + 1), 0);
    for (auto& s : spans_) {
      s.band_begin = band_of(s.ya);
      s.band_end = band_of(s.yb);
      for (int64_t band = s.band_begin; band < s.band_end; ++band) ++first_[band + 1];
    }
    for (int64_t band = 0; band < bands; ++band) first_[band + 1] += first_[band];
    covering_.resize(static_cast<size_t>(first_[bands]));
    next_.assign(first_.begin(), first_.end() - 1);
    for (size_t i = 0; i < spans_.size(); ++i) {
      for (int64_t band = spans_[i].band_begin; band < spans_[i].band_end; ++band) {
        covering_[next_[band]++] = static_cast<int32_t>(i);
      }
    }
  }

  int64_t size() const { return static_cast<int64_t>(ys_.size()) - 1; }
  int64_t first_row(int64_t band) const { return ys_[band]; }
  int64_t end_row(int64_t band) const { return ys_[band + 1]; }

  // The hole mask of the rows of `band` as `row` words, one per element of a row with `cw`
  // elements per pixel (cw = C for channels_last, 1 for a plane of NCHW): all ones for a hole, zero
  // for a kept element, `init_hole` where no op reaches. Returns false when no op covers the band
  // (then every word would be `init_hole`, and `words` is left alone).
  template <typename word_t>
  bool hole_words(int64_t band, int64_t cw, int64_t row, bool init_hole, word_t* words) const {
    const int64_t begin = first_[band], end = first_[band + 1];
    if (begin == end) return false;
    const word_t on = static_cast<word_t>(~word_t(0)), off = word_t(0);
    std::fill(words, words + row, init_hole ? on : off);
    for (int64_t i = begin; i < end; ++i) {
      const PixelSpan& s = spans_[covering_[i]];
      std::fill(words + s.xa * cw, words + s.xb * cw, s.hole ? on : off);
    }
    return true;
  }

 private:
  std::vector<PixelSpan> spans_;
  std::vector<int64_t> ys_;         // band boundaries (rows)
  std::vector<int64_t> first_;      // CSR offsets of covering_ per band
  std::vector<int32_t> covering_;   // indices into spans_, in op order, per band
  std::vector<int64_t> next_;       // build's fill cursor per band (kept to reuse its memory)
};

#ifdef __CUDACC__
// --- device side, shared by the CUDA kernels ---
//
// A block covers kThreads * kPerThread consecutive elements of one image (blockIdx.y). The image's
// ops are staged through shared memory in chunks of kThreads as pixel spans, and every element
// keeps its state in a register while the chunks stream by: the last op covering it wins.
constexpr int kThreads = 256;
constexpr int kPerThread = 4;

struct TileState {
  int x[kPerThread];
  int y[kPerThread];
  unsigned char hole[kPerThread];  // 1 = erased (region_erase) / background shows (composite)
};

// floor(n / d) for 0 <= n < 2^31, d > 0, through a double reciprocal (a few instructions instead
// of an integer division): (n + 0.5) * (1/d) is within 2^-52 * 2^31 / d = 2^-21 / d of
// (n + 0.5) / d, which lies at least 0.5 / d away from an integer, so truncating it is exact.
__device__ inline int div_floor(int n, double inv_d) {
  return static_cast<int>((static_cast<double>(n) + 0.5) * inv_d);
}

// Image geometry shared by a kernel's threads.
struct Geometry {
  int C, H, W;
  bool nhwc;
  double inv_c, inv_w, inv_plane;  // 1/C, 1/W, 1/(H*W)
};

inline Geometry make_geometry(const at::Tensor& t, bool nhwc) {
  const int C = static_cast<int>(t.size(1)), H = static_cast<int>(t.size(2));
  const int W = static_cast<int>(t.size(3));
  const double plane = static_cast<double>(H) * W;
  return Geometry{C, H, W, nhwc, 1.0 / (C > 0 ? C : 1), 1.0 / (W > 0 ? W : 1),
                  1.0 / (plane > 0 ? plane : 1)};
}

// Pixel (x, y) of element e of an image (e < C*H*W): NCHW e = (c*H + y)*W + x,
// NHWC e = (y*W + x)*C + c.
__device__ inline void element_pixel(int e, const Geometry& g, int& x, int& y) {
  const int pixel = g.nhwc ? div_floor(e, g.inv_c) : e - div_floor(e, g.inv_plane) * (g.H * g.W);
  y = div_floor(pixel, g.inv_w);
  x = pixel - y * g.W;
}

// Replays ops [r0, r1) of the block's image onto the tile; spans are clipped to the window
// [x_lo,x_hi) x [y_lo,y_hi). Ops that miss the tile's rows [tile_y0, tile_y1] (or are empty) are
// dropped while staging, keeping the order of the rest, so each element only tests the few ops
// near it. Must be reached by every thread of the block (it synchronises).
__device__ inline void replay_tile(TileState& s, const float* __restrict__ rects,
                                   const bool* __restrict__ erase, int64_t r0, int64_t r1, int H,
                                   int W, int x_lo, int x_hi, int y_lo, int y_hi, int tile_y0,
                                   int tile_y1) {
  __shared__ int4 span[kThreads];
  __shared__ unsigned char flag[kThreads];
  __shared__ int warp_kept[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t c0 = r0; c0 < r1; c0 += kThreads) {
    const int n = static_cast<int>(r1 - c0 < kThreads ? r1 - c0 : kThreads);
    int4 p = make_int4(0, 0, 0, 0);
    bool keep = false;
    if (threadIdx.x < n) {
      const float* q = rects + 4 * (c0 + threadIdx.x);
      int64_t xa, xb, ya, yb;
      pixel_span(q[0], q[2], W, xa, xb);
      pixel_span(q[1], q[3], H, ya, yb);
      p = make_int4(max(static_cast<int>(xa), x_lo), min(static_cast<int>(xb), x_hi),
                    max(static_cast<int>(ya), y_lo), min(static_cast<int>(yb), y_hi));
      keep = p.x < p.y && p.z < p.w && p.z <= tile_y1 && p.w > tile_y0;
    }
    // Ordered compaction of the kept ops: rank = kept ops before this one in the chunk.
    const unsigned ballot = __ballot_sync(0xffffffffu, keep);
    __syncthreads();  // the previous chunk is no longer read
    if (lane == 0) warp_kept[warp] = __popc(ballot);
    __syncthreads();
    int rank = __popc(ballot & ((1u << lane) - 1u)), kept = 0;
    for (int w = 0; w < kThreads / 32; ++w) {
      rank += w < warp ? warp_kept[w] : 0;
      kept += warp_kept[w];
    }
    if (keep) {
      span[rank] = p;
      flag[rank] = erase[c0 + threadIdx.x] ? 1 : 0;
    }
    __syncthreads();
    for (int r = 0; r < kept; ++r) {
      const int4 o = span[r];
      const unsigned char f = flag[r];
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        if (s.x[i] >= o.x && s.x[i] < o.y && s.y[i] >= o.z && s.y[i] < o.w) s.hole[i] = f;
      }
    }
  }
}

// Rows [y0, y1] that elements [e0, e1] of an image lie on (all rows when an NCHW tile spans
// two channel planes).
__device__ inline void tile_rows(int e0, int e1, const Geometry& g, int& y0, int& y1) {
  int xa, xb;
  element_pixel(e0, g, xa, y0);
  element_pixel(e1, g, xb, y1);
  if (!g.nhwc && div_floor(e0, g.inv_plane) != div_floor(e1, g.inv_plane)) {
    y0 = 0;
    y1 = g.H - 1;
  }
}

// composite's per-image geometry: the background image it reads (bg_index[b]; out of range trips a
// device assertion, as torch's own indexing kernels do), and the window [x_lo,x_hi) x [y_lo,y_hi) of
// output pixels whose source pixel (x - dx, y - dy) lies inside the image. A shift of a whole image
// or more leaves no foreground; clamping it keeps the sums in int.
struct CompositeImage {
  int64_t source;
  int dx, dy, x_lo, x_hi, y_lo, y_hi;
};

__device__ inline CompositeImage composite_image(const int64_t* __restrict__ bg_index, int64_t num_bg,
                                                 const int64_t* __restrict__ shift, int b, int H, int W) {
  CompositeImage c;
  c.source = bg_index[b];
  CUDA_KERNEL_ASSERT(c.source >= 0 && c.source < num_bg && "composite: bg_index out of range");
  c.source = c.source < 0 ? 0 : (c.source >= num_bg ? num_bg - 1 : c.source);
  const int64_t sx = shift[2 * b], sy = shift[2 * b + 1];
  c.dx = static_cast<int>(sx < -W ? -W : (sx > W ? W : sx));
  c.dy = static_cast<int>(sy < -H ? -H : (sy > H ? H : sy));
  c.x_lo = min(max(c.dx, 0), W);
  c.x_hi = max(min(W + c.dx, W), c.x_lo);
  c.y_lo = min(max(c.dy, 0), H);
  c.y_hi = max(min(H + c.dy, H), c.y_lo);
  return c;
}

// Reads offsets[b], offsets[b+1]; bad values (only possible from a caller bypassing the checks
// of the samplers) trip a device assertion, as torch's own indexing kernels do.
__device__ inline void op_range(const int64_t* __restrict__ offsets, int b, int64_t num_rects,
                                int64_t& r0, int64_t& r1) {
  r0 = offsets[b];
  r1 = offsets[b + 1];
  CUDA_KERNEL_ASSERT(r0 >= 0 && r0 <= r1 && r1 <= num_rects && "region op offsets out of range");
  r0 = r0 < 0 ? 0 : (r0 > num_rects ? num_rects : r0);
  r1 = r1 < r0 ? r0 : (r1 > num_rects ? num_rects : r1);
}
#endif  // __CUDACC__

}  // namespace region
}  // namespace d3ssl
