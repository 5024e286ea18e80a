// Fake-score (EDM-weighted denoising) loss on the CPU (oracle: mmfast/reference/fake_score.py;
// contract: FakeScoreParams in params.h). Per sample row, with e = b - x:
//   loss = scale * lam * sum e^2,   db = e * (lam * 2 scale)
// One pass over the data: db does not depend on the row sum, so each chunk's sum and then its
// gradient (from the chunk's inputs in L1) are formed in the first stage; the second stage of
// score_rows.h only writes the loss. A large db is written with streaming stores
// (streaming_stores.h), the same values and sums either way.
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "mmfast/kernels.h"
#include "score_rows.h"
#include "streaming_stores.h"

namespace mmfast {
namespace cpu {
namespace {

template <typename T>
void fake_score_pass(const FakeScoreParams& p, int64_t r, int64_t begin, int64_t end, double* out, bool streaming) {
  using F = compute_t<T>;
  const T* __restrict b = static_cast<const T*>(p.b) + r * p.sb;
  const T* __restrict x = static_cast<const T*>(p.x) + r * p.sx;
  const auto sums = [=](int64_t j0, int64_t j1) MMFAST_INLINE_LAMBDA {
    blocked_sums<F>(j0, j1, out, [=](int64_t j, F& t0, F& t1, F& t2, F& t3) MMFAST_INLINE_LAMBDA {
      const F e = to_compute(b[j]) - to_compute(x[j]);
      t0 = e * e;
      t1 = t2 = t3 = F(0);
    });
  };
  if (p.db == nullptr) {
    with_isa([&](auto) MMFAST_INLINE_LAMBDA { sums(begin, end); });
    return;
  }
  T* const db[1] = {static_cast<T*>(p.db) + r * p.D};
  const F k = static_cast<const F*>(p.lam)[r] * F(2.0 * p.scale);
  // a chunk's sum, then its db from the chunk's inputs in L1
  static_assert(kStreamChunk % kSumBlock == 0, "chunks must be whole sum blocks");
  with_isa([&](auto isa) MMFAST_INLINE_LAMBDA {
    for (int64_t j0 = begin; j0 < end; j0 += kStreamChunk) {
      const int64_t j1 = std::min(end, j0 + kStreamChunk);
      sums(j0, j1);
      write_lines(isa, db, j0, j1, streaming, [=](int64_t j, auto grad) MMFAST_INLINE_LAMBDA {
        grad[0] = (to_compute(b[j]) - to_compute(x[j])) * k;
      });
    }
  });
  if (streaming) stream_fence();
}

template <typename T>
struct FakeScoreRows {
  static constexpr int kSums = 1;
  const FakeScoreParams& p;
  bool streaming;  // db written with streaming stores
  void sums(int64_t r, int64_t begin, int64_t end, double* out) const {
    fake_score_pass<T>(p, r, begin, end, out, streaming);
  }
  void finish(int64_t r, int64_t, int64_t, const double* totals, bool first) const {
    using F = compute_t<T>;
    if (first) static_cast<F*>(p.loss)[r] = F(double(static_cast<const F*>(p.lam)[r]) * totals[0] * p.scale);
  }
};

}  // namespace
}  // namespace cpu

void fake_score_cpu(const FakeScoreParams& p, int num_threads) {
  if (p.B <= 0) return;
  const bool known = cpu::dispatch_dtype(p.dtype, [&](auto storage) {
    using T = decltype(storage);
    // b, x and db
    const bool streaming = p.db != nullptr && cpu::streaming_worthwhile(3 * p.B * p.D * int64_t{sizeof(T)});
    // nothing is re-read after the sums: 0 bytes to keep in cache, rows are split for balance only
    cpu::run_score_rows(cpu::FakeScoreRows<T>{p, streaming}, p.B, p.D, 0, num_threads);
  });
  if (!known) throw std::invalid_argument("fake_score_cpu: unknown dtype code " + std::to_string(p.dtype));
}

}  // namespace mmfast
