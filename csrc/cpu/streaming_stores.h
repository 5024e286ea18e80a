// Non-temporal ("streaming") stores for outputs larger than the caches.
//
// A plain store to a line that is not cached first reads the line from memory (read for
// ownership): writing a gradient of G bytes moves 2G bytes. A streaming store goes to a
// write-combining buffer and on to memory as whole lines, without the read and without evicting the
// inputs from the caches: G bytes. That pays when the output will not be re-read from the caches
// anyway, i.e. when the kernel streams more bytes than the last-level cache holds
// (`streaming_worthwhile`, a threshold tests and tuning can move); for smaller outputs plain stores
// are kept, and the consumer of the gradient (the next backward op) may find it cached.
//
// The kernels compute a chunk of an output row into an L1-resident buffer and copy it out with
// `stream_bytes` (16-byte SSE2 stores, the x86-64 baseline, so every clone of a multiversioned
// function can use them; the write-combining buffers merge them into full lines). Streaming stores
// are weakly ordered: every thread that issued them calls `stream_fence` before its work is
// published. Elsewhere (non-x86) these helpers are plain copies and fills.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__SSE2__)
#include <emmintrin.h>
#define MMFAST_STREAMING_STORES 1
#endif

#include "storage.h"
#include "vec_math.h"

namespace mmfast::cpu {

// Elements per chunk of an output row computed in L1 before it is streamed out.
constexpr int64_t kStreamChunk = 512;

// True when a kernel that moves `bytes` (read + written) should write its large outputs with
// streaming stores: more than cpu_streaming_min_bytes() (mmfast/kernels.h; by default the
// last-level cache size), on x86-64. Defined in streaming_stores.cpp.
bool streaming_worthwhile(int64_t bytes);

// dst[0:n) = src[0:n) (bytes): streaming stores on the 16-byte aligned part of dst, plain ones on
// the unaligned head and tail.
MMFAST_INLINE void stream_bytes(void* dst, const void* src, std::size_t n) {
#ifdef MMFAST_STREAMING_STORES
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  const std::size_t head = std::min<std::size_t>(n, (16 - (reinterpret_cast<std::uintptr_t>(d) & 15)) & 15);
  std::memcpy(d, s, head);
  d += head;
  s += head;
  n -= head;
  for (; n >= 16; n -= 16, d += 16, s += 16)
    _mm_stream_si128(reinterpret_cast<__m128i*>(d), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
  std::memcpy(d, s, n);
#else
  std::memcpy(dst, src, n);
#endif
}

// dst[0:n) = 0 (bytes), streaming stores where aligned (all-zero bits: +0 in every float type).
MMFAST_INLINE void stream_zero(void* dst, std::size_t n) {
#ifdef MMFAST_STREAMING_STORES
  char* d = static_cast<char*>(dst);
  const std::size_t head = std::min<std::size_t>(n, (16 - (reinterpret_cast<std::uintptr_t>(d) & 15)) & 15);
  std::memset(d, 0, head);
  d += head;
  n -= head;
  const __m128i zero = _mm_setzero_si128();
  for (; n >= 16; n -= 16, d += 16) _mm_stream_si128(reinterpret_cast<__m128i*>(d), zero);
  std::memset(d, 0, n);
#else
  std::memset(dst, 0, n);
#endif
}

// dst[j] = value(j) for j in [begin, end), converted to the storage type: plain stores, or with
// `streaming` a chunk at a time through an L1 buffer and streaming stores (the caller fences).
template <typename T, typename Value>
MMFAST_INLINE void write_elements(T* __restrict dst, int64_t begin, int64_t end, bool streaming, Value&& value) {
  if (!streaming) {
#pragma omp simd
    for (int64_t j = begin; j < end; ++j) dst[j] = from_compute<T>(value(j));
    return;
  }
  alignas(64) T buf[kStreamChunk];
  for (int64_t j0 = begin; j0 < end; j0 += kStreamChunk) {
    const int64_t n = std::min(kStreamChunk, end - j0);
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) buf[k] = from_compute<T>(value(j0 + k));
    stream_bytes(dst + j0, buf, static_cast<std::size_t>(n) * sizeof(T));
  }
}

// Orders this thread's streaming stores before its later stores (and before the OpenMP barrier
// that publishes its work).
MMFAST_INLINE void stream_fence() {
#ifdef MMFAST_STREAMING_STORES
  _mm_sfence();
#endif
}

}  // namespace mmfast::cpu
