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
// 3. Outputs of 1 MiB or more are kept when freed, in a small cache of blocks (as torch's caching
//    allocator keeps CUDA memory), and a later output of the same size takes one: a loop that calls
//    the ops on same-sized batches then writes into memory that is already mapped, with no page
//    faults at all. A block goes back to the cache only when its tensor is freed, so no live output is ever
//    reused. D3SSL_OUTPUT_CACHE_MB (read once; default 512, 0 = off) bounds the memory it keeps.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/MemoryFormat.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#endif
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace d3ssl {
namespace region {

// Outputs of at least this many bytes get huge pages when the cache is off: glibc's largest mmap
// threshold, so such a buffer is always a mapping of its own, fresh (smaller ones are often recycled
// heap memory, already faulted in) and unmapped when freed, taking the advice with it.
constexpr int64_t kHugePageOutputBytes = int64_t(32) << 20;
// Outputs of at least this many bytes come from the cache of freed outputs (point 3).
constexpr int64_t kCachedOutputBytes = int64_t(1) << 20;
// Outputs of at least this many bytes are written with streaming stores: about the size of a large
// last-level cache, above which the output would not stay cached for its consumer anyway.
constexpr int64_t kStreamingOutputBytes = int64_t(24) << 20;

// Asks for transparent huge pages on the whole 2 MiB pages inside [p, p + bytes) (a hint: without
// THP support, or with THP disabled, nothing changes; the advice never reaches other memory).
inline void advise_huge_pages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const auto begin = reinterpret_cast<uintptr_t>(p);
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (begin + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

#if defined(__linux__)
// The cache of large output blocks (point 3 above). Blocks are private anonymous mappings, reused
// only for an output of exactly their size; the oldest is unmapped when a new one would exceed the
// bound. One process-wide instance, never destroyed (outputs may be freed during interpreter exit).
class OutputBlocks {
 public:
  static OutputBlocks& instance() {
    static OutputBlocks* blocks = new OutputBlocks();
    return *blocks;
  }

  // A block of `bytes` bytes: a cached one, else a new mapping (nullptr when mmap fails).
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (size_t i = 0; i < free_.size(); ++i) {
        if (free_[i].second == bytes) {
          void* p = free_[i].first;
          free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(i));
          held_ -= bytes;
          return p;
        }
      }
    }
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return nullptr;
    advise_huge_pages(p, static_cast<int64_t>(bytes));
    return p;
  }

  // Called when the output owning the block is freed.
  void give(void* p, size_t bytes) {
    std::vector<std::pair<void*, size_t>> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (bytes > limit_) {
        evicted.emplace_back(p, bytes);
      } else {
        while (held_ + bytes > limit_ && !free_.empty()) {
          evicted.push_back(free_.front());
          held_ -= free_.front().second;
          free_.erase(free_.begin());
        }
        free_.emplace_back(p, bytes);
        held_ += bytes;
      }
    }
    for (const auto& b : evicted) munmap(b.first, b.second);
  }

  bool enabled() const { return limit_ > 0; }

  // [blocks held, bytes held, bound in bytes], for tests and diagnostics.
  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {static_cast<int64_t>(free_.size()), static_cast<int64_t>(held_), static_cast<int64_t>(limit_)};
  }

 private:
  OutputBlocks() {
    const char* env = std::getenv("D3SSL_OUTPUT_CACHE_MB");
    const long mb = env != nullptr ? std::strtol(env, nullptr, 10) : 512;
    limit_ = mb > 0 ? static_cast<size_t>(mb) << 20 : 0;
    // fork() takes the lock first and both processes release it after, so a child never inherits
    // the cache half-updated by another thread (the locked sections are short and never fork).
    pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                   [] { instance().mutex_.unlock(); });
  }

  std::mutex mutex_;
  std::vector<std::pair<void*, size_t>> free_;  // oldest first
  size_t held_ = 0;
  size_t limit_ = 0;
};
#endif

// OutputBlocks::stats(), or zeros where there is no cache.
inline std::vector<int64_t> output_cache_stats() {
#if defined(__linux__)
  return OutputBlocks::instance().stats();
#else
  return {0, 0, 0};
#endif
}

// at::empty_like(like, format) for a kernel that overwrites every element: outputs of at least
// kCachedOutputBytes come from OutputBlocks (huge pages where whole 2 MiB pages fit), smaller ones
// from torch's allocator.
inline at::Tensor empty_output(const at::Tensor& like, at::MemoryFormat format) {
  const int64_t bytes = like.numel() * like.element_size();
#if defined(__linux__)
  if (bytes >= kCachedOutputBytes && OutputBlocks::instance().enabled()) {
    const auto size = static_cast<size_t>(bytes);
    if (void* p = OutputBlocks::instance().take(size)) {
      const auto sizes = like.sizes();
      std::vector<int64_t> strides(sizes.size(), 1);
      if (format == at::MemoryFormat::ChannelsLast) {
        strides = c10::get_channels_last_strides_2d(sizes);
      } else {
        for (int64_t d = static_cast<int64_t>(sizes.size()) - 2; d >= 0; --d) strides[d] = strides[d + 1] * sizes[d + 1];
      }
      return at::from_blob(
          p, sizes, strides, [size](void* q) { OutputBlocks::instance().give(q, size); }, like.options());
    }
  }
#endif
  at::Tensor out = at::empty_like(like, format);
  if (bytes >= kHugePageOutputBytes) advise_huge_pages(out.data_ptr(), bytes);
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

// dst[i] = hole[i] ? b[i] : a[i] over n words whose hole words are all ones or zero: (a & ~hole) |
// (b & hole), 16 bytes at a time. dst must not overlap a, b or hole.
template <typename word_t>
inline void select_words(word_t* __restrict dst, const word_t* __restrict a,
                         const word_t* __restrict b, const word_t* __restrict hole, int64_t n) {
  int64_t i = 0;
#if defined(__SSE2__)
  // A cache line (4 vectors) per iteration keeps several loads of each source in flight.
  constexpr int64_t kPerVector = 16 / sizeof(word_t);
  const auto select = [&](int64_t at) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(hole + at));
    const __m128i va = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a + at));
    const __m128i vb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + at));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + at),
                     _mm_or_si128(_mm_andnot_si128(h, va), _mm_and_si128(h, vb)));
  };
  for (; i + 4 * kPerVector <= n; i += 4 * kPerVector) {
    select(i);
    select(i + kPerVector);
    select(i + 2 * kPerVector);
    select(i + 3 * kPerVector);
  }
  for (; i + kPerVector <= n; i += kPerVector) select(i);
#endif
  for (; i < n; ++i) dst[i] = static_cast<word_t>((a[i] & ~hole[i]) | (b[i] & hole[i]));
}

// The 16-byte vector of `fill` repeated (SSE2 builds).
#if defined(__SSE2__)
template <typename word_t>
inline __m128i fill_vector(word_t fill) {
  word_t pattern[16 / sizeof(word_t)];
  for (auto& w : pattern) w = fill;
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(pattern));
}
#endif

// dst[i] = hole[i] ? fill : a[i] over n words; dst may be a (in place), nothing else may overlap.
// With `streaming` (never in place), the 16-byte-aligned part of dst is written with streaming
// stores, in the same single pass (call stream_fence() before the data is handed on).
template <typename word_t>
inline void select_fill(word_t* dst, const word_t* a, word_t fill, const word_t* __restrict hole,
                        int64_t n, bool streaming = false) {
  int64_t i = 0;
#if defined(__SSE2__)
  // Streaming stores need dst 16-byte aligned, reached in whole words only when dst is aligned to
  // its word size (torch allows an output that is not, e.g. one made from a byte buffer); the
  // 16-byte fill pattern then starts on a word boundary too.
  streaming = streaming && reinterpret_cast<uintptr_t>(dst) % sizeof(word_t) == 0;
  if (streaming) {
    const int64_t head = static_cast<int64_t>(((16 - (reinterpret_cast<uintptr_t>(dst) & 15)) & 15) / sizeof(word_t));
    for (const int64_t end = std::min(head, n); i < end; ++i) {
      dst[i] = static_cast<word_t>((a[i] & ~hole[i]) | (fill & hole[i]));
    }
  }
  constexpr int64_t kPerVector = 16 / sizeof(word_t);
  const __m128i f = fill_vector(fill);
  for (; i + kPerVector <= n; i += kPerVector) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(hole + i));
    const __m128i va = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a + i));
    const __m128i r = _mm_or_si128(_mm_andnot_si128(h, va), _mm_and_si128(h, f));
    if (streaming) {
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), r);
    } else {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), r);
    }
  }
#else
  (void)streaming;
#endif
  for (; i < n; ++i) dst[i] = static_cast<word_t>((a[i] & ~hole[i]) | (fill & hole[i]));
}

}  // namespace region
}  // namespace d3ssl
