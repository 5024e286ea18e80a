// Row tiles: short rows processed a vector of rows at a time, one row per lane.
//
// A row of C < 64 classes leaves most of a vector empty, and its fixed per-row work (horizontal
// reductions, a log and a divide per softmax) dominates. A tile holds kTileRows<F> rows class-major,
// buf[c * kTileRows + r], so that every step over the classes is a vertical vector operation on
// all rows at once and each per-row scalar (max, sum, log-sum) is one lane of a vector. Loads and
// stores go through per-lane element offsets (off[r]), so any layout reaches the tiles.
// Each kernel tiles rows up to the class count where, measured, the row loop becomes faster; the knob
// cpu_row_tile_max_classes() (mmfast/kernels.h) overrides that bound for tests and tuning.
#pragma once

#include <algorithm>
#include <cstdint>

#include "row_ops.h"

namespace mmfast::cpu {

// Rows per tile: one 512-bit vector of the compute type (two AVX2 vectors).
template <typename F>
constexpr int kTileRows = 64 / int(sizeof(F));

// True when rows of C classes are processed in tiles: C <= the knob of mmfast/kernels.h when it is set,
// else C <= default_max_classes (the kernel's own bound).
bool tile_rows(int64_t C, int64_t default_max_classes);

template <typename F>
struct TileStats {
  alignas(64) F log_sum[kTileRows<F>];
  alignas(64) F inv_sum[kTileRows<F>];
};

// In place v -= max over the classes (per lane), e = exp(v); each lane's softmax statistics
// (SoftmaxStats). A NaN may be skipped by the max but poisons its lane's sum, as in the row path.
// The log of each sum is the vectorizable log_approx of the sum rounded to F.
template <typename F>
MMFAST_INLINE TileStats<F> shift_exp_tile(F* __restrict v, int64_t C, F* __restrict e) {
  constexpr int R = kTileRows<F>;
  alignas(64) F m[R];
#pragma omp simd
  for (int r = 0; r < R; ++r) m[r] = -kInf<F>;
  for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
    for (int r = 0; r < R; ++r) m[r] = v[c * R + r] > m[r] ? v[c * R + r] : m[r];
  }
  alignas(64) double sum[R] = {};
  for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
    for (int r = 0; r < R; ++r) {
      const F t = v[c * R + r] - m[r];
      const F ex = exp_nonpos(t);
      v[c * R + r] = t;
      e[c * R + r] = ex;
      sum[r] += ex;
    }
  }
  TileStats<F> s;
#pragma omp simd
  for (int r = 0; r < R; ++r) {
    s.log_sum[r] = log_approx(F(sum[r]));
    s.inv_sum[r] = F(1 / sum[r]);
  }
  return s;
}

// True when the R lanes' element offsets are consecutive (off[r] == off[0] + r): the tile's rows are
// neighbouring pixels of dense logits [B, C, S] (class stride S), so each class of the tile is one
// contiguous run of R elements, loaded and stored as whole vectors instead of gathered and scattered.
// Each class is then its own stream through memory (C streams per tensor, S elements apart: more than the
// hardware prefetchers follow), so the loads and stores prefetch their class's run that many tiles ahead
// (19 classes, 128 x 256 pixels, E = 4, one Xeon, 2 threads: 29-31 ms without, 21-22 ms with), into L2:
// with S a multiple of 1024 floats the streams share one L1 set (prefetch_l2_at).
constexpr int kTilePrefetchLoads = 2;
constexpr int kTilePrefetchStores = 4;
template <int R>
MMFAST_INLINE bool consecutive_lanes(const int64_t* off) {
  bool consecutive = true;
  for (int r = 1; r < R; ++r) consecutive = consecutive && off[r] == off[0] + r;
  return consecutive;
}

// ---- Packed tiles: the R rows side by side in memory ----
//
// When a tile's rows are consecutive rows of a row-major tensor (off[r] == off[0] + r * C, unit class
// stride: `packed_rows`), the tile is one block of R * C elements. Per-lane loads and stores would move it
// an element at a time (a scalar store per element into the class-major buffer on the way in, a scatter on
// the way out); instead the block goes through R x R transposes in vector registers, R classes at a time:
// R row vectors in, R class vectors out (`load_packed_tile`), and back (`store_packed_tile`).
template <int R>
MMFAST_INLINE bool packed_rows(const int64_t* off, int64_t C) {
  bool packed = true;
  for (int r = 1; r < R; ++r) packed = packed && off[r] == off[0] + r * C;
  return packed;
}

// v[c * R + r] = block[r * C + c] * scale: the tile's R packed rows (packed_rows) into its class-major
// buffer v. One overload per storage type, defined in row_tiles.cpp with one clone per ISA level.
void load_packed_tile(const float* block, int64_t C, float scale, float* v);
void load_packed_tile(const double* block, int64_t C, double scale, double* v);
void load_packed_tile(const bf16* block, int64_t C, float scale, float* v);
void load_packed_tile(const f16* block, int64_t C, float scale, float* v);

// block[r * C + c0 + c] = cols[c * R + r] for the classes c < min(R, C - c0) of one chunk of a tile's R packed
// rows, converted to the storage type. Chunks must come from the last to the first (the rows of a partial
// chunk are stored as whole vectors where they stay inside the block: row_tiles.cpp). Defined like
// load_packed_tile.
void store_packed_chunk(const float* cols, float* block, int64_t C, int64_t c0);
void store_packed_chunk(const double* cols, double* block, int64_t C, int64_t c0);
void store_packed_chunk(const float* cols, bf16* block, int64_t C, int64_t c0);
void store_packed_chunk(const float* cols, f16* block, int64_t C, int64_t c0);

// block[r * C + c] = value(c * R + r, r) for the tile's R packed rows (packed_rows): each chunk of R classes
// formed class-major, then transposed and stored by store_packed_chunk.
template <typename T, typename Value>
MMFAST_INLINE void store_packed_tile(T* __restrict block, int64_t C, Value&& value) {
  using F = compute_t<T>;
  constexpr int R = kTileRows<F>;
  for (int64_t c0 = (C - 1) / R * R; c0 >= 0; c0 -= R) {
    const int64_t w = std::min<int64_t>(R, C - c0);
    alignas(64) F cols[R * R];
    for (int64_t c = 0; c < w; ++c) {
#pragma omp simd
      for (int r = 0; r < R; ++r) cols[c * R + r] = value((c0 + c) * R + r, r);
    }
    store_packed_chunk(cols, block, C, c0);
  }
}

// v[c][r] = src[off[r] + c * stride] * scale, then shift_exp_tile.
template <typename T, typename F = compute_t<T>>
MMFAST_INLINE TileStats<F> load_softmax_tile(const T* __restrict src, const int64_t* __restrict off,
                                             int64_t stride, int64_t C, F scale, F* __restrict v,
                                             F* __restrict e) {
  constexpr int R = kTileRows<F>;
  if (stride == 1 && packed_rows<R>(off, C)) {
    load_packed_tile(src + off[0], C, scale, v);
  } else if (stride == 1) {  // lane by lane: each row is read contiguously (no gathers)
    for (int r = 0; r < R; ++r) {
      const T* __restrict row = src + off[r];
      for (int64_t c = 0; c < C; ++c) v[c * R + r] = to_compute(row[c]) * scale;
    }
  } else if (consecutive_lanes<R>(off)) {
    const T* __restrict base = src + off[0];
    for (int64_t c = 0; c < C; ++c) {
      prefetch_l2_at<0>(base, c * stride + kTilePrefetchLoads * R);
#pragma omp simd
      for (int r = 0; r < R; ++r) v[c * R + r] = to_compute(base[c * stride + r]) * scale;
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
      for (int r = 0; r < R; ++r) v[c * R + r] = to_compute(src[off[r] + c * stride]) * scale;
    }
  }
  return shift_exp_tile(v, C, e);
}

// Normalizes a tile from its statistics: lp -= log_sum (log p), p *= inv_sum (p); then use(i, r) for each
// element i = c * R + r (callers fold their own per-element sums into the same sweep).
template <typename F, typename Use>
MMFAST_INLINE void normalize_tile(F* __restrict lp, F* __restrict p, int64_t C, const TileStats<F>& t,
                                  Use&& use) {
  constexpr int R = kTileRows<F>;
  for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
    for (int r = 0; r < R; ++r) {
      const int64_t i = c * R + r;
      lp[i] -= t.log_sum[r];
      p[i] *= t.inv_sum[r];
      use(i, r);
    }
  }
}

// out[r] = sum_c buf[c][r], accumulated in double.
template <typename F>
MMFAST_INLINE void tile_sums(const F* __restrict buf, int64_t C, F* __restrict out) {
  constexpr int R = kTileRows<F>;
  alignas(64) double acc[R] = {};
  for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
    for (int r = 0; r < R; ++r) acc[r] += buf[c * R + r];
  }
#pragma omp simd
  for (int r = 0; r < R; ++r) out[r] = F(acc[r]);
}

// dst[off[r] + c * stride] = value(c * R + r, r) (accumulate: +=), converted to the storage type.
template <typename T, typename Value>
MMFAST_INLINE void store_tile(T* __restrict dst, const int64_t* __restrict off, int64_t stride, int64_t C,
                              bool accumulate, Value&& value) {
  constexpr int R = kTileRows<compute_t<T>>;
  if (stride == 1 && !accumulate && packed_rows<R>(off, C)) {
    store_packed_tile(dst + off[0], C, value);
    return;
  }
  if (stride != 1 && consecutive_lanes<R>(off)) {  // whole vectors (see consecutive_lanes)
    T* __restrict base = dst + off[0];
    for (int64_t c = 0; c < C; ++c) {
      T* __restrict run = base + c * stride;
      prefetch_l2_at<1>(run, kTilePrefetchStores * R);
      if (accumulate) {
#pragma omp simd
        for (int r = 0; r < R; ++r) run[r] = from_compute<T>(to_compute(run[r]) + value(c * R + r, r));
      } else {
#pragma omp simd
        for (int r = 0; r < R; ++r) run[r] = from_compute<T>(value(c * R + r, r));
      }
    }
    return;
  }
  with_stride(stride, [&](auto s) MMFAST_INLINE_LAMBDA {
    for (int64_t c = 0; c < C; ++c) {
      if (accumulate) {
#pragma omp simd
        for (int r = 0; r < R; ++r) {
          T& d = dst[off[r] + c * s];
          d = from_compute<T>(to_compute(d) + value(c * R + r, r));
        }
      } else {
#pragma omp simd
        for (int r = 0; r < R; ++r) dst[off[r] + c * s] = from_compute<T>(value(c * R + r, r));
      }
    }
  });
}

}  // namespace mmfast::cpu
