// Fake-score (EDM-weighted denoising) loss on the CPU (oracle: mmfast/reference/fake_score.py;
// contract: FakeScoreParams in params.h). Per sample row, with e = b - x:
//   loss = scale * lam * sum e^2,   db = e * (lam * 2 scale)
// One pass over the data: db does not depend on the row sum, so the sum and the gradient are
// computed in the same loop; the second stage of score_rows.h only writes the loss. A large db is
// written with streaming stores (streaming_stores.h), the same values and sums either way.
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
MMFAST_MULTIVERSION void fake_score_pass(const FakeScoreParams& p, int64_t r, int64_t begin, int64_t end,
                                         double* out, bool streaming) {
  using F = compute_t<T>;
  const T* __restrict b = static_cast<const T*>(p.b) + r * p.sb;
  const T* __restrict x = static_cast<const T*>(p.x) + r * p.sx;
  if (p.db == nullptr) {
    blocked_sums<F>(begin, end, out, [=](int64_t j, F& t0, F& t1, F& t2, F& t3) MMFAST_INLINE_LAMBDA {
      const F e = to_compute(b[j]) - to_compute(x[j]);
      t0 = e * e;
      t1 = t2 = t3 = F(0);
    });
    return;
  }
  T* __restrict db = static_cast<T*>(p.db) + r * p.D;
  const F k = static_cast<const F*>(p.lam)[r] * F(2.0 * p.scale);
  if (!streaming) {
    blocked_sums<F>(begin, end, out, [=](int64_t j, F& t0, F& t1, F& t2, F& t3) MMFAST_INLINE_LAMBDA {
      const F e = to_compute(b[j]) - to_compute(x[j]);
      db[j] = from_compute<T>(e * k);
      t0 = e * e;
      t1 = t2 = t3 = F(0);
    });
    return;
  }
  // db a chunk at a time through an L1 buffer; chunks of kSumBlock elements keep blocked_sums' grouping
  static_assert(kStreamChunk == kSumBlock, "streamed chunks must be the sum blocks");
  alignas(64) T buf[kStreamChunk];
  for (int64_t j0 = begin; j0 < end; j0 += kStreamChunk) {
    const int64_t j1 = std::min(end, j0 + kStreamChunk);
    T* __restrict chunk = buf;  // chunk[j - j0] for j in [j0, j1)
    blocked_sums<F>(j0, j1, out, [=](int64_t j, F& t0, F& t1, F& t2, F& t3) MMFAST_INLINE_LAMBDA {
      const F e = to_compute(b[j]) - to_compute(x[j]);
      chunk[j - j0] = from_compute<T>(e * k);
      t0 = e * e;
      t1 = t2 = t3 = F(0);
    });
    stream_bytes(db + j0, buf, static_cast<std::size_t>(j1 - j0) * sizeof(T));
  }
  stream_fence();
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
