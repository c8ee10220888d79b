// The d3ssl operator library: every schema is declared here, once. Kernels are registered per
// backend in csrc/ops/{cpu,cuda}/, autograd and fake (meta) kernels in Python (d3ssl/ops/).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "ops/cpu/region_cpu.h"

#ifndef D3SSL_TORCH_VERSION
#define D3SSL_TORCH_VERSION "unknown"
#endif

namespace d3ssl {

// The torch version this library was compiled against; d3ssl/__init__.py compares it with the
// running torch so a stale build is reported instead of crashing later.
static std::string build_torch_version() { return D3SSL_TORCH_VERSION; }

// Whether at::parallel_for, as compiled into this library, spreads the CPU kernels over torch's
// intra-op threads: always with torch's own thread pool, only when compiled with OpenMP where torch's
// threads are OpenMP's (without it the parallel region is compiled out and the kernels run on the
// calling thread).
static bool build_intra_op_parallel() {
#ifdef INTRA_OP_PARALLEL
  return true;
#else
  return false;
#endif
}

// How many threads a CPU kernel's parallel region would use now: with OpenMP, the runtime this
// library is linked to (it must be torch's, or torch.set_num_threads would not reach it).
static int64_t intra_op_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#elif defined(INTRA_OP_PARALLEL)
  return at::get_num_threads();
#else
  return 1;
#endif
}

namespace region {

// The CUDA region kernels' choice (region.h): read from D3SSL_VECTOR_KERNELS once, when the
// setting is first used; "1" turns the vector kernels on.
static std::atomic<bool>& vector_kernels_flag() {
  static std::atomic<bool> on([] {
    const char* env = std::getenv("D3SSL_VECTOR_KERNELS");
    return env != nullptr && std::strcmp(env, "1") == 0;
  }());
  return on;
}

bool vector_kernels() { return vector_kernels_flag().load(std::memory_order_relaxed); }

bool set_vector_kernels(bool on) { return vector_kernels_flag().exchange(on); }

}  // namespace region

TORCH_LIBRARY(d3ssl, m) {
  m.def("_build_torch_version() -> str", &build_torch_version);
  m.def("_build_intra_op_parallel() -> bool", &build_intra_op_parallel);
  m.def("_intra_op_threads() -> int", &intra_op_threads);
  // [blocks, bytes, bound in bytes] of the CPU region ops' cache of freed large outputs
  // (csrc/ops/cpu/region_cpu.h).
  m.def("_output_cache_stats() -> int[]", &region::output_cache_stats);
  // Switches the CUDA region_erase / composite between their vector and element kernels; returns
  // the previous setting (d3ssl.ops.region.vector_kernels).
  m.def("_set_vector_kernels(bool on) -> bool", &region::set_vector_kernels);
  m.def("_vector_kernels() -> bool", &region::vector_kernels);

  // RoIAlign with torchvision's semantics. rois: [K,5] (batch index, x1, y1, x2, y2) in input pixels
  // before spatial_scale. Output [K, C, pooled_height, pooled_width] in the input's memory format.
  // Sizes are SymInt so that the op traces with dynamic shapes under torch.compile.
  m.def(
      "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
      "int sampling_ratio, bool aligned) -> Tensor");
  m.def(
      "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
      "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, "
      "int sampling_ratio, bool aligned, bool channels_last) -> Tensor");

  // Region erase (PRC + PRM in one pass). Image b owns rects[offsets[b]:offsets[b+1]], applied in
  // order: a rect with erase=true marks its pixels erased, erase=false restores them. A pixel is
  // covered by a rect when its centre (x+0.5, y+0.5) lies in [x1,x2) x [y1,y2). Pixels that end up
  // erased take `fill`. rects: float32 [R,4] (x1,y1,x2,y2) pixels; erase: bool [R]; offsets: int64 [B+1].
  m.def("region_erase(Tensor images, Tensor rects, Tensor erase, Tensor offsets, float fill) -> Tensor");
  // In-place variant. It returns nothing (the Python wrapper returns `images`): torch can only
  // functionalise (torch.compile, opcheck) custom mutating ops whose outputs carry no alias.
  m.def("region_erase_(Tensor(a!) images, Tensor rects, Tensor erase, Tensor offsets, float fill) -> ()");
  // Out variant: writes the result into `out` (images' shape, dtype, device and memory format;
  // `out` may be `images` itself), so that a caller can reuse one output buffer across calls.
  m.def(
      "region_erase_out(Tensor images, Tensor rects, Tensor erase, Tensor offsets, float fill, "
      "Tensor(a!) out) -> ()");

  // De-positioning composite: out[i] = fg[i] shifted by shift[i] where the mask is set, else
  // bg[bg_index[i]]. The mask of image i starts empty and replays rects[offsets[i]:offsets[i+1]] in
  // order (erase=false sets, erase=true clears; same pixel rule as region_erase): the shifted boxes
  // first, then the PRC operations cut into them. shift: int64 [B,2] (dx, dy) pixels.
  m.def(
      "composite(Tensor fg, Tensor bg, Tensor bg_index, Tensor shift, Tensor rects, Tensor erase, "
      "Tensor offsets) -> Tensor");
  // Out variant of composite: `out` has fg's shape, dtype, device and memory format and shares no
  // memory with fg or bg.
  m.def(
      "composite_out(Tensor fg, Tensor bg, Tensor bg_index, Tensor shift, Tensor rects, Tensor erase, "
      "Tensor offsets, Tensor(a!) out) -> ()");

  // The samplers' geometry after the draw (csrc/ops/samplers.h; the Python samplers draw the
  // float64 uniforms u and call these). Boxes are float32 (x1,y1,x2,y2) pixels; size is the image's
  // (H, W), or empty where clipping is optional and not wanted.
  // PRC: boxes [B,K,4], valid [B,K], u [B,K,3] (target, x, y), K <= 32; target fraction
  // lo + width * u. Returns rects float32 [B,2K,4] (slot 2s restores the proposal visited at turn s,
  // slot 2s+1 is its cutout; inactive slots (0,0,0,0)) and the visiting order int64 [B,K].
  m.def(
      "prc_plan(Tensor boxes, Tensor valid, Tensor u, int[] size, float lo, float width, float max_cover) -> "
      "(Tensor, Tensor)");
  // PRM: boxes [...,4], valid [...], u [...,4] (area, ratio, side, position), size required. Returns
  // the mask rectangles float32 [...,4] and the sides int64 [...].
  m.def(
      "prm_plan(Tensor boxes, Tensor valid, Tensor u, int[] size, float area_lo, float area_width, "
      "float ratio_lo, float ratio_width) -> (Tensor, Tensor)");
  // Box jitter: boxes [...,4], valid [...], u [...,5] (apply, cx, cy, w, h). Clipped to the box
  // itself (RBJ) when size is empty, else to the image (the baseline's jitter). Returns the boxes
  // float32 [...,4] and which were jittered, bool [...].
  m.def(
      "jitter_plan(Tensor boxes, Tensor valid, Tensor u, int[] size, float p, float shift_lo, "
      "float shift_width, float scale_lo, float scale_width) -> (Tensor, Tensor)");
  // De-positioning shift: boxes [B,K,4], valid [B,K], u [B,2], size required. Returns int64 [B,2].
  m.def("shift_plan(Tensor boxes, Tensor valid, Tensor u, int[] size) -> Tensor");
}

}  // namespace d3ssl
