// Host execution shim (csrc/cuda/host/DESIGN in ../DESIGN.md): what the fastcl device code takes from
// <cuda_runtime.h>, for a host C++ compiler. Kernels run lane by lane in sim.cpp: one fiber per CUDA
// thread, __syncthreads and the warp collectives as real meetings, every shared and global access
// checked. Only what csrc/cuda uses is here: a kernel that needs more fails to compile, not to run.
#pragma once

#ifndef FASTCL_HOST_EXEC
#error "csrc/cuda/host/include is the host execution's shim: compile with -DFASTCL_HOST_EXEC"
#endif

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <source_location>

// ---- qualifiers -----------------------------------------------------------------------------------
#define __device__
#define __host__
#define __global__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// Static __shared__ variables: one instance per block (blocks run one at a time), in a section of
// their own so the checker knows their bytes (sim.cpp: __start_fastcl_shared / __stop_fastcl_shared).
// Dynamic shared memory is taken with FASTCL_DYNAMIC_SMEM (kernels.h), not `extern __shared__`.
#define __shared__ static __attribute__((section("fastcl_shared")))

// ---- types and builtins ---------------------------------------------------------------------------
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }

// Set by the scheduler for the fiber that runs (sim.cpp): the CUDA builtins.
extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}

// The device math library's float functions (exp2f, fmaxf, ...) are <cmath>'s; the classification
// functions are overloads there, not macros.
inline bool isinf(float v) { return std::isinf(v); }
inline bool isfinite(float v) { return std::isfinite(v); }

// ---- runtime API ----------------------------------------------------------------------------------
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
using cudaStream_t = struct CUstream_st*;
enum cudaFuncAttribute : int { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace fastcl::host {
cudaError_t take_last_error();
const char* error_string(cudaError_t err);
cudaError_t memset_checked(void* p, int value, size_t bytes);
cudaError_t set_func_attribute(const void* kernel, cudaFuncAttribute attr, int value);
void sync_block(const std::source_location& where);
float shfl_xor(unsigned mask, float value, int lane_mask, const std::source_location& where);
}  // namespace fastcl::host

inline cudaError_t cudaGetLastError() { return fastcl::host::take_last_error(); }
inline const char* cudaGetErrorString(cudaError_t err) { return fastcl::host::error_string(err); }
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t = nullptr) {
  return fastcl::host::memset_checked(p, value, bytes);
}

// A launch above 48 KiB of dynamic shared memory needs this first (up to sm_80's 163 KiB per block).
template <typename... Params>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attr, int value) {
  return fastcl::host::set_func_attribute(reinterpret_cast<const void*>(kernel), attr, value);
}

inline void __syncthreads(const std::source_location where = std::source_location::current()) {
  fastcl::host::sync_block(where);
}
inline float __shfl_xor_sync(unsigned mask, float value, int lane_mask,
                             const std::source_location where = std::source_location::current()) {
  return fastcl::host::shfl_xor(mask, value, lane_mask, where);
}

// kernel<<<grid, block, smem, stream>>>(args): every block of the grid, each as blockDim fibers
// (sim.h Launch); the kernel's text and the launching function's template arguments name the variant.
#include "../sim.h"
#define FASTCL_LAUNCH(grid, block, smem, stream, ...) \
  ::fastcl::host::Launch(#__VA_ARGS__, __PRETTY_FUNCTION__, __VA_ARGS__, grid, block, smem)
