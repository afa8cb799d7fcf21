// Host execution shim: float16 storage and the conversions the device code uses, rounded as the
// hardware's cvt.rn.f16.f32 (IEEE round to nearest even, subnormals kept, overflow to inf).
#pragma once

#include <cstdint>
#include <cstring>

struct __half {
  uint16_t bits;
};
struct alignas(4) __half2 {
  __half x, y;
};

namespace fastcl::host {
uint16_t float_to_half_bits(float f);
float half_bits_to_float(uint16_t h);
}  // namespace fastcl::host

inline __half __float2half_rn(float f) { return {fastcl::host::float_to_half_bits(f)}; }
inline float __half2float(__half h) { return fastcl::host::half_bits_to_float(h.bits); }
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }
