// PRC planning on the GPU: one thread per image runs prc::plan_image, so the sampler's sequential
// turns cost one launch instead of a few hundred small kernels.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ops/prc.h"

namespace d3ssl {
namespace {

constexpr int kThreads = 64;

__global__ void prc_plan_kernel(const double* __restrict__ span, const double* __restrict__ u,
                                const bool* __restrict__ live, int64_t b, int k, double lo, double width,
                                double max_cover, double* __restrict__ rects) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= b) return;
  prc::plan_image(span + i * k * 4, u + i * k * 3, live + i * k, k, lo, width, max_cover, rects + i * k * 8);
}

at::Tensor prc_plan_cuda(const at::Tensor& span, const at::Tensor& u, const at::Tensor& live, double lo,
                         double width, double max_cover) {
  prc::check_args(span, u, live);
  TORCH_CHECK(span.is_cuda(), "prc_plan: the CUDA kernel got span on ", span.device());
  const c10::cuda::CUDAGuard guard(span.device());
  const int64_t b = span.size(0), k = span.size(1);
  const at::Tensor s = span.contiguous(), uu = u.contiguous(), l = live.contiguous();
  at::Tensor rects = at::empty({b, 2 * k, 4}, span.options());
  if (b == 0 || k == 0) return rects;
  const auto blocks = static_cast<unsigned int>((b + kThreads - 1) / kThreads);
  prc_plan_kernel<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      s.const_data_ptr<double>(), uu.const_data_ptr<double>(), l.const_data_ptr<bool>(), b, static_cast<int>(k),
      lo, width, max_cover, rects.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return rects;
}

}  // namespace

TORCH_LIBRARY_IMPL(d3ssl, CUDA, m) { m.impl("prc_plan", &prc_plan_cuda); }

}  // namespace d3ssl
