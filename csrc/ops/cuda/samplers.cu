// The samplers' geometry on the GPU (see csrc/ops/samplers.h): one thread per image (PRC, shift) or
// per row (PRM, jitter), so each sampler costs one launch instead of dozens of small kernels.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "ops/samplers.h"

namespace d3ssl {
namespace {

using sampling::Bounds;

constexpr int kThreads = 64;

unsigned int blocks_for(int64_t n) { return static_cast<unsigned int>((n + kThreads - 1) / kThreads); }

void check_cuda(const char* op, const at::Tensor& boxes) {
  TORCH_CHECK(boxes.is_cuda(), op, ": the CUDA kernel got boxes on ", boxes.device());
}

__global__ void prc_plan_kernel(const float* __restrict__ boxes, const bool* __restrict__ valid,
                                const double* __restrict__ u, int64_t b, int k, Bounds bounds, double lo,
                                double width, double max_cover, float* __restrict__ rects,
                                int64_t* __restrict__ order, sampling::PrcScratch* __restrict__ scratch) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= b) return;
  sampling::prc_image(boxes + i * k * 4, valid + i * k, u + i * k * 3, k, bounds, lo, width, max_cover,
                      rects + i * k * 8, order + i * k, scratch + i);
}

__global__ void prm_plan_kernel(const float* __restrict__ boxes, const bool* __restrict__ valid,
                                const double* __restrict__ u, int64_t n, Bounds bounds, double area_lo,
                                double area_width, double ratio_lo, double ratio_width, float* __restrict__ rects,
                                int64_t* __restrict__ side) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  sampling::prm_box(boxes + 4 * i, valid[i], u + 4 * i, bounds, area_lo, area_width, ratio_lo, ratio_width,
                    rects + 4 * i, side + i);
}

__global__ void jitter_plan_kernel(const float* __restrict__ boxes, const bool* __restrict__ valid,
                                   const double* __restrict__ u, int64_t n, Bounds bounds, double p, double shift_lo,
                                   double shift_width, double scale_lo, double scale_width, float* __restrict__ out,
                                   bool* __restrict__ jittered) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  jittered[i] = sampling::jitter_box(boxes + 4 * i, valid[i], u + 5 * i, p, shift_lo, shift_width, scale_lo,
                                     scale_width, bounds, out + 4 * i);
}

__global__ void shift_plan_kernel(const float* __restrict__ boxes, const bool* __restrict__ valid,
                                  const double* __restrict__ u, int64_t b, int k, double h, double w,
                                  int64_t* __restrict__ shift) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= b) return;
  sampling::shift_image(boxes + i * k * 4, valid + i * k, u + 2 * i, k, h, w, shift + 2 * i);
}

std::tuple<at::Tensor, at::Tensor> prc_plan_cuda(const at::Tensor& boxes, const at::Tensor& valid,
                                                 const at::Tensor& u, at::IntArrayRef size, double lo, double width,
                                                 double max_cover) {
  sampling::check_prc(boxes, valid, u);
  check_cuda("prc_plan", boxes);
  const Bounds bounds = sampling::bounds_of("prc_plan", size, /*optional=*/true);
  const c10::cuda::CUDAGuard guard(boxes.device());
  const int64_t b = boxes.size(0), k = boxes.size(1);
  const sampling::Inputs in(boxes, valid, u);
  at::Tensor rects = at::empty({b, 2 * k, 4}, boxes.options());
  at::Tensor order = at::empty({b, k}, boxes.options().dtype(at::kLong));
  if (b == 0 || k == 0) return {rects, order};
  // Each image's working arrays in global memory (prc::Cells says why); the caching allocator's
  // blocks are 512-byte aligned and PrcScratch's size is a multiple of its alignment.
  at::Tensor scratch =
      at::empty({b * static_cast<int64_t>(sizeof(sampling::PrcScratch))}, boxes.options().dtype(at::kByte));
  prc_plan_kernel<<<blocks_for(b), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      in.boxes, in.valid, in.u, b, static_cast<int>(k), bounds, lo, width, max_cover,
      rects.mutable_data_ptr<float>(), order.mutable_data_ptr<int64_t>(),
      reinterpret_cast<sampling::PrcScratch*>(scratch.mutable_data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {rects, order};
}

std::tuple<at::Tensor, at::Tensor> prm_plan_cuda(const at::Tensor& boxes, const at::Tensor& valid,
                                                 const at::Tensor& u, at::IntArrayRef size, double area_lo,
                                                 double area_width, double ratio_lo, double ratio_width) {
  sampling::check_rows("prm_plan", boxes, valid, u, 4);
  check_cuda("prm_plan", boxes);
  const Bounds bounds = sampling::bounds_of("prm_plan", size, /*optional=*/false);
  const c10::cuda::CUDAGuard guard(boxes.device());
  const sampling::Inputs in(boxes, valid, u);
  at::Tensor rects = at::empty(boxes.sizes(), boxes.options());
  at::Tensor side = at::empty(valid.sizes(), boxes.options().dtype(at::kLong));
  const int64_t n = valid.numel();
  if (n == 0) return {rects, side};
  prm_plan_kernel<<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      in.boxes, in.valid, in.u, n, bounds, area_lo, area_width, ratio_lo, ratio_width,
      rects.mutable_data_ptr<float>(), side.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {rects, side};
}

std::tuple<at::Tensor, at::Tensor> jitter_plan_cuda(const at::Tensor& boxes, const at::Tensor& valid,
                                                    const at::Tensor& u, at::IntArrayRef size, double p,
                                                    double shift_lo, double shift_width, double scale_lo,
                                                    double scale_width) {
  sampling::check_rows("jitter_plan", boxes, valid, u, 5);
  check_cuda("jitter_plan", boxes);
  const Bounds bounds = sampling::bounds_of("jitter_plan", size, /*optional=*/true);
  const c10::cuda::CUDAGuard guard(boxes.device());
  const sampling::Inputs in(boxes, valid, u);
  at::Tensor out = at::empty(boxes.sizes(), boxes.options());
  at::Tensor jittered = at::empty(valid.sizes(), valid.options());
  const int64_t n = valid.numel();
  if (n == 0) return {out, jittered};
  jitter_plan_kernel<<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      in.boxes, in.valid, in.u, n, bounds, p, shift_lo, shift_width, scale_lo, scale_width,
      out.mutable_data_ptr<float>(), jittered.mutable_data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, jittered};
}

at::Tensor shift_plan_cuda(const at::Tensor& boxes, const at::Tensor& valid, const at::Tensor& u,
                           at::IntArrayRef size) {
  sampling::check_shift(boxes, valid, u);
  check_cuda("shift_plan", boxes);
  const Bounds bounds = sampling::bounds_of("shift_plan", size, /*optional=*/false);
  const c10::cuda::CUDAGuard guard(boxes.device());
  const int64_t b = boxes.size(0), k = boxes.size(1);
  const sampling::Inputs in(boxes, valid, u);
  at::Tensor shift = at::empty({b, 2}, boxes.options().dtype(at::kLong));
  if (b == 0) return shift;
  shift_plan_kernel<<<blocks_for(b), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      in.boxes, in.valid, in.u, b, static_cast<int>(k), bounds.h, bounds.w, shift.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return shift;
}

}  // namespace

TORCH_LIBRARY_IMPL(d3ssl, CUDA, m) {
  m.impl("prc_plan", &prc_plan_cuda);
  m.impl("prm_plan", &prm_plan_cuda);
  m.impl("jitter_plan", &jitter_plan_cuda);
  m.impl("shift_plan", &shift_plan_cuda);
}

}  // namespace d3ssl
