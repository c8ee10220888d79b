// Memory helpers of the CPU region kernels (region_erase, composite). Both kernels write every
// element of a batch-sized output once and never read it back, so on large batches (B=64 at 224 px
// is 38.5 MB in float32) their time is that of moving memory: the helpers make that cheaper.
//
// 1. A fresh output is first touched by the kernel. With 4 KiB pages that is one page fault (and
//    a kernel-side zeroing) per 4 KiB, which on a 38.5 MB output costs ~2x the copy itself.
//    empty_output asks Linux for transparent huge pages on the output (MADV_HUGEPAGE, as torch's
//    own THP_MEM_ALLOC_ENABLE does for every allocation): one fault per 2 MiB.
// 2. Rows are written with non-temporal (streaming) stores when the output is much larger than the
//    cache: they skip the read-for-ownership of the destination line, so a row costs one read and
//    one write of memory instead of two reads and one write, and do not evict the inputs.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace d3ssl {
namespace region {

// Outputs of at least this many bytes get huge pages: glibc's largest mmap threshold, so such a
// buffer is always a mapping of its own, fresh (smaller ones are often recycled heap memory, already
// faulted in) and unmapped when freed, taking the advice with it.
constexpr int64_t kHugePageOutputBytes = int64_t(32) << 20;
// Outputs of at least this many bytes are written with streaming stores: about the size of a large
// last-level cache, above which the output would not stay cached for its consumer anyway.
constexpr int64_t kStreamingOutputBytes = int64_t(24) << 20;

// at::empty_like(like, format), with transparent huge pages requested for large outputs (a hint:
// without THP support, or with THP disabled, it is an ordinary allocation).
inline at::Tensor empty_output(const at::Tensor& like, at::MemoryFormat format) {
  at::Tensor out = at::empty_like(like, format);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t bytes = out.numel() * out.element_size();
  if (bytes >= kHugePageOutputBytes) {
    constexpr uintptr_t kHuge = uintptr_t(2) << 20;
    const auto begin = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t hi = (begin + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
    // Only whole 2 MiB pages inside the buffer: the advice never reaches other memory.
    if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
  }
#endif
  return out;
}

// Whether an output of `bytes` bytes is written with streaming stores.
inline bool use_streaming(int64_t bytes) {
#if defined(__SSE2__)
  return bytes >= kStreamingOutputBytes;
#else
  (void)bytes;
  return false;
#endif
}

// Copies n bytes; with `streaming`, the 16-byte-aligned part of dst is written with non-temporal
// stores (call stream_fence() before the data is handed to another thread or returned).
inline void copy_bytes(void* dst, const void* src, size_t n, bool streaming) {
#if defined(__SSE2__)
  if (streaming && n >= 64) {
    auto* d = static_cast<char*>(dst);
    const auto* s = static_cast<const char*>(src);
    const size_t head = (16 - (reinterpret_cast<uintptr_t>(d) & 15)) & 15;
    std::memcpy(d, s, head);
    d += head;
    s += head;
    n -= head;
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 16));
      const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 32));
      const __m128i e = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 48));
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), a);
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 16), b);
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 32), c);
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 48), e);
    }
    for (; i + 16 <= n; i += 16) {
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i),
                       _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
    }
    std::memcpy(d + i, s + i, n - i);
    return;
  }
#endif
  (void)streaming;
  std::memcpy(dst, src, n);
}

// Orders this thread's streaming stores before anything that follows (a no-op without SSE2).
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

}  // namespace region
}  // namespace d3ssl
