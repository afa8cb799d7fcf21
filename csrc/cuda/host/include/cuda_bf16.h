// Host execution shim: bfloat16 storage and the conversions the device code uses, rounded as the
// hardware's cvt.rn.bf16.f32 (round to nearest even; NaN stays NaN).
#pragma once

#include <cstdint>

struct __nv_bfloat16 {
  uint16_t bits;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

namespace fastcl::host {
uint16_t float_to_bfloat16_bits(float f);
float bfloat16_bits_to_float(uint16_t b);
}  // namespace fastcl::host

inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {fastcl::host::float_to_bfloat16_bits(f)}; }
inline float __bfloat162float(__nv_bfloat16 b) { return fastcl::host::bfloat16_bits_to_float(b.bits); }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
