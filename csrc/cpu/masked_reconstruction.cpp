// Masked reconstruction loss on the CPU, one pass over pred and target per row (oracle:
// mmfast/reference/masked_reconstruction.py; layout: MaskedReconParams in params.h).
//
// Per row r (D channels, stride sp_d / sy_d): P and Y are gathered once into per-thread buffers in
// the compute type; with normalize_target Yt = (Y - mean) * rstd, rstd = 1 / sqrt(var + eps). Then
//   mse / smooth_l1: e_c, g_c = w m_c de_c/dP (= dP), loss = sum_c w m_c e_c;
//   cosine:          cos = P.Yt / (max|P| max|Yt|), loss = w (1 - cos),
//                    dP = w (k_p P - Yt inv), dYt = w (k_y Yt - P inv);
// dY = dYt, or through the normalisation rstd (dYt - mean dYt - Yt mean(dYt Yt)). Everything after
// the gather runs on the L1-resident buffers. A row with w == 0 is not read unless dm is wanted:
// its loss and gradients are written as 0. Sums accumulate in double (see row_ops.h).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "mmfast/kernels.h"
#include "row_ops.h"
#include "streaming_stores.h"

namespace mmfast {
namespace cpu {
namespace {

// A kept row that follows an excluded one is prefetched whole, kPrefetchRows kept rows ahead, when it
// is at most kPrefetchRowBytes long (longer rows are streams the hardware prefetcher picks up).
constexpr int kPrefetchRows = 2;
constexpr int64_t kPrefetchRowBytes = 16 << 10;

// Per-thread scratch buffers, leading_dim(D) apart: P, Yt, element mask, dP (g), e or dYt.
constexpr int64_t kReconBuffers = 5;

// Gathers src[c * stride] (storage T) into dst (compute F).
template <typename T, typename F>
MMFAST_INLINE void gather_row(const T* __restrict src, int64_t stride, int64_t D, F* __restrict dst) {
  with_stride(stride, [&](auto s) MMFAST_INLINE_LAMBDA {
#pragma omp simd
    for (int64_t c = 0; c < D; ++c) dst[c] = F(to_compute(src[c * s]));
  });
}

// Prefetches a unit-stride row into L2, one request per 64-byte line (an L1 prefetch of whole rows
// ahead evicts the row being computed).
template <typename T>
MMFAST_INLINE void prefetch_row(const T* row, int64_t D) {
  const char* bytes = reinterpret_cast<const char*>(row);
  const int64_t n = D * int64_t(sizeof(T));
  for (int64_t off = 0; off < n; off += 64) __builtin_prefetch(bytes + off, 0, 1);
}

template <typename F>
MMFAST_INLINE void gather_mask(const void* mask, int32_t kind, int64_t stride, int64_t D, F* __restrict dst) {
  if (kind == kReconMaskBool) {
    const uint8_t* __restrict src = static_cast<const uint8_t*>(mask);
    with_stride(stride, [&](auto s) MMFAST_INLINE_LAMBDA {
#pragma omp simd
      for (int64_t c = 0; c < D; ++c) dst[c] = F(src[c * s]);  // torch bools are stored as 0 / 1
    });
  } else {
    gather_row(static_cast<const F*>(mask), stride, D, dst);
  }
}

// Elementwise loss of d = P - Yt: returns e, writes de/dd (mse: 2d; smooth_l1: d / beta inside
// |d| < beta, else sign(d) with NaN kept).
template <int kLoss, typename F>
MMFAST_INLINE F elementwise(F d, F beta, F inv_beta, F half_beta, F& de) {
  if constexpr (kLoss == kReconMSE) {
    de = d + d;
    return d * d;
  } else {
    const F ad = std::fabs(d);
    const bool quad = ad < beta;
    const F sgn = d > F(0) ? F(1) : (d < F(0) ? F(-1) : d);
    de = quad ? d * inv_beta : sgn;
    return quad ? F(0.5) * d * d * inv_beta : ad - half_beta;
  }
}

// The common case without the row buffers: an elementwise loss, unit strides, no normalisation, dP
// wanted, no per-element outputs. M: void (no element mask; w is the row weight), F (float mask) or
// uint8_t (bool mask). A chunk of kStreamChunk elements at a time: its sums, then its gradients from
// the chunk's inputs in L1, formed a line at a time in registers and stored with `isa`'s widest
// stores (write_lines; streaming stores with `streaming`).
template <int kLoss, typename M, bool kDY, typename Isa, typename T, typename F = compute_t<T>>
MMFAST_INLINE void stream_row(Isa isa, const T* __restrict prow, const T* __restrict yrow, const M* __restrict mrow,
                              int64_t D, F w, F beta, F inv_beta, F half_beta, T* dprow, T* dyrow, bool streaming,
                              double& loss, double& mask_sum) {
  // a bool mask is widened to F a chunk at a time first: bytes in the line loops would make gcc
  // vectorize them 4 lanes wide (one 16-byte vector of bytes per line)
  constexpr bool kBoolMask = std::is_same_v<M, uint8_t>;
  alignas(64) F mask_chunk[kBoolMask ? kStreamChunk : 1];
  int64_t chunk_begin = 0;
  const auto mask_at = [&](int64_t c) MMFAST_INLINE_LAMBDA -> F {
    if constexpr (kBoolMask) {
      return mask_chunk[c - chunk_begin];
    } else if constexpr (!std::is_void_v<M>) {
      return mrow[c];
    } else {
      return F(1);
    }
  };
  T* grads[kDY ? 2 : 1] = {dprow};
  if constexpr (kDY) grads[kDY ? 1 : 0] = dyrow;  // (the index keeps the discarded branch in bounds)
  double acc = 0, macc = 0;
  for (int64_t c0 = 0; c0 < D; c0 += kStreamChunk) {
    const int64_t c1 = std::min(D, c0 + kStreamChunk);
    chunk_begin = c0;
    if constexpr (kBoolMask) {
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) mask_chunk[c - c0] = F(mrow[c]);  // torch bools are stored as 0 / 1
    }
#pragma omp simd reduction(+ : acc, macc)
    for (int64_t c = c0; c < c1; ++c) {
      F de;
      const F e = elementwise<kLoss>(to_compute(prow[c]) - to_compute(yrow[c]), beta, inv_beta, half_beta, de);
      const F m = mask_at(c);
      acc += (w * m) * e;
      macc += m;
    }
    write_lines(isa, grads, c0, c1, streaming, [=](int64_t c, auto out) MMFAST_INLINE_LAMBDA {
      F de;
      elementwise<kLoss>(to_compute(prow[c]) - to_compute(yrow[c]), beta, inv_beta, half_beta, de);
      const F g = (w * mask_at(c)) * de;
      out[0] = g;
      if constexpr (kDY) out[1] = -g;
    });
  }
  loss = acc;
  mask_sum = macc;
}

template <int kLoss, typename M, typename T, typename F = compute_t<T>>
MMFAST_INLINE void stream_row_dy(const T* prow, const T* yrow, const M* mrow, int64_t D, F w, F beta,
                                 F inv_beta, F half_beta, T* dprow, T* dyrow, bool streaming, double& loss,
                                 double& mask_sum) {
  with_isa([&](auto isa) MMFAST_INLINE_LAMBDA {
    if (dyrow != nullptr) {
      stream_row<kLoss, M, true>(isa, prow, yrow, mrow, D, w, beta, inv_beta, half_beta, dprow, dyrow, streaming,
                                 loss, mask_sum);
    } else {
      stream_row<kLoss, M, false>(isa, prow, yrow, mrow, D, w, beta, inv_beta, half_beta, dprow, dyrow, streaming,
                                  loss, mask_sum);
    }
  });
}

// Rows strided over the channels ([A, D, S] with S > 1: channel_dim=1 features, a row per pixel) under an
// elementwise loss without normalisation: no step needs a whole row, so the rows are walked a channel at a
// time over a run of up to kPixelChunk neighbouring pixels of one sample, each step a contiguous run of
// pixels, the per-pixel sums kept in buffers; run_recon hands out whole samples (or equal parts of one), so
// that the channel steps continue one sequential stream through the sample's [D, S] block. (Row by row, a
// row's D channels are D cache lines S elements apart, and the next pixel reads the same lines again: at
// 8 x 256 x 32 x 32 that took 15x torch.compile's time.) Same outputs as the row loop of recon_rows, the sums
// over the channels in the same order.
constexpr int64_t kPixelChunk = 4096;
// the per-pixel loss sums of the common case (only dp wanted) are kept in F over blocks of this many
// channels, each block added to a double
constexpr int64_t kChannelBlock = 32;
// the per-thread buffers of recon_pixels, in elements of F: three of double, five of F
template <typename F>
constexpr int64_t kPixelWorkspace = kPixelChunk * (3 * int64_t(sizeof(double) / sizeof(F)) + 5);

MMFAST_INLINE bool pixel_major(const MaskedReconParams& p) {
  return p.S > 1 && p.loss != kReconCosine && p.normalize_target == 0 && p.sp_s == 1 && p.sy_s == 1;
}

template <typename T, int kLoss>
MMFAST_MULTIVERSION void recon_pixels(const MaskedReconParams& p, int64_t begin, int64_t end,
                                      compute_t<T>* workspace) {
  using F = compute_t<T>;
  // the element mask is a run-time test here (a loop of its own per channel): one instance per loss and
  // storage type, not per mask kind too, keeps the object's compile time down
  const bool elem_mask = p.mask_kind == kReconMaskFloat || p.mask_kind == kReconMaskBool;
  const int64_t D = p.D, S = p.S;
  const T* pred = static_cast<const T*>(p.pred);
  const T* target = static_cast<const T*>(p.target);
  const F* mask_rows = static_cast<const F*>(p.mask_kind == kReconMaskRows ? p.mask : p.row_weights);
  const bool per_element = p.per_element != 0;
  F* loss_rows = per_element ? nullptr : static_cast<F*>(p.loss_out);
  T* loss_elems = per_element ? static_cast<T*>(p.loss_out) : nullptr;
  F* msum = static_cast<F*>(p.msum);
  T* dp = static_cast<T*>(p.dp);
  T* dy = static_cast<T*>(p.dy);
  F* dm = static_cast<F*>(p.dm);
  const bool dm_rows = dm != nullptr && mask_rows != nullptr && !per_element;
  const F beta = F(p.beta), inv_beta = F(1 / p.beta), half_beta = F(0.5 * p.beta);
  double* __restrict acc = reinterpret_cast<double*>(workspace);  // per pixel: sum of w m e,
  double* __restrict raw = acc + kPixelChunk;                      // sum of e,
  double* __restrict macc = raw + kPixelChunk;                     // sum of m
  F* __restrict w = reinterpret_cast<F*>(macc + kPixelChunk);      // row weights; 0: excluded (loss and gradients 0)
  F* __restrict m = w + kPixelChunk;                               // the element mask of one channel
  F* __restrict g = m + kPixelChunk;                               // d loss / d pred of one channel
  F* __restrict eb = g + kPixelChunk;                              // w m e of one channel (0 where excluded)
  F* __restrict er = eb + kPixelChunk;                             // e of one channel
  const bool direct = dp != nullptr && dy == nullptr && !per_element && dm == nullptr && !(elem_mask && msum);
  for (int64_t r0 = begin; r0 < end;) {
    const int64_t a = r0 / S, s0 = r0 - a * S;
    const int64_t n = std::min({S - s0, kPixelChunk, end - r0});
    for (int64_t i = 0; i < n; ++i) {
      w[i] = mask_rows != nullptr ? mask_rows[r0 + i] : F(1);
      m[i] = F(1);
      eb[i] = F(0);
      acc[i] = raw[i] = macc[i] = 0;
    }
    const int64_t o = a * D * S + s0;  // outputs: [A, D, S] contiguous
    for (int64_t d = 0; d < D; ++d) {
      const T* __restrict prow = pred + a * p.sp_a + d * p.sp_d + s0;
      const T* __restrict yrow = target + a * p.sy_a + d * p.sy_d + s0;
      if (elem_mask) {
        const int64_t esize = p.mask_kind == kReconMaskBool ? 1 : int64_t(sizeof(F));
        const char* base = static_cast<const char*>(p.mask) + (a * p.sm_a + d * p.sm_d + s0 * p.sm_s) * esize;
        gather_mask(base, p.mask_kind, p.sm_s, n, m);
      }
      const int64_t od = o + d * S;
      // the terms and the gradient into buffers, then one plain loop per requested output (a test per
      // output inside the loop keeps gcc from vectorizing it)
      const auto pass = [&](auto direct) MMFAST_INLINE_LAMBDA {
        // direct: dp alone is wanted, written here rather than through g. The loop holds no double: gcc
        // does not if-convert the selects of a loop that also adds into doubles (it stays scalar), nor does
        // it see __restrict through a lambda's captures, hence the names again.
        T* __restrict dprow = dp + od;
        const T* __restrict pr = prow;
        const T* __restrict yr = yrow;
        const F* __restrict wr = w;
        const F* __restrict mr = m;
        F* __restrict gr = g;
        F* __restrict ebr = eb;
        F* __restrict err = er;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          F de;
          const F e = elementwise<kLoss>(to_compute(pr[i]) - to_compute(yr[i]), beta, inv_beta, half_beta, de);
          const F wm = wr[i] * mr[i];
          const bool kept = wr[i] != F(0);
          const F gi = kept ? wm * de : F(0);
          const F we = kept ? wm * e : F(0);
          if constexpr (direct) {  // eb: a sum over a block of kChannelBlock channels
            ebr[i] += we;
            dprow[i] = from_compute<T>(gi);
          } else {
            ebr[i] = we;
            gr[i] = gi;
            err[i] = e;
          }
        }
      };
      if (direct) {
        pass(std::true_type{});
        if ((d + 1) % kChannelBlock == 0 || d + 1 == D) {
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) {
            acc[i] += eb[i];
            eb[i] = F(0);
          }
        }
        continue;
      }
      pass(std::false_type{});
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) acc[i] += eb[i];
      if (dm_rows) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) raw[i] += er[i];
      }
      if (elem_mask) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) macc[i] += m[i];
      }
      if (dp != nullptr) {
        T* __restrict out = dp + od;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) out[i] = from_compute<T>(g[i]);
      }
      if (dy != nullptr) {
        T* __restrict out = dy + od;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) out[i] = from_compute<T>(-g[i]);
      }
      if (per_element) {
        T* __restrict out = loss_elems + od;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) out[i] = from_compute<T>(eb[i]);
      }
      if (dm != nullptr && !dm_rows) {
        F* __restrict out = dm + od;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) out[i] = er[i];
      }
    }
    for (int64_t i = 0; i < n; ++i) {
      if (!per_element) loss_rows[r0 + i] = F(acc[i]);  // (0 for an excluded pixel: its terms were 0)
      if (elem_mask && msum != nullptr) msum[r0 + i] = F(macc[i]);
      if (dm_rows) dm[r0 + i] = F(raw[i]);
    }
    r0 += n;
  }
}

template <typename T, int kLoss, bool kElemMask>
MMFAST_MULTIVERSION void recon_rows(const MaskedReconParams& p, int64_t begin, int64_t end,
                                    compute_t<T>* workspace, bool streaming) {
  using F = compute_t<T>;
  const int64_t D = p.D, S = p.S, ld = Workspace<F>::leading_dim(D);
  const T* pred = static_cast<const T*>(p.pred);
  const T* target = static_cast<const T*>(p.target);
  // row weights: a row mask, or the row_weights beside an element mask
  const F* mask_rows = static_cast<const F*>(p.mask_kind == kReconMaskRows ? p.mask : p.row_weights);
  const bool per_element = p.per_element != 0, normalize = p.normalize_target != 0;
  F* loss_rows = per_element ? nullptr : static_cast<F*>(p.loss_out);
  T* loss_elems = per_element ? static_cast<T*>(p.loss_out) : nullptr;
  F* msum = static_cast<F*>(p.msum);
  T* dp = static_cast<T*>(p.dp);
  T* dy = static_cast<T*>(p.dy);
  F* dm = static_cast<F*>(p.dm);
  const bool dm_rows = dm != nullptr && mask_rows != nullptr && !per_element;
  const F beta = F(p.beta), inv_beta = F(1 / p.beta), half_beta = F(0.5 * p.beta);
  const F eps = F(p.eps), cos_eps = F(p.cos_eps), inv_D = F(1.0 / double(D));
  F* __restrict pb = workspace;
  F* __restrict yb = pb + ld;
  F* __restrict mb = yb + ld;
  F* __restrict gb = mb + ld;
  F* __restrict eb = gb + ld;
  const bool stream = kLoss != kReconCosine && !normalize && !per_element && dm == nullptr && dp != nullptr &&
                      p.sp_d == 1 && p.sy_d == 1 && S == 1 && (!kElemMask || p.sm_d == 1);

  // Software prefetch where the hardware prefetchers lose the stream: at a kept row after excluded
  // ones (they are not read), for a row mask; a contiguous run of kept rows is left to the hardware.
  const bool prefetching = mask_rows != nullptr && dm == nullptr && p.sp_d == 1 && p.sy_d == 1 &&
                           D * int64_t(sizeof(T)) <= kPrefetchRowBytes;
  int64_t pf = begin;  // the kept rows before pf, after the current one, are prefetched (or contiguous)
  int pending = 0;     // how many of them
  for (int64_t r = begin; r < end; ++r) {
    const int64_t a = r / S, s = r - a * S;
    const int64_t o = a * D * S + s;  // outputs: [A, D, S] contiguous, channel stride S
    const F w = mask_rows != nullptr ? mask_rows[r] : F(1);
    const bool excluded = w == F(0);
    if (excluded && dm == nullptr) {  // not read
      if (per_element) {
        fill_row(loss_elems + o, S, D, F(0));
      } else {
        loss_rows[r] = F(0);
      }
      for (T* g : {dp, dy}) {
        if (g == nullptr) continue;
        if (streaming && S == 1) {
          with_isa([&](auto isa) MMFAST_INLINE_LAMBDA { stream_zero(isa, g + o, D * sizeof(T)); });
        } else {
          fill_row(g + o, S, D, F(0));
        }
      }
      continue;
    }
    if (prefetching) {
      if (r >= pf) {
        pf = r + 1;
      } else {
        --pending;
      }
      for (; pending < kPrefetchRows && pf < end; ++pf) {
        if (mask_rows[pf] == F(0)) continue;
        ++pending;
        if (pf > begin && mask_rows[pf - 1] != F(0)) continue;  // a contiguous run: the hardware's
        const int64_t na = pf / S, ns = pf - na * S;
        prefetch_row(pred + na * p.sp_a + ns * p.sp_s, D);
        prefetch_row(target + na * p.sy_a + ns * p.sy_s, D);
      }
    }
    if constexpr (kLoss != kReconCosine) {
      if (stream) {
        const T* prow = pred + a * p.sp_a + s * p.sp_s;
        const T* yrow = target + a * p.sy_a + s * p.sy_s;
        T* dyrow = dy != nullptr ? dy + o : nullptr;
        double acc = 0, macc = 0;
        if constexpr (kElemMask) {
          const int64_t off = a * p.sm_a + s * p.sm_s;
          if (p.mask_kind == kReconMaskBool) {
            stream_row_dy<kLoss>(prow, yrow, static_cast<const uint8_t*>(p.mask) + off, D, w, beta, inv_beta,
                                 half_beta, dp + o, dyrow, streaming, acc, macc);
          } else {
            stream_row_dy<kLoss>(prow, yrow, static_cast<const F*>(p.mask) + off, D, w, beta, inv_beta,
                                 half_beta, dp + o, dyrow, streaming, acc, macc);
          }
          if (msum != nullptr) msum[r] = F(macc);
        } else {
          stream_row_dy<kLoss, void>(prow, yrow, nullptr, D, w, beta, inv_beta, half_beta, dp + o, dyrow,
                                     streaming, acc, macc);
        }
        loss_rows[r] = F(acc);
        continue;
      }
    }
    gather_row(pred + a * p.sp_a + s * p.sp_s, p.sp_d, D, pb);
    gather_row(target + a * p.sy_a + s * p.sy_s, p.sy_d, D, yb);
    if constexpr (kElemMask) {
      const int64_t esize = p.mask_kind == kReconMaskBool ? 1 : int64_t(sizeof(F));
      const char* base = static_cast<const char*>(p.mask) + (a * p.sm_a + s * p.sm_s) * esize;
      gather_mask(base, p.mask_kind, p.sm_d, D, mb);
    }
    F rstd = F(1);
    if (normalize) {
      double sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < D; ++c) sum += yb[c];
      const F mean = F(sum / double(D));
      double sq = 0;
#pragma omp simd reduction(+ : sq)
      for (int64_t c = 0; c < D; ++c) {
        const F yc = yb[c] - mean;
        yb[c] = yc;
        sq += yc * yc;
      }
      rstd = F(1) / std::sqrt(F(sq / double(D)) + eps);
#pragma omp simd
      for (int64_t c = 0; c < D; ++c) yb[c] *= rstd;
    }

    // gb = dP, eb = dYt (cosine) or e (elementwise)
    F row_loss, row_raw = F(0);
    if constexpr (kLoss == kReconCosine) {
      double dot = 0, pp = 0, yy = 0;
#pragma omp simd reduction(+ : dot, pp, yy)
      for (int64_t c = 0; c < D; ++c) {
        dot += pb[c] * yb[c];
        pp += pb[c] * pb[c];
        yy += yb[c] * yb[c];
      }
      const F norm_p = F(std::sqrt(pp)), norm_y = F(std::sqrt(yy));
      const F den_p = norm_p < cos_eps ? cos_eps : norm_p;  // NaN stays NaN
      const F den_y = norm_y < cos_eps ? cos_eps : norm_y;
      const F inv = F(1) / (den_p * den_y);
      const F cos = F(dot) * inv;
      const F k_p = norm_p > cos_eps ? cos / (den_p * den_p) : F(0);
      const F k_y = norm_y > cos_eps ? cos / (den_y * den_y) : F(0);
      row_raw = F(1) - cos;
      row_loss = w * row_raw;
#pragma omp simd
      for (int64_t c = 0; c < D; ++c) {
        gb[c] = w * (k_p * pb[c] - yb[c] * inv);
        eb[c] = w * (k_y * yb[c] - pb[c] * inv);
      }
    } else {
      double acc = 0, raw = 0, macc = 0;
#pragma omp simd reduction(+ : acc, raw, macc)
      for (int64_t c = 0; c < D; ++c) {
        F de;
        const F e = elementwise<kLoss>(pb[c] - yb[c], beta, inv_beta, half_beta, de);
        const F weight = kElemMask ? w * mb[c] : w;
        eb[c] = e;
        gb[c] = weight * de;
        acc += weight * e;
        raw += e;
        if constexpr (kElemMask) macc += mb[c];
      }
      row_loss = F(acc);
      row_raw = F(raw);
      if constexpr (kElemMask) {
        if (msum != nullptr) msum[r] = F(macc);
      }
      if (per_element) {
        const F* __restrict mbc = mb;
        store_row(loss_elems + o, S, D, false, [=](int64_t c) MMFAST_INLINE_LAMBDA {
          return excluded ? F(0) : (kElemMask ? w * mbc[c] : w) * eb[c];
        });
      }
    }
    if (!per_element) loss_rows[r] = excluded ? F(0) : row_loss;
    if (dm != nullptr) {
      if (dm_rows) {
        dm[r] = row_raw;
      } else {
        store_row(dm + o, S, D, false, [=](int64_t c) MMFAST_INLINE_LAMBDA { return eb[c]; });
      }
    }
    if (dp != nullptr) {
      store_row(dp + o, S, D, false,
                [=](int64_t c) MMFAST_INLINE_LAMBDA { return excluded ? F(0) : gb[c]; });
    }
    if (dy != nullptr) {
      // dYt: eb (cosine) or -gb (elementwise)
      const F sign = kLoss == kReconCosine ? F(1) : F(-1);
      const F* __restrict gyt = kLoss == kReconCosine ? eb : gb;
      if (normalize) {
        double sg = 0, sgy = 0;
#pragma omp simd reduction(+ : sg, sgy)
        for (int64_t c = 0; c < D; ++c) {
          sg += gyt[c];
          sgy += gyt[c] * yb[c];
        }
        const F mean_g = sign * F(sg) * inv_D, mean_gy = sign * F(sgy) * inv_D;
        store_row(dy + o, S, D, false, [=](int64_t c) MMFAST_INLINE_LAMBDA {
          return excluded ? F(0) : rstd * (sign * gyt[c] - mean_g - yb[c] * mean_gy);
        });
      } else {
        store_row(dy + o, S, D, false,
                  [=](int64_t c) MMFAST_INLINE_LAMBDA { return excluded ? F(0) : sign * gyt[c]; });
      }
    }
  }
  if (streaming) stream_fence();
}

template <typename T>
void run_recon(const MaskedReconParams& p, int num_threads) {
  using F = compute_t<T>;
  const int64_t R = p.A * p.S;
  // a thread per kGrain elements at most: waking a second thread costs more than a small problem
  constexpr int64_t kGrain = int64_t{1} << 14;
  const int threads = resolve_threads(num_threads, std::min(R, (R * p.D + kGrain - 1) / kGrain));
  const bool pixels = pixel_major(p);
  Workspace<F> workspace(threads, std::max(kReconBuffers * Workspace<F>::leading_dim(p.D),
                                           pixels ? kPixelWorkspace<F> : int64_t{0}));
  const bool elem = p.mask_kind == kReconMaskFloat || p.mask_kind == kReconMaskBool;
  // pred, target and the requested gradients, each [R, D]
  const int64_t tensors = 2 + (p.dp != nullptr) + (p.dy != nullptr);
  const bool streaming = streaming_worthwhile(tensors * R * p.D * int64_t(sizeof(T)));
  const auto rows = [&](int64_t begin, int64_t end, int thread) {
    F* ws = workspace.slice(thread);
    if (pixels) {  // (never the cosine loss: pixel_major)
      if (p.loss == kReconSmoothL1) {
        recon_pixels<T, kReconSmoothL1>(p, begin, end, ws);
      } else {
        recon_pixels<T, kReconMSE>(p, begin, end, ws);
      }
    } else if (p.loss == kReconCosine) {
      recon_rows<T, kReconCosine, false>(p, begin, end, ws, streaming);
    } else if (p.loss == kReconSmoothL1) {
      if (elem) {
        recon_rows<T, kReconSmoothL1, true>(p, begin, end, ws, streaming);
      } else {
        recon_rows<T, kReconSmoothL1, false>(p, begin, end, ws, streaming);
      }
    } else if (elem) {
      recon_rows<T, kReconMSE, true>(p, begin, end, ws, streaming);
    } else {
      recon_rows<T, kReconMSE, false>(p, begin, end, ws, streaming);
    }
  };
  if (!pixels) {
    parallel_rows(R, threads, rows);
    return;
  }
  // recon_pixels: items of whole samples' pixels, or equal parts of them when there are too few samples to
  // keep the threads busy (or a sample has more than kPixelChunk pixels)
  const int64_t S = p.S;
  int64_t parts = (S + kPixelChunk - 1) / kPixelChunk;
  while (p.A * parts < 4 * int64_t{threads} && S / (2 * parts) >= 256) parts *= 2;
  const int64_t part = (S + parts - 1) / parts;
  parallel_rows(p.A * parts, threads, [&](int64_t begin, int64_t end, int thread) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t a = i / parts, s0 = (i % parts) * part;
      rows(a * S + s0, a * S + std::min(S, s0 + part), thread);
    }
  });
}

}  // namespace
}  // namespace cpu

void masked_reconstruction_cpu(const MaskedReconParams& p, int num_threads) {
  if (p.A * p.S <= 0 || p.D <= 0) return;
  if (p.loss != kReconMSE && p.loss != kReconSmoothL1 && p.loss != kReconCosine)
    throw std::invalid_argument("masked_reconstruction_cpu: unknown loss code " + std::to_string(p.loss));
  if (p.loss == kReconCosine && (p.per_element || p.mask_kind == kReconMaskFloat || p.mask_kind == kReconMaskBool))
    throw std::invalid_argument("masked_reconstruction_cpu: the cosine loss takes row masks only, per row");
  if (p.mask_kind < kReconMaskNone || p.mask_kind > kReconMaskBool)
    throw std::invalid_argument("masked_reconstruction_cpu: unknown mask kind " + std::to_string(p.mask_kind));
  const bool elem = p.mask_kind == kReconMaskFloat || p.mask_kind == kReconMaskBool;
  if (p.row_weights != nullptr && (!elem || p.msum != nullptr || p.dm != nullptr))
    throw std::invalid_argument("masked_reconstruction_cpu: row_weights go with an element mask, without msum and dm");
  const bool known = cpu::dispatch_dtype(p.dtype, [&](auto storage) {
    cpu::run_recon<decltype(storage)>(p, num_threads);
  });
  if (!known)
    throw std::invalid_argument("masked_reconstruction_cpu: unknown dtype code " + std::to_string(p.dtype));
}

}  // namespace mmfast
