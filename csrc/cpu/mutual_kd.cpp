// Mutual (co-training) KD over M models on the CPU, one pass structure per row
// (oracle: mmfast/reference/mutual_kd.py). With p_i = softmax(x_i / tau), S = sum_i p_i and
// T = sum_i log p_i:
//   R_i = sum_c p_i (M log p_i - T),  loss = scale * sum_i R_i,
//   d loss / d x_i = scale / tau * (M p_i - S + p_i (M log p_i - T - R_i)),
// entries with p_i == 0 contributing 0 to the p_i (...) terms (a NaN p_i stays NaN). Each model's
// row is exponentiated once. Rows of few classes run as row tiles (row_tiles.h).
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "mmfast/kernels.h"
#include "row_ops.h"
#include "row_tiles.h"

namespace mmfast {
namespace cpu {
namespace {

// Scratch per thread, leading_dim(C) apart: two buffers per model (the row path: shifted logits and
// their exps; the tile path: log p_i and p_i), T, S; then the M scalars R_i and (row path) the M
// models' softmax statistics.
int64_t mutual_buffers(int64_t M) { return 2 * M + 2; }

// Rows n .. n + kTileRows - 1 as a row tile (row_tiles.h): the row loop's steps, one row per lane.
// Scratch: log p_i and p_i for each model, T, S (each C * kTileRows), then the M x kTileRows R_i.
template <typename T>
MMFAST_INLINE void mutual_tile(const MutualKDParams& p, int64_t n, compute_t<T>* __restrict workspace) {
  using F = compute_t<T>;
  constexpr int R = kTileRows<F>;
  const T* logits = static_cast<const T*>(p.logits);
  T* grad = static_cast<T*>(p.grad);
  const int64_t M = p.M, C = p.C, CR = C * R;
  const F inv_tau = F(p.inv_tau), Mf = F(M), g = F(p.scale * p.inv_tau);
  F* __restrict sum_logp = workspace + 2 * M * CR;
  F* __restrict sum_p = sum_logp + CR;
  F* __restrict R_i = sum_p + CR;
  alignas(64) int64_t off[R];
  std::fill(sum_logp, sum_logp + 2 * CR, F(0));
  for (int64_t i = 0; i < M; ++i) {
    F* __restrict lp = workspace + 2 * i * CR;
    F* __restrict pi = lp + CR;
    for (int r = 0; r < R; ++r) off[r] = i * p.s_m + (n + r) * p.s_n;
    const TileStats<F> t = load_softmax_tile(logits, off, p.s_c, C, inv_tau, lp, pi);
    normalize_tile(lp, pi, C, t, [=](int64_t j, int) MMFAST_INLINE_LAMBDA {
      sum_logp[j] += lp[j];
      sum_p[j] += pi[j];
    });
  }
  alignas(64) double total[R] = {};
  for (int64_t i = 0; i < M; ++i) {
    const F* __restrict lp = workspace + 2 * i * CR;
    const F* __restrict pi = lp + CR;
    alignas(64) double r_i[R] = {};
    for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
      for (int r = 0; r < R; ++r) {
        const int64_t j = c * R + r;
        r_i[r] += zero_where_zero(pi[j], pi[j] * (Mf * lp[j] - sum_logp[j]));
      }
    }
#pragma omp simd
    for (int r = 0; r < R; ++r) {
      R_i[i * R + r] = F(r_i[r]);
      total[r] += r_i[r];
    }
  }
  F* loss = static_cast<F*>(p.loss);
  for (int r = 0; r < R; ++r) loss[n + r] = F(p.scale) * F(total[r]);
  for (int64_t i = 0; grad != nullptr && i < M; ++i) {
    const F* __restrict lp = workspace + 2 * i * CR;
    const F* __restrict pi = lp + CR;
    const F* __restrict ri = R_i + i * R;
    for (int r = 0; r < R; ++r) off[r] = (i * p.N + n + r) * C;
    store_tile(grad, off, 1, C, false, [&](int64_t j, int r) MMFAST_INLINE_LAMBDA {
      const F own = zero_where_zero(pi[j], pi[j] * (Mf * lp[j] - sum_logp[j] - ri[r]));
      return (Mf * pi[j] - sum_p[j] + own) * g;
    });
  }
}

template <typename T>
MMFAST_MULTIVERSION void mutual_rows(const MutualKDParams& p, bool tiles, int64_t begin, int64_t end,
                                     compute_t<T>* workspace) {
  using F = compute_t<T>;
  const T* logits = static_cast<const T*>(p.logits);
  F* loss = static_cast<F*>(p.loss);
  T* grad = static_cast<T*>(p.grad);
  const int64_t M = p.M, C = p.C, ld = Workspace<F>::leading_dim(C);
  // rows shorter than 64 classes are padded to whole vectors (log p = -inf, p = 0: every term of such
  // an entry is 0), so the loops over Cw run no scalar remainder (see load_softmax_padded)
  const int64_t Cw = C < 64 ? ld : C;
  const F inv_tau = F(p.inv_tau), Mf = F(M), g = F(p.scale * p.inv_tau);
  F* __restrict sum_logp = workspace + 2 * M * ld;
  F* __restrict sum_p = sum_logp + ld;
  F* R = workspace + mutual_buffers(M) * ld;

  int64_t n = begin;
  if (tiles) {
    for (; n + kTileRows<F> <= end; n += kTileRows<F>) mutual_tile<T>(p, n, workspace);
  }
  // Per row: one exp sweep per model (each row's max taken in the sweep of the row before it:
  // RowSequence), keeping the shifted logits v_i and exp(v_i); log p_i = v_i - log_sum_i and
  // p_i = exp(v_i) inv_sum_i are formed where they are used, with the same operations (so the same
  // bits) as a normalised copy would hold. The first R pass also forms T and S.
  RowSequence<T> sequence;
  SoftmaxStats<F>* stats = reinterpret_cast<SoftmaxStats<F>*>(R + M);
  for (; n < end; ++n) {
    for (int64_t i = 0; i < M; ++i) {
      F* __restrict v = workspace + 2 * i * ld;
      F* __restrict e = v + ld;
      const T* row = logits + i * p.s_m + n * p.s_n;
      const T* next = i + 1 < M ? row + p.s_m : n + 1 < end ? logits + (n + 1) * p.s_n : nullptr;
      stats[i] = Cw == C ? sequence.load(row, p.s_c, C, inv_tau, v, e, next, p.s_c)
                         : load_softmax_padded(row, p.s_c, C, Cw, inv_tau, v, e);
    }
    // T = sum_i log p_i, S = sum_i p_i (in model order), with R_0
    {
      const F* __restrict v0 = workspace;
      const F* __restrict e0 = v0 + ld;
      const F l0 = stats[0].log_sum, s0 = stats[0].inv_sum;
#pragma omp simd
      for (int64_t c = 0; c < Cw; ++c) {
        sum_logp[c] = v0[c] - l0;
        sum_p[c] = e0[c] * s0;
      }
      for (int64_t i = 1; i < M; ++i) {
        const F* __restrict v = workspace + 2 * i * ld;
        const F* __restrict e = v + ld;
        const F li = stats[i].log_sum, si = stats[i].inv_sum;
#pragma omp simd
        for (int64_t c = 0; c < Cw; ++c) {
          sum_logp[c] += v[c] - li;
          sum_p[c] += e[c] * si;
        }
      }
    }
    double total = 0;
    for (int64_t i = 0; i < M; ++i) {
      const F* __restrict v = workspace + 2 * i * ld;
      const F* __restrict e = v + ld;
      const F li = stats[i].log_sum, si = stats[i].inv_sum;
      double r = 0;
#pragma omp simd reduction(+ : r)
      for (int64_t c = 0; c < Cw; ++c) {
        const F pi = e[c] * si;
        r += zero_where_zero(pi, pi * (Mf * (v[c] - li) - sum_logp[c]));
      }
      R[i] = F(r);
      total += r;
    }
    loss[n] = F(p.scale) * F(total);
    for (int64_t i = 0; grad != nullptr && i < M; ++i) {
      const F* __restrict v = workspace + 2 * i * ld;
      const F* __restrict e = v + ld;
      const F li = stats[i].log_sum, si = stats[i].inv_sum;
      const F r = R[i];
      store_row(grad + (i * p.N + n) * C, 1, C, false, [=](int64_t c) MMFAST_INLINE_LAMBDA {
        const F pi = e[c] * si;
        const F own = zero_where_zero(pi, pi * (Mf * (v[c] - li) - sum_logp[c] - r));
        return (Mf * pi - sum_p[c] + own) * g;
      });
    }
  }
}

template <typename T>
void run_mutual(const MutualKDParams& p, int num_threads) {
  using F = compute_t<T>;
  const int threads = resolve_threads(num_threads, p.N);
  const int64_t rows = mutual_buffers(p.M) * Workspace<F>::leading_dim(p.C) + 3 * p.M;
  // tiles up to 27 classes (one EPYC, 2 threads, fp32, M = 3, N*C = 2^20: 1.4x faster than rows at
  // C = 24, 0.9x at C = 32); read once: the workspace is sized for it
  const bool tiles = tile_rows(p.C, 27);
  const int64_t per_tile = tiles ? (mutual_buffers(p.M) * p.C + p.M) * kTileRows<F> : 0;
  Workspace<F> workspace(threads, std::max(rows, per_tile));
  parallel_rows(
      p.N, threads,
      [&](int64_t begin, int64_t end, int thread) { mutual_rows<T>(p, tiles, begin, end, workspace.slice(thread)); },
      tiles ? kTileRows<F> : 1);  // a row's path (tile or row loop) does not depend on the thread count
}

}  // namespace
}  // namespace cpu

void mutual_kd_cpu(const MutualKDParams& p, int num_threads) {
  if (p.N <= 0) return;
  const bool known = cpu::dispatch_dtype(p.dtype, [&](auto storage) {
    cpu::run_mutual<decltype(storage)>(p, num_threads);
  });
  if (!known)
    throw std::invalid_argument("mutual_kd_cpu: unknown dtype code " + std::to_string(p.dtype));
}

}  // namespace mmfast
