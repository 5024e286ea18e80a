// Row primitives shared by the CPU kernels: strided row loads into a per-thread buffer, the
// softmax statistics of a row, strided row stores, per-thread workspaces and the OpenMP row loop.
// Every loop is a `#pragma omp simd` loop over the classes of one row with a unit-stride fast path.
// Row sums accumulate in double: with 4..16 lanes of naive fp32 accumulation a sum of 1k-10k
// terms is off by ~1e-6 relative, beyond torch's own fp32 reductions (softmax normalizers) and
// amplified where terms cancel (divergence terms, gradient sums, dot products).
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <new>
#include <type_traits>

#include "storage.h"
#include "vec_math.h"

namespace mmfast::cpu {

template <typename F>
constexpr F kInf = std::numeric_limits<F>::infinity();
template <typename F>
constexpr F kNaN = std::numeric_limits<F>::quiet_NaN();

// Calls body(s) with s the compile-time constant 1 when stride == 1 (the loop inside body then
// vectorizes with contiguous loads and stores) and with the runtime stride otherwise.
template <typename Body>
MMFAST_INLINE auto with_stride(int64_t stride, Body&& body) {
  return stride == 1 ? body(std::integral_constant<int64_t, 1>{}) : body(stride);
}

// max_c src[c] * scale (scale > 0). A NaN element may be skipped by the max, but it still poisons the exp sum
// of its row (as in torch).
template <typename T, typename F = compute_t<T>>
MMFAST_INLINE F row_max(const T* __restrict src, int64_t C, F scale) {
  F m = -kInf<F>;
#pragma omp simd reduction(max : m)
  for (int64_t c = 0; c < C; ++c) {
    const F v = to_compute(src[c]);
    m = v > m ? v : m;
  }
  return m * scale;  // = max_c src[c] * scale: scale > 0 and rounding is monotonic
}

// dst[c] (+)= weight * src[c * stride] * scale (assigns when !accumulate); returns max_c dst[c].
template <typename T, typename F = compute_t<T>>
MMFAST_INLINE F axpy_scaled(const T* __restrict src, int64_t stride, int64_t C, F scale, F weight,
                            bool accumulate, F* __restrict dst) {
  // one loop per value of accumulate: GCC's unswitching of the loop-invariant test is not reliable in large
  // callers (routed_rows left the loop scalar, 2.5x slower)
  const auto loop = [&](auto s, auto acc) MMFAST_INLINE_LAMBDA {
    F m = -kInf<F>;
#pragma omp simd reduction(max : m)
    for (int64_t c = 0; c < C; ++c) {
      const F v = weight * (to_compute(src[c * s]) * scale);
      const F r = acc ? dst[c] + v : v;
      dst[c] = r;
      m = r > m ? r : m;
    }
    return m;
  };
  return with_stride(stride, [&](auto s) MMFAST_INLINE_LAMBDA {
    return accumulate ? loop(s, std::true_type{}) : loop(s, std::false_type{});
  });
}

// sum_c src[c * stride] * scale * y[c]
template <typename T, typename F = compute_t<T>>
MMFAST_INLINE F dot_scaled(const T* __restrict src, int64_t stride, int64_t C, F scale,
                           const F* __restrict y) {
  return with_stride(stride, [&](auto s) MMFAST_INLINE_LAMBDA {
    double acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t c = 0; c < C; ++c) acc += (to_compute(src[c * s]) * scale) * y[c];
    return F(acc);
  });
}

// sum_c v[c]
template <typename F>
MMFAST_INLINE F row_sum(const F* __restrict v, int64_t C) {
  double acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t c = 0; c < C; ++c) acc += v[c];
  return F(acc);
}

// Softmax statistics of a row: v[c] = row[c] - max (shifted logits), e[c] = exp(v[c]). Then
// log softmax = v[c] - log_sum and softmax = e[c] * inv_sum: one exp per element, no log.
template <typename F>
struct SoftmaxStats {
  F log_sum, inv_sum;
};

template <typename F>
MMFAST_INLINE SoftmaxStats<F> softmax_stats(double sum) {
  return {F(std::log(sum)), F(1 / sum)};
}

// The same for a row held in v (max m): v[c] -= m in place, e[c] = exp(v[c]).
template <typename F>
MMFAST_INLINE SoftmaxStats<F> shift_exp(F* __restrict v, F m, int64_t C, F* __restrict e) {
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < C; ++c) {
    const F t = v[c] - m;
    const F ex = exp_nonpos(t);
    v[c] = t;
    e[c] = ex;
    sum += ex;
  }
  return softmax_stats<F>(sum);
}

// Classes per block of a sweep's float sums (routed_kd.cpp's KL teacher sweep, mutual_kd.cpp's last sweep), each
// block's sums added to doubles: a vectorized loop sums a block / (vector width) terms per lane, and keeps its sums
// in float (a double sum converts each vector to two). Gradients that cancel against the sums (routed KD's dz,
// mutual KD's) take the shorter block: a scalar build summing 1024 terms in a row missed the tests' fp32 bounds
// there by up to 1.6x. exp_row sums in double (its sums also normalise mutual KD's models).
constexpr int64_t kSweepBlock = 1024;
constexpr int64_t kCancellingSweepBlock = 256;

// The softmax statistics of the unit-stride row src[c] * scale whose max m is known: v[c] = shifted
// logits, e[c] = their exp. The same sweep returns in *next_max the max of `next`, a unit-stride row of the
// same length, also scaled by `scale`: the row loaded after this one then needs no max pass of its own, and
// its first read from memory overlaps this row's arithmetic. (Callers without a next row pass src: one
// loop for both cases keeps the kernels' code, and their compile time, smaller.)
template <typename T, typename F = compute_t<T>>
MMFAST_INLINE SoftmaxStats<F> exp_row(const T* __restrict src, int64_t C, F scale, F m, F* __restrict v,
                                      F* __restrict e, const T* __restrict next, F* __restrict next_max) {
  double sum = 0;
  F mn = -kInf<F>;
#pragma omp simd reduction(+ : sum) reduction(max : mn)
  for (int64_t c = 0; c < C; ++c) {
    const F t = to_compute(src[c]) * scale - m;
    const F ex = exp_nonpos(t);
    v[c] = t;
    e[c] = ex;
    sum += ex;
    const F y = to_compute(next[c]);
    mn = y > mn ? y : mn;
  }
  *next_max = mn * scale;  // as row_max
  return softmax_stats<F>(sum);
}

// The softmax statistics of a sequence of rows of the same length and scale, each row's max taken in the sweep
// of the row before it where both have unit stride (exp_row). load(src, stride, ..., next, next_stride)
// says which row comes next (nullptr: none known); a row whose max was not taken ahead gets its own pass.
// A strided row is gathered once into v (its max on the way), then exponentiated from v.
template <typename T, typename F = compute_t<T>>
class RowSequence {
 public:
  MMFAST_INLINE SoftmaxStats<F> load(const T* src, int64_t stride, int64_t C, F scale, F* v, F* e,
                                     const T* next = nullptr, int64_t next_stride = 0) {
    if (stride != 1) {
      ahead_ = nullptr;
      F m = -kInf<F>;
#pragma omp simd reduction(max : m)
      for (int64_t c = 0; c < C; ++c) {
        const F x = to_compute(src[c * stride]) * scale;
        v[c] = x;
        m = x > m ? x : m;
      }
      return shift_exp(v, m, C, e);
    }
    return sweep(src, C, scale, next, next_stride, [&](F m, const T* ahead, F* ahead_max) MMFAST_INLINE_LAMBDA {
      return exp_row(src, C, scale, m, v, e, ahead, ahead_max);
    });
  }

  // A unit-stride row src of the sequence, swept by the caller's body(m, ahead, ahead_max): m is the row's max
  // (taken ahead, else in a pass of its own), and the sweep must also store in *ahead_max the max of the
  // unit-stride row `ahead` (next where it has unit stride, else src) scaled by `scale`, as exp_row does.
  // Returns what body returns.
  template <typename Body>
  MMFAST_INLINE auto sweep(const T* src, int64_t C, F scale, const T* next, int64_t next_stride, Body&& body) {
    const F m = ahead_ == src && src != nullptr ? ahead_max_ : row_max(src, C, scale);
    return sweep_before(next, next_stride, src, [&](const T* ahead, F* ahead_max) MMFAST_INLINE_LAMBDA {
      return body(m, ahead, ahead_max);
    });
  }

  // A sweep over something that is not a row of the sequence (a buffer the caller formed), which takes the max of
  // `next` ahead all the same: body(ahead, ahead_max) must store in *ahead_max the max of the unit-stride row
  // `ahead` scaled by the sequence's scale; ahead is next where it has unit stride, else `fallback` (any
  // unit-stride row of the same length, read and discarded: one loop for both cases). Returns what body returns.
  template <typename Body>
  MMFAST_INLINE auto sweep_before(const T* next, int64_t next_stride, const T* fallback, Body&& body) {
    const bool ahead = next != nullptr && next_stride == 1;
    const auto result = body(ahead ? next : fallback, &ahead_max_);
    ahead_ = ahead ? next : nullptr;
    return result;
  }

 private:
  const T* ahead_ = nullptr;
  F ahead_max_ = 0;
};

// The softmax statistics of a short row in buffers padded to Cw >= C elements: v[C, Cw) = -inf and
// e[C, Cw) = 0, so that loops over Cw (a multiple of the vector width) run no scalar remainder and
// give the same sums (exp(-inf) = 0). The row is gathered first, then max and exp run over Cw.
template <typename T, typename F = compute_t<T>>
MMFAST_INLINE SoftmaxStats<F> load_softmax_padded(const T* __restrict src, int64_t stride, int64_t C, int64_t Cw,
                                                  F scale, F* __restrict v, F* __restrict e) {
  with_stride(stride, [&](auto s) MMFAST_INLINE_LAMBDA {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) v[c] = to_compute(src[c * s]) * scale;
  });
  for (int64_t c = C; c < Cw; ++c) v[c] = -kInf<F>;
  return shift_exp(v, row_max(v, Cw, F(1)), Cw, e);
}

// dst[c * stride] = value(c) (accumulate: +=), converted to the storage type.
template <typename T, typename Value>
MMFAST_INLINE void store_row(T* __restrict dst, int64_t stride, int64_t C, bool accumulate,
                             Value&& value) {
  with_stride(stride, [&](auto s) MMFAST_INLINE_LAMBDA {
    if (accumulate) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c)
        dst[c * s] = from_compute<T>(to_compute(dst[c * s]) + value(c));
    } else {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) dst[c * s] = from_compute<T>(value(c));
    }
  });
}

template <typename T>
MMFAST_INLINE void fill_row(T* dst, int64_t stride, int64_t C, compute_t<T> value) {
  store_row(dst, stride, C, false, [value](int64_t) MMFAST_INLINE_LAMBDA { return value; });
}

// Per-thread scratch: `per_thread` elements of F (rounded up to a cache line) for each of `threads`
// threads in one 64-byte aligned block. Buffers inside a slice are leading_dim(C) elements apart.
template <typename F>
class Workspace {
 public:
  static int64_t leading_dim(int64_t C) {
    constexpr int64_t kLine = 64 / sizeof(F);
    return std::max<int64_t>(kLine, (C + kLine - 1) / kLine * kLine);
  }

  Workspace(int threads, int64_t per_thread) : per_thread_(leading_dim(per_thread)) {
    const std::size_t bytes = static_cast<std::size_t>(threads) * per_thread_ * sizeof(F);
    data_ = static_cast<F*>(std::aligned_alloc(64, bytes));
    if (data_ == nullptr) throw std::bad_alloc();
  }
  ~Workspace() { std::free(data_); }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;

  F* slice(int thread) const { return data_ + thread * per_thread_; }

 private:
  int64_t per_thread_;
  F* data_;
};

// Threads for `rows` rows: the OpenMP default when num_threads <= 0, never more than rows.
inline int resolve_threads(int num_threads, int64_t rows) {
  const int wanted = num_threads > 0 ? num_threads : omp_get_max_threads();
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wanted, rows)));
}

// body(begin, end, thread) over contiguous row chunks, dynamically scheduled (masked rows are
// free, so static shares can be uneven); chunks stay contiguous for the strided [B, C, S] layout.
// Every chunk but the last is a multiple of `align` rows long, so chunks begin at multiples of it
// whatever the thread count (row tiles then cover the same rows in any partition).
template <typename Body>
void parallel_rows(int64_t rows, int threads, Body&& body, int64_t align = 1) {
  int64_t chunk = std::max<int64_t>(1, rows / (int64_t{threads} * 8));
  chunk = (chunk + align - 1) / align * align;
  const int64_t chunks = (rows + chunk - 1) / chunk;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t i = 0; i < chunks; ++i)
    body(i * chunk, std::min(rows, (i + 1) * chunk), omp_get_thread_num());
}

}  // namespace mmfast::cpu
