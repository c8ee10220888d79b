// composite on the CPU: per image, the ops (clipped to where the shifted foreground exists) become
// bands of rows that they cover alike; a band no op reaches is copied from the background in one
// piece, the rows of the others select shifted foreground or background through the band's hole
// mask, as words. Images are spread over threads.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "ops/cpu/region_cpu.h"
#include "ops/region.h"

namespace d3ssl {
namespace {

using region::Layout;

template <typename word_t>
void composite_batch(const word_t* fg, const word_t* bg, word_t* out, const int64_t* bg_index,
                     const int64_t* shift, Layout layout, int64_t B, int64_t C, int64_t H,
                     int64_t W, const float* rects, const bool* erase, const int64_t* offsets) {
  const int64_t cw = layout == Layout::NHWC ? C : 1;  // elements per pixel in a row
  const int64_t row = W * cw;                         // elements per row
  const int64_t plane = H * row;                      // NCHW: one channel; NHWC: the image
  const int64_t planes = layout == Layout::NHWC ? 1 : C;
  const int64_t image = C * H * W;
  const size_t row_bytes = static_cast<size_t>(row) * sizeof(word_t);
  const bool streaming = region::use_streaming(B * image * int64_t(sizeof(word_t)));
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    region::Bands bands;
    std::vector<word_t> hole(static_cast<size_t>(row));
    // With streaming stores a row with foreground is assembled here (in L1), then streamed out.
    std::vector<word_t> staged(streaming ? static_cast<size_t>(row) : 0);
    for (int64_t b = begin; b < end; ++b) {
      // A shift of a whole image or more leaves no foreground; clamping keeps the sums small.
      const int64_t dx = std::min(std::max(shift[2 * b], -W), W);
      const int64_t dy = std::min(std::max(shift[2 * b + 1], -H), H);
      // Output pixels whose source (x - dx, y - dy) lies inside the image; the ops are clipped
      // to them, so the foreground is never read out of bounds.
      const int64_t x_lo = std::min(std::max<int64_t>(dx, 0), W);
      const int64_t x_hi = std::max(std::min(W + dx, W), x_lo);
      const int64_t y_lo = std::min(std::max<int64_t>(dy, 0), H);
      const int64_t y_hi = std::max(std::min(H + dy, H), y_lo);
      bands.build(rects, erase, offsets[b], offsets[b + 1], H, W, x_lo, x_hi, y_lo, y_hi);
      const word_t* bg_image = bg + bg_index[b] * image;
      for (int64_t band = 0; band < bands.size(); ++band) {
        const int64_t y0 = bands.first_row(band), rows = bands.end_row(band) - y0;
        const bool covered = bands.hole_words(band, cw, row, /*init_hole=*/true, hole.data());
        // Covered rows select over the whole window [i_lo, i_hi), not only where the ops reach:
        // the foreground is then read in the same stretch of every row, a pattern the hardware
        // prefetcher follows (reading only the stretch the ops reach was ~25% slower at B=64,
        // S=224).
        const int64_t i_lo = x_lo * cw, i_hi = x_hi * cw;
        for (int64_t c = 0; c < planes; ++c) {
          const int64_t at = c * plane + y0 * row;
          if (!covered) {  // background only; the band's rows are contiguous: one copy
            region::copy_bytes(out + b * image + at, bg_image + at, rows * row_bytes, streaming);
            continue;
          }
          for (int64_t y = 0; y < rows; ++y) {
            const int64_t r = at + y * row;
            word_t* dst = out + b * image + r;
            word_t* row_out = streaming ? staged.data() : dst;
            const word_t* back = bg_image + r;
            // Element i of the row comes from element i - (dy * W + dx) * cw of fg's image (source
            // row y - dy, moved by dx pixels), inside the image for i in [i_lo, i_hi).
            const word_t* front = fg + (b * image + r - (dy * W + dx) * cw + i_lo);
            std::memcpy(row_out, back, static_cast<size_t>(i_lo) * sizeof(word_t));
            region::select_words(row_out + i_lo, front, back + i_lo, hole.data() + i_lo, i_hi - i_lo);
            std::memcpy(row_out + i_hi, back + i_hi, static_cast<size_t>(row - i_hi) * sizeof(word_t));
            if (streaming) region::copy_bytes(dst, row_out, row_bytes, true);
          }
        }
      }
    }
    if (streaming) region::stream_fence();
  });
}

// Checks the arguments' values (shapes, dtypes and devices are checked by check_composite).
void check_values(const at::Tensor& fg, const at::Tensor& bg, const at::Tensor& bg_index,
                  const at::Tensor& rects, const at::Tensor& offsets) {
  const int64_t B = fg.size(0);
  const auto offsets_c = offsets.contiguous();
  region::check_offsets_values(offsets_c.const_data_ptr<int64_t>(), B, rects.size(0));
  const auto bg_index_c = bg_index.contiguous();
  const int64_t* bi = bg_index_c.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(bi[b] >= 0 && bi[b] < bg.size(0), "bg_index[", b, "] = ", bi[b],
                " is out of range for bg with ", bg.size(0), " images");
  }
}

// Writes the composite of the dense fg_c, bg_c (layout `layout`) into out.
void composite_into(const at::Tensor& fg_c, const at::Tensor& bg_c, const at::Tensor& bg_index,
                    const at::Tensor& shift, const at::Tensor& rects, const at::Tensor& erase,
                    const at::Tensor& offsets, const at::Tensor& out, Layout layout) {
  if (out.numel() == 0) return;
  const auto bg_index_c = bg_index.contiguous();
  const auto shift_c = shift.contiguous();
  const auto rects_c = rects.contiguous();
  const auto erase_c = erase.contiguous();
  const auto offsets_c = offsets.contiguous();
  D3SSL_DISPATCH_WORD(fg_c, "composite", [&] {
    composite_batch<word_t>(static_cast<const word_t*>(fg_c.const_data_ptr()),
                            static_cast<const word_t*>(bg_c.const_data_ptr()),
                            static_cast<word_t*>(out.data_ptr()),
                            bg_index_c.const_data_ptr<int64_t>(),
                            shift_c.const_data_ptr<int64_t>(), layout, fg_c.size(0), fg_c.size(1),
                            fg_c.size(2), fg_c.size(3), rects_c.const_data_ptr<float>(),
                            erase_c.const_data_ptr<bool>(), offsets_c.const_data_ptr<int64_t>());
  });
}

at::Tensor composite_cpu(const at::Tensor& fg, const at::Tensor& bg, const at::Tensor& bg_index,
                         const at::Tensor& shift, const at::Tensor& rects, const at::Tensor& erase,
                         const at::Tensor& offsets) {
  region::check_composite(fg, bg, bg_index, shift, rects, erase, offsets);
  check_values(fg, bg, bg_index, rects, offsets);
  const Layout layout = region::layout_of(fg);
  const auto format = region::memory_format(layout);
  const auto fg_c = fg.contiguous(format);  // copies only for odd strides
  const auto bg_c = bg.contiguous(format);  // copies when bg's layout differs from fg's
  auto out = region::empty_output(fg_c, format);
  composite_into(fg_c, bg_c, bg_index, shift, rects, erase, offsets, out, layout);
  return out;
}

void composite_out_cpu(const at::Tensor& fg, const at::Tensor& bg, const at::Tensor& bg_index,
                       const at::Tensor& shift, const at::Tensor& rects, const at::Tensor& erase,
                       const at::Tensor& offsets, const at::Tensor& out) {
  region::check_composite(fg, bg, bg_index, shift, rects, erase, offsets);
  check_values(fg, bg, bg_index, rects, offsets);
  const Layout layout = region::layout_of(fg);
  region::check_out(out, fg, layout, "fg");
  const auto format = region::memory_format(layout);
  const auto fg_c = fg.contiguous(format);
  const auto bg_c = bg.contiguous(format);
  region::check_out_apart(out, fg_c, bg_c);
  composite_into(fg_c, bg_c, bg_index, shift, rects, erase, offsets, out, layout);
}

}  // namespace

TORCH_LIBRARY_IMPL(d3ssl, CPU, m) {
  m.impl("composite", &composite_cpu);
  m.impl("composite_out", &composite_out_cpu);
}

}  // namespace d3ssl
