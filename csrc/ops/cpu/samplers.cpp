// The samplers' geometry on the CPU (see csrc/ops/samplers.h): PRC is planned per image over threads;
// PRM, jitter and shift cost a few hundred nanoseconds per row and run on the calling thread.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "ops/samplers.h"

namespace d3ssl {
namespace {

using sampling::Bounds;

void check_cpu(const char* op, const at::Tensor& boxes) {
  TORCH_CHECK(boxes.device().is_cpu(), op, ": the CPU kernel got boxes on ", boxes.device());
}

std::tuple<at::Tensor, at::Tensor> prc_plan_cpu(const at::Tensor& boxes, const at::Tensor& valid, const at::Tensor& u,
                                                at::IntArrayRef size, double lo, double width, double max_cover) {
  sampling::check_prc(boxes, valid, u);
  check_cpu("prc_plan", boxes);
  const Bounds bounds = sampling::bounds_of("prc_plan", size, /*optional=*/true);
  const int64_t b = boxes.size(0), k = boxes.size(1);
  const sampling::Inputs in(boxes, valid, u);
  at::Tensor rects = at::empty({b, 2 * k, 4}, boxes.options());
  at::Tensor order = at::empty({b, k}, boxes.options().dtype(at::kLong));
  float* rp = rects.mutable_data_ptr<float>();
  int64_t* op = order.mutable_data_ptr<int64_t>();
  at::parallel_for(0, b, 16, [&](int64_t begin, int64_t end) {
    sampling::PrcScratch scratch;
    for (int64_t i = begin; i < end; ++i) {
      sampling::prc_image(in.boxes + i * k * 4, in.valid + i * k, in.u + i * k * 3, static_cast<int>(k), bounds,
                          lo, width, max_cover, rp + i * k * 8, op + i * k, &scratch);
    }
  });
  return {rects, order};
}

std::tuple<at::Tensor, at::Tensor> prm_plan_cpu(const at::Tensor& boxes, const at::Tensor& valid, const at::Tensor& u,
                                                at::IntArrayRef size, double area_lo, double area_width,
                                                double ratio_lo, double ratio_width) {
  sampling::check_rows("prm_plan", boxes, valid, u, 4);
  check_cpu("prm_plan", boxes);
  const Bounds bounds = sampling::bounds_of("prm_plan", size, /*optional=*/false);
  const sampling::Inputs in(boxes, valid, u);
  at::Tensor rects = at::empty(boxes.sizes(), boxes.options());
  at::Tensor side = at::empty(valid.sizes(), boxes.options().dtype(at::kLong));
  float* rp = rects.mutable_data_ptr<float>();
  int64_t* sp = side.mutable_data_ptr<int64_t>();
  for (int64_t i = 0, n = valid.numel(); i < n; ++i) {
    sampling::prm_box(in.boxes + 4 * i, in.valid[i], in.u + 4 * i, bounds, area_lo, area_width, ratio_lo,
                      ratio_width, rp + 4 * i, sp + i);
  }
  return {rects, side};
}

std::tuple<at::Tensor, at::Tensor> jitter_plan_cpu(const at::Tensor& boxes, const at::Tensor& valid,
                                                   const at::Tensor& u, at::IntArrayRef size, double p,
                                                   double shift_lo, double shift_width, double scale_lo,
                                                   double scale_width) {
  sampling::check_rows("jitter_plan", boxes, valid, u, 5);
  check_cpu("jitter_plan", boxes);
  const Bounds bounds = sampling::bounds_of("jitter_plan", size, /*optional=*/true);
  const sampling::Inputs in(boxes, valid, u);
  at::Tensor out = at::empty(boxes.sizes(), boxes.options());
  at::Tensor jittered = at::empty(valid.sizes(), valid.options());
  float* op = out.mutable_data_ptr<float>();
  bool* jp = jittered.mutable_data_ptr<bool>();
  for (int64_t i = 0, n = valid.numel(); i < n; ++i) {
    jp[i] = sampling::jitter_box(in.boxes + 4 * i, in.valid[i], in.u + 5 * i, p, shift_lo, shift_width, scale_lo,
                                 scale_width, bounds, op + 4 * i);
  }
  return {out, jittered};
}

at::Tensor shift_plan_cpu(const at::Tensor& boxes, const at::Tensor& valid, const at::Tensor& u,
                          at::IntArrayRef size) {
  sampling::check_shift(boxes, valid, u);
  check_cpu("shift_plan", boxes);
  const Bounds bounds = sampling::bounds_of("shift_plan", size, /*optional=*/false);
  const int64_t b = boxes.size(0), k = boxes.size(1);
  const sampling::Inputs in(boxes, valid, u);
  at::Tensor shift = at::empty({b, 2}, boxes.options().dtype(at::kLong));
  int64_t* tp = shift.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < b; ++i) {
    sampling::shift_image(in.boxes + i * k * 4, in.valid + i * k, in.u + 2 * i, static_cast<int>(k), bounds.h,
                          bounds.w, tp + 2 * i);
  }
  return shift;
}

}  // namespace

TORCH_LIBRARY_IMPL(d3ssl, CPU, m) {
  m.impl("prc_plan", &prc_plan_cpu);
  m.impl("prm_plan", &prm_plan_cpu);
  m.impl("jitter_plan", &jitter_plan_cpu);
  m.impl("shift_plan", &shift_plan_cpu);
}

}  // namespace d3ssl
