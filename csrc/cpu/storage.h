// Storage types of the CPU kernels and their conversion to/from the compute type.
// float, bf16, f16 compute in float; double computes in double. bf16/f16 are raw 16-bit patterns
// converted by branch-free bit manipulation (round-to-nearest-even, NaN kept quiet, as torch does),
// so the conversions vectorize on every target.
#pragma once

#include <cstdint>

#include "mmfast/params.h"
#include "vec_math.h"

namespace mmfast::cpu {

struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};

template <typename T>
struct ComputeOf {
  using type = float;
};
template <>
struct ComputeOf<double> {
  using type = double;
};
template <typename T>
using compute_t = typename ComputeOf<T>::type;

MMFAST_INLINE float to_compute(float v) { return v; }
MMFAST_INLINE double to_compute(double v) { return v; }
MMFAST_INLINE float to_compute(bf16 v) {
  return bit_cast<float>(static_cast<uint32_t>(v.bits) << 16);
}

// Half -> float (F. Giesen): shift exponent/mantissa into place and rebias; Inf/NaN get the
// remaining exponent bias, zero/subnormal halves are renormalized by a float subtraction.
MMFAST_INLINE float to_compute(f16 v) {
  const uint32_t h = v.bits;
  const uint32_t shifted = (h & 0x7fffu) << 13;
  const uint32_t exponent = shifted & (0x7c00u << 13);
  const uint32_t rebiased = shifted + ((127u - 15u) << 23);
  const uint32_t inf_nan = rebiased + ((128u - 16u) << 23);
  const float subnormal = bit_cast<float>(rebiased + (1u << 23)) - bit_cast<float>(113u << 23);
  uint32_t out = exponent == (0x7c00u << 13) ? inf_nan : rebiased;
  out = exponent == 0 ? bit_cast<uint32_t>(subnormal) : out;
  return bit_cast<float>(out | ((h & 0x8000u) << 16));
}

template <typename T>
MMFAST_INLINE T from_compute(compute_t<T> v);

template <>
MMFAST_INLINE float from_compute<float>(float v) {
  return v;
}
template <>
MMFAST_INLINE double from_compute<double>(double v) {
  return v;
}

// float -> bf16, round to nearest even; NaN -> quiet NaN with the sign kept.
template <>
MMFAST_INLINE bf16 from_compute<bf16>(float v) {
  const uint32_t u = bit_cast<uint32_t>(v);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = (u >> 16) | 0x0040u;
  return bf16{static_cast<uint16_t>(v != v ? nan : rounded)};
}

// float -> f16, round to nearest even (F. Giesen's float_to_half_fast3_rtne): overflow to Inf,
// NaN -> 0x7e00, subnormal results by a magic-number float addition that rounds for us.
template <>
MMFAST_INLINE f16 from_compute<f16>(float v) {
  const uint32_t u = bit_cast<uint32_t>(v);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  const uint32_t subnormal =
      bit_cast<uint32_t>(bit_cast<float>(a) + bit_cast<float>(denorm_magic)) - denorm_magic;
  const uint32_t normal = (a + ((15u - 127u) << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
  uint32_t out = a < (113u << 23) ? subnormal : normal;
  out = a >= ((127u + 16u) << 23) ? (a > (255u << 23) ? 0x7e00u : 0x7c00u) : out;
  return f16{static_cast<uint16_t>(out | sign)};
}

// Calls fn(T{}) with T the storage type of `dtype`; false for an unknown code.
template <typename Fn>
bool dispatch_dtype(int32_t dtype, Fn&& fn) {
  switch (dtype) {
    case kFloat32:
      fn(float{});
      return true;
    case kFloat64:
      fn(double{});
      return true;
    case kBFloat16:
      fn(bf16{});
      return true;
    case kFloat16:
      fn(f16{});
      return true;
    default:
      return false;
  }
}

}  // namespace mmfast::cpu
