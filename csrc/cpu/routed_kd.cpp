// Routed teacher-mixture KD on the CPU: one pass structure per row (b, s) computes every
// log-sum-exp, the row loss and the gradients dx, dw, dz (mmfast/reference/routed_kd.py is the
// oracle; csrc/include/mmfast/params.h the contract).
//
// With u = x / tau, q = softmax(u), lq = u - lse(u), a divergence D(P || q) is written through
// its elementwise pieces: D = sum terms, A = dD/dlog q, B = dD/dlog P, G = dD/dP. The softmax
// chains give
//   dL/du = A - q sum(A),   dL/dv = B - P sum(B)   (v = z / tau),
// so a row needs the softmax statistics of the student and of each selected teacher once: every
// row is gathered into a per-thread buffer, exp(v - max) is stored once and reused for the loss
// and the gradient, and log-probabilities are v - lse (no log per element). A row's max is taken in the
// exp sweep of the row before it (RowSequence in row_ops.h: student, then each distinct teacher, then the
// next row's student when this thread computes it and it is not masked).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "mmfast/dtype_shards.h"
#include "mmfast/kernels.h"
#include "row_ops.h"
#include "row_tiles.h"

namespace mmfast {
namespace cpu {
namespace {

template <typename F>
struct JSWeights {
  F beta, one_minus_beta, log_beta, log_one_minus_beta;
};

// Rows shorter than this are padded to a whole number of vectors (RoutedRow::load).
constexpr int64_t kPadBelow = 64;

template <typename F>
struct Pieces {
  F terms, A, B, G;
};

// The reference's divergence_terms, elementwise. Terms whose weight (P or q) is exactly 0 are 0,
// so an entry that underflows never gives NaN (a NaN weight stays NaN); sign(0) = sign(NaN) = 0
// as torch.sign.
template <int DIV, typename F>
MMFAST_INLINE Pieces<F> divergence_pieces(F lP, F lq, F P, F q, const JSWeights<F>& js) {
  if constexpr (DIV == kKL) {  // sum P (log P - log q)
    const F terms = zero_where_zero(P, P * (lP - lq));
    return {terms, -P, terms + P, lP - lq + F(1)};
  } else if constexpr (DIV == kReverseKL) {  // sum q (log q - log P)
    const F terms = zero_where_zero(q, q * (lq - lP));
    return {terms, terms + q, -q, -exp_approx(lq - lP)};
  } else if constexpr (DIV == kJS) {
    // beta KL(P || M) + (1 - beta) KL(q || M), M = beta P + (1 - beta) q mixed in log space
    const F lM = logaddexp(lP + js.log_beta, lq + js.log_one_minus_beta);
    const F tp = zero_where_zero(P, P * (lP - lM));
    const F tq = zero_where_zero(q, q * (lq - lM));
    return {js.beta * tp + js.one_minus_beta * tq, js.one_minus_beta * tq, js.beta * tp,
            js.beta * (lP - lM)};
  } else {  // 0.5 sum |P - q|
    static_assert(DIV == kTVD, "unknown divergence");
    const F d = q - P;
    const F sign = F(d > F(0)) - F(d < F(0));
    return {F(0.5) * std::abs(d), F(0.5) * q * sign, F(-0.5) * P * sign, F(-0.5) * sign};
  }
}

// p_k dD/dP at one class (mix probs). For reverse KL, p_k G = -p_k q / P is formed in log space as
// -exp(log p_k + log q - log P), as the reference does (P may underflow where p_k q does not).
template <int DIV, typename F>
MMFAST_INLINE F prob_times_grad(F pk, F lpk, F G, F lP, F lq) {
  if constexpr (DIV == kReverseKL) {
    return -exp_approx(lpk + lq - lP);
  } else {
    return pk * G;
  }
}

struct KLSums {
  double Z, S;
};

// One sweep over a unit-stride teacher row src for KL(p || q), p = softmax(v), v = src * scale - m (m the
// row's max): stores e[c] = exp(v[c]) (kStoreV: and vout[c] = v[c]) and returns
// Z = sum e and S = sum over e != 0 of e (v - u), u the student's shifted logits, so that
// KL = S / Z - log Z + log Z_q (p sums to one; log p - log q = v - u - log Z + log Z_q). The max of the unit-stride
// row `next` (same length and scale) in *next_max. src is a row of the logits (Src = T) or a buffer of mixed logits
// (Src = F).
// Float sums over blocks of kSweepBlock classes (kCancellingSweepBlock with kStoreV), each added to a double
// (row_ops.h).
template <bool kStoreV, typename Src, typename T, typename F = compute_t<T>>
MMFAST_INLINE KLSums kl_teacher_row(const Src* __restrict src, int64_t C, F scale, F m, const F* __restrict u,
                                    F* __restrict e, F* __restrict vout, const T* __restrict next,
                                    F* __restrict next_max) {
  // dz cancels against D (B - p (D + 1))
  constexpr int64_t kBlock = kStoreV ? kCancellingSweepBlock : kSweepBlock;
  double Z = 0, S = 0;
  F mn = -kInf<F>;
  for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
    const int64_t c1 = std::min(C, c0 + kBlock);
    F zb = 0, sb = 0;
#pragma omp simd reduction(+ : zb, sb) reduction(max : mn)
    for (int64_t c = c0; c < c1; ++c) {
      const F v = to_compute(src[c]) * scale - m;
      const F ex = exp_nonpos(v);
      e[c] = ex;
      if constexpr (kStoreV) vout[c] = v;
      zb += ex;
      sb += zero_where_zero(ex, ex * (v - u[c]));
      const F y = to_compute(next[c]);
      mn = y > mn ? y : mn;
    }
    Z += zb;
    S += sb;
  }
  *next_max = mn * scale;  // = max of next[c] * scale (scale > 0, rounding is monotonic)
  return {Z, S};
}

// body(std::integral_constant<int, N>{}) with N = n for n in 1..3 and 4 otherwise: the passes over several rows
// take up to four, named, so that their pointers stay in registers.
template <typename Body>
MMFAST_INLINE auto with_row_count(int64_t n, Body&& body) {
  switch (n) {
    case 1:
      return body(std::integral_constant<int, 1>{});
    case 2:
      return body(std::integral_constant<int, 2>{});
    case 3:
      return body(std::integral_constant<int, 3>{});
    default:
      return body(std::integral_constant<int, 4>{});
  }
}

// body(std::integral_constant<int, DIV>{}) for the divergence code div (checked by rows_fn). Only the loops that
// form divergence pieces are instantiated per divergence: the rows' and tiles' loading, routing and stores are
// shared (one copy per mix instead of four: the f32 object compiles in 38 s instead of 84 s).
template <typename Body>
MMFAST_INLINE auto with_divergence(int32_t div, Body&& body) {
  switch (div) {
    case kKL:
      return body(std::integral_constant<int, kKL>{});
    case kReverseKL:
      return body(std::integral_constant<int, kReverseKL>{});
    case kJS:
      return body(std::integral_constant<int, kJS>{});
    default:
      return body(std::integral_constant<int, kTVD>{});
  }
}

// Mix logits: vbar[c] = sum_j w_j (rows_j[c] * scale) over ND unit-stride rows, added in order j = 0, 1, .. (the
// reference's rounding); returns max_c vbar[c]. Named rows and weights (an array of them stays in memory, reloaded
// per vector); unused ones repeat row 0 and are never read.
template <int ND, typename T, typename F = compute_t<T>>
MMFAST_INLINE F mix_rows(const T* const* rows, const F* w, int64_t C, F scale, F* __restrict vbar) {
  const T* __restrict r0 = rows[0];
  const T* __restrict r1 = rows[ND > 1 ? 1 : 0];
  const T* __restrict r2 = rows[ND > 2 ? 2 : 0];
  const T* __restrict r3 = rows[ND > 3 ? 3 : 0];
  const F w0 = w[0], w1 = w[ND > 1 ? 1 : 0], w2 = w[ND > 2 ? 2 : 0], w3 = w[ND > 3 ? 3 : 0];
  F m = -kInf<F>;
#pragma omp simd reduction(max : m)
  for (int64_t c = 0; c < C; ++c) {
    F s = w0 * (to_compute(r0[c]) * scale);
    if constexpr (ND > 1) s += w1 * (to_compute(r1[c]) * scale);
    if constexpr (ND > 2) s += w2 * (to_compute(r2[c]) * scale);
    if constexpr (ND > 3) s += w3 * (to_compute(r3[c]) * scale);
    vbar[c] = s;
    m = s > m ? s : m;
  }
  return m;
}

// out[j] = sum_c (rows_j[c] * scale) g(c) over ND unit-stride rows in one pass (mix logits' dw), summed in double.
template <int ND, typename T, typename F, typename G>
MMFAST_INLINE void dot_rows(const T* const* rows, int64_t C, F scale, G&& g, double* out) {
  const T* __restrict r0 = rows[0];
  const T* __restrict r1 = rows[ND > 1 ? 1 : 0];
  const T* __restrict r2 = rows[ND > 2 ? 2 : 0];
  const T* __restrict r3 = rows[ND > 3 ? 3 : 0];
  double a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
  for (int64_t c = 0; c < C; ++c) {
    const F gc = g(c);
    a0 += (to_compute(r0[c]) * scale) * gc;
    if constexpr (ND > 1) a1 += (to_compute(r1[c]) * scale) * gc;
    if constexpr (ND > 2) a2 += (to_compute(r2[c]) * scale) * gc;
    if constexpr (ND > 3) a3 += (to_compute(r3[c]) * scale) * gc;
  }
  out[0] = a0;
  if constexpr (ND > 1) out[1] = a1;
  if constexpr (ND > 2) out[2] = a2;
  if constexpr (ND > 3) out[3] = a3;
}

// logsumexp_j term(j) over j < n with torch.logsumexp's semantics: NaN when a term is NaN, the max itself when it is
// infinite (every term -inf: -inf). A term of -inf adds nothing (a slot left out).
template <typename F, typename Term>
MMFAST_INLINE F logsumexp_terms(int64_t n, Term&& term) {
  F hi = -kInf<F>;
  bool nan = false;
  for (int64_t j = 0; j < n; ++j) {
    const F t = term(j);
    nan = nan || std::isnan(t);
    hi = std::max(hi, t);
  }
  if (nan) return kNaN<F>;
  if (std::isinf(hi)) return hi;
  F sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += std::exp(term(j) - hi);
  return hi + std::log(sum);
}

// Mix probs with KL: P[c] = sum_j coef_j e_j[c] over ND exp rows (coef_j = w_j / Z_j).
template <int ND, typename F>
MMFAST_INLINE void mix_prob_rows(const F* const* e, const F* coef, int64_t C, F* __restrict P) {
  const F* __restrict e0 = e[0];
  const F* __restrict e1 = e[ND > 1 ? 1 : 0];
  const F* __restrict e2 = e[ND > 2 ? 2 : 0];
  const F* __restrict e3 = e[ND > 3 ? 3 : 0];
  const F c0 = coef[0], c1 = coef[ND > 1 ? 1 : 0], c2 = coef[ND > 2 ? 2 : 0], c3 = coef[ND > 3 ? 3 : 0];
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    F p = c0 * e0[c];
    if constexpr (ND > 1) p += c1 * e1[c];
    if constexpr (ND > 2) p += c2 * e2[c];
    if constexpr (ND > 3) p += c3 * e3[c];
    P[c] = p;
  }
}

// Mix probs with KL, from P, log P, the student's shifted logits u and log Z_q: returns D = sum P (log P - log q)
// (the KL pieces of divergence_pieces: terms where P is 0 are 0); kDots: dots[j] = sum_c p_j[c] G[c] over ND exp rows (p_j = e_j inv_z_j,
// G = log P - log q + 1). Summed in double, as the general path: a student far from the mixture (log q in the
// hundreds) makes terms large against their sum, where float block sums lost up to 10x the reference's accuracy.
template <int ND, bool kDots, typename F>
MMFAST_INLINE double kl_mixture_sums(const F* __restrict P, const F* __restrict lP, const F* __restrict u, F log_zq,
                                     const F* const* e, const F* inv_z, int64_t C, double* dots) {
  const F* __restrict e0 = e[0];
  const F* __restrict e1 = e[ND > 1 ? 1 : 0];
  const F* __restrict e2 = e[ND > 2 ? 2 : 0];
  const F* __restrict e3 = e[ND > 3 ? 3 : 0];
  const F i0 = inv_z[0], i1 = inv_z[ND > 1 ? 1 : 0], i2 = inv_z[ND > 2 ? 2 : 0], i3 = inv_z[ND > 3 ? 3 : 0];
  double d = 0, a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : d, a0, a1, a2, a3)
  for (int64_t c = 0; c < C; ++c) {
    const Pieces<F> pc = divergence_pieces<kKL>(lP[c], u[c] - log_zq, P[c], F(0), JSWeights<F>{});  // q unused
    d += pc.terms;
    if constexpr (kDots) {
      a0 += (e0[c] * i0) * pc.G;
      if constexpr (ND > 1) a1 += (e1[c] * i1) * pc.G;
      if constexpr (ND > 2) a2 += (e2[c] * i2) * pc.G;
      if constexpr (ND > 3) a3 += (e3[c] * i3) * pc.G;
    }
  }
  if constexpr (kDots) {
    dots[0] = a0;
    if constexpr (ND > 1) dots[1] = a1;
    if constexpr (ND > 2) dots[2] = a2;
    if constexpr (ND > 3) dots[3] = a3;
  }
  return d;
}

// Mix probs: lP = log P for the n mixture probabilities P = sum_k w_k p_k. log(P) equals
// logsumexp_k(log w_k + log p_k) wherever P is a normal float; elsewhere (underflow, NaN, inf) take the
// log-space value logp_at(i), as the reference, and P = exp of it.
template <typename F, typename LogP>
MMFAST_INLINE void mixture_log(F* __restrict P, F* __restrict lP, int64_t n, LogP&& logp_at) {
  constexpr F lo = std::numeric_limits<F>::min(), hi = std::numeric_limits<F>::max();
  const auto normal = [=](F p) MMFAST_INLINE_LAMBDA { return p >= lo && p <= hi; };
  // three loops: log_approx's special cases, or a short-circuit test, in the count's loop keep GCC from
  // vectorizing it; the scalar pass runs only for a row that needs it
  int bad = 0;
#pragma omp simd reduction(+ : bad)
  for (int64_t i = 0; i < n; ++i) bad += int(P[i] < lo) | int(!(P[i] <= hi));  // !normal, without branches
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) lP[i] = log_approx(P[i]);
  for (int64_t i = 0; bad != 0 && i < n; ++i) {
    if (normal(P[i])) continue;
    lP[i] = logp_at(i);
    P[i] = std::exp(lP[i]);
  }
}

// The params' pointers, typed, and the per-call constants: shared by the row and the tile paths.
template <typename T>
struct RoutedOperands {
  using F = compute_t<T>;

  explicit RoutedOperands(const RoutedKDParams& p)
      : p_(p),
        x_(static_cast<const T*>(p.x)),
        z_(static_cast<const T*>(p.z)),
        w_(static_cast<const F*>(p.w)),
        loss_(static_cast<F*>(p.loss)),
        dx_(static_cast<T*>(p.dx)),
        dw_(static_cast<F*>(p.dw)),
        dz_(static_cast<T*>(p.dz)),
        C_(p.C),
        K_(p.K),
        inv_tau_(F(p.inv_tau)),
        scale_(F(p.scale)),
        grad_scale_(F(p.scale * p.inv_tau)),
        div_(p.div),
        js_{F(p.beta), F(1 - p.beta), F(std::log(p.beta)), F(std::log1p(-p.beta))} {}

  const RoutedKDParams& p_;
  const T* x_;
  const T* z_;
  const F* w_;
  F* loss_;
  T* dx_;
  F* dw_;
  T* dz_;
  int64_t C_, K_;
  F inv_tau_, scale_, grad_scale_;
  int32_t div_;
  JSWeights<F> js_;
};

// State and stages of one row; every stage is inlined into the multiversioned row loop.
template <typename T>
class RoutedRow : RoutedOperands<T> {
  using Ops = RoutedOperands<T>;
  using Ops::p_, Ops::x_, Ops::z_, Ops::w_, Ops::loss_, Ops::dx_, Ops::dw_, Ops::dz_, Ops::C_, Ops::K_,
      Ops::inv_tau_, Ops::scale_, Ops::grad_scale_, Ops::div_, Ops::js_;
  using F = compute_t<T>;

 public:
  // Scratch buffers per thread (leading_dim(C) apart): shifted student logits u, exp(u), A, then
  // the mix's own buffers from index kFirstMixBuffer on; after them kSlotScalars scalars per routing slot.
  static constexpr int kFirstMixBuffer = 3;
  // (Mix loss with KL, mix_loss_kl: u, exp(u), one exp row per distinct slot, then a teacher's shifted logits.)
  static int num_buffers(int mix, int64_t K) {
    return mix == kMixProbs ? 5 + 2 * int(K) : mix == kMixLoss ? std::max(6, 3 + int(K)) : 6;
  }
  // Scalars per routing slot after the buffers.
  static constexpr int kSlotScalars = 3;

  MMFAST_INLINE RoutedRow(const RoutedKDParams& p, F* workspace, int64_t* slot_ints)
      : Ops(p),
        ld_(Workspace<F>::leading_dim(p.C)),
        Cw_(p.mix != kMixProbs && p.C < kPadBelow ? ld_ : p.C),
        ws_(workspace),
        u_(buffer(0)),
        eq_(buffer(1)),
        a_(buffer(2)),
        teacher_(slot_ints),
        first_(slot_ints + p.K),
        wsum_(workspace + int64_t{num_buffers(p.mix, p.K)} * ld_),
        dval_(wsum_ + p.K),
        coef_(dval_ + p.K) {}

  // Row n; next (or -1): the row this thread computes after it, if it will be read (not masked).
  MMFAST_INLINE void set_row(int64_t n, int64_t next) {
    n_ = n;
    b_ = n / p_.S;
    s_ = n % p_.S;
    next_x_ = next < 0 ? nullptr : x_row(next / p_.S, next % p_.S);
  }

  // Resolves the row's slots: teacher_[k], first_[k] (the first slot routed to the same teacher;
  // duplicates are computed once) and wsum_[k] (the summed weight of those slots, for first slots).
  // False when an index is outside [0, E).
  MMFAST_INLINE bool route() {
    const F* w = w_ + b_ * K_;
    const int64_t* idx = p_.idx == nullptr ? nullptr : p_.idx + b_ * K_;
    for (int64_t k = 0; k < K_; ++k) {
      const int64_t e = idx == nullptr ? k : idx[k];
      if (e < 0 || e >= p_.E) return false;
      teacher_[k] = e;
      first_[k] = k;
      wsum_[k] = w[k];
      for (int64_t j = 0; idx != nullptr && j < k; ++j) {
        if (teacher_[j] == e) {
          first_[k] = j;
          wsum_[j] += w[k];
          break;
        }
      }
    }
    return true;
  }

  // A bad index: loss and gradients NaN. The reference scatters the NaN gradient into the clamped
  // teachers' dz rows; so do we (the out-of-range index itself is never dereferenced).
  MMFAST_INLINE void write_bad_row() {
    loss_[n_] = kNaN<F>;
    if (dx_ != nullptr) fill_row(dx_row(), p_.S, C_, kNaN<F>);
    for (int64_t k = 0; dw_ != nullptr && k < K_; ++k) dw_[n_ * K_ + k] = kNaN<F>;
    for (int64_t k = 0; dz_ != nullptr && k < K_; ++k) {
      const int64_t e = std::clamp<int64_t>(p_.idx[b_ * K_ + k], 0, p_.E - 1);
      fill_row(dz_row(e), p_.S, C_, kNaN<F>);
    }
  }

  // A masked row: zeros, nothing read (sparse dz is zero-filled by the caller).
  MMFAST_INLINE void write_masked_row() {
    loss_[n_] = 0;
    if (dx_ != nullptr) fill_row(dx_row(), p_.S, C_, F(0));
    for (int64_t k = 0; dw_ != nullptr && k < K_; ++k) dw_[n_ * K_ + k] = 0;
    for (int64_t e = 0; dz_ != nullptr && p_.idx == nullptr && e < p_.E; ++e)
      fill_row(dz_row(e), p_.S, C_, F(0));
  }

  // The student's softmax; mix loss and probs load the first slot's teacher next (its max is taken ahead).
  MMFAST_INLINE void load_student(bool teacher_next) {
    const T* next = teacher_next && K_ > 0 ? z_row(teacher_[0]) : nullptr;
    q_ = load(x_row(b_, s_), p_.sx_c, u_, eq_, next, p_.sz_c);
  }

  // mix "loss": L = sum_k w_k D(p_k || q); A = sum_k w_k A_k, dw_k = D_k,
  // dL/dv_k = w_k (B_k - p_k sum(B_k)).
  MMFAST_INLINE void mix_loss() {
    if (div_ == kKL && Cw_ == C_ && p_.sz_c == 1) return dz_ == nullptr ? mix_loss_kl<false>() : mix_loss_kl<true>();
    F* v = buffer(kFirstMixBuffer);
    F* e = buffer(kFirstMixBuffer + 1);
    F* b = buffer(kFirstMixBuffer + 2);
    std::fill(a_, a_ + Cw_, F(0));
    for (int64_t k = 0; k < K_; ++k) {
      if (first_[k] != k) continue;
      const F wk = wsum_[k];
      const SoftmaxStats<F> t = load_slot<true>(k, v, e);
      if (dz_ == nullptr) {
        dval_[k] = accumulate_teacher(std::false_type{}, wk, t, v, e, b);
        continue;
      }
      dval_[k] = accumulate_teacher(std::true_type{}, wk, t, v, e, b);
      const F sum_b = row_sum(b, Cw_);
      const F gk = grad_scale_ * wk;
      store_row(dz_row(teacher_[k]), p_.S, C_, p_.idx != nullptr,
                [&](int64_t c) MMFAST_INLINE_LAMBDA {
                  return gk * (b[c] - (e[c] * t.inv_sum) * sum_b);
                });
    }
    write_loss_and_dw();
    write_dx();
  }

  // mix "loss" with KL, rows that are not padded and teachers of unit class stride: each distinct teacher row is
  // read in one sweep (kl_teacher_row), which keeps its exp row e_k and gives D_k, and one pass after them writes
  // dx = scale / tau (q W - sum_k (w_k / Z_k) e_k), W = sum_k w_k (A = -sum_k w_k p_k, sum(A) = -W). Fewer
  // passes over the row buffers than the general path, which forms every divergence piece in a pass of its own
  // per teacher. kWithDz (teachers that need a gradient): the sweep also keeps the shifted logits v_k, and one
  // pass after it writes dz_k = scale / tau w_k (B_k - p_k sum(B_k)), B_k = p_k (log p_k - log q) + p_k,
  // sum(B_k) = D_k + 1, as the general path with the same pieces.
  template <bool kWithDz>
  MMFAST_INLINE void mix_loss_kl() {
    const double log_zq = q_.log_sum;
    F W = 0;
    int nd = 0;  // distinct slots
    for (int64_t k = 0; k < K_; ++k) {
      if (first_[k] != k) continue;
      F* e = buffer(2 + nd);
      const T* src = z_row(teacher_[k]);
      const RowAfter next = row_after_slot(k);
      F* v = buffer(2 + int(K_));  // kWithDz: this teacher's shifted logits, until its dz is written
      const KLSums sums = rows_.sweep(src, C_, inv_tau_, next.row, next.stride,
                                      [&](F m, const T* ahead, F* ahead_max) MMFAST_INLINE_LAMBDA {
                                        return kl_teacher_row<kWithDz>(src, C_, inv_tau_, m, u_, e, v, ahead,
                                                                       ahead_max);
                                      });
      const double log_z = std::log(sums.Z);
      const double d = sums.S / sums.Z - log_z + log_zq;
      dval_[k] = F(d);
      const F wk = wsum_[k];
      const F inv_z = F(1 / sums.Z);
      coef_[nd++] = wk * inv_z;
      W += wk;
      if constexpr (kWithDz) write_dz_kl(k, e, v, F(log_z), inv_z, F(d));
    }
    write_loss_and_dw();
    if (dx_ == nullptr) return;
    if (nd > 4) {  // sum_j coef_j e_j into e_0 first (the pass below takes up to four rows)
      F* __restrict e0 = buffer(2);
      const F c0 = coef_[0];
#pragma omp simd
      for (int64_t c = 0; c < C_; ++c) e0[c] *= c0;
      for (int j = 1; j < nd; ++j) {
        const F* __restrict ej = buffer(2 + j);
        const F cj = coef_[j];
#pragma omp simd
        for (int64_t c = 0; c < C_; ++c) e0[c] += cj * ej[c];
      }
      coef_[0] = 1;
      nd = 1;
    }
    with_row_count(nd, [&](auto n) MMFAST_INLINE_LAMBDA { write_dx_kl(W, n); });
  }

  // dz of slot k's teacher (mix_loss_kl): its exps e, shifted logits v, log Z, 1 / Z and D_k.
  MMFAST_INLINE void write_dz_kl(int64_t k, const F* __restrict e, const F* __restrict v, F log_z, F inv_z, F d) {
    const F* __restrict u = u_;
    const F log_zq = q_.log_sum;
    const F sum_b = d + F(1);
    const F gk = grad_scale_ * wsum_[k];
    const JSWeights<F> js = js_;
    store_row(dz_row(teacher_[k]), p_.S, C_, p_.idx != nullptr, [=](int64_t c) MMFAST_INLINE_LAMBDA {
      const F P = e[c] * inv_z;
      const F b = divergence_pieces<kKL>(v[c] - log_z, u[c] - log_zq, P, F(0), js).B;  // q is not needed for B
      return gk * (b - P * sum_b);
    });
  }

  // dx = scale / tau (q W - sum_j coef_j e_j) over the ND exp rows e_j = buffer(2 + j) (mix_loss_kl).
  template <int ND>
  MMFAST_INLINE void write_dx_kl(F W, std::integral_constant<int, ND>) {
    const F* __restrict eq = eq_;
    // named rows and coefficients (an array of them stays in memory, reloaded per vector); unused ones repeat
    // row 0 and are never read
    const F* __restrict e0 = buffer(2);
    const F* __restrict e1 = buffer(ND > 1 ? 3 : 2);
    const F* __restrict e2 = buffer(ND > 2 ? 4 : 2);
    const F* __restrict e3 = buffer(ND > 3 ? 5 : 2);
    const F c0 = coef_[0], c1 = ND > 1 ? coef_[1] : F(0), c2 = ND > 2 ? coef_[2] : F(0),
            c3 = ND > 3 ? coef_[3] : F(0);
    const F qw = q_.inv_sum * W;
    const F g = grad_scale_;
    store_row(dx_row(), p_.S, C_, false, [=](int64_t c) MMFAST_INLINE_LAMBDA {
      F pbar = c0 * e0[c];
      if constexpr (ND > 1) pbar += c1 * e1[c];
      if constexpr (ND > 2) pbar += c2 * e2[c];
      if constexpr (ND > 3) pbar += c3 * e3[c];
      return (eq[c] * qw - pbar) * g;
    });
  }

  // mix "logits": vbar = sum_k w_k v_k, L = D(softmax(vbar) || q);
  // with g = B - P sum(B): dw_k = <g, v_k>, dL/dv_k = w_k g.
  MMFAST_INLINE void mix_logits() {
    if (div_ == kKL && Cw_ == C_ && p_.sz_c == 1 && K_ > 0) return mix_logits_kl();
    F* vbar = buffer(kFirstMixBuffer);
    F* e = buffer(kFirstMixBuffer + 1);
    F* g = buffer(kFirstMixBuffer + 2);
    F m = -kInf<F>;
    for (int64_t k = 0; k < K_; ++k)
      m = axpy_scaled(z_row(teacher_[k]), p_.sz_c, C_, inv_tau_, w_[b_ * K_ + k], k > 0, vbar);
    std::fill(vbar + C_, vbar + Cw_, -kInf<F>);  // padding (see load)
    const SoftmaxStats<F> t = shift_exp(vbar, m, Cw_, e);
    loss_[n_] = scale_ * accumulate_mixture(t, vbar, e, g);
    if (dw_ != nullptr || dz_ != nullptr) {
      const F sum_b = row_sum(g, Cw_);
#pragma omp simd
      for (int64_t c = 0; c < Cw_; ++c) g[c] -= (e[c] * t.inv_sum) * sum_b;
    }
    for (int64_t k = 0; dw_ != nullptr && k < K_; ++k)
      dw_[n_ * K_ + k] = scale_ * dot_scaled(z_row(teacher_[k]), p_.sz_c, C_, inv_tau_, g);
    for (int64_t k = 0; dz_ != nullptr && k < K_; ++k) {
      if (first_[k] != k) continue;
      const F gk = grad_scale_ * wsum_[k];
      store_row(dz_row(teacher_[k]), p_.S, C_, p_.idx != nullptr,
                [&](int64_t c) MMFAST_INLINE_LAMBDA { return gk * g[c]; });
    }
    write_dx();
  }

  // mix "logits" with KL, rows that are not padded and teachers of unit class stride: vbar = sum_k w_k v_k in one
  // pass over the slots' teacher rows with its max (mix_teacher_rows), then one sweep (kl_teacher_row) gives
  // e = exp(vbar - max), Z and S, so D = S / Z - log Z + log Z_q, and takes the next row's student max ahead;
  // dx = scale / tau (q - P) in one pass (write_dx_kl). Fewer passes over the row buffers than the general path
  // (which adds the teachers one pass each and forms every divergence piece in a pass of its own). With dw or dz
  // the sweep also keeps the shifted logits v for the gradient g = B - P sum(B) (write_mixture_grads).
  MMFAST_INLINE void mix_logits_kl() {
    F* e = buffer(2);  // the exp row write_dx_kl reads
    F* vbar = buffer(kFirstMixBuffer);  // then B
    F* v = buffer(kFirstMixBuffer + 1);
    const F m = mix_teacher_rows(vbar);
    const bool with_g = dw_ != nullptr || dz_ != nullptr;
    const T* fallback = z_row(teacher_[0]);  // read by the sweep when no student row comes next
    const KLSums sums =
        rows_.sweep_before(next_x_, p_.sx_c, fallback, [&](const T* ahead, F* ahead_max) MMFAST_INLINE_LAMBDA {
          const KLSums row = with_g ? kl_teacher_row<true>(vbar, C_, F(1), m, u_, e, v, ahead, ahead_max)
                                    : kl_teacher_row<false>(vbar, C_, F(1), m, u_, e, v, ahead, ahead_max);
          *ahead_max *= inv_tau_;  // the student's max at its scale (the sweep took it at scale 1, exactly)
          return row;
        });
    const double log_z = std::log(sums.Z);
    loss_[n_] = scale_ * F(sums.S / sums.Z - log_z + q_.log_sum);
    const F inv_z = F(1 / sums.Z);
    if (with_g) write_mixture_grads(e, v, F(log_z), inv_z, vbar);
    if (dx_ == nullptr) return;
    coef_[0] = inv_z;
    write_dx_kl(F(1), std::integral_constant<int, 1>{});
  }

  // vbar = sum_k w_k v_k over the row's slots in order (unit stride), as the reference and the general path add
  // them (rows far apart in scale make the mixture's rounding matter): up to four slots in one pass, the rest
  // added one pass each; returns max_c vbar[c].
  MMFAST_INLINE F mix_teacher_rows(F* vbar) {
    const T* rows[4];
    const F* w = w_ + b_ * K_;
    const int64_t n = std::min<int64_t>(K_, 4);
    for (int64_t k = 0; k < n; ++k) rows[k] = z_row(teacher_[k]);
    F m = with_row_count(n, [&](auto nd) MMFAST_INLINE_LAMBDA {
      return mix_rows<decltype(nd)::value>(rows, w, C_, inv_tau_, vbar);
    });
    for (int64_t k = n; k < K_; ++k) m = axpy_scaled(z_row(teacher_[k]), 1, C_, inv_tau_, w[k], true, vbar);
    return m;
  }

  // Mix logits with KL, from the mixture's exps e, shifted logits v, log Z and 1 / Z: B = P (log P - log q) + P
  // into b_out (the general path's pieces) and g = B - P sum(B) / sum(P), sums of the stored values (sum(P) = 1 up
  // to rounding): g then sums to 0 up to rounding, whatever the error of Z (a float sum per block), so the dots
  // with the teachers' logits, whose offset is arbitrary (rows hundreds apart), add no multiple of it;
  // dw_k = scale <g, v_k> (the slots' teachers, up to four in one pass), dz_k = scale / tau wsum_k g (distinct
  // slots), g formed on the fly in each pass.
  MMFAST_INLINE void write_mixture_grads(const F* __restrict e, const F* __restrict v, F log_z, F inv_z,
                                         F* __restrict b_out) {
    const F* __restrict u = u_;
    const F log_zq = q_.log_sum;
    const JSWeights<F> js = js_;
    double sum_b = 0, sum_p = 0;
#pragma omp simd reduction(+ : sum_b, sum_p)
    for (int64_t c = 0; c < C_; ++c) {
      const F P = e[c] * inv_z;
      const F b = divergence_pieces<kKL>(v[c] - log_z, u[c] - log_zq, P, F(0), js).B;  // q is not needed for B
      b_out[c] = b;
      sum_b += b;
      sum_p += P;
    }
    const F ratio = F(sum_b / sum_p);
    const F* __restrict b = b_out;
    const auto g = [=](int64_t c) MMFAST_INLINE_LAMBDA { return b[c] - (e[c] * inv_z) * ratio; };
    for (int64_t k0 = 0; dw_ != nullptr && k0 < K_; k0 += 4) {
      const T* rows[4];
      double dots[4];
      const int64_t n = std::min<int64_t>(K_ - k0, 4);
      for (int64_t j = 0; j < n; ++j) rows[j] = z_row(teacher_[k0 + j]);
      with_row_count(n, [&](auto nd) MMFAST_INLINE_LAMBDA {
        dot_rows<decltype(nd)::value>(rows, C_, inv_tau_, g, dots);
      });
      for (int64_t j = 0; j < n; ++j) dw_[n_ * K_ + k0 + j] = scale_ * F(dots[j]);
    }
    for (int64_t k = 0; dz_ != nullptr && k < K_; ++k) {
      if (first_[k] != k) continue;
      const F gk = grad_scale_ * wsum_[k];
      store_row(dz_row(teacher_[k]), p_.S, C_, p_.idx != nullptr,
                [=](int64_t c) MMFAST_INLINE_LAMBDA { return gk * g(c); });
    }
  }

  // mix "probs" with KL, teachers of unit class stride, at most four distinct ones and no teacher gradient: each
  // distinct teacher row in one exp sweep (exp_row) that keeps its shifted logits and exps e_j, then one pass forms
  // P = sum_j (w_j / Z_j) e_j (mix_prob_rows), mixture_log log P (as the general path: log space where P is not a
  // normal float), one pass the loss and, for dw, sum_c p_j G (kl_mixture_sums), and one
  // dx = scale / tau (q W - P) (A = -P, sum(A) = -W). The general path also forms log p_k and p_k, and every
  // divergence piece, in passes of their own.
  MMFAST_INLINE void mix_probs_kl() {
    F* P = buffer(kFirstMixBuffer);
    F* lP = buffer(kFirstMixBuffer + 1);
    const F* e[4];
    const F* v[4];
    F inv_z[4];
    F offset[4];  // log Z_j - log w_j: log (w_j p_j) = v_j - offset_j
    int64_t slot[4];
    F W = 0;
    int nd = 0;
    for (int64_t k = 0; k < K_; ++k) {
      if (first_[k] != k) continue;
      // exp_row: Z summed in double, as a float sum's error in P is scaled by log q in the loss (hundreds for a
      // student far from the mixture; the scalar build's 1024-term float sums were 10x the reference's error there)
      const SoftmaxStats<F> t = load_slot<false>(k, slot_logp(nd), slot_prob(nd));
      const F wk = wsum_[k];
      e[nd] = slot_prob(nd);
      v[nd] = slot_logp(nd);
      inv_z[nd] = t.inv_sum;
      coef_[nd] = wk * t.inv_sum;
      offset[nd] = t.log_sum - std::log(wk);
      slot[nd++] = k;
      W += wk;
    }
    with_row_count(nd, [&](auto n) MMFAST_INLINE_LAMBDA { mix_prob_rows<decltype(n)::value>(e, coef_, C_, P); });
    mixture_log(P, lP, C_, [&](int64_t c) {
      return logsumexp_terms<F>(nd, [&](int64_t j) MMFAST_INLINE_LAMBDA { return v[j][c] - offset[j]; });
    });
    double dots[4];
    const F log_zq = q_.log_sum;
    const double d = with_row_count(nd, [&](auto n) MMFAST_INLINE_LAMBDA {
      constexpr int kRows = decltype(n)::value;
      return dw_ != nullptr ? kl_mixture_sums<kRows, true>(P, lP, u_, log_zq, e, inv_z, C_, dots)
                            : kl_mixture_sums<kRows, false>(P, lP, u_, log_zq, e, inv_z, C_, dots);
    });
    loss_[n_] = scale_ * F(d);
    if (dw_ != nullptr) {
      for (int j = 0; j < nd; ++j) dval_[slot[j]] = F(dots[j]);
      for (int64_t k = 0; k < K_; ++k) dw_[n_ * K_ + k] = scale_ * dval_[first_[k]];
    }
    if (dx_ == nullptr) return;
    const F* __restrict eq = eq_;
    const F* __restrict Pr = P;
    const F qw = q_.inv_sum * W;
    const F g = grad_scale_;
    store_row(dx_row(), p_.S, C_, false,
              [=](int64_t c) MMFAST_INLINE_LAMBDA { return (eq[c] * qw - Pr[c]) * g; });
  }

  // The row's distinct teachers.
  MMFAST_INLINE int64_t distinct_slots() const {
    int64_t n = 0;
    for (int64_t k = 0; k < K_; ++k) n += first_[k] == k;
    return n;
  }

  // mix "probs": P = sum_k w_k p_k, L = D(P || q); with G = dD/dP: dw_k = sum(p_k G),
  // dL/dv_k = w_k (p_k G - p_k sum(p_k G)).
  MMFAST_INLINE void mix_probs() {
    if (div_ == kKL && p_.sz_c == 1 && dz_ == nullptr && K_ > 0 && distinct_slots() <= 4) return mix_probs_kl();
    F* pbar = buffer(kFirstMixBuffer);  // P, then G
    F* lpbar = buffer(kFirstMixBuffer + 1);
    std::fill(pbar, pbar + C_, F(0));
    for (int64_t k = 0; k < K_; ++k) {
      if (first_[k] != k) continue;
      F* lp = slot_logp(k);
      F* pk = slot_prob(k);
      const SoftmaxStats<F> t = load_slot<false>(k, lp, pk);  // mix probs: rows are not padded
      const F wk = wsum_[k];
#pragma omp simd
      for (int64_t c = 0; c < C_; ++c) {
        lp[c] -= t.log_sum;
        pk[c] *= t.inv_sum;
        pbar[c] += wk * pk[c];
      }
    }
    mixture_log(pbar, lpbar, C_, [this](int64_t c) { return mixture_logp(c); });
    F* G = pbar;
    loss_[n_] = scale_ * accumulate_mixture_grad(lpbar, pbar, G);
    if (dw_ != nullptr || dz_ != nullptr) {
      const F* __restrict u = u_;
      const F log_sum_q = q_.log_sum;
      for (int64_t k = 0; k < K_; ++k) {
        if (first_[k] != k) continue;
        const F* __restrict pk = slot_prob(k);
        F* __restrict pg = slot_logp(k);  // p_k G, over log p_k
        const F pg_sum = with_divergence(div_, [&](auto div) MMFAST_INLINE_LAMBDA {
          double sum_pg = 0;
#pragma omp simd reduction(+ : sum_pg)
          for (int64_t c = 0; c < C_; ++c) {
            const F v = prob_times_grad<decltype(div)::value>(pk[c], pg[c], G[c], lpbar[c], u[c] - log_sum_q);
            pg[c] = v;
            sum_pg += v;
          }
          return F(sum_pg);
        });
        dval_[k] = pg_sum;
        if (dz_ != nullptr) {
          const F gk = grad_scale_ * wsum_[k];
          store_row(dz_row(teacher_[k]), p_.S, C_, p_.idx != nullptr,
                    [&](int64_t c) MMFAST_INLINE_LAMBDA { return gk * (pg[c] - pk[c] * pg_sum); });
        }
      }
    }
    for (int64_t k = 0; dw_ != nullptr && k < K_; ++k) dw_[n_ * K_ + k] = scale_ * dval_[first_[k]];
    write_dx();
  }

 private:
  MMFAST_INLINE F* buffer(int i) const { return ws_ + i * ld_; }

  // The softmax statistics of a row into v (shifted logits) and e (exp): rows shorter than kPadBelow
  // (mix loss and logits) are padded to Cw_ = leading_dim(C) elements with logit -inf, probability 0.
  // Every divergence piece of such an entry is 0 (its terms are masked where P or q is 0), so the
  // sums and the loops over Cw_ (whole vectors, no scalar remainder) give the unpadded row's values.
  // `next`: the row loaded after this one (RowSequence).
  MMFAST_INLINE SoftmaxStats<F> load(const T* src, int64_t stride, F* v, F* e, const T* next = nullptr,
                                     int64_t next_stride = 0) {
    if (Cw_ == C_) return rows_.load(src, stride, C_, inv_tau_, v, e, next, next_stride);
    return load_softmax_padded(src, stride, C_, Cw_, inv_tau_, v, e);
  }
  // The teacher of slot k (a first slot); next: the next first slot's teacher, else the next row's student.
  // kPadded: as load() (mix loss); else the row is never padded (mix probs).
  template <bool kPadded>
  MMFAST_INLINE SoftmaxStats<F> load_slot(int64_t k, F* v, F* e) {
    const RowAfter next = row_after_slot(k);
    if constexpr (kPadded) return load(z_row(teacher_[k]), p_.sz_c, v, e, next.row, next.stride);
    return rows_.load(z_row(teacher_[k]), p_.sz_c, C_, inv_tau_, v, e, next.row, next.stride);
  }
  // The row read after slot k's teacher (RowSequence): the next distinct slot's teacher, else the next row's
  // student (nullptr when none will be read).
  struct RowAfter {
    const T* row;
    int64_t stride;
  };
  MMFAST_INLINE RowAfter row_after_slot(int64_t k) const {
    int64_t j = k + 1;
    while (j < K_ && first_[j] != j) ++j;
    return j < K_ ? RowAfter{z_row(teacher_[j]), p_.sz_c} : RowAfter{next_x_, p_.sx_c};
  }
  // The row's loss and dw from the distinct slots' divergences dval_ (mix loss).
  MMFAST_INLINE void write_loss_and_dw() {
    F loss = 0;
    for (int64_t k = 0; k < K_; ++k) {
      const F d = dval_[first_[k]];
      loss += w_[b_ * K_ + k] * d;
      if (dw_ != nullptr) dw_[n_ * K_ + k] = scale_ * d;
    }
    loss_[n_] = scale_ * loss;
  }
  MMFAST_INLINE F* slot_logp(int64_t k) const { return buffer(5 + 2 * int(k)); }
  MMFAST_INLINE F* slot_prob(int64_t k) const { return buffer(6 + 2 * int(k)); }

  MMFAST_INLINE const T* x_row(int64_t b, int64_t s) const { return x_ + b * p_.sx_b + s * p_.sx_s; }
  MMFAST_INLINE const T* z_row(int64_t e) const {
    return z_ + e * p_.sz_e + b_ * p_.sz_b + s_ * p_.sz_s;
  }
  MMFAST_INLINE T* dx_row() const { return dx_ + b_ * C_ * p_.S + s_; }
  MMFAST_INLINE T* dz_row(int64_t e) const { return dz_ + (e * p_.B + b_) * C_ * p_.S + s_; }

  // The sums of A and B over a row are taken from the stored a and b afterwards (not accumulated
  // alongside): fp-contraction could round them differently from the stored elements, and
  // A - q sum(A) must cancel exactly where q is one-hot.

  // Teacher k of mix "loss" (softmax stats t, shifted logits v, exp e): returns D_k; a += w_k A_k
  // and, with kWithB, b = B_k for its dz.
  template <bool kWithB>
  MMFAST_INLINE F accumulate_teacher(std::integral_constant<bool, kWithB>, F wk,
                                           const SoftmaxStats<F>& t, const F* __restrict v,
                                           const F* __restrict e, F* __restrict b) {
    const F* __restrict u = u_;
    const F* __restrict eq = eq_;
    F* __restrict a = a_;
    const SoftmaxStats<F> q = q_;
    return with_divergence(div_, [&](auto div) MMFAST_INLINE_LAMBDA {
      double terms = 0;
#pragma omp simd reduction(+ : terms)
      for (int64_t c = 0; c < Cw_; ++c) {
        const Pieces<F> pc = divergence_pieces<decltype(div)::value>(v[c] - t.log_sum, u[c] - q.log_sum,
                                                                     e[c] * t.inv_sum, eq[c] * q.inv_sum, js_);
        terms += pc.terms;
        a[c] += wk * pc.A;
        if constexpr (kWithB) b[c] = pc.B;
      }
      return F(terms);
    });
  }

  // Mixture P with shifted logits v and exp e: returns D; a = A, b = B.
  MMFAST_INLINE F accumulate_mixture(const SoftmaxStats<F>& t, const F* __restrict v,
                                           const F* __restrict e, F* __restrict b) {
    const F* __restrict u = u_;
    const F* __restrict eq = eq_;
    F* __restrict a = a_;
    const SoftmaxStats<F> q = q_;
    return with_divergence(div_, [&](auto div) MMFAST_INLINE_LAMBDA {
      double terms = 0;
#pragma omp simd reduction(+ : terms)
      for (int64_t c = 0; c < Cw_; ++c) {
        const Pieces<F> pc = divergence_pieces<decltype(div)::value>(v[c] - t.log_sum, u[c] - q.log_sum,
                                                                     e[c] * t.inv_sum, eq[c] * q.inv_sum, js_);
        terms += pc.terms;
        a[c] = pc.A;
        b[c] = pc.B;
      }
      return F(terms);
    });
  }

  // Mixture P given as log P and P: returns D; a = A, G (may alias P: each element is read first).
  MMFAST_INLINE F accumulate_mixture_grad(const F* lP, const F* P, F* G) {
    const F* __restrict u = u_;
    const F* __restrict eq = eq_;
    F* __restrict a = a_;
    const SoftmaxStats<F> q = q_;
    return with_divergence(div_, [&](auto div) MMFAST_INLINE_LAMBDA {
      double terms = 0;
#pragma omp simd reduction(+ : terms)
      for (int64_t c = 0; c < C_; ++c) {
        const Pieces<F> pc =
            divergence_pieces<decltype(div)::value>(lP[c], u[c] - q.log_sum, P[c], eq[c] * q.inv_sum, js_);
        terms += pc.terms;
        a[c] = pc.A;
        G[c] = pc.G;
      }
      return F(terms);
    });
  }

  // logsumexp_k(log w_k + log p_k[c]) over the row's distinct teachers (torch.logsumexp semantics).
  MMFAST_INLINE F mixture_logp(int64_t c) const {
    return logsumexp_terms<F>(K_, [&](int64_t k) MMFAST_INLINE_LAMBDA {
      return first_[k] == k ? std::log(wsum_[k]) + slot_logp(k)[c] : -kInf<F>;
    });
  }

  // dx = scale / tau * (A - q sum(A))
  MMFAST_INLINE void write_dx() {
    if (dx_ == nullptr) return;
    const F* __restrict a = a_;
    const F sum_a = row_sum(a, Cw_);
    const F* __restrict eq = eq_;
    const F inv_sum = q_.inv_sum;
    const F g = grad_scale_;
    store_row(dx_row(), p_.S, C_, false, [=](int64_t c) MMFAST_INLINE_LAMBDA {
      return (a[c] - (eq[c] * inv_sum) * sum_a) * g;
    });
  }

  int64_t ld_;
  int64_t Cw_;  // the compute loops' length: C_, or leading_dim(C_) for a padded short row (see load)
  F* ws_;
  F* u_;
  F* eq_;
  F* a_;
  int64_t* teacher_;
  int64_t* first_;
  F* wsum_;
  F* dval_;  // per slot: D_k (mix loss) or <p_k, G> (mix probs)
  F* coef_;  // mix_loss_kl, mix_probs_kl: w_k / Z_k of the j-th distinct slot
  int64_t n_ = 0, b_ = 0, s_ = 0;
  const T* next_x_ = nullptr;  // the student row of the next row, when it will be read
  RowSequence<T> rows_;
  SoftmaxStats<F> q_{};
};

// Rows of few classes (row_tiles.h) run a tile of rows at a time. Loads and
// stores go through per-lane offsets, so any layout and sparse routing (a teacher per lane) take the
// same path. A tile runs only when all its rows are unmasked and routed to valid teachers; otherwise
// its rows take the row path (masked rows are never read).
// The bounds: where tiles stop being faster than rows (one EPYC, 2 threads, fp32, E = 2, N*C = 2^20):
// mix loss tiles are 1.5-1.7x faster at C = 48..63; mix logits 1.3x at C = 32 and 0.95x at C = 48;
// mix probs (E = 2 and 4) 1.04-1.14x at C = 32, 0.85x at C = 48 and 1.5-1.6x at C = 63 (its row loop
// is not padded, so it is fast only at multiples of the vector width: tiles win on average up to 63).
bool use_tiles(const RoutedKDParams& p) { return tile_rows(p.C, p.mix == kMixLogits ? 40 : 63); }

template <typename T>
class RoutedTile : RoutedOperands<T> {
  using Ops = RoutedOperands<T>;
  using Ops::p_, Ops::x_, Ops::z_, Ops::w_, Ops::loss_, Ops::dx_, Ops::dw_, Ops::dz_, Ops::C_, Ops::K_,
      Ops::inv_tau_, Ops::scale_, Ops::grad_scale_, Ops::div_, Ops::js_;
  using F = compute_t<T>;
  static constexpr int R = kTileRows<F>;

 public:
  // Scratch, each C * R elements: u, exp(u), A, then the mix's v, e, b (mix probs: P, log P, then log p_k
  // and p_k per slot), then (mix probs) the K x R slot weights.
  static int64_t workspace_elements(int mix, int64_t C, int64_t K) {
    return mix == kMixProbs ? (5 + 2 * K) * C * R + K * R : 6 * C * R;
  }

  MMFAST_INLINE RoutedTile(const RoutedKDParams& p, F* workspace)
      : Ops(p),
        u_(workspace),
        eq_(workspace + 1 * p.C * R),
        a_(workspace + 2 * p.C * R),
        v_(workspace + 3 * p.C * R),
        e_(workspace + 4 * p.C * R),
        b_(workspace + 5 * p.C * R),
        slot_w_(p.mix == kMixProbs ? workspace + (5 + 2 * p.K) * p.C * R : nullptr) {}

  // Rows n .. n + R - 1: true when every row is unmasked and every index is in [0, E); then the
  // per-lane offsets are set for mix_loss() / mix_logits().
  MMFAST_INLINE bool ready(int64_t n) {
    for (int r = 0; r < R; ++r) {
      const int64_t row = n + r;
      if (p_.mask != nullptr && p_.mask[row] == 0) return false;
      const int64_t b = p_.S == 1 ? row : row / p_.S, s = row - b * p_.S;
      for (int64_t k = 0; p_.idx != nullptr && k < K_; ++k) {
        const int64_t e = p_.idx[b * K_ + k];
        if (e < 0 || e >= p_.E) return false;
      }
      sample_[r] = b;
      x_off_[r] = b * p_.sx_b + s * p_.sx_s;
      z_lane_[r] = b * p_.sz_b + s * p_.sz_s;
      g_off_[r] = b * C_ * p_.S + s;  // dx, and dz without its teacher term
    }
    n_ = n;
    return true;
  }

  // mix "loss" (RoutedRow::mix_loss, each slot on its own: a teacher routed twice is read twice).
  MMFAST_INLINE void mix_loss() {
    load_student();
    std::fill(a_, a_ + C_ * R, F(0));
    alignas(64) F loss[R] = {};
    for (int64_t k = 0; k < K_; ++k) {
      route_slot(k);
      const Stats t = load(z_, z_off_, p_.sz_c, v_, e_);
      alignas(64) double terms[R] = {};
      const F* __restrict v = v_;
      const F* __restrict e = e_;
      const F* __restrict u = u_;
      const F* __restrict eq = eq_;
      F* __restrict a = a_;
      F* __restrict bb = b_;
      with_divergence(div_, [&](auto div) MMFAST_INLINE_LAMBDA {
        for (int64_t c = 0; c < C_; ++c) {
#pragma omp simd
          for (int r = 0; r < R; ++r) {
            const int64_t i = c * R + r;
            const Pieces<F> pc = divergence_pieces<decltype(div)::value>(
                v[i] - t.log_sum[r], u[i] - q_.log_sum[r], e[i] * t.inv_sum[r], eq[i] * q_.inv_sum[r], js_);
            terms[r] += pc.terms;
            a[i] += w_slot_[r] * pc.A;
            bb[i] = pc.B;
          }
        }
      });
#pragma omp simd
      for (int r = 0; r < R; ++r) {
        loss[r] += w_slot_[r] * F(terms[r]);
      }
      for (int r = 0; dw_ != nullptr && r < R; ++r) dw_[(n_ + r) * K_ + k] = scale_ * F(terms[r]);
      if (dz_ == nullptr) continue;
      alignas(64) F sum_b[R];
      sums(bb, sum_b);
      alignas(64) F gk[R];
#pragma omp simd
      for (int r = 0; r < R; ++r) gk[r] = grad_scale_ * w_slot_[r];
      store(dz_, dz_off_, p_.idx != nullptr, [&](int64_t i, int r) MMFAST_INLINE_LAMBDA {
        return gk[r] * (bb[i] - (e[i] * t.inv_sum[r]) * sum_b[r]);
      });
    }
    for (int r = 0; r < R; ++r) loss_[n_ + r] = scale_ * loss[r];
    write_dx();
  }

  // mix "logits" (RoutedRow::mix_logits).
  MMFAST_INLINE void mix_logits() {
    load_student();
    F* __restrict vbar = v_;
    F* __restrict e = e_;
    F* __restrict g = b_;
    for (int64_t k = 0; k < K_; ++k) {
      route_slot(k);
      with_stride(p_.sz_c, [&](auto sc) MMFAST_INLINE_LAMBDA {
        for (int64_t c = 0; c < C_; ++c) {
#pragma omp simd
          for (int r = 0; r < R; ++r) {
            const F val = w_slot_[r] * (to_compute(z_[z_off_[r] + c * sc]) * inv_tau_);
            vbar[c * R + r] = k > 0 ? vbar[c * R + r] + val : val;
          }
        }
      });
    }
    const Stats t = shift_exp_tile(vbar, C_, e);
    alignas(64) double terms[R] = {};
    {
      const F* __restrict u = u_;
      const F* __restrict eq = eq_;
      F* __restrict a = a_;
      with_divergence(div_, [&](auto div) MMFAST_INLINE_LAMBDA {
        for (int64_t c = 0; c < C_; ++c) {
#pragma omp simd
          for (int r = 0; r < R; ++r) {
            const int64_t i = c * R + r;
            const Pieces<F> pc = divergence_pieces<decltype(div)::value>(
                vbar[i] - t.log_sum[r], u[i] - q_.log_sum[r], e[i] * t.inv_sum[r], eq[i] * q_.inv_sum[r], js_);
            terms[r] += pc.terms;
            a[i] = pc.A;
            g[i] = pc.B;
          }
        }
      });
    }
    for (int r = 0; r < R; ++r) loss_[n_ + r] = scale_ * F(terms[r]);
    if (dw_ != nullptr || dz_ != nullptr) {
      alignas(64) F sum_b[R];
      sums(g, sum_b);
      for (int64_t c = 0; c < C_; ++c) {
#pragma omp simd
        for (int r = 0; r < R; ++r) g[c * R + r] -= (e[c * R + r] * t.inv_sum[r]) * sum_b[r];
      }
    }
    for (int64_t k = 0; k < K_; ++k) {
      if (dw_ == nullptr && dz_ == nullptr) break;
      route_slot(k);
      if (dw_ != nullptr) {
        alignas(64) double dot[R] = {};
        with_stride(p_.sz_c, [&](auto sc) MMFAST_INLINE_LAMBDA {
          for (int64_t c = 0; c < C_; ++c) {
#pragma omp simd
            for (int r = 0; r < R; ++r)
              dot[r] += (to_compute(z_[z_off_[r] + c * sc]) * inv_tau_) * g[c * R + r];
          }
        });
        for (int r = 0; r < R; ++r) dw_[(n_ + r) * K_ + k] = scale_ * F(dot[r]);
      }
      if (dz_ != nullptr) {
        alignas(64) F gk[R];
#pragma omp simd
        for (int r = 0; r < R; ++r) gk[r] = grad_scale_ * w_slot_[r];
        store(dz_, dz_off_, p_.idx != nullptr,
              [&](int64_t i, int r) MMFAST_INLINE_LAMBDA { return gk[r] * g[i]; });
      }
    }
    write_dx();
  }

  // mix "probs" (RoutedRow::mix_probs; log P of each slot's weight on its own, not summed per teacher).
  MMFAST_INLINE void mix_probs() {
    load_student();
    const int64_t CR = C_ * R;
    F* __restrict pbar = v_;  // P, then G
    F* __restrict lpbar = e_;
    std::fill(pbar, pbar + CR, F(0));
    for (int64_t k = 0; k < K_; ++k) {
      route_slot(k);
      F* __restrict lp = slot_logp(k);
      F* __restrict pk = slot_prob(k);
      const Stats t = load(z_, z_off_, p_.sz_c, lp, pk);
      const F* __restrict w = w_slot_;
      normalize_tile(lp, pk, C_, t, [=](int64_t i, int r) MMFAST_INLINE_LAMBDA { pbar[i] += w[r] * pk[i]; });
      std::copy(w_slot_, w_slot_ + R, slot_w_ + k * R);
    }
    mixture_log(pbar, lpbar, CR, [this](int64_t i) { return mixture_logp(i); });
    F* __restrict G = pbar;
    alignas(64) double terms[R] = {};
    {
      const F* __restrict u = u_;
      const F* __restrict eq = eq_;
      F* __restrict a = a_;
      with_divergence(div_, [&](auto div) MMFAST_INLINE_LAMBDA {
        for (int64_t c = 0; c < C_; ++c) {
#pragma omp simd
          for (int r = 0; r < R; ++r) {
            const int64_t i = c * R + r;
            const Pieces<F> pc = divergence_pieces<decltype(div)::value>(lpbar[i], u[i] - q_.log_sum[r], pbar[i],
                                                                         eq[i] * q_.inv_sum[r], js_);
            terms[r] += pc.terms;
            a[i] = pc.A;
            G[i] = pc.G;
          }
        }
      });
    }
    for (int r = 0; r < R; ++r) loss_[n_ + r] = scale_ * F(terms[r]);
    for (int64_t k = 0; k < K_ && (dw_ != nullptr || dz_ != nullptr); ++k) {
      route_slot(k);
      const F* __restrict u = u_;
      const F* __restrict pk = slot_prob(k);
      F* __restrict pg = slot_logp(k);  // p_k G, over log p_k
      alignas(64) double sum_pg[R] = {};
      with_divergence(div_, [&](auto div) MMFAST_INLINE_LAMBDA {
        for (int64_t c = 0; c < C_; ++c) {
#pragma omp simd
          for (int r = 0; r < R; ++r) {
            const int64_t i = c * R + r;
            const F v = prob_times_grad<decltype(div)::value>(pk[i], pg[i], G[i], lpbar[i], u[i] - q_.log_sum[r]);
            pg[i] = v;
            sum_pg[r] += v;
          }
        }
      });
      alignas(64) F pg_sum[R];
#pragma omp simd
      for (int r = 0; r < R; ++r) pg_sum[r] = F(sum_pg[r]);
      for (int r = 0; dw_ != nullptr && r < R; ++r) dw_[(n_ + r) * K_ + k] = scale_ * pg_sum[r];
      if (dz_ != nullptr) {
        alignas(64) F gk[R];
#pragma omp simd
        for (int r = 0; r < R; ++r) gk[r] = grad_scale_ * w_slot_[r];
        store(dz_, dz_off_, p_.idx != nullptr, [&](int64_t i, int r) MMFAST_INLINE_LAMBDA {
          return gk[r] * (pg[i] - pk[i] * pg_sum[r]);
        });
      }
    }
    write_dx();
  }

 private:
  using Stats = TileStats<F>;

  MMFAST_INLINE F* slot_logp(int64_t k) const { return v_ + (2 + 2 * k) * C_ * R; }
  MMFAST_INLINE F* slot_prob(int64_t k) const { return v_ + (3 + 2 * k) * C_ * R; }

  // logsumexp_k(log w_k + log p_k) at tile element i = c * R + r (torch.logsumexp semantics).
  MMFAST_INLINE F mixture_logp(int64_t i) const {
    const int r = int(i % R);
    return logsumexp_terms<F>(K_, [&](int64_t k) MMFAST_INLINE_LAMBDA {
      return std::log(slot_w_[k * R + r]) + slot_logp(k)[i];
    });
  }

  // Slot k of every lane: its weight, its teacher's logits offset and its dz offset.
  MMFAST_INLINE void route_slot(int64_t k) {
    for (int r = 0; r < R; ++r) {
      const int64_t b = sample_[r];
      const int64_t e = p_.idx == nullptr ? k : p_.idx[b * K_ + k];
      w_slot_[r] = w_[b * K_ + k];
      z_off_[r] = e * p_.sz_e + z_lane_[r];
      dz_off_[r] = e * p_.B * C_ * p_.S + g_off_[r];
    }
  }

  MMFAST_INLINE void load_student() { q_ = load(x_, x_off_, p_.sx_c, u_, eq_); }

  MMFAST_INLINE Stats load(const T* src, const int64_t* off, int64_t stride, F* v, F* e) const {
    return load_softmax_tile(src, off, stride, C_, inv_tau_, v, e);
  }
  MMFAST_INLINE void sums(const F* buf, F* out) const { tile_sums(buf, C_, out); }
  template <typename Value>
  MMFAST_INLINE void store(T* dst, const int64_t* off, bool accumulate, Value&& value) const {
    store_tile(dst, off, p_.S, C_, accumulate, value);  // gradients are [.., C, S] contiguous
  }

  // dx = scale / tau * (A - q sum(A))
  MMFAST_INLINE void write_dx() {
    if (dx_ == nullptr) return;
    alignas(64) F sum_a[R];
    sums(a_, sum_a);
    const F* __restrict a = a_;
    const F* __restrict eq = eq_;
    const F g = grad_scale_;
    store(dx_, g_off_, false, [&](int64_t i, int r) MMFAST_INLINE_LAMBDA {
      return (a[i] - (eq[i] * q_.inv_sum[r]) * sum_a[r]) * g;
    });
  }

  F* u_;
  F* eq_;
  F* a_;
  F* v_;
  F* e_;
  F* b_;
  F* slot_w_;  // mix probs: the weight of each slot and lane
  int64_t n_ = 0;
  Stats q_{};
  alignas(64) int64_t sample_[R];
  alignas(64) int64_t x_off_[R];
  alignas(64) int64_t z_lane_[R];
  alignas(64) int64_t g_off_[R];
  alignas(64) int64_t z_off_[R];
  alignas(64) int64_t dz_off_[R];
  alignas(64) F w_slot_[R];
};

template <typename T, int MIX>
MMFAST_MULTIVERSION void routed_rows(const RoutedKDParams& p, bool tiles, int64_t begin, int64_t end,
                                     compute_t<T>* workspace, int64_t* slot_ints) {
  RoutedRow<T> row(p, workspace, slot_ints);
  const auto one_row = [&](int64_t n, int64_t stop) MMFAST_INLINE_LAMBDA {
    row.set_row(n, n + 1 < stop && (p.mask == nullptr || p.mask[n + 1] != 0) ? n + 1 : -1);
    if (!row.route()) {  // a bad index wins over the mask, as in the reference
      row.write_bad_row();
      return;
    }
    if (p.mask != nullptr && p.mask[n] == 0) {
      row.write_masked_row();
      return;
    }
    row.load_student(MIX != kMixLogits);
    if constexpr (MIX == kMixLoss) {
      row.mix_loss();
    } else if constexpr (MIX == kMixLogits) {
      row.mix_logits();
    } else {
      row.mix_probs();
    }
  };
  // Whole tiles from `begin` go through the tile path; a tile it cannot take (a masked row, a bad index)
  // and the rows after the last whole tile go through the row path. Each path has one call site, so
  // that the row path is inlined once (a second copy made the code 1.7x larger and its compile 2x longer).
  constexpr int R = kTileRows<compute_t<T>>;
  std::optional<RoutedTile<T>> tile;
  if (tiles) tile.emplace(p, workspace);
  for (int64_t n = begin; n < end;) {
    const bool whole_tile = tile.has_value() && n + R <= end;
    if (whole_tile && tile->ready(n)) {
      if constexpr (MIX == kMixLoss) {
        tile->mix_loss();
      } else if constexpr (MIX == kMixLogits) {
        tile->mix_logits();
      } else {
        tile->mix_probs();
      }
      n += R;
      continue;
    }
    for (const int64_t stop = whole_tile ? n + R : end; n < stop; ++n) one_row(n, stop);
  }
}

template <typename T>
using RowsFn = void (*)(const RoutedKDParams&, bool, int64_t, int64_t, compute_t<T>*, int64_t*);

template <typename T>
RowsFn<T> rows_fn(int32_t mix, int32_t div) {
  if (div != kKL && div != kReverseKL && div != kJS && div != kTVD)
    throw std::invalid_argument("routed_kd_cpu: unknown divergence code " + std::to_string(div));
  switch (mix) {
    case kMixLoss:
      return &routed_rows<T, kMixLoss>;
    case kMixLogits:
      return &routed_rows<T, kMixLogits>;
    case kMixProbs:
      return &routed_rows<T, kMixProbs>;
    default:
      throw std::invalid_argument("routed_kd_cpu: unknown mix code " + std::to_string(mix));
  }
}

template <typename T>
void run_routed(const RoutedKDParams& p, int num_threads) {
  using F = compute_t<T>;
  const RowsFn<T> fn = rows_fn<T>(p.mix, p.div);
  const int64_t rows = p.B * p.S;
  const int threads = resolve_threads(num_threads, rows);
  const int64_t buffers = RoutedRow<T>::num_buffers(p.mix, p.K);
  const bool tiles = use_tiles(p);  // read once: the workspace is sized for it
  const int64_t per_thread = std::max(buffers * Workspace<F>::leading_dim(p.C) + RoutedRow<T>::kSlotScalars * p.K,
                                      tiles ? RoutedTile<T>::workspace_elements(p.mix, p.C, p.K) : 0);
  Workspace<F> workspace(threads, per_thread);
  std::vector<int64_t> slot_ints(static_cast<std::size_t>(threads) * 2 * p.K);
  parallel_rows(
      rows, threads,
      [&](int64_t begin, int64_t end, int thread) {
        fn(p, tiles, begin, end, workspace.slice(thread), slot_ints.data() + thread * 2 * p.K);
      },
      tiles ? kTileRows<F> : 1);  // a row's path (tile or row loop) does not depend on the thread count
}

}  // namespace

// The kernels of one storage type: each built in its own object (dtype shards, mmfast/dtype_shards.h).
template <typename T>
void routed_kd_typed(const RoutedKDParams& p, int num_threads) {
  run_routed<T>(p, num_threads);
}

static_assert(kFloat32 == 0 && kFloat64 == 1 && kBFloat16 == 2 && kFloat16 == 3,
              "the dtype shards below and in CMakeLists.txt use these DType codes");
#if MMFAST_DISPATCH_ONLY
extern template void routed_kd_typed<float>(const RoutedKDParams&, int);
extern template void routed_kd_typed<double>(const RoutedKDParams&, int);
extern template void routed_kd_typed<bf16>(const RoutedKDParams&, int);
extern template void routed_kd_typed<f16>(const RoutedKDParams&, int);
#endif
#if MMFAST_BUILDS_DTYPE(0)  // kFloat32
template void routed_kd_typed<float>(const RoutedKDParams&, int);
#endif
#if MMFAST_BUILDS_DTYPE(1)  // kFloat64
template void routed_kd_typed<double>(const RoutedKDParams&, int);
#endif
#if MMFAST_BUILDS_DTYPE(2)  // kBFloat16
template void routed_kd_typed<bf16>(const RoutedKDParams&, int);
#endif
#if MMFAST_BUILDS_DTYPE(3)  // kFloat16
template void routed_kd_typed<f16>(const RoutedKDParams&, int);
#endif

}  // namespace cpu

#if MMFAST_BUILDS_DISPATCH
void routed_kd_cpu(const RoutedKDParams& p, int num_threads) {
  if (p.B * p.S <= 0) return;
  const bool known = cpu::dispatch_dtype(p.dtype, [&](auto storage) {
    cpu::routed_kd_typed<decltype(storage)>(p, num_threads);
  });
  if (!known)
    throw std::invalid_argument("routed_kd_cpu: unknown dtype code " + std::to_string(p.dtype));
}
#endif

}  // namespace mmfast
