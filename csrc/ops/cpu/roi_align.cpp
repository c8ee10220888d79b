// RoIAlign on the CPU: forward and backward, NCHW or channels_last read in place.
//
// Every sample point's four neighbours and weights depend only on the RoI, not on the channel, so
// they are computed once per RoI into a small table and reused for all channels. In channels_last
// the inner loop then runs over contiguous channels (vectorised); in NCHW it gathers from one plane.
// The forward is parallel over (RoI, channel block) units. The backward is parallel over channel
// blocks: channels never mix, so each block scatters into its own slice of grad_input without races.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "ops/roi_align.h"

namespace d3ssl {
namespace {

using namespace roi_align_detail;

// Channels handled by one forward work unit: large enough to amortise the table, small enough that
// a few RoIs still keep every thread busy.
constexpr int64_t kChannelBlock = 128;

// The valid sample points of every bin of one RoI. Bin b owns entries [bin_begin[b], bin_begin[b+1]).
// Weights already include the 1 / count of the average.
template <typename T>
struct SampleTable {
  std::vector<int64_t> bin_begin;
  std::vector<Bilinear<T>> samples;

  void build(const T* roi, T spatial_scale, int64_t height, int64_t width, int64_t pooled_height,
             int64_t pooled_width, int64_t sampling_ratio, bool aligned) {
    const RoiGeometry<T> g = roi_geometry(roi, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned);
    bin_begin.resize(pooled_height * pooled_width + 1);
    samples.clear();  // keeps its capacity: a thread reuses one table for all its RoIs
    int64_t bin = 0;
    for (int64_t ph = 0; ph < pooled_height; ++ph) {
      for (int64_t pw = 0; pw < pooled_width; ++pw) {
        bin_begin[bin++] = static_cast<int64_t>(samples.size());
        for (int64_t iy = 0; iy < g.grid_h; ++iy) {
          const T y = sample_y(g, ph, iy);
          for (int64_t ix = 0; ix < g.grid_w; ++ix) {
            Bilinear<T> b;
            if (!bilinear(y, sample_x(g, pw, ix), height, width, b)) continue;
            b.w1 *= g.inv_count;
            b.w2 *= g.inv_count;
            b.w3 *= g.inv_count;
            b.w4 *= g.inv_count;
            samples.push_back(b);
          }
        }
      }
    }
    bin_begin[bin] = static_cast<int64_t>(samples.size());
  }
};

// NCHW channels handled together, so that each table entry is loaded once for that many planes.
constexpr int kPlaneGroup = 8;

// NCHW forward of kGroup consecutive channels of one RoI: planes [kGroup, H*W] -> out [kGroup, bins].
template <int kGroup, typename scalar_t, typename acc_t>
void pool_planes(const SampleTable<acc_t>& table, int64_t bins, int64_t hw, const scalar_t* planes,
                 scalar_t* out) {
  for (int64_t bin = 0; bin < bins; ++bin) {
    acc_t sum[kGroup] = {};
    for (int64_t s = table.bin_begin[bin]; s < table.bin_begin[bin + 1]; ++s) {
      const Bilinear<acc_t>& p = table.samples[s];
      for (int j = 0; j < kGroup; ++j) {
        const scalar_t* plane = planes + j * hw;
        sum[j] += p.w1 * static_cast<acc_t>(plane[p.p1]) + p.w2 * static_cast<acc_t>(plane[p.p2]) +
                  p.w3 * static_cast<acc_t>(plane[p.p3]) + p.w4 * static_cast<acc_t>(plane[p.p4]);
      }
    }
    for (int j = 0; j < kGroup; ++j) out[j * bins + bin] = static_cast<scalar_t>(sum[j]);
  }
}

// NCHW backward of kGroup consecutive channels of one RoI: grad [kGroup, bins] -> planes [kGroup, H*W].
template <int kGroup, typename scalar_t, typename acc_t>
void scatter_planes(const SampleTable<acc_t>& table, int64_t bins, int64_t hw, const scalar_t* grad,
                    acc_t* planes) {
  for (int64_t bin = 0; bin < bins; ++bin) {
    acc_t gv[kGroup];
    for (int j = 0; j < kGroup; ++j) gv[j] = static_cast<acc_t>(grad[j * bins + bin]);
    for (int64_t s = table.bin_begin[bin]; s < table.bin_begin[bin + 1]; ++s) {
      const Bilinear<acc_t>& p = table.samples[s];
      for (int j = 0; j < kGroup; ++j) {
        acc_t* plane = planes + j * hw;
        plane[p.p1] += p.w1 * gv[j];
        plane[p.p2] += p.w2 * gv[j];
        plane[p.p3] += p.w3 * gv[j];
        plane[p.p4] += p.w4 * gv[j];
      }
    }
  }
}

// Batch indices are read like torchvision (truncated to an integer) and must name an image.
template <typename T>
void check_batch_indices(const T* rois, int64_t num_rois, int64_t batch_size, const char* op) {
  for (int64_t k = 0; k < num_rois; ++k) {
    const auto b = static_cast<int64_t>(rois[k * 5]);
    TORCH_CHECK(b >= 0 && b < batch_size, op, ": rois[", k, ", 0] (batch index) is ", rois[k * 5],
                ", outside the input's batch of ", batch_size, " images");
  }
}

template <typename scalar_t, typename acc_t>
void forward_impl(const scalar_t* input, const acc_t* rois, acc_t spatial_scale, int64_t num_rois,
                  int64_t channels, int64_t height, int64_t width, int64_t pooled_height, int64_t pooled_width,
                  int64_t sampling_ratio, bool aligned, bool channels_last, scalar_t* output) {
  const int64_t num_blocks = (channels + kChannelBlock - 1) / kChannelBlock;
  const int64_t bins = pooled_height * pooled_width;
  const int64_t hw = height * width;
  at::parallel_for(0, num_rois * num_blocks, 1, [&](int64_t begin, int64_t end) {
    SampleTable<acc_t> table;
    std::vector<acc_t> acc(kChannelBlock);
    int64_t table_roi = -1;
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t k = unit / num_blocks;
      const int64_t c0 = (unit % num_blocks) * kChannelBlock;
      const int64_t nc = std::min(kChannelBlock, channels - c0);
      const acc_t* roi = rois + k * 5;
      if (table_roi != k) {  // consecutive units of a thread mostly share the RoI
        table.build(roi, spatial_scale, height, width, pooled_height, pooled_width, sampling_ratio, aligned);
        table_roi = k;
      }
      const int64_t b = static_cast<int64_t>(roi[0]);
      if (channels_last) {
        // input [N, H, W, C], output [K, PH, PW, C]
        const scalar_t* in = input + b * hw * channels + c0;
        for (int64_t bin = 0; bin < bins; ++bin) {
          acc_t* a = acc.data();
          for (int64_t c = 0; c < nc; ++c) a[c] = acc_t(0);
          for (int64_t s = table.bin_begin[bin]; s < table.bin_begin[bin + 1]; ++s) {
            const Bilinear<acc_t>& p = table.samples[s];
            const scalar_t* i1 = in + p.p1 * channels;
            const scalar_t* i2 = in + p.p2 * channels;
            const scalar_t* i3 = in + p.p3 * channels;
            const scalar_t* i4 = in + p.p4 * channels;
            for (int64_t c = 0; c < nc; ++c) {
              a[c] += p.w1 * static_cast<acc_t>(i1[c]) + p.w2 * static_cast<acc_t>(i2[c]) +
                      p.w3 * static_cast<acc_t>(i3[c]) + p.w4 * static_cast<acc_t>(i4[c]);
            }
          }
          scalar_t* out = output + (k * bins + bin) * channels + c0;
          for (int64_t c = 0; c < nc; ++c) out[c] = static_cast<scalar_t>(a[c]);
        }
      } else {
        // input [N, C, H, W], output [K, C, PH, PW]
        const scalar_t* plane = input + (b * channels + c0) * hw;
        scalar_t* out = output + (k * channels + c0) * bins;
        int64_t c = 0;
        for (; c + kPlaneGroup <= nc; c += kPlaneGroup) {
          pool_planes<kPlaneGroup>(table, bins, hw, plane + c * hw, out + c * bins);
        }
        for (; c < nc; ++c) pool_planes<1>(table, bins, hw, plane + c * hw, out + c * bins);
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_impl(const scalar_t* grad, const acc_t* rois, acc_t spatial_scale, int64_t num_rois,
                   int64_t channels, int64_t height, int64_t width, int64_t pooled_height, int64_t pooled_width,
                   int64_t sampling_ratio, bool aligned, bool channels_last, acc_t* grad_input) {
  const int64_t bins = pooled_height * pooled_width;
  const int64_t hw = height * width;
  // Each thread takes a contiguous range of channels; with few channels fall back to fewer threads.
  const int64_t grain = std::max<int64_t>(16, channels / (4 * at::get_num_threads()));
  at::parallel_for(0, channels, grain, [&](int64_t c0, int64_t c1) {
    SampleTable<acc_t> table;
    const int64_t nc = c1 - c0;
    for (int64_t k = 0; k < num_rois; ++k) {
      const acc_t* roi = rois + k * 5;
      table.build(roi, spatial_scale, height, width, pooled_height, pooled_width, sampling_ratio, aligned);
      const int64_t b = static_cast<int64_t>(roi[0]);
      if (channels_last) {
        // grad [K, PH, PW, C], grad_input [N, H, W, C]
        acc_t* gi = grad_input + b * hw * channels + c0;
        for (int64_t bin = 0; bin < bins; ++bin) {
          const scalar_t* g = grad + (k * bins + bin) * channels + c0;
          for (int64_t s = table.bin_begin[bin]; s < table.bin_begin[bin + 1]; ++s) {
            const Bilinear<acc_t>& p = table.samples[s];
            acc_t* g1 = gi + p.p1 * channels;
            acc_t* g2 = gi + p.p2 * channels;
            acc_t* g3 = gi + p.p3 * channels;
            acc_t* g4 = gi + p.p4 * channels;
            // The four rows may coincide at the border, so each is its own pass (no aliasing hazard).
            for (int64_t c = 0; c < nc; ++c) g1[c] += p.w1 * static_cast<acc_t>(g[c]);
            for (int64_t c = 0; c < nc; ++c) g2[c] += p.w2 * static_cast<acc_t>(g[c]);
            for (int64_t c = 0; c < nc; ++c) g3[c] += p.w3 * static_cast<acc_t>(g[c]);
            for (int64_t c = 0; c < nc; ++c) g4[c] += p.w4 * static_cast<acc_t>(g[c]);
          }
        }
      } else {
        // grad [K, C, PH, PW], grad_input [N, C, H, W]
        const scalar_t* g = grad + (k * channels + c0) * bins;
        acc_t* plane = grad_input + (b * channels + c0) * hw;
        int64_t c = 0;
        for (; c + kPlaneGroup <= nc; c += kPlaneGroup) {
          scatter_planes<kPlaneGroup>(table, bins, hw, g + c * bins, plane + c * hw);
        }
        for (; c < nc; ++c) scatter_planes<1>(table, bins, hw, g + c * bins, plane + c * hw);
      }
    }
  });
}

at::Tensor roi_align_forward_cpu(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                                 int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio,
                                 bool aligned) {
  check_forward_args(input, rois, pooled_height, pooled_width, "roi_align");
  TORCH_CHECK(input.device().is_cpu(), "roi_align: the CPU kernel got input on ", input.device());

  const bool channels_last = reads_channels_last(input);
  const at::Tensor in = channels_last ? input : input.contiguous();
  const int64_t num_rois = rois.size(0), channels = input.size(1), height = input.size(2),
                width = input.size(3);
  at::Tensor output = at::empty({num_rois, channels, pooled_height, pooled_width},
                                input.options().memory_format(layout(channels_last)));
  if (output.numel() == 0) return output;
  if (height == 0 || width == 0) return output.zero_();  // nothing to sample from

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "roi_align_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor rois_acc = rois.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    check_batch_indices(rois_acc.const_data_ptr<acc_t>(), num_rois, input.size(0), "roi_align");
    forward_impl<scalar_t, acc_t>(in.const_data_ptr<scalar_t>(), rois_acc.const_data_ptr<acc_t>(),
                                  static_cast<acc_t>(spatial_scale), num_rois, channels, height, width,
                                  pooled_height, pooled_width, sampling_ratio, aligned, channels_last,
                                  output.mutable_data_ptr<scalar_t>());
  });
  return output;
}

at::Tensor roi_align_backward_cpu(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale,
                                  int64_t pooled_height, int64_t pooled_width, int64_t batch_size,
                                  int64_t channels, int64_t height, int64_t width, int64_t sampling_ratio,
                                  bool aligned, bool channels_last) {
  check_backward_args(grad, rois, pooled_height, pooled_width, batch_size, channels, height, width,
                      "_roi_align_backward");
  TORCH_CHECK(grad.device().is_cpu(), "_roi_align_backward: the CPU kernel got grad on ", grad.device());

  const auto fmt = layout(channels_last);
  const auto acc_type = at::toOpMathType(grad.scalar_type());
  // Accumulated in float (double for double) and cast at the end.
  // (at::zeros would ignore the memory format, hence empty + zero_.)
  at::Tensor grad_acc =
      at::empty({batch_size, channels, height, width}, grad.options().dtype(acc_type).memory_format(fmt)).zero_();
  const int64_t num_rois = rois.size(0);
  if (grad_acc.numel() > 0 && num_rois > 0) {
    const at::Tensor g = grad.contiguous(fmt);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const at::Tensor rois_acc = rois.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
      check_batch_indices(rois_acc.const_data_ptr<acc_t>(), num_rois, batch_size, "_roi_align_backward");
      backward_impl<scalar_t, acc_t>(g.const_data_ptr<scalar_t>(), rois_acc.const_data_ptr<acc_t>(),
                                     static_cast<acc_t>(spatial_scale), num_rois, channels, height, width,
                                     pooled_height, pooled_width, sampling_ratio, aligned, channels_last,
                                     grad_acc.mutable_data_ptr<acc_t>());
    });
  }
  return grad_acc.scalar_type() == grad.scalar_type() ? grad_acc : grad_acc.to(grad.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(d3ssl, CPU, m) {
  m.impl("roi_align", &roi_align_forward_cpu);
  m.impl("_roi_align_backward", &roi_align_backward_cpu);
}

}  // namespace d3ssl
