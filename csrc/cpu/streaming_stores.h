// Non-temporal ("streaming") stores for outputs larger than the caches.
//
// A plain store to a line that is not cached first reads the line from memory (read for
// ownership): writing a gradient of G bytes moves 2G bytes. A streaming store goes to a
// write-combining buffer and on to memory as whole lines, without the read and without evicting the
// inputs from the caches: G bytes. That pays when the output will not be re-read from the caches
// anyway, i.e. when the kernel streams more bytes than the last-level cache holds, or 64 MiB
// (`streaming_worthwhile`, a threshold tests and tuning can move); for smaller outputs plain stores
// are kept, and the consumer of the gradient (the next backward op) may find it cached.
//
// The kernels form their outputs a cache line at a time in registers and store each line with the
// widest store of the CPU's ISA level (`write_lines`, `with_isa`). Streaming stores are weakly
// ordered: every thread that issued them calls `stream_fence` before its work is published. Elsewhere
// (non-x86) the lines are plain copies.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) && defined(__SSE2__)
#include <immintrin.h>
#define MMFAST_STREAMING_STORES 1
#endif
#if defined(MMFAST_STREAMING_STORES) && defined(__ELF__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(MMFAST_NO_ISA_CLONES)
#define MMFAST_ISA_DISPATCH 1
#endif

#include "storage.h"
#include "vec_math.h"

namespace mmfast::cpu {

// Elements per chunk of a row whose sums are formed before its outputs are written (the chunk's
// inputs are re-read from L1).
constexpr int64_t kStreamChunk = 512;

// True when a kernel that moves `bytes` (read + written) should write its large outputs with
// streaming stores: more than cpu_streaming_min_bytes() (mmfast/kernels.h; by default the
// last-level cache size, at most 64 MiB), on x86-64. Defined in streaming_stores.cpp.
bool streaming_worthwhile(int64_t bytes);

// ---- Line groups: outputs computed a cache line at a time and stored from registers ----
//
// The widest streaming store writes a whole 64-byte line from one register, which the write-combining
// buffers pass on at once; 16-byte stores of the same line, or a copy out of an L1 buffer, took up to
// 1.7x the time on a Zen 4 core in a standalone model of the Uni-Instruct pass (three outputs; see
// benchmarks/results/cpu-2026-11-27-e). The widest store is an instruction of the ISA level, so a loop
// that uses it is built once per level by hand (`with_isa`) rather than by target_clones: IsaV4
// (AVX-512) stores a line with one instruction, IsaV3 (AVX2) with two, IsaBase with four SSE2 stores
// (or a plain copy off x86-64).

constexpr int64_t kLineBytes = 64;

struct IsaBase {
  static MMFAST_INLINE void stream_line(void* dst, const void* src) {
#ifdef MMFAST_STREAMING_STORES
    for (int i = 0; i < 4; ++i)
      _mm_stream_si128(static_cast<__m128i*>(dst) + i, _mm_load_si128(static_cast<const __m128i*>(src) + i));
#else
    std::memcpy(dst, src, kLineBytes);
#endif
  }
};

#ifdef MMFAST_ISA_DISPATCH
#define MMFAST_TARGET_V3 __attribute__((target("arch=x86-64-v3")))
#define MMFAST_TARGET_V4 __attribute__((target("arch=x86-64-v4")))
// stream_line is not always_inline: it may only be inlined into code built for its level, which
// the flatten attribute of run_isa_v3 / run_isa_v4 below does.
struct IsaV3 {
  MMFAST_TARGET_V3 static inline void stream_line(void* dst, const void* src) {
    for (int i = 0; i < 2; ++i)
      _mm256_stream_si256(static_cast<__m256i*>(dst) + i, _mm256_load_si256(static_cast<const __m256i*>(src) + i));
  }
};
struct IsaV4 {
  MMFAST_TARGET_V4 static inline void stream_line(void* dst, const void* src) {
    _mm512_stream_si512(static_cast<__m512i*>(dst), _mm512_load_si512(src));
  }
};

// The level the with_isa kernels run at: 4 (x86-64-v4), 3 (x86-64-v3) or 0, this CPU's (read once)
// unless set_cpu_isa_level (mmfast/kernels.h) caps it lower.
int isa_level();

template <typename Body>
MMFAST_TARGET_V4 __attribute__((flatten)) void run_isa_v4(const Body& body) {
  body(IsaV4{});
}
template <typename Body>
MMFAST_TARGET_V3 __attribute__((flatten)) void run_isa_v3(const Body& body) {
  body(IsaV3{});
}
template <typename Body>
__attribute__((flatten)) void run_isa_base(const Body& body) {
  body(IsaBase{});
}

// body(isa) built for each ISA level (everything it calls inlined: flatten), run at isa_level()'s.
template <typename Body>
MMFAST_INLINE void with_isa(const Body& body) {
  const int level = isa_level();
  if (level >= 4) {
    run_isa_v4(body);
  } else if (level == 3) {
    run_isa_v3(body);
  } else {
    run_isa_base(body);
  }
}
#else
template <typename Body>
MMFAST_INLINE void with_isa(const Body& body) {
  body(IsaBase{});
}
#endif

// Elements from p to the next line boundary (0 when p is on one), or -1 when T-sized steps from p
// never reach one (p not aligned to sizeof(T)).
template <typename T>
MMFAST_INLINE int64_t elements_to_line(const T* p) {
  const auto offset = static_cast<int64_t>(reinterpret_cast<std::uintptr_t>(p) % kLineBytes);
  if (offset % int64_t{sizeof(T)} != 0) return -1;
  return (kLineBytes - offset) % kLineBytes / int64_t{sizeof(T)};
}

// Where value(j, out) puts output n of element j: out[n], the line buffer's row n at j's lane. (A
// private `F out[N]` array in the `omp simd` loop stops gcc's vectorizer; this strided reference
// does not.)
template <typename F, int64_t G>
struct LineSlot {
  F* lane;
  MMFAST_INLINE F& operator[](int n) const { return lane[n * G]; }
};

// Up to N outputs per element: value(j, out) sets out[0..N) (compute type) for j in [begin, end),
// and out[n] is stored to dst[n][j] (a null dst[n] is not written). Whole lines are computed in
// registers (an `omp simd` loop over one line of elements) and stored with `isa`'s widest store,
// streaming with `streaming` (the caller fences), plain otherwise; the elements before dst's first
// line boundary and after its last one are stored one at a time. Streaming needs every dst[n] at
// the same offset from a line boundary; otherwise (never for rows of tensors torch allocated alike)
// the lines are stored plain.
template <typename Isa, typename T, int N, typename Value>
MMFAST_INLINE void write_lines(Isa, T* const (&dst)[N], int64_t begin, int64_t end, bool streaming,
                               Value&& value) {
  using F = compute_t<T>;
  constexpr int64_t G = kLineBytes / int64_t{sizeof(T)};
  const T* first = nullptr;
  for (int n = 0; n < N; ++n) {
    if (first == nullptr && dst[n] != nullptr) first = dst[n] + begin;
  }
  if (first == nullptr || begin >= end) return;
  int64_t head = elements_to_line(first);
  for (int n = 0; n < N; ++n) {
    if (dst[n] != nullptr && elements_to_line(dst[n] + begin) != head) head = -1;
  }
  if (head < 0) {  // no common line boundary: plain stores throughout
    head = 0;
    streaming = false;
  }
  const auto one_by_one = [&](int64_t j0, int64_t j1) MMFAST_INLINE_LAMBDA {
    for (int64_t j = j0; j < j1; ++j) {
      F out[N];
      value(j, LineSlot<F, 1>{out});
      for (int n = 0; n < N; ++n) {
        if (dst[n] != nullptr) dst[n][j] = from_compute<T>(out[n]);
      }
    }
  };
  const int64_t lines_begin = std::min(end, begin + head);
  const int64_t lines_end = lines_begin + (end - lines_begin) / G * G;
  one_by_one(begin, lines_begin);
  for (int64_t j0 = lines_begin; j0 < lines_end; j0 += G) {
    alignas(kLineBytes) F line[N][G];
#pragma omp simd
    for (int64_t k = 0; k < G; ++k) value(j0 + k, LineSlot<F, G>{&line[0][k]});
    for (int n = 0; n < N; ++n) {
      if (dst[n] == nullptr) continue;
      alignas(kLineBytes) T stored[G];
      if constexpr (std::is_same_v<T, F>) {
        std::memcpy(stored, line[n], kLineBytes);
      } else {
#pragma omp simd
        for (int64_t k = 0; k < G; ++k) stored[k] = from_compute<T>(line[n][k]);
      }
      if (streaming) {
        Isa::stream_line(dst[n] + j0, stored);
      } else {
        std::memcpy(dst[n] + j0, stored, kLineBytes);
      }
    }
  }
  one_by_one(lines_end, end);
}

// dst[0:n) = 0 (+0 in every float type): whole lines with `isa`'s widest streaming store, the
// bytes before the first line boundary and after the last one with plain stores (the caller fences).
template <typename Isa>
MMFAST_INLINE void stream_zero(Isa, void* dst, std::size_t n) {
  alignas(kLineBytes) static constexpr char kZeroLine[kLineBytes] = {};
  char* d = static_cast<char*>(dst);
  const std::size_t head =
      std::min<std::size_t>(n, (kLineBytes - reinterpret_cast<std::uintptr_t>(d) % kLineBytes) % kLineBytes);
  std::memset(d, 0, head);
  d += head;
  n -= head;
  for (; n >= std::size_t{kLineBytes}; n -= kLineBytes, d += kLineBytes) Isa::stream_line(d, kZeroLine);
  std::memset(d, 0, n);
}

// Orders this thread's streaming stores before its later stores (and before the OpenMP barrier
// that publishes its work).
MMFAST_INLINE void stream_fence() {
#ifdef MMFAST_STREAMING_STORES
  _mm_sfence();
#endif
}

}  // namespace mmfast::cpu
