// Uni-Instruct (SiD-family) generator loss on the CPU (oracle: mmfast/reference/uni_instruct.py;
// contract: UniInstructParams in params.h). Per sample row, with d = a - b, u = (a - x) - alpha d:
//   pass 1: S_abs = sum |x - a|, S_dd = sum d^2, S_du = sum d u, S_xd = sum x d
//           wf = max(S_abs / D, 1e-5), c = scale / wf, n = sqrt(S_dd) (or the given norm),
//           loss = c (ls S_du + [fgm] lf S_dd + [di] (ld n) S_xd)
//   pass 2: dx = d (k c) with k = -ls (+ ld n with di), da = (ls c)(u + (1 - alpha) d) [+ (2 lf c) d],
//           db = (ls c)(alpha d - u) [- (2 lf c) d]; one loop over the row forms all three a cache
//           line at a time and stores the requested ones (write_lines, streaming_stores.h).
// A switched-off term (fgm, di) is not evaluated, as in the reference. Scheduling: score_rows.h.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "mmfast/kernels.h"
#include "score_rows.h"
#include "streaming_stores.h"

namespace mmfast {
namespace cpu {
namespace {

constexpr double kWfMin = 1e-5;

template <typename T>
MMFAST_MULTIVERSION void uni_sums(const UniInstructParams& p, int64_t r, int64_t begin, int64_t end,
                                  double* out) {
  using F = compute_t<T>;
  const T* __restrict x = static_cast<const T*>(p.x) + r * p.sx;
  const T* __restrict a = static_cast<const T*>(p.a) + r * p.sa;
  const T* __restrict b = static_cast<const T*>(p.b) + r * p.sb;
  const F alpha = F(p.alpha);
  blocked_sums<F>(begin, end, out, [=](int64_t j, F& t0, F& t1, F& t2, F& t3) MMFAST_INLINE_LAMBDA {
    const F xv = to_compute(x[j]), av = to_compute(a[j]);
    const F d = av - to_compute(b[j]);
    const F u = (av - xv) - alpha * d;
    t0 = std::abs(xv - av);
    t1 = d * d;
    t2 = d * u;
    t3 = xv * d;
  });
}

// Per-row coefficients of the loss and of the gradients.
template <typename F>
struct UniRow {
  F c;        // scale / wf
  F lam_sim;  // ls
  F lam_fgm;  // lf (fgm only)
  F di_coef;  // ld * n (di only)
};

template <typename F>
MMFAST_INLINE UniRow<F> uni_row(const UniInstructParams& p, int64_t r, const double* totals) {
  const F* coef = static_cast<const F*>(p.coef) + 3 * r;
  const F wf = std::max(F(totals[0] / double(p.D)), F(kWfMin));  // a NaN mean stays NaN
  UniRow<F> row{F(p.scale) / wf, coef[0], coef[1], F(0)};
  if (p.di) {
    const F n = p.di_norm != nullptr ? static_cast<const F*>(p.di_norm)[0] : F(std::sqrt(totals[1]));
    row.di_coef = coef[2] * n;
  }
  return row;
}

template <typename T>
void uni_finish(const UniInstructParams& p, int64_t r, int64_t begin, int64_t end, const double* totals,
                bool first, bool streaming) {
  using F = compute_t<T>;
  const UniRow<F> row = uni_row<F>(p, r, totals);
  if (first) {
    double inner = double(row.lam_sim) * totals[2];
    if (p.fgm) inner += double(row.lam_fgm) * totals[1];
    if (p.di) inner += double(row.di_coef) * totals[3];
    static_cast<F*>(p.loss)[r] = F(double(row.c) * inner);
  }
  const T* __restrict x = static_cast<const T*>(p.x) + r * p.sx;
  const T* __restrict a = static_cast<const T*>(p.a) + r * p.sa;
  const T* __restrict b = static_cast<const T*>(p.b) + r * p.sb;
  T* const grads[3] = {p.dx != nullptr ? static_cast<T*>(p.dx) + r * p.D : nullptr,
                       p.da != nullptr ? static_cast<T*>(p.da) + r * p.D : nullptr,
                       p.db != nullptr ? static_cast<T*>(p.db) + r * p.D : nullptr};
  const F alpha = F(p.alpha), one_minus_alpha = F(1.0 - p.alpha);
  const F dx_coef = (p.di ? row.di_coef - row.lam_sim : -row.lam_sim) * row.c;
  const F cs = row.lam_sim * row.c;
  const F f2 = p.fgm ? F(2.0) * row.lam_fgm * row.c : F(0);
  // dx = d dx_coef, da = cs (u + (1 - alpha) d) [+ f2 d], db = cs (alpha d - u) [- f2 d]: all three
  // are formed (a few flops) and the requested ones stored
  const auto pass = [&](auto isa, auto fgm) MMFAST_INLINE_LAMBDA {
    write_lines(isa, grads, begin, end, streaming, [=](int64_t j, auto out) MMFAST_INLINE_LAMBDA {
      const F xv = to_compute(x[j]), av = to_compute(a[j]);
      const F d = av - to_compute(b[j]);
      const F u = (av - xv) - alpha * d;
      out[0] = d * dx_coef;
      out[1] = cs * (u + one_minus_alpha * d);
      out[2] = cs * (alpha * d - u);
      if constexpr (decltype(fgm)::value) {
        out[1] = out[1] + f2 * d;
        out[2] = out[2] - f2 * d;
      }
    });
  };
  with_isa([&](auto isa) MMFAST_INLINE_LAMBDA {
    if (p.da == nullptr && p.db == nullptr) {  // dx alone (the usual case): from a and b, x is not re-read
      T* const dx[1] = {grads[0]};
      write_lines(isa, dx, begin, end, streaming, [=](int64_t j, auto out) MMFAST_INLINE_LAMBDA {
        out[0] = (to_compute(a[j]) - to_compute(b[j])) * dx_coef;
      });
    } else if (p.fgm) {
      pass(isa, std::true_type{});
    } else {
      pass(isa, std::false_type{});
    }
  });
  if (streaming) stream_fence();
}

template <typename T>
struct UniInstructRows {
  static constexpr int kSums = 4;
  const UniInstructParams& p;
  bool streaming;  // dx, da, db written with streaming stores
  void sums(int64_t r, int64_t begin, int64_t end, double* out) const { uni_sums<T>(p, r, begin, end, out); }
  void finish(int64_t r, int64_t begin, int64_t end, const double* totals, bool first) const {
    uni_finish<T>(p, r, begin, end, totals, first, streaming);
  }
};

}  // namespace
}  // namespace cpu

void uni_instruct_cpu(const UniInstructParams& p, int num_threads) {
  if (p.B <= 0) return;
  const bool known = cpu::dispatch_dtype(p.dtype, [&](auto storage) {
    using T = decltype(storage);
    // x, a, b and the requested gradients
    const int64_t tensors = 3 + (p.dx != nullptr) + (p.da != nullptr) + (p.db != nullptr);
    const bool streaming = tensors > 3 && cpu::streaming_worthwhile(tensors * p.B * p.D * int64_t{sizeof(T)});
    cpu::run_score_rows(cpu::UniInstructRows<T>{p, streaming}, p.B, p.D, 3 * int64_t{sizeof(T)}, num_threads);
  });
  if (!known) throw std::invalid_argument("uni_instruct_cpu: unknown dtype code " + std::to_string(p.dtype));
}

}  // namespace mmfast
