// Element types the token kernels handle, and exact float <-> bf16/fp16 conversion (round to
// nearest even, as torch does) in integer arithmetic that host and device run alike, so the CPU
// and CUDA kernels round identically and the CPU path needs no torch headers.
#pragma once

#include <cstdint>
#include <cstring>

#include "hd.h"

namespace moe_comm {

enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

inline int64_t dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

MOE_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

MOE_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// A subnormal of a narrow float type, |f| in units of its subnormal step (f * 2^k, exact: a
// power-of-two scaling), rounded to the nearest integer, ties to even, with the float unit
// (exact: far fewer than 24 significant bits above the rounding point).
MOE_HD uint32_t subnormal_units(float abs_f, float step_inverse) {
  const float units = abs_f * step_inverse;
  uint32_t m = static_cast<uint32_t>(units);
  const float rem = units - static_cast<float>(m);
  if (rem > 0.5f || (rem == 0.5f && (m & 1u))) ++m;
  return m;
}

MOE_HD float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

MOE_HD uint16_t float_to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

MOE_HD float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  if (exp != 0) return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return bits_float(sign);
  // Subnormal: value = mant * 2^-24, exact in float.
  const float v = static_cast<float>(mant) * 5.9604644775390625e-08f;
  return sign ? -v : v;
}

MOE_HD uint16_t float_to_fp16(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7e00u;   // NaN
  if (abs >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {                        // below 2^-14: subnormal or zero
    return sign | static_cast<uint16_t>(subnormal_units(bits_float(abs), 16777216.0f));  // step 2^-24
  }
  // Normal: rebias the exponent, round the 13 dropped mantissa bits to nearest even.
  uint32_t v = abs - (112u << 23);
  v += 0xfffu + ((v >> 13) & 1u);
  return sign | static_cast<uint16_t>(v >> 13);
}

// Typed load/store of one element as float.
template <DType T> struct Elem;
template <> struct Elem<DType::kFloat32> {
  using Storage = float;
  MOE_HD static float load(Storage v) { return v; }
  MOE_HD static Storage store(float f) { return f; }
};
template <> struct Elem<DType::kBFloat16> {
  using Storage = uint16_t;
  MOE_HD static float load(Storage v) { return bf16_to_float(v); }
  MOE_HD static Storage store(float f) { return float_to_bf16(f); }
};
template <> struct Elem<DType::kFloat16> {
  using Storage = uint16_t;
  MOE_HD static float load(Storage v) { return fp16_to_float(v); }
  MOE_HD static Storage store(float f) { return float_to_fp16(f); }
};

}  // namespace moe_comm
