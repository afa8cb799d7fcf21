// The host execution's state (sim.cpp, block.cpp, ptx.cpp): the running block, its fibers, warp
// meetings, the shadow of shared memory, reports.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <set>
#include <source_location>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "fiber.h"

namespace fastcl::host {

// One byte of shared memory as the checkers see it.
struct Shadow {
  static constexpr int16_t kNone = -1, kMany = -2;
  enum State : uint8_t { kUnwritten, kWritten, kPending };
  State state = kUnwritten;      // kPending: a cp.async to it has not landed yet (writer issued it)
  int16_t writer = kNone;        // last writer (or the cp.async's issuer)
  int16_t reader = kNone;        // the reader in read_epoch, or kMany
  uint32_t write_epoch = 0;      // barrier epoch of the last write (0: none)
  uint32_t read_epoch = 0;
};

// A warp collective in progress: every lane in `mask` deposits its operands, the last one computes
// everybody's results; a lane arriving at a different collective is divergence.
struct Meeting {
  const char* kind = nullptr;
  const char* file = nullptr;
  unsigned line = 0;
  unsigned mask = 0, arrived = 0;
  const void* in[32] = {};
  void* out[32] = {};
  int arg[32] = {};
  void (*complete)(Meeting&, int warp) = nullptr;
};

// One cp.async, deferred to its wait_group.
struct Copy {
  uint8_t* dst;
  const uint8_t* src;
  int src_bytes;
};

struct ThreadState {
  std::vector<Copy> uncommitted;
  std::vector<std::vector<Copy>> groups;  // committed, oldest first
};

// A function-local static of a kernel, i.e. a __shared__ variable (cuda_runtime.h), found by its symbol.
struct StaticVar {
  uintptr_t begin = 0;
  size_t size = 0;
  std::string name;
  std::vector<Shadow> shadow;
};

struct Block {
  const char* kernel = nullptr;
  int threads = 0;
  std::vector<Fiber> fibers;
  std::vector<ThreadState> thread_state;
  std::vector<Meeting> warps;
  uint32_t epoch = 1;              // barrier epoch: +1 whenever the block passes __syncthreads
  int at_barrier = 0;
  const char* barrier_file = nullptr;
  unsigned barrier_line = 0;
  bool aborted = false;
  std::vector<uint8_t> smem;       // dynamic shared memory (capacity >= smem_bytes)
  size_t smem_bytes = 0;
  std::vector<Shadow> smem_shadow, static_shadow;
};

struct Sim {
  // reports
  std::string reports, error_text, variants_joined;
  std::map<std::string, int64_t> report_counts, launch_counts;
  int64_t launch_reports = 0;
  size_t launch_reports_begin = 0;  // where this grid's lines start in `reports`
  std::set<std::string> variants;
  Counters counters{};
  cudaError_t last_error = cudaSuccess;

  // global memory
  std::mutex alloc_mutex;
  std::map<uintptr_t, size_t> allocations;
  uintptr_t last_alloc_begin = 1, last_alloc_end = 0;

  // the running grid
  Block* block = nullptr;
  Fiber* current = nullptr;
  Context scheduler;
  uintptr_t params_begin = 0, params_end = 0;
  std::map<uintptr_t, StaticVar> static_vars;  // by address; reset with every block

  void report(const char* kind, const std::string& what);
  bool in_allocation(uintptr_t a, size_t n, std::string* why);
  bool is_shared(uintptr_t a);
  StaticVar* static_var(uintptr_t a, bool discover);
  void reset_static_vars();
  Shadow* shared_shadow(uintptr_t a, size_t n, std::string* name);
  void shared_access(uintptr_t a, size_t n, bool write, int tid, const void* pc);
  void access(const void* p, size_t n, bool write, const void* pc);

  // block.cpp: give the CPU back until this fiber may go on
  void wait(Fiber::State why);
  // block.cpp: deposit this lane's operands in its warp's meeting and wait for the others
  void meet(const char* kind, const std::source_location& where, unsigned mask, const void* in, void* out, int arg,
            void (*complete)(Meeting&, int warp));
};

Sim& sim();

// The static __shared__ variables (the fastcl_shared section): where, how many bytes.
char* static_shared_base();
size_t static_shared_bytes();

}  // namespace fastcl::host
