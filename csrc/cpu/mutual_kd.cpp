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

// d loss / d x_i for kM models at once: T = sum_j log p_j and S = sum_j p_j per class (in model order, as the
// general loop forms them), then every model's gradient row.
template <int kM, typename T, typename F = compute_t<T>>
MMFAST_INLINE void grad_pass(int64_t C, F* const* v, F* const* e, const F* log_z, const F* inv_z, const F* R, F Mf,
                             F g, T* const* gr) {
  const F* __restrict v0 = v[0];
  const F* __restrict v1 = v[1];
  const F* __restrict v2 = v[kM > 2 ? 2 : 0];
  const F* __restrict v3 = v[kM > 3 ? 3 : 0];
  const F* __restrict e0 = e[0];
  const F* __restrict e1 = e[1];
  const F* __restrict e2 = e[kM > 2 ? 2 : 0];
  const F* __restrict e3 = e[kM > 3 ? 3 : 0];
  T* __restrict g0 = gr[0];
  T* __restrict g1 = gr[1];
  T* __restrict g2 = gr[kM > 2 ? 2 : 0];
  T* __restrict g3 = gr[kM > 3 ? 3 : 0];
  const F l0 = log_z[0], l1 = log_z[1], l2 = kM > 2 ? log_z[2] : F(0), l3 = kM > 3 ? log_z[3] : F(0);
  const F s0 = inv_z[0], s1 = inv_z[1], s2 = kM > 2 ? inv_z[2] : F(0), s3 = kM > 3 ? inv_z[3] : F(0);
  const F r0 = R[0], r1 = R[1], r2 = kM > 2 ? R[2] : F(0), r3 = kM > 3 ? R[3] : F(0);
  const auto own = [Mf](F pi, F lpi, F T_, F r) MMFAST_INLINE_LAMBDA {
    return zero_where_zero(pi, pi * (Mf * lpi - T_ - r));
  };
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const F lp0 = v0[c] - l0, lp1 = v1[c] - l1;
    const F p0 = e0[c] * s0, p1 = e1[c] * s1;
    F T_ = lp0 + lp1, S = p0 + p1;
    F lp2 = 0, lp3 = 0, p2 = 0, p3 = 0;
    if constexpr (kM > 2) {
      lp2 = v2[c] - l2;
      p2 = e2[c] * s2;
      T_ += lp2;
      S += p2;
    }
    if constexpr (kM > 3) {
      lp3 = v3[c] - l3;
      p3 = e3[c] * s3;
      T_ += lp3;
      S += p3;
    }
    g0[c] = from_compute<T>((Mf * p0 - S + own(p0, lp0, T_, r0)) * g);
    g1[c] = from_compute<T>((Mf * p1 - S + own(p1, lp1, T_, r1)) * g);
    if constexpr (kM > 2) g2[c] = from_compute<T>((Mf * p2 - S + own(p2, lp2, T_, r2)) * g);
    if constexpr (kM > 3) g3[c] = from_compute<T>((Mf * p3 - S + own(p3, lp3, T_, r3)) * g);
  }
}

// The last model's sweep of a row of kM models (kM >= 2; the first kM - 1 swept into v[i], e[i] as exp_row does):
// v, e of the last model from src (max m) and, with V = sum_j v_j, the sums Y_i = sum over e_i != 0 of
// e_i (kM v_i - V) for every model, so that R_i = Y_i / Z_i - kM log Z_i + sum_j log Z_j
// (log p_i = v_i - log Z_i: kM log p_i - T = kM v_i - V - kM log Z_i + sum_j log Z_j, and p_i sums to one).
// Returns the last model's Z; Y[i] += the sums, in float over blocks of kCancellingSweepBlock classes (row_ops.h).
// The max of `next` in *next_max (as exp_row).
template <int kM, typename T, typename F = compute_t<T>>
MMFAST_INLINE double mutual_last_sweep(const T* __restrict src, int64_t C, F scale, F m, F* const* v, F* const* e,
                                       const T* __restrict next, F* __restrict next_max, double* Y) {
  F* __restrict vl = v[kM - 1];
  F* __restrict el = e[kM - 1];
  const F* __restrict vs[kM - 1];
  const F* __restrict es[kM - 1];
  for (int i = 0; i < kM - 1; ++i) {
    vs[i] = v[i];
    es[i] = e[i];
  }
  const F Mf = F(kM);
  double Z = 0;
  F mn = -kInf<F>;
  for (int64_t c0 = 0; c0 < C; c0 += kCancellingSweepBlock) {
    const int64_t c1 = std::min(C, c0 + kCancellingSweepBlock);
    F z = 0, y0 = 0, y1 = 0, y2 = 0, y3 = 0;
#pragma omp simd reduction(+ : z, y0, y1, y2, y3) reduction(max : mn)
    for (int64_t c = c0; c < c1; ++c) {
      const F t = to_compute(src[c]) * scale - m;
      const F ex = exp_nonpos(t);
      vl[c] = t;
      el[c] = ex;
      z += ex;
      F V = vs[0][c];
      if constexpr (kM > 2) V += vs[1][c];
      if constexpr (kM > 3) V += vs[2][c];
      V += t;
      y0 += zero_where_zero(es[0][c], es[0][c] * (Mf * vs[0][c] - V));
      if constexpr (kM == 2) {
        y1 += zero_where_zero(ex, ex * (Mf * t - V));
      } else {
        y1 += zero_where_zero(es[1][c], es[1][c] * (Mf * vs[1][c] - V));
      }
      if constexpr (kM == 3) {
        y2 += zero_where_zero(ex, ex * (Mf * t - V));
      } else if constexpr (kM == 4) {
        y2 += zero_where_zero(es[2][c], es[2][c] * (Mf * vs[2][c] - V));
        y3 += zero_where_zero(ex, ex * (Mf * t - V));
      }
      const F y = to_compute(next[c]);
      mn = y > mn ? y : mn;
    }
    Z += z;
    Y[0] += y0;
    Y[1] += y1;
    if constexpr (kM > 2) Y[2] += y2;
    if constexpr (kM > 3) Y[3] += y3;
  }
  *next_max = mn * scale;  // as row_max
  return Z;
}

// Rows of kM = 2..4 models, unpadded (see mutual_rows) with unit class stride: the first kM - 1 models' exp sweeps
// (RowSequence), the last model's sweep that also gives every R_i (mutual_last_sweep), and one pass that
// writes all kM gradient rows. Fewer passes over the row buffers than the general loop in mutual_rows.
template <int kM, typename T>
MMFAST_INLINE void mutual_row_fixed(const MutualKDParams& p, int64_t n, int64_t end, compute_t<T>* workspace,
                                    RowSequence<T>& sequence) {
  using F = compute_t<T>;
  const T* logits = static_cast<const T*>(p.logits);
  T* grad = static_cast<T*>(p.grad);
  const int64_t C = p.C, ld = Workspace<F>::leading_dim(C);
  const F inv_tau = F(p.inv_tau), Mf = F(kM), g = F(p.scale * p.inv_tau);
  F* v[kM];
  F* e[kM];
  for (int i = 0; i < kM; ++i) {
    v[i] = workspace + 2 * i * ld;
    e[i] = v[i] + ld;
  }
  F log_z[kM], inv_z[kM];
  for (int i = 0; i < kM - 1; ++i) {
    const T* row = logits + i * p.s_m + n * p.s_n;
    const SoftmaxStats<F> st = sequence.load(row, 1, C, inv_tau, v[i], e[i], row + p.s_m, 1);
    log_z[i] = st.log_sum;
    inv_z[i] = st.inv_sum;
  }
  double Y[4] = {0, 0, 0, 0};
  const T* last = logits + (kM - 1) * p.s_m + n * p.s_n;
  const T* next = n + 1 < end ? logits + (n + 1) * p.s_n : nullptr;
  const double z_last = sequence.sweep(last, C, inv_tau, next, 1, [&](F m, const T* ahead, F* ahead_max)
                                           MMFAST_INLINE_LAMBDA {
                                             return mutual_last_sweep<kM>(last, C, inv_tau, m, v, e, ahead,
                                                                          ahead_max, Y);
                                           });
  const SoftmaxStats<F> st_last = softmax_stats<F>(z_last);
  log_z[kM - 1] = st_last.log_sum;
  inv_z[kM - 1] = st_last.inv_sum;
  // R_i in double from the row sums (Y_i / Z_i as Y_i inv_z_i: p_i = e_i inv_z_i throughout)
  double lse_total = 0;
  for (int i = 0; i < kM; ++i) lse_total += double(log_z[i]);
  F R[kM];
  double total = 0;
  for (int i = 0; i < kM; ++i) {
    const double r = Y[i] * double(inv_z[i]) - double(kM) * double(log_z[i]) + lse_total;
    R[i] = F(r);
    total += r;
  }
  static_cast<F*>(p.loss)[n] = F(p.scale) * F(total);
  if (grad == nullptr) return;
  T* gr[kM];
  for (int i = 0; i < kM; ++i) gr[i] = grad + (i * p.N + n) * C;
  grad_pass<kM, T>(C, v, e, log_z, inv_z, R, Mf, g, gr);
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
  if (Cw == C && p.s_c == 1 && M >= 2 && M <= 4) {
    for (; n < end; ++n) {
      switch (M) {
        case 2:
          mutual_row_fixed<2, T>(p, n, end, workspace, sequence);
          break;
        case 3:
          mutual_row_fixed<3, T>(p, n, end, workspace, sequence);
          break;
        default:
          mutual_row_fixed<4, T>(p, n, end, workspace, sequence);
      }
    }
    return;
  }
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
