// PRC planning on the CPU: images spread over threads, each planned by prc::plan_image.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops/prc.h"

namespace d3ssl {
namespace {

at::Tensor prc_plan_cpu(const at::Tensor& span, const at::Tensor& u, const at::Tensor& live, double lo,
                        double width, double max_cover) {
  prc::check_args(span, u, live);
  TORCH_CHECK(span.device().is_cpu(), "prc_plan: the CPU kernel got span on ", span.device());
  const int64_t b = span.size(0), k = span.size(1);
  const at::Tensor s = span.contiguous(), uu = u.contiguous(), l = live.contiguous();
  at::Tensor rects = at::empty({b, 2 * k, 4}, span.options());
  const double* sp = s.const_data_ptr<double>();
  const double* up = uu.const_data_ptr<double>();
  const bool* lp = l.const_data_ptr<bool>();
  double* rp = rects.mutable_data_ptr<double>();
  at::parallel_for(0, b, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      prc::plan_image(sp + i * k * 4, up + i * k * 3, lp + i * k, static_cast<int>(k), lo, width, max_cover,
                      rp + i * k * 8);
    }
  });
  return rects;
}

}  // namespace

TORCH_LIBRARY_IMPL(d3ssl, CPU, m) { m.impl("prc_plan", &prc_plan_cpu); }

}  // namespace d3ssl
