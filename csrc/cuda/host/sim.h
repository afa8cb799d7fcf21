// The host execution of the fastcl CUDA kernels (csrc/cuda/DESIGN.md, "Executed on the CPU"): what
// the shim headers (include/) and the host branches of mma.cuh and tile.cuh call. sim.cpp runs the
// threads of a block as fibers with real meetings and checks every shared and global access;
// ptx.cpp holds the PTX ISA's semantics of the instructions the kernels use, lane by lane.
#pragma once

#include <cstddef>
#include <cstdint>
#include <source_location>
#include <tuple>
#include <type_traits>
#include <utility>

namespace fastcl::host {

// ---- launches ---------------------------------------------------------------------------------
// Runs every block of `grid` in order (x fastest), each as block.x * block.y * block.z fibers calling
// body(ctx); [params, params + params_bytes) holds the kernel's parameters (read-only, as a GPU's
// constant bank). Sets the error cudaGetLastError returns: cudaErrorLaunchFailure when a
// checker reported anything during the grid (the reports say what), else cudaSuccess.
// `function` is the kernel's address: what cudaFuncSetAttribute named (a launch above 48 KiB of
// dynamic shared memory must have opted in to at least that much; else cudaErrorInvalidValue).
void run_grid(const char* kernel, const char* launcher, const void* function, dim3 grid, dim3 block,
              size_t smem_bytes, void (*body)(void*), void* ctx, const void* params, size_t params_bytes);

// kernel<<<grid, block, smem>>>(args...) as Launch(...)(args...) (FASTCL_LAUNCH in cuda_runtime.h).
template <typename... Params>
class Launch {
 public:
  Launch(const char* kernel, const char* launcher, void (*fn)(Params...), dim3 grid, dim3 block, size_t smem)
      : kernel_(kernel), launcher_(launcher), fn_(fn), grid_(grid), block_(block), smem_(smem) {}

  template <typename... Args>
  void operator()(Args&&... args) {
    Frame frame{fn_, {std::forward<Args>(args)...}};
    run_grid(kernel_, launcher_, reinterpret_cast<const void*>(fn_), grid_, block_, smem_, &Frame::body, &frame,
             &frame, sizeof(frame));
  }

 private:
  struct Frame {
    void (*fn)(Params...);
    std::tuple<std::decay_t<Params>...> params;  // copied once, as a launch copies its arguments
    static void body(void* ctx) {
      auto* f = static_cast<Frame*>(ctx);
      std::apply(f->fn, f->params);
    }
  };
  const char* kernel_;
  const char* launcher_;
  void (*fn_)(Params...);
  dim3 grid_, block_;
  size_t smem_;
};

// The running block's dynamic shared memory (its launch's smem bytes; 16-byte aligned).
void* dynamic_shared();

// ---- PTX instructions, with the ISA's semantics (ptx.cpp) --------------------------------------
namespace ptx {
// cp.async.cg.shared.global [dst], [src], 16, src_bytes: deferred until the issuing thread's
// wait_group that covers it (the latest moment the ISA allows); src_bytes < 16 zero-fills the rest.
void cp_async_cg_16(void* dst, const void* src, int src_bytes);
void cp_async_commit_group();
void cp_async_wait_group(int pending);

// cvt.rna.tf32.f32: round to nearest, ties away from zero, to 10 mantissa bits (low 13 bits zero).
uint32_t cvt_rna_tf32_f32(float x);

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 d, a, b, c with d == c (in place).
void mma_m16n8k8_tf32(float cd[4], const uint32_t a[4], const uint32_t b[2]);
// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 d, a, b, c with d == c.
enum class Half { kF16, kBF16 };
void mma_m16n8k16(Half type, float cd[4], const uint32_t a[4], const uint32_t b[2]);
// ldmatrix.sync.aligned.m8n8.x4.shared.b16 {r0..r3}, [row address of this lane].
void ldmatrix_m8n8_x4_b16(uint32_t r[4], const void* row);

// The fragment layouts, from the PTX ISA's tables (ptx.cpp): (row, column) of element `element`
// held by `lane`. Operands: "a", "b", "c" (c is also d) of "m16n8k8.tf32" and "m16n8k16.16bit",
// and "m8n8.b16" (ldmatrix: each lane's pair of one matrix). Returns false for an unknown name or
// an element the lane does not hold.
bool fragment(const char* shape, const char* operand, int lane, int element, int& row, int& col);
}  // namespace ptx

// ---- what the checkers found --------------------------------------------------------------------
// Reports since the last reset: one line each (the first few per kind), and totals per kind.
struct Counters {
  int64_t launches, blocks, threads, meetings, shared_accesses, global_accesses;
};
void reset_reports();
const char* reports_text();   // empty when nothing was found
int64_t report_count(const char* kind);  // "race", "cp.async", "shared bounds", "global bounds",
                                         // "alignment", "uninitialised", "divergence", "deadlock",
                                         // "parameters"
Counters counters();
// The kernel variants launched since the process started ("kernel [with T = ...]"), '\n'-separated.
const char* variants_text();

// Global memory the kernels may touch: every allocation of the tracking allocator (module.cpp).
void note_allocation(const void* p, size_t bytes);
void forget_allocation(const void* p);

}  // namespace fastcl::host
