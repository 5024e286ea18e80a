// The bound on the classes of a row below which the CPU kernels work in row tiles, and the packed tiles'
// transposes (row_tiles.h).
#include "row_tiles.h"

#include <atomic>
#include <cstring>
#include <utility>

#include "mmfast/kernels.h"

namespace mmfast {
namespace {

// -1: each kernel's own bound (tile_rows)
std::atomic<int64_t> g_tile_max_classes{-1};

}  // namespace

int64_t cpu_row_tile_max_classes() { return g_tile_max_classes.load(std::memory_order_relaxed); }
void set_cpu_row_tile_max_classes(int64_t classes) {
  g_tile_max_classes.store(classes < 0 ? -1 : classes, std::memory_order_relaxed);
}

namespace cpu {
bool tile_rows(int64_t C, int64_t default_max_classes) {
  const int64_t bound = cpu_row_tile_max_classes();
  return C <= (bound < 0 ? default_max_classes : bound);
}

namespace {

// One vector of a tile's lanes: kTileRows<F> values of F (a GCC / Clang vector extension, lowered for the ISA
// level of each clone of the functions below).
template <typename F>
struct TileVector {
  typedef F type __attribute__((vector_size(64)));
};
template <typename F>
using tile_vector_t = typename TileVector<F>::type;

// One butterfly stage of an R x R transpose on rows a = m[i] and b = m[i + S] (bit S of i clear): the lanes j
// with bit S set of a swap with the lanes j - S of b. After the stages S = R/2, ..., 2, 1 row i holds column i.
template <int R, int S, typename V, int... J>
MMFAST_INLINE V butterfly_low(const V& a, const V& b, std::integer_sequence<int, J...>) {
  return __builtin_shufflevector(a, b, ((J & S) ? R + J - S : J)...);
}
template <int R, int S, typename V, int... J>
MMFAST_INLINE V butterfly_high(const V& a, const V& b, std::integer_sequence<int, J...>) {
  return __builtin_shufflevector(a, b, ((J & S) ? R + J : J + S)...);
}

// m (R vectors of R lanes) = its transpose.
template <typename F, int S = kTileRows<F> / 2>
MMFAST_INLINE void transpose_tile(tile_vector_t<F>* m) {
  constexpr int R = kTileRows<F>;
  using Lanes = std::make_integer_sequence<int, R>;
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
    if (i & S) continue;
    const tile_vector_t<F> a = m[i], b = m[i + S];
    m[i] = butterfly_low<R, S>(a, b, Lanes{});
    m[i + S] = butterfly_high<R, S>(a, b, Lanes{});
  }
  if constexpr (S > 1) transpose_tile<F, S / 2>(m);
}

// Whether the R elements of row r from class c0 lie inside the tile's block of R * C elements (the last rows'
// vectors of a partial class chunk would reach past it).
template <int R>
MMFAST_INLINE bool inside_block(int r, int64_t c0, int64_t C) {
  return r * C + c0 + R <= R * C;
}

template <typename T>
MMFAST_INLINE void load_packed(const T* __restrict block, int64_t C, compute_t<T> scale, compute_t<T>* __restrict v) {
  using F = compute_t<T>;
  constexpr int R = kTileRows<F>;
  using V = tile_vector_t<F>;
  for (int64_t c0 = 0; c0 < C; c0 += R) {
    const int64_t w = std::min<int64_t>(R, C - c0);  // classes of this chunk
    V m[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const T* __restrict row = block + r * C + c0;
      alignas(64) F lanes[R];
      if (inside_block<R>(r, c0, C)) {  // lanes from w on hold the next rows' classes: never stored
#pragma omp simd
        for (int j = 0; j < R; ++j) lanes[j] = to_compute(row[j]) * scale;
      } else {
        for (int j = 0; j < R; ++j) lanes[j] = j < w ? to_compute(row[j]) * scale : F(0);
      }
      std::memcpy(&m[r], lanes, sizeof(V));
    }
    transpose_tile<F>(m);
#pragma GCC unroll 16
    for (int c = 0; c < R; ++c) {
      if (c < w) std::memcpy(v + (c0 + c) * R, &m[c], sizeof(V));
    }
  }
}

// A row's vector of a partial chunk (w < R classes) is stored whole where it stays inside the block: its
// lanes past the row land on the next rows' first classes, which later stores overwrite (the rows go in order
// and the chunks from the last to the first, so chunk 0 comes last); the last rows store only their own
// classes.
template <typename T>
MMFAST_INLINE void store_packed(const compute_t<T>* __restrict cols, T* __restrict block, int64_t C, int64_t c0) {
  using F = compute_t<T>;
  constexpr int R = kTileRows<F>;
  using V = tile_vector_t<F>;
  const int64_t w = std::min<int64_t>(R, C - c0);
  V m[R];
#pragma GCC unroll 16
  for (int c = 0; c < R; ++c) {
    if (c < w) {
      std::memcpy(&m[c], cols + c * R, sizeof(V));
    } else {
      m[c] = V{};  // the lanes past the chunk's classes: zeros, overwritten or never stored
    }
  }
  transpose_tile<F>(m);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    T* row = block + r * C + c0;  // (not __restrict: a row's vector may overlap the next row, stored after it)
    alignas(64) F lanes[R];
    std::memcpy(lanes, &m[r], sizeof(V));
    if (inside_block<R>(r, c0, C)) {
#pragma omp simd
      for (int j = 0; j < R; ++j) row[j] = from_compute<T>(lanes[j]);
    } else {
      for (int64_t j = 0; j < w; ++j) row[j] = from_compute<T>(lanes[j]);
    }
  }
}

}  // namespace

// The overloads of row_tiles.h (plain functions: GCC drops target_clones from a template's explicit
// instantiation once an extern declaration of it has been seen).
#define MMFAST_PACKED_TILE_OVERLOADS(T)                                                                 \
  MMFAST_MULTIVERSION void load_packed_tile(const T* block, int64_t C, compute_t<T> scale, compute_t<T>* v) { \
    load_packed(block, C, scale, v);                                                                    \
  }                                                                                                     \
  MMFAST_MULTIVERSION void store_packed_chunk(const compute_t<T>* cols, T* block, int64_t C, int64_t c0) {    \
    store_packed(cols, block, C, c0);                                                                   \
  }
MMFAST_PACKED_TILE_OVERLOADS(float)
MMFAST_PACKED_TILE_OVERLOADS(double)
MMFAST_PACKED_TILE_OVERLOADS(bf16)
MMFAST_PACKED_TILE_OVERLOADS(f16)
#undef MMFAST_PACKED_TILE_OVERLOADS

}  // namespace cpu

}  // namespace mmfast
