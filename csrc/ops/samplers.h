// The samplers' geometry after the draw (README, "The method"), one proposal or one image at a time, shared
// by the CPU and CUDA kernels: PRC (spans, visiting order, then prc.h's turns), PRM, box jitter (RBJ
// and the baseline's) and the de-positioning shift. The random numbers come in as float64 U[0,1)
// drawn by the Python sampler; everything here is deterministic.
//
// Each function evaluates the same float64 operations in the same order as its pure-PyTorch
// reference in d3ssl/augment/samplers.py (the tests' oracle), one rounding per operation (prc::mul,
// prc::add: no fused multiply-add), so the op, the reference, the CPU and the GPU all give
// bit-identical results. Boxes are float32 (x1, y1, x2, y2) pixels; `clip` bounds are the image's
// height and width.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

#include "ops/prc.h"

namespace d3ssl {
namespace sampling {

using prc::add;
using prc::mul;

C10_HOST_DEVICE inline double dmin(double a, double b) { return b < a ? b : a; }
C10_HOST_DEVICE inline double dmax(double a, double b) { return b > a ? b : a; }
// min and max that return NaN when either argument is NaN, as torch.amin / torch.amax do.
C10_HOST_DEVICE inline double nan_min(double a, double b) { return a != a || b != b ? NAN : dmin(a, b); }
C10_HOST_DEVICE inline double nan_max(double a, double b) { return a != a || b != b ? NAN : dmax(a, b); }
C10_HOST_DEVICE inline float fmin_(float a, float b) { return b < a ? b : a; }
C10_HOST_DEVICE inline float fmax_(float a, float b) { return b > a ? b : a; }

// Image bounds for the spans: clipped to [0, w] x [0, h] when clip is set.
struct Bounds {
  bool clip;
  double h, w;
};

// A box's pixel span under the ops' pixel rule (pixel_spans in samplers.py): ceil(v - 0.5) per
// coordinate, clipped to the image when asked, and x1 >= x0, y1 >= y0.
C10_HOST_DEVICE inline void pixel_span(const float* box, Bounds b, double* s) {
  for (int i = 0; i < 4; ++i) s[i] = ::ceil(static_cast<double>(box[i]) - 0.5);
  if (b.clip) {
    for (int i = 0; i < 4; ++i) s[i] = dmin(dmax(s[i], 0.0), (i & 1) ? b.h : b.w);
  }
  s[2] = dmax(s[2], s[0]);
  s[3] = dmax(s[3], s[1]);
}

// prc_image's working arrays (see prc::Cells for why they are not on the stack).
struct PrcScratch {
  prc::Cells cells;
  double span[4 * prc::kMaxBoxes], key[prc::kMaxBoxes];
  double sorted[4 * prc::kMaxBoxes], us[3 * prc::kMaxBoxes], planned[8 * prc::kMaxBoxes];
  int idx[prc::kMaxBoxes];
  bool live[prc::kMaxBoxes];
};

// PRC of one image: boxes [k,4], valid [k], u [k,3] (target, x, y) in the boxes' order. Proposals
// are visited from largest to smallest pixel area (ties by index); padded, empty and non-finite ones
// (possible without clipping) are not live and come last. Then planned by prc::plan_image. Writes
// rects [2k,4] (float32, integer-valued) and order [k].
C10_HOST_DEVICE inline void prc_image(const float* boxes, const bool* valid, const double* u, int k, Bounds bounds,
                                      double lo, double width, double max_cover, float* rects, int64_t* order,
                                      PrcScratch* t) {
  for (int j = 0; j < k; ++j) {
    double* s = t->span + 4 * j;
    pixel_span(boxes + 4 * j, bounds, s);
    const double pw = s[2] - s[0], ph = s[3] - s[1], area = mul(pw, ph);
    t->key[j] = valid[j] && pw > 0.0 && ph > 0.0 && area < INFINITY ? area : -1.0;
    // stable descending insertion: j goes after every earlier proposal with a key >= its own
    int i = j;
    while (i > 0 && t->key[t->idx[i - 1]] < t->key[j]) {
      t->idx[i] = t->idx[i - 1];
      --i;
    }
    t->idx[i] = j;
  }
  for (int s = 0; s < k; ++s) {
    const int j = t->idx[s];
    for (int i = 0; i < 4; ++i) t->sorted[4 * s + i] = t->span[4 * j + i];
    for (int i = 0; i < 3; ++i) t->us[3 * s + i] = u[3 * j + i];
    t->live[s] = t->key[j] >= 0.0;
    order[s] = j;
  }
  prc::plan_image(t->sorted, t->us, t->live, k, lo, width, max_cover, t->planned, &t->cells);
  for (int i = 0; i < 8 * k; ++i) rects[i] = static_cast<float>(t->planned[i]);
}

// PRM of one proposal: u (area fraction, ratio, side, position). Writes the mask rectangle (zeros
// when the proposal is padded or empty, or the mask falls wholly outside the image) and the side
// (0 top, 1 bottom, 2 left, 3 right; drawn for every row).
C10_HOST_DEVICE inline void prm_box(const float* box, bool valid, const double* u, Bounds bounds, double area_lo,
                                    double area_width, double ratio_lo, double ratio_width, float* rect,
                                    int64_t* side) {
  double s[4];
  pixel_span(box, bounds, s);
  const double x0 = s[0], y0 = s[1], x1 = s[2], y1 = s[3];
  const double pw = x1 - x0, ph = y1 - y0;
  const bool live = valid && pw > 0.0 && ph > 0.0;
  const double area = mul(mul(add(area_lo, mul(area_width, u[0])), pw), ph);
  const double r = add(ratio_lo, mul(ratio_width, u[1]));
  const double w = dmax(::rint(::sqrt(mul(area, r))), 1.0);  // torch.round: half to even
  const double h = dmax(::rint(::sqrt(area / r)), 1.0);
  const double side_u = dmin(::floor(mul(u[2], 4.0)), 3.0);
  const int sd = side_u >= 0.0 ? static_cast<int>(side_u) : 0;  // u outside [0, 1) is not a draw
  const double along_x = add(x0, dmin(::floor(mul(u[3], pw)), pw - 1.0)) - ::floor(w / 2.0);
  const double along_y = add(y0, dmin(::floor(mul(u[3], ph)), ph - 1.0)) - ::floor(h / 2.0);
  const double mx0 = sd < 2 ? along_x : (sd == 2 ? x0 - w : x1);
  const double my0 = sd == 0 ? y0 - h : (sd == 1 ? y1 : along_y);
  double m[4] = {mx0, my0, mx0 + w, my0 + h};
  for (int i = 0; i < 4; ++i) m[i] = dmin(dmax(m[i], 0.0), (i & 1) ? bounds.h : bounds.w);
  const bool keep = live && m[2] > m[0] && m[3] > m[1];
  for (int i = 0; i < 4; ++i) rect[i] = keep ? static_cast<float>(m[i]) : 0.0f;
  *side = sd;
}

// Box jitter of one box: u (apply, centre x, centre y, w, h). With u[0] < p the centre moves by
// (shift_lo + shift_width * u) * (w, h) and w, h scale by 1 + scale_lo + scale_width * u; the box
// is rounded to float32 and clipped to the image when `bounds` clip (the baseline's jitter), else to
// the input box itself (RBJ); a padded row, one not drawn, or one that would end empty keeps the
// input box. Returns whether the box was jittered.
C10_HOST_DEVICE inline bool jitter_box(const float* box, bool valid, const double* u, double p, double shift_lo,
                                       double shift_width, double scale_lo, double scale_width, Bounds bounds,
                                       float* out) {
  float lo[4], hi[4];
  for (int i = 0; i < 4; ++i) {
    lo[i] = bounds.clip ? 0.0f : box[i & 1];
    hi[i] = bounds.clip ? static_cast<float>((i & 1) ? bounds.h : bounds.w) : box[2 + (i & 1)];
  }
  const double b0 = box[0], b1 = box[1], b2 = box[2], b3 = box[3];
  const double w = b2 - b0, h = b3 - b1;
  const double cx = add(add(b0, b2) / 2.0, mul(add(shift_lo, mul(shift_width, u[1])), w));
  const double cy = add(add(b1, b3) / 2.0, mul(add(shift_lo, mul(shift_width, u[2])), h));
  const double nw = mul(w, add(1.0, add(scale_lo, mul(scale_width, u[3]))));
  const double nh = mul(h, add(1.0, add(scale_lo, mul(scale_width, u[4]))));
  float n[4] = {static_cast<float>(cx - nw / 2.0), static_cast<float>(cy - nh / 2.0),
                static_cast<float>(cx + nw / 2.0), static_cast<float>(cy + nh / 2.0)};
  // + 0: a tie between -0 and +0 in the clamp becomes +0 (torch.maximum/minimum pick either)
  for (int i = 0; i < 4; ++i) n[i] = fmin_(fmax_(n[i], lo[i]), hi[i]) + 0.0f;
  const bool jittered = valid && u[0] < p && n[2] > n[0] && n[3] > n[1];
  for (int i = 0; i < 4; ++i) out[i] = jittered ? n[i] : box[i];
  return jittered;
}

// The de-positioning shift of one image: boxes [k,4], valid [k], u (dx, dy). Uniform over the
// integer shifts that keep the bounding box of the valid boxes inside [0, w] x [0, h]; (0, 0) on an
// axis without room, for an image without valid boxes, or with a non-finite bound.
C10_HOST_DEVICE inline void shift_image(const float* boxes, const bool* valid, const double* u, int k, double h,
                                        double w, int64_t* t) {
  const double inf = INFINITY;
  double lo_xy[2] = {inf, inf}, hi_xy[2] = {-inf, -inf};
  bool any = false;
  for (int j = 0; j < k; ++j) {
    if (!valid[j]) continue;
    any = true;
    for (int a = 0; a < 2; ++a) {
      lo_xy[a] = nan_min(lo_xy[a], static_cast<double>(boxes[4 * j + a]));
      hi_xy[a] = nan_max(hi_xy[a], static_cast<double>(boxes[4 * j + a + 2]));
    }
  }
  const double size[2] = {w, h};
  for (int a = 0; a < 2; ++a) {
    double lo = ::ceil(-lo_xy[a]), hi = ::floor(size[a] - hi_xy[a]);
    if (!(any && lo <= hi && lo > -INFINITY && hi < INFINITY)) lo = hi = 0.0;  // also NaN or infinite boxes
    const double v = add(lo, dmin(::floor(mul(u[a], add(hi - lo, 1.0))), hi - lo));
    t[a] = v == v ? static_cast<int64_t>(v) : 0;  // NaN only from a u that is not a draw
  }
}

// Host-side checks shared by the kernels. boxes float32 [..., 4], valid bool [...] (the boxes'
// leading shape), u float64 [..., n] (the same leading shape).
inline void check_rows(const char* op, const at::Tensor& boxes, const at::Tensor& valid, const at::Tensor& u,
                       int64_t n) {
  TORCH_CHECK(boxes.dim() >= 1 && boxes.size(-1) == 4 && boxes.scalar_type() == at::kFloat, op,
              ": boxes must be float32 [...,4], got ", boxes.scalar_type(), " ", boxes.sizes());
  const auto lead = boxes.sizes().slice(0, boxes.dim() - 1);
  TORCH_CHECK(valid.scalar_type() == at::kBool && valid.sizes() == lead, op, ": valid must be bool ", lead,
              ", got ", valid.scalar_type(), " ", valid.sizes());
  TORCH_CHECK(u.scalar_type() == at::kDouble && u.dim() == boxes.dim() && u.sizes().slice(0, u.dim() - 1) == lead &&
                  u.size(-1) == n,
              op, ": u must be float64 ", lead, " x ", n, ", got ", u.scalar_type(), " ", u.sizes());
  TORCH_CHECK(valid.device() == boxes.device() && u.device() == boxes.device(), op,
              ": boxes, valid and u must be on one device, got ", boxes.device(), ", ", valid.device(), ", ",
              u.device());
}

// prc_plan: boxes float32 [B,K,4], valid bool [B,K], u float64 [B,K,3], K <= prc::kMaxBoxes.
inline void check_prc(const at::Tensor& boxes, const at::Tensor& valid, const at::Tensor& u) {
  TORCH_CHECK(boxes.dim() == 3, "prc_plan: boxes must be float32 [B,K,4], got ", boxes.scalar_type(), " ",
              boxes.sizes());
  check_rows("prc_plan", boxes, valid, u, 3);
  TORCH_CHECK(boxes.size(1) <= prc::kMaxBoxes, "prc_plan: at most ", prc::kMaxBoxes, " proposals per image, got ",
              boxes.size(1));
}

// shift_plan: boxes float32 [B,K,4], valid bool [B,K], u float64 [B,2].
inline void check_shift(const at::Tensor& boxes, const at::Tensor& valid, const at::Tensor& u) {
  TORCH_CHECK(boxes.dim() == 3 && boxes.size(2) == 4 && boxes.scalar_type() == at::kFloat,
              "shift_plan: boxes must be float32 [B,K,4], got ", boxes.scalar_type(), " ", boxes.sizes());
  TORCH_CHECK(valid.scalar_type() == at::kBool && valid.dim() == 2 && valid.size(0) == boxes.size(0) &&
                  valid.size(1) == boxes.size(1),
              "shift_plan: valid must be bool [B,K] = [", boxes.size(0), ", ", boxes.size(1), "], got ",
              valid.scalar_type(), " ", valid.sizes());
  TORCH_CHECK(u.scalar_type() == at::kDouble && u.dim() == 2 && u.size(0) == boxes.size(0) && u.size(1) == 2,
              "shift_plan: u must be float64 [B,2] = [", boxes.size(0), ", 2], got ", u.scalar_type(), " ", u.sizes());
  TORCH_CHECK(valid.device() == boxes.device() && u.device() == boxes.device(),
              "shift_plan: boxes, valid and u must be on one device, got ", boxes.device(), ", ", valid.device(), ", ",
              u.device());
}

// A sampling op's three inputs made contiguous (kept alive here) and their data. On a GPU, make it
// under the op's device guard: a non-contiguous input is copied on the current device.
struct Inputs {
  at::Tensor boxes_c, valid_c, u_c;
  const float* boxes;
  const bool* valid;
  const double* u;

  Inputs(const at::Tensor& b, const at::Tensor& v, const at::Tensor& w)
      : boxes_c(b.contiguous()),
        valid_c(v.contiguous()),
        u_c(w.contiguous()),
        boxes(boxes_c.const_data_ptr<float>()),
        valid(valid_c.const_data_ptr<bool>()),
        u(u_c.const_data_ptr<double>()) {}
};

// size: (H, W), or empty for no clipping where `optional` is set.
inline Bounds bounds_of(const char* op, at::IntArrayRef size, bool optional) {
  TORCH_CHECK(size.size() == 2 || (optional && size.empty()), op, ": size must be (H, W)",
              optional ? " or empty" : "", ", got ", size);
  if (size.empty()) return {false, 0.0, 0.0};
  TORCH_CHECK(size[0] >= 0 && size[1] >= 0, op, ": size must be non-negative, got ", size);
  return {true, static_cast<double>(size[0]), static_cast<double>(size[1])};
}

}  // namespace sampling
}  // namespace d3ssl
