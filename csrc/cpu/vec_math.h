// Branch-free scalar math that gcc/clang auto-vectorize inside `#pragma omp simd` loops, and the
// attributes that build the hot row loops once per x86 ISA level.
//
// exp/log for float are Sleef/Cephes-style polynomials (measured <= 1.4 ulp on their domain, IEEE
// specials included: exp(-inf) = 0 exactly, NaN propagates). For double the compute type stays
// double and the libm functions are used: f64 is the exactness path, not the fast one.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

// MMFAST_INLINE_LAMBDA goes after a lambda's parameter list. Everything a multiversioned function
// calls must be inlined into it, or it runs as baseline (unvectorized) code.
#if defined(__GNUC__) || defined(__clang__)
#define MMFAST_INLINE inline __attribute__((always_inline))
#define MMFAST_INLINE_LAMBDA __attribute__((always_inline))
#define MMFAST_PREFETCH(address, rw, locality) __builtin_prefetch((address), (rw), (locality))
#else
#define MMFAST_INLINE inline
#define MMFAST_INLINE_LAMBDA
#define MMFAST_PREFETCH(address, rw, locality) ((void)(address))
#endif

// One clone per ISA level (x86-64-v4 = AVX-512, v3 = AVX2 + FMA), chosen once at load time through
// an ifunc. Elsewhere (non-x86, non-ELF), or built with MMFAST_NO_ISA_CLONES (CMake option
// MMFAST_CPU_ISA_CLONES=OFF), the function is built for the baseline target.
#if defined(__x86_64__) && defined(__ELF__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(MMFAST_NO_ISA_CLONES)
#define MMFAST_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MMFAST_MULTIVERSION
#endif

namespace mmfast::cpu {

template <typename To, typename From>
MMFAST_INLINE To bit_cast(From v) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs equal sizes");
  To r;
  std::memcpy(&r, &v, sizeof(To));
  return r;
}

// A hint to fetch the cache line `elements` elements after p (kWrite: to write it) into L2, not L1
// (prefetcht1): the callers prefetch many streams at once, and streams a multiple of 4 KiB apart (the
// classes of NCHW logits with a power-of-two pixel count) map to one L1 set, where prefetched lines evict
// each other before they are used (19 classes x 128 x 256 pixels, E = 4, AMD EPYC, 2 threads: 23-26 ms
// per step prefetching into L1, 14.6-15.2 ms into L2). A prefetch never faults, so the address may lie past
// the end of p's array: it is formed as an integer, not by pointer arithmetic.
template <int kWrite, typename T>
MMFAST_INLINE void prefetch_l2_at(const T* p, int64_t elements) {
  const auto address = reinterpret_cast<std::uintptr_t>(p) + static_cast<std::uintptr_t>(elements * int64_t{sizeof(T)});
  MMFAST_PREFETCH(reinterpret_cast<const void*>(address), kWrite, 2);
}

// 2^q for an integer q in [-126, 127] (held as two's complement), built from the exponent bits.
MMFAST_INLINE float pow2i(uint32_t q) { return bit_cast<float>((q + 127u) << 23); }

// exp(x) = 2^q exp(s) for |x| <= 104: q = round(x / ln 2) (read from the mantissa of x / ln 2 + 1.5 * 2^23,
// no float -> int conversion) and exp(s), s = x - q ln 2 in [-ln2/2, ln2/2] (Cody-Waite split of ln 2), by
// Sleef's xexpf polynomial. A NaN x gives a NaN u.
struct ExpParts {
  float u;     // exp(s)
  uint32_t q;  // q as two's complement
};
MMFAST_INLINE ExpParts exp_parts(float x) {
  constexpr float kLog2e = 1.442695040888963407f;
  constexpr float kLn2Hi = 0.693145751953125f;
  constexpr float kLn2Lo = 1.428606765330187045e-06f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float shifted = x * kLog2e + kRound;
  const uint32_t q = bit_cast<uint32_t>(shifted) - bit_cast<uint32_t>(kRound);
  const float qf = shifted - kRound;
  float s = qf * -kLn2Hi + x;
  s = qf * -kLn2Lo + s;
  float u = 0.000198527617612853646278381f;
  u = u * s + 0.00139304355252534151077271f;
  u = u * s + 0.00833336077630519866943359f;
  u = u * s + 0.0416664853692054748535156f;
  u = u * s + 0.166666671633720397949219f;
  u = u * s + 0.5f;
  u = (s * s) * u + s + 1.0f;
  return {u, q};
}

// exp(x): |x| is clamped to 104, beyond which exp is 0 or +inf in float; 2^q is applied in two halves, so
// underflow (to subnormals and to exactly 0, e.g. exp(-inf) = 0) and overflow (to +inf) come out of the last
// product with one rounding. All integer arithmetic on the bit patterns, no compare-and-select on x: the
// optimizer has no branch to specialize (which would stop the vectorizer). A NaN x gives a NaN.
MMFAST_INLINE float exp_approx(float x) {
  constexpr uint32_t kLimitBits = 0x42d00000u;  // 104.0f
  const uint32_t bits = bit_cast<uint32_t>(x);
  const uint32_t magnitude = bits & 0x7fffffffu;
  const uint32_t nan_mask = 0u - static_cast<uint32_t>(magnitude > 0x7f800000u);
  const float xc = bit_cast<float>(std::min(magnitude, kLimitBits) | (bits & 0x80000000u));
  const ExpParts e = exp_parts(xc);
  const uint32_t q_half = static_cast<uint32_t>(static_cast<int32_t>(e.q) >> 1);
  const float u = e.u * pow2i(q_half) * pow2i(e.q - q_half);
  return bit_cast<float>(bit_cast<uint32_t>(u) | (nan_mask & 0x7fc00000u));
}

// exp(t) for t <= 0 (NaN and -inf included): a softmax's shifted logits t = v - max(v). Results below
// the smallest normal float (t < -87.34, exp(t) < 2^-126) are 0, as the CUDA kernels' fast-math exp2f
// flushes them: one scaling by 2^q instead of two, no clamp, and no subnormal arithmetic (which costs a
// microcode assist per result on x86). Elsewhere the same operations, so the same bits, as exp_approx
// (whose two scalings by powers of 2 are exact there). A NaN flows through the arithmetic; -inf gives 0.
MMFAST_INLINE float exp_nonpos(float t) {
  constexpr float kMinNormalArg = -87.3365447505531f;  // log(2^-126)
  const ExpParts e = exp_parts(t);
  // a bit mask rather than a select (see zero_where_zero); false for a NaN t
  const uint32_t keep = 0u - static_cast<uint32_t>(!(t < kMinNormalArg));
  return bit_cast<float>(bit_cast<uint32_t>(e.u * pow2i(e.q)) & keep);
}

// e ln 2 + log(1 + f) for f in [sqrt(1/2) - 1, sqrt(2) - 1]: the Cephes logf polynomial, with
// ln 2 split in two so that e ln 2 adds without rounding error.
MMFAST_INLINE float log1p_reduced(float f, float e) {
  const float f2 = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * f2;
  y = e * -2.12194440e-4f + y;
  y = f2 * -0.5f + y;
  return e * 0.693359375f + (f + y);
}

// log(x), x = 2^e m with m in [sqrt(1/2), sqrt(2)). Subnormals are rescaled by 2^23 first;
// log(0) = -inf, log(+inf) = +inf, log(x < 0) = NaN.
MMFAST_INLINE float log_approx(float x) {
  const bool subnormal = x < std::numeric_limits<float>::min();
  const uint32_t bits = bit_cast<uint32_t>(x * (subnormal ? 8388608.0f : 1.0f));  // 2^23
  const float m = bit_cast<float>((bits & 0x007fffffu) | 0x3f000000u);  // in [0.5, 1)
  const float e = static_cast<float>(static_cast<int32_t>(bits >> 23) - (subnormal ? 149 : 126));
  const bool small = m < 0.707106781186547524f;  // use 2m and e - 1
  float r = log1p_reduced(m * (small ? 2.0f : 1.0f) - 1.0f, e - (small ? 1.0f : 0.0f));
  r = x == std::numeric_limits<float>::infinity() ? x : r;
  r = x == 0.0f ? -std::numeric_limits<float>::infinity() : r;
  return (x < 0.0f) | (x != x) ? std::numeric_limits<float>::quiet_NaN() : r;
}

// log(1 + t) for t in [0, 1] without forming 1 + t for small t (so without its rounding error):
// t < sqrt(2) - 1 reduces to f = t, e = 0; larger t to 1 + t = 2 (1 + f) with f = (t - 1) / 2.
MMFAST_INLINE float log1p_unit(float t) {
  const bool large = t > 0.414213562373095049f;
  return log1p_reduced(large ? (t - 1.0f) * 0.5f : t, large ? 1.0f : 0.0f);
}

// `value` where `weight` != 0, else +0: the reference's where(p == 0, 0, p * (...)) (a NaN weight
// keeps its NaN value). A bit mask rather than a select: gcc does not if-convert a select that
// feeds a double accumulator, and the loop would not vectorize.
MMFAST_INLINE float zero_where_zero(float weight, float value) {
  const uint32_t keep = 0u - static_cast<uint32_t>(weight != 0.0f);
  return bit_cast<float>(bit_cast<uint32_t>(value) & keep);
}
MMFAST_INLINE double zero_where_zero(double weight, double value) {
  const uint64_t keep = 0u - static_cast<uint64_t>(weight != 0.0);
  return bit_cast<double>(bit_cast<uint64_t>(value) & keep);
}

MMFAST_INLINE double exp_approx(double x) { return std::exp(x); }
MMFAST_INLINE double exp_nonpos(double t) { return std::exp(t); }
MMFAST_INLINE double log_approx(double x) { return std::log(x); }
MMFAST_INLINE double log1p_unit(double t) { return std::log1p(t); }

// log(exp(a) + exp(b)), torch.logaddexp semantics: equal arguments (both -inf included) give
// a + log 2, NaN propagates.
template <typename F>
MMFAST_INLINE F logaddexp(F a, F b) {
  const bool b_larger = a < b;
  const F hi = b_larger ? b : a;
  const F lo = b_larger ? a : b;
  const F r = hi + log1p_unit(exp_approx(lo - hi));  // NaN when a or b is NaN
  return a == b ? a + F(0.693147180559945309417232) : r;
}

}  // namespace mmfast::cpu
