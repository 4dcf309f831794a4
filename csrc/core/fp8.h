// FP8 rows (API.md "FP8 on the wire"): float32 <-> e4m3 (float8_e4m3fn) conversion and the
// block rule, in integer and float32 arithmetic that host and device run alike, so that the
// CPU and CUDA kernels quantize to the same bits as moe_comm.quantize_fp8 (moe_comm/fp8.py).
#pragma once

#include <cstdint>

#include "dtype.h"
#include "hd.h"

namespace moe_comm {

constexpr int64_t kFp8Block = 128;      // elements sharing one float32 scale (the last: fewer)
constexpr float kFp8Max = 448.0f;       // the largest finite e4m3 value
constexpr float kFp8AmaxFloor = 1e-4f;  // a block's amax is at least this (zero rows)

MOE_HD int64_t fp8_scale_count(int64_t hidden) { return (hidden + kFp8Block - 1) / kFp8Block; }

// float32 -> e4m3, round to nearest even: torch's cast for every |f| <= 464, which holds every
// value the block rule casts (|x * 448 / amax| <= 448 (1 + 2^-23)). Past 464: NaN (e4m3fn has
// no infinity; torch 2.13 saturates to 448 there instead).
MOE_HD uint8_t float_to_e4m3(float f) {
  const uint32_t u = float_bits(f);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs >= 0x43f00000u) return sign | 0x7fu;  // 480 and up, infinities, NaN (464-480 round to 0x7f)
  if (abs < 0x3c800000u) {                       // below 2^-6: subnormal or zero
    // Steps of 2^-9; 8 steps (rounded up from below) is the smallest normal, whose code is 8.
    return sign | static_cast<uint8_t>(subnormal_units(bits_float(abs), 512.0f));
  }
  // Normal: rebias the exponent (127 -> 7), round the 20 dropped mantissa bits to nearest even.
  uint32_t v = abs - (120u << 23);
  v += 0x7ffffu + ((v >> 20) & 1u);
  return sign | static_cast<uint8_t>(v >> 20);
}

MOE_HD float e4m3_to_float(uint8_t q) {
  const uint32_t sign = static_cast<uint32_t>(q & 0x80u) << 24;
  const uint32_t abs = q & 0x7fu;
  // Without branches (the expand runs this per element): a normal code rebiases its exponent
  // (7 -> 127); a subnormal code (exponent 0) read with exponent 1 is 2^-6 (1 + m / 8), which
  // less 2^-6 is m 2^-9, exactly.
  const float normal = bits_float((abs << 20) + (120u << 23));
  const float subnormal = bits_float((abs << 20) | (121u << 23)) - 0.015625f;
  const uint32_t magnitude = float_bits(abs >= 8 ? normal : subnormal);
  return bits_float(sign | (abs == 0x7f ? 0x7fc00000u : magnitude));  // 0x7f: NaN
}

// max(a, b) that keeps a NaN, as torch's amax does (fmaxf would drop it).
MOE_HD float nan_max(float a, float b) { return (b > a || b != b) ? b : a; }

// A block's amax -> the factor its elements are multiplied by before the cast (448 / amax, a
// true float32 division) and its scale (amax / 448).
MOE_HD float fp8_clamped_amax(float amax) { return amax < kFp8AmaxFloor ? kFp8AmaxFloor : amax; }  // keeps NaN
MOE_HD float fp8_ratio(float amax) { return kFp8Max / fp8_clamped_amax(amax); }
MOE_HD float fp8_scale(float amax) { return fp8_clamped_amax(amax) / kFp8Max; }

}  // namespace moe_comm
