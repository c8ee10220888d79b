// PRC planning (proposal-based random cutout; README, "The method"): the sequential part of the sampler,
// one image at a time, shared by the CPU and CUDA kernels (through samplers.h, which sorts the
// proposals and calls plan_image).
//
// Proposals are visited in the order given (largest first). At turn s the
// exact fraction c of proposal s already erased by the operations of turns < s is computed; if
// c > max_cover the proposal is restored first (c = 0); if the target a = lo + width * u0 exceeds c,
// a rectangle of the proposal's aspect ratio and (a - c) of its pixels, rounded down to whole
// pixels, is erased at an integer position drawn from u1, u2. Turn s writes slot 2s (the restore,
// erase = false) and slot 2s + 1 (the cutout, erase = true); inactive slots stay (0, 0, 0, 0).
//
// Everything is float64 and evaluated in the same order as the sampler's PyTorch reference
// (d3ssl.augment.samplers.prc_rects_reference), one rounding per operation (no fused multiply-add
// on the GPU), so both give bit-identical rectangles. The erased area is a sum of products of whole
// pixel counts, exact in float64 in any order.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace d3ssl {
namespace prc {

// Most proposals per image the kernels plan (their scratch arrays are sized for it).
constexpr int kMaxBoxes = 32;
constexpr int kMaxEdges = 4 * kMaxBoxes + 2;  // 2 per op over up to 2K ops, plus the proposal's 2

// The cell edges of erased_fraction. The kernels keep it (and the sampler's arrays, samplers.h) in a
// buffer the caller provides rather than on the stack: on a GPU a kernel's stack frame is reserved
// for every thread the device could hold at once, several KiB each.
struct Cells {
  double ex[kMaxEdges], ey[kMaxEdges];
};

// a * b and a + b rounded once each: compilers may otherwise fuse a * b + c into one rounding (nvcc
// always, host compilers where the target has FMA instructions). On the host a volatile result
// forces the product to be rounded to double before it is used.
C10_HOST_DEVICE inline double mul(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  volatile double r = a * b;
  return r;
#endif
}

C10_HOST_DEVICE inline double add(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dadd_rn(a, b);
#else
  volatile double r = a + b;
  return r;
#endif
}

C10_HOST_DEVICE inline double clamp(double v, double lo, double hi) { return v < lo ? lo : (v > hi ? hi : v); }

// The cell edges along one axis: the span [lo, hi] and every op's interval [a, b) clamped to it,
// sorted (insertion sort: at most kMaxEdges values). Returns how many.
C10_HOST_DEVICE inline int cell_edges(double lo, double hi, const double* rects, int m, int axis, double* e) {
  int n = 0;
  e[n++] = lo;
  e[n++] = hi;
  for (int j = 0; j < m; ++j) {
    e[n++] = clamp(rects[4 * j + axis], lo, hi);
    e[n++] = clamp(rects[4 * j + axis + 2], lo, hi);
  }
  for (int i = 1; i < n; ++i) {
    const double v = e[i];
    int j = i - 1;
    while (j >= 0 && e[j] > v) {
      e[j + 1] = e[j];
      --j;
    }
    e[j + 1] = v;
  }
  return n;
}

// Exact fraction of the pixels of `box` (x0, y0, x1, y1 pixel span) that end erased after the
// first m PRC ops (op j restores when j is even, erases when odd), replayed in order. The ops'
// edges cut the span into cells whose pixels share their state under every op; a cell's state is
// that of the last op covering its corner.
C10_HOST_DEVICE inline double erased_fraction(const double* box, const double* rects, int m, Cells* cells) {
  if (m == 0) return 0.0;
  double* ex = cells->ex;
  double* ey = cells->ey;
  const int nx = cell_edges(box[0], box[2], rects, m, 0, ex);
  const int ny = cell_edges(box[1], box[3], rects, m, 1, ey);
  double erased = 0.0;
  for (int i = 0; i + 1 < nx; ++i) {
    const double x = ex[i], wx = ex[i + 1] - ex[i];
    if (wx == 0.0) continue;
    for (int k = 0; k + 1 < ny; ++k) {
      const double y = ey[k], wy = ey[k + 1] - ey[k];
      if (wy == 0.0) continue;
      for (int j = m - 1; j >= 0; --j) {
        const double* r = rects + 4 * j;
        if (r[0] <= x && x < r[2] && r[1] <= y && y < r[3]) {
          if (j & 1) erased = add(erased, mul(wx, wy));
          break;
        }
      }
    }
  }
  const double area = mul(box[2] - box[0], box[3] - box[1]);
  return area > 0.0 ? erased / (area < 1.0 ? 1.0 : area) : 0.0;
}

// One image: span [k,4] (pixel spans, in visiting order), u [k,3] (target, x, y uniforms), live [k]
// -> rects [2k,4].
C10_HOST_DEVICE inline void plan_image(const double* span, const double* u, const bool* live, int k, double lo,
                                       double width, double max_cover, double* rects, Cells* cells) {
  for (int i = 0; i < 8 * k; ++i) rects[i] = 0.0;
  for (int s = 0; s < k; ++s) {
    const double* box = span + 4 * s;
    double c = erased_fraction(box, rects, 2 * s, cells);
    if (live[s] && c > max_cover) {
      for (int i = 0; i < 4; ++i) rects[8 * s + i] = box[i];
      c = 0.0;
    }
    const double a = add(lo, mul(width, u[3 * s]));
    const double d = a - c;
    const double side = ::sqrt(d > 0.0 ? d : 0.0);
    const double pw = box[2] - box[0], ph = box[3] - box[1];
    const double w = ::floor(mul(pw, side)), h = ::floor(mul(ph, side));
    const double fx = ::floor(mul(u[3 * s + 1], pw - w + 1.0)), fy = ::floor(mul(u[3 * s + 2], ph - h + 1.0));
    const double x0 = box[0] + (fx < pw - w ? fx : pw - w);
    const double y0 = box[1] + (fy < ph - h ? fy : ph - h);
    if (live[s] && a > c && w >= 1.0 && h >= 1.0) {
      double* r = rects + 8 * s + 4;
      r[0] = x0;
      r[1] = y0;
      r[2] = x0 + w;
      r[3] = y0 + h;
    }
  }
}

}  // namespace prc
}  // namespace d3ssl
