// f-distill (DMD-form) generator loss on the CPU (oracle: mmfast/reference/fdistill.py; contract:
// FDistillParams in params.h). Per sample row of D elements, with d = b - a:
//   pass 1: S_abs = sum |x - a|, S_dd = sum d^2, Z = #{d == 0}
//           m = S_abs / D, w = h / (m + 1e-6), loss = scale * 0.5 * w^2 * S_dd
//   pass 2: dx = scale * (d * w)            (reads a and b only; x is not re-read)
// The loss is 0.5 * sum (d w)^2 of the reference, factored so that it needs no second reduction;
// the product is formed in double (no overflow of w^2 where the reference's sum is finite), and
// w = inf with some d == 0 gives NaN as the reference's inf * 0 does. Scheduling: score_rows.h.
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

#include "mmfast/kernels.h"
#include "score_rows.h"
#include "streaming_stores.h"

namespace mmfast {
namespace cpu {
namespace {

constexpr double kEps = 1e-6;

template <typename T>
MMFAST_MULTIVERSION void fdistill_sums(const FDistillParams& p, int64_t r, int64_t begin, int64_t end,
                                       double* out) {
  using F = compute_t<T>;
  const T* __restrict x = static_cast<const T*>(p.x) + r * p.sx;
  const T* __restrict a = static_cast<const T*>(p.a) + r * p.sa;
  const T* __restrict b = static_cast<const T*>(p.b) + r * p.sb;
  blocked_sums<F>(begin, end, out, [=](int64_t j, F& t0, F& t1, F& t2, F& t3) MMFAST_INLINE_LAMBDA {
    const F av = to_compute(a[j]);
    const F d = to_compute(b[j]) - av;
    t0 = std::abs(to_compute(x[j]) - av);
    t1 = d * d;
    t2 = d == F(0) ? F(1) : F(0);
    t3 = F(0);
  });
}

template <typename T>
MMFAST_INLINE compute_t<T> fdistill_weight(const FDistillParams& p, int64_t r, const double* totals) {
  using F = compute_t<T>;
  const F m = F(totals[0] / double(p.D));
  return static_cast<const F*>(p.h)[r] / (m + F(kEps));
}

template <typename T>
void fdistill_finish(const FDistillParams& p, int64_t r, int64_t begin, int64_t end, const double* totals,
                     bool first, bool streaming) {
  using F = compute_t<T>;
  const F w = fdistill_weight<T>(p, r, totals);
  if (first) {
    const double wd = double(w);
    double loss = 0.5 * p.scale * (wd * wd) * totals[1];
    if (std::isinf(wd) && totals[2] > 0) loss = std::numeric_limits<double>::quiet_NaN();
    static_cast<F*>(p.loss)[r] = F(loss);
  }
  if (p.dx == nullptr) return;
  const T* __restrict a = static_cast<const T*>(p.a) + r * p.sa;
  const T* __restrict b = static_cast<const T*>(p.b) + r * p.sb;
  T* const dx[1] = {static_cast<T*>(p.dx) + r * p.D};
  const F scale = F(p.scale);
  with_isa([&](auto isa) MMFAST_INLINE_LAMBDA {
    write_lines(isa, dx, begin, end, streaming, [=](int64_t j, auto out) MMFAST_INLINE_LAMBDA {
      out[0] = ((to_compute(b[j]) - to_compute(a[j])) * w) * scale;
    });
  });
  if (streaming) stream_fence();
}

template <typename T>
struct FDistillRows {
  static constexpr int kSums = 3;
  const FDistillParams& p;
  bool streaming;  // dx written with streaming stores
  void sums(int64_t r, int64_t begin, int64_t end, double* out) const { fdistill_sums<T>(p, r, begin, end, out); }
  void finish(int64_t r, int64_t begin, int64_t end, const double* totals, bool first) const {
    fdistill_finish<T>(p, r, begin, end, totals, first, streaming);
  }
};

}  // namespace
}  // namespace cpu

void fdistill_cpu(const FDistillParams& p, int num_threads) {
  if (p.B <= 0) return;
  const bool known = cpu::dispatch_dtype(p.dtype, [&](auto storage) {
    using T = decltype(storage);
    // x, a, b and dx
    const bool streaming = p.dx != nullptr && cpu::streaming_worthwhile(4 * p.B * p.D * int64_t{sizeof(T)});
    cpu::run_score_rows(cpu::FDistillRows<T>{p, streaming}, p.B, p.D, 3 * int64_t{sizeof(T)}, num_threads);
  });
  if (!known) throw std::invalid_argument("fdistill_cpu: unknown dtype code " + std::to_string(p.dtype));
}

}  // namespace mmfast
