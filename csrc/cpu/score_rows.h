// Row driver of the score-distillation CPU kernels (fdistill.cpp, uni_instruct.cpp, fake_score.cpp).
//
// Every op is "per-sample sums over a row (pass 1), then an elementwise pass that needs those sums
// (pass 2)". An op provides
//   static constexpr int kSums;                                       // sums per row (<= 4)
//   void sums(int64_t row, int64_t begin, int64_t end, double* out);  // pass 1 over [begin, end),
//                                                                     // adds into out[0..kSums)
//   void finish(int64_t row, int64_t begin, int64_t end, const double* totals, bool first);
//                                                                     // pass 2 over [begin, end);
//                                                                     // `first`: write the loss
// and run_score_rows schedules them (ScorePlan):
// - row mode (at least 4 rows per thread): OpenMP over rows, dynamically scheduled; each row's pass 1
//   is followed at once by its pass 2, which re-reads the row from L2 (1 MB per core here) when it
//   fits (a 3 x 64 x 64 fp32 row of three tensors is 144 KB, a 4 x 128 x 128 one 768 KB).
// - split mode (fewer rows than 4 per thread): rows are cut into chunks of `chunk` elements and
//   processed in groups of `group` rows whose data fit in the threads' L2 caches together: pass 1 on
//   every (row, chunk) of the group (static schedule), a barrier, the per-row totals (the chunk
//   partials added in chunk order: deterministic), pass 2 on the same (row, chunk) items with the
//   same static schedule, so each thread re-reads the chunks it has just summed from its own cache.
// Sums: float lanes over blocks of kSumBlock elements, each block's sum added to a double (double
// throughout for float64 inputs): the float error is that of a 512-term sum, whatever the row length.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "row_ops.h"

namespace mmfast::cpu {

constexpr int64_t kSumBlock = 512;

// Up to four row sums of terms(j, t0, t1, t2, t3) over j in [begin, end), added into out[0..4).
// Unused terms set to a constant 0 are optimized away.
template <typename F, typename Terms>
MMFAST_INLINE void blocked_sums(int64_t begin, int64_t end, double* out, Terms&& terms) {
  double o0 = 0, o1 = 0, o2 = 0, o3 = 0;
  for (int64_t j0 = begin; j0 < end; j0 += kSumBlock) {
    const int64_t j1 = std::min(end, j0 + kSumBlock);
    F s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t j = j0; j < j1; ++j) {
      F t0, t1, t2, t3;
      terms(j, t0, t1, t2, t3);
      s0 += t0;
      s1 += t1;
      s2 += t2;
      s3 += t3;
    }
    o0 += s0;
    o1 += s1;
    o2 += s2;
    o3 += s3;
  }
  out[0] += o0;
  out[1] += o1;
  out[2] += o2;
  out[3] += o3;
}

struct ScorePlan {
  int threads;
  int64_t nsplit;  // chunks per row; 1: row mode
  int64_t chunk;   // elements per chunk (a multiple of kSumBlock unless nsplit == 1)
  int64_t group;   // rows per group (split mode)
};

// `bytes_per_elem`: bytes per element that pass 2 re-reads (all the input rows pass 1 reads; 0 when
// pass 2 reads nothing, so that rows are split only to balance the threads).
inline ScorePlan score_plan(int64_t B, int64_t D, int64_t bytes_per_elem, int num_threads) {
  constexpr int64_t kCacheBudget = 512 * 1024;  // pass-1 bytes per thread re-read from L2 by pass 2
  constexpr int64_t kMinChunk = 4096;           // elements; shorter chunks cost more than they gain
  const int wanted = num_threads > 0 ? num_threads : omp_get_max_threads();
  const int64_t max_split = std::max<int64_t>(1, D / kMinChunk);
  const int threads = static_cast<int>(std::clamp<int64_t>(wanted, 1, B * max_split));
  const int64_t row_bytes = D * bytes_per_elem;
  // Enough rows: row mode, whatever their length (a barrier costs a time slice when another process
  // holds a core; dynamic scheduling over rows does not wait). Few rows: split for balance, in chunks
  // whose data fit the cache budget.
  int64_t nsplit = 1;
  if (threads > 1 && B < 4 * int64_t{threads}) {
    nsplit = std::max((4 * int64_t{threads} + B - 1) / B, (row_bytes + kCacheBudget - 1) / kCacheBudget);
    nsplit = std::min(nsplit, max_split);
  }
  if (nsplit == 1) return {threads, 1, D, 1};
  const int64_t per = (D + nsplit - 1) / nsplit;
  const int64_t chunk = (per + kSumBlock - 1) / kSumBlock * kSumBlock;
  nsplit = (D + chunk - 1) / chunk;
  const int64_t group = std::clamp<int64_t>(threads * kCacheBudget / std::max<int64_t>(1, row_bytes), 1, B);
  return {threads, nsplit, chunk, group};
}

template <typename Op>
void run_score_rows(const Op& op, int64_t B, int64_t D, int64_t bytes_per_elem, int num_threads) {
  constexpr int K = Op::kSums;
  static_assert(K >= 1 && K <= 4, "blocked_sums holds four sums");
  const ScorePlan plan = score_plan(B, D, bytes_per_elem, num_threads);
  if (plan.nsplit == 1) {
    parallel_rows(B, plan.threads, [&](int64_t begin, int64_t end, int) {
      for (int64_t r = begin; r < end; ++r) {
        double s[4] = {0, 0, 0, 0};
        op.sums(r, 0, D, s);
        op.finish(r, 0, D, s, true);
      }
    });
    return;
  }
  const int64_t nsplit = plan.nsplit, chunk = plan.chunk, group = plan.group;
  std::vector<double> part(static_cast<std::size_t>(group * nsplit * 4));
#pragma omp parallel num_threads(plan.threads)
  for (int64_t g0 = 0; g0 < B; g0 += group) {
    const int64_t items = std::min(group, B - g0) * nsplit;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < items; ++i) {
      const int64_t c = i % nsplit;
      double* s = part.data() + i * 4;
      s[0] = s[1] = s[2] = s[3] = 0;
      op.sums(g0 + i / nsplit, c * chunk, std::min(D, (c + 1) * chunk), s);
    }
#pragma omp for schedule(static)
    for (int64_t i = 0; i < items; ++i) {
      const int64_t r = i / nsplit, c = i % nsplit;
      double totals[4] = {0, 0, 0, 0};
      for (int64_t cc = 0; cc < nsplit; ++cc) {
        const double* s = part.data() + (r * nsplit + cc) * 4;
        for (int k = 0; k < K; ++k) totals[k] += s[k];
      }
      op.finish(g0 + r, c * chunk, std::min(D, (c + 1) * chunk), totals, c == 0);
    }
  }
}

}  // namespace mmfast::cpu
