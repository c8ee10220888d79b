// region_erase on the CPU: per image, the ops become bands of rows that they cover alike (see
// region::Bands); a band no op reaches is copied in one piece (out-of-place) or
// skipped (in-place), the rows of the others select fill or input through the band's hole mask, as
// words. Images are spread over threads.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "ops/cpu/region_cpu.h"
#include "ops/region.h"

namespace d3ssl {
namespace {

using region::Layout;

template <typename word_t>
void erase_batch(const word_t* in, word_t* out, bool inplace, word_t fill, Layout layout,
                 int64_t B, int64_t C, int64_t H, int64_t W, const float* rects,
                 const bool* erase, const int64_t* offsets) {
  const int64_t cw = layout == Layout::NHWC ? C : 1;  // elements per pixel in a row
  const int64_t row = W * cw;                         // elements per row
  const int64_t plane = H * row;                      // NCHW: one channel; NHWC: the image
  const int64_t planes = layout == Layout::NHWC ? 1 : C;
  const int64_t image = C * H * W;
  const size_t row_bytes = static_cast<size_t>(row) * sizeof(word_t);
  const bool streaming = !inplace && region::use_streaming(B * image * int64_t(sizeof(word_t)));
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    region::Bands bands;
    std::vector<word_t> hole(static_cast<size_t>(row));
    for (int64_t b = begin; b < end; ++b) {
      bands.build(rects, erase, offsets[b], offsets[b + 1], H, W, 0, W, 0, H);
      for (int64_t band = 0; band < bands.size(); ++band) {
        const int64_t y0 = bands.first_row(band), rows = bands.end_row(band) - y0;
        const bool covered = bands.hole_words(band, cw, row, /*init_hole=*/false, hole.data());
        for (int64_t c = 0; c < planes; ++c) {
          const int64_t at = b * image + c * plane + y0 * row;
          if (!covered) {  // the band's rows are contiguous: one copy
            if (!inplace) region::copy_bytes(out + at, in + at, rows * row_bytes, streaming);
            continue;
          }
          for (int64_t y = 0; y < rows; ++y) {
            word_t* dst = out + at + y * row;
            // Whole rows, even in place and where the ops reach only part of the row: rows read
            // in pieces defeat the hardware prefetcher (copies around a select of the reached
            // stretch, or in place a select of that stretch alone, were 10-40% slower).
            const word_t* src = inplace ? dst : in + at + y * row;
            region::select_fill(dst, src, fill, hole.data(), row, streaming);
          }
        }
      }
    }
    if (streaming) region::stream_fence();
  });
}

// Writes the result into `out` (which may be `images` itself).
// `inplace`: out is images itself, only the erased elements are written.
void region_erase_into(const at::Tensor& images, const at::Tensor& out, const at::Tensor& rects,
                       const at::Tensor& erase, const at::Tensor& offsets, double fill,
                       Layout layout, bool inplace) {
  const int64_t B = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  if (images.numel() == 0) return;
  const auto rects_c = rects.contiguous();
  const auto erase_c = erase.contiguous();
  const auto offsets_c = offsets.contiguous();
  D3SSL_DISPATCH_WORD(images, "region_erase", [&] {
    erase_batch<word_t>(static_cast<const word_t*>(images.const_data_ptr()),
                        static_cast<word_t*>(out.data_ptr()), inplace,
                        region::fill_bits<word_t>(fill, images.scalar_type()), layout, B, C, H,
                        W, rects_c.const_data_ptr<float>(), erase_c.const_data_ptr<bool>(),
                        offsets_c.const_data_ptr<int64_t>());
  });
}

void check(const at::Tensor& images, const at::Tensor& rects, const at::Tensor& erase,
           const at::Tensor& offsets) {
  region::check_images(images, "images");
  region::check_ops(images, rects, erase, offsets, "images");
  const auto off = offsets.contiguous();
  region::check_offsets_values(off.const_data_ptr<int64_t>(), images.size(0), rects.size(0));
}

at::Tensor region_erase_cpu(const at::Tensor& images, const at::Tensor& rects,
                            const at::Tensor& erase, const at::Tensor& offsets, double fill) {
  check(images, rects, erase, offsets);
  const Layout layout = region::layout_of(images);
  const auto in = images.contiguous(region::memory_format(layout));  // a copy only for odd strides
  auto out = region::empty_output(in, region::memory_format(layout));
  region_erase_into(in, out, rects, erase, offsets, fill, layout, /*inplace=*/false);
  return out;
}

void region_erase_inplace_cpu(const at::Tensor& images, const at::Tensor& rects,
                                     const at::Tensor& erase, const at::Tensor& offsets,
                                     double fill) {
  check(images, rects, erase, offsets);
  const Layout layout = region::layout_of(images);
  if (images.is_contiguous(region::memory_format(layout))) {
    region_erase_into(images, images, rects, erase, offsets, fill, layout, true);
  } else {  // odd strides: work on a dense copy and write it back
    auto dense = images.contiguous(region::memory_format(layout));
    region_erase_into(dense, dense, rects, erase, offsets, fill, layout, true);
    images.copy_(dense);
  }
}

void region_erase_out_cpu(const at::Tensor& images, const at::Tensor& rects,
                          const at::Tensor& erase, const at::Tensor& offsets, double fill,
                          const at::Tensor& out) {
  check(images, rects, erase, offsets);
  const Layout layout = region::layout_of(images);
  region::check_out(out, images, layout, "images");
  if (region::out_is_input(out, images, "images")) {
    region_erase_inplace_cpu(images, rects, erase, offsets, fill);
    return;
  }
  const auto in = images.contiguous(region::memory_format(layout));  // a copy only for odd strides
  region_erase_into(in, out, rects, erase, offsets, fill, layout, /*inplace=*/false);
}

}  // namespace

TORCH_LIBRARY_IMPL(d3ssl, CPU, m) {
  m.impl("region_erase", &region_erase_cpu);
  m.impl("region_erase_", &region_erase_inplace_cpu);
  m.impl("region_erase_out", &region_erase_out_cpu);
}

}  // namespace d3ssl
