// The host execution's runtime: blocks of fibers with real barriers and warp meetings, and the
// checkers. Not instrumented itself; the kernels' translation units are compiled with
// -fsanitize=thread, whose instrumentation calls the __tsan_* hooks at the end of this file on
// every load and store: those hooks are this file's, not ThreadSanitizer's runtime (which is not
// linked). Accesses are classified by address:
//   the block's dynamic shared memory or the static __shared__ section -> the shared-memory checks
//   the running fiber's stack (registers and locals), the kernel's parameters, the builtins -> fine
//   anything else -> global memory, which must lie inside one live allocation of the tracking
//   allocator (module.cpp), 64-byte red zones around each.
// Shared memory keeps a shadow per byte (sim_shadow.h): who wrote it in which barrier epoch, who
// read it, whether a cp.async to it is still in flight, whether it was ever written.
#include <dlfcn.h>
#include <link.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "fiber.h"
#include "sim_state.h"

// The CUDA builtins (cuda_runtime.h), set for the fiber that runs.
uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

// The static __shared__ variables' section (cuda_runtime.h); the linker names its ends.
extern "C" char __start_fastcl_shared[] __attribute__((weak));
extern "C" char __stop_fastcl_shared[] __attribute__((weak));

namespace fastcl::host {

Sim& sim() {
  static Sim s;
  return s;
}

char* static_shared_base() { return __start_fastcl_shared; }
size_t static_shared_bytes() {
  return __start_fastcl_shared == nullptr ? 0 : static_cast<size_t>(__stop_fastcl_shared - __start_fastcl_shared);
}

// ---- reports --------------------------------------------------------------------------------------

namespace {

constexpr int kShownPerKind = 8;

std::string symbol_of(const void* code) {
  Dl_info info{};
  if (code == nullptr || dladdr(code, &info) == 0 || info.dli_sname == nullptr) return "?";
  std::string name = info.dli_sname;
  // Demangled names of the kernels are long; the mangled one is enough to find the function.
  if (name.size() > 120) name = name.substr(0, 117) + "...";
  return name;
}

}  // namespace

void Sim::report(const char* kind, const std::string& what) {
  ++report_counts[kind];
  const int64_t n = ++launch_counts[kind];  // lines shown per grid and kind
  ++launch_reports;
  if (n <= kShownPerKind) {
    std::string where;
    if (block != nullptr) {
      char buf[160];
      std::snprintf(buf, sizeof(buf), " [%s, block (%u,%u,%u), thread %d]", block->kernel, blockIdx.x, blockIdx.y,
                    blockIdx.z, current != nullptr ? current->tid : -1);
      where = buf;
    }
    reports += std::string(kind) + ": " + what + where + "\n";
  } else if (n == kShownPerKind + 1) {
    reports += std::string(kind) + ": ... (further reports of this kind counted, not shown)\n";
  }
}

void reset_reports() {
  Sim& s = sim();
  s.reports.clear();
  s.report_counts.clear();
}

const char* reports_text() { return sim().reports.c_str(); }

int64_t report_count(const char* kind) {
  const auto it = sim().report_counts.find(kind);
  return it == sim().report_counts.end() ? 0 : it->second;
}

Counters counters() { return sim().counters; }

const char* variants_text() {
  Sim& s = sim();
  s.variants_joined.clear();
  for (const std::string& v : s.variants) s.variants_joined += v + "\n";
  return s.variants_joined.c_str();
}

// ---- global memory --------------------------------------------------------------------------------

void note_allocation(const void* p, size_t bytes) {
  std::lock_guard<std::mutex> lock(sim().alloc_mutex);
  sim().allocations[reinterpret_cast<uintptr_t>(p)] = bytes;
}

void forget_allocation(const void* p) {
  std::lock_guard<std::mutex> lock(sim().alloc_mutex);
  sim().allocations.erase(reinterpret_cast<uintptr_t>(p));
}

// Whether [a, a + n) lies in one live allocation; the message says where it is otherwise.
bool Sim::in_allocation(uintptr_t a, size_t n, std::string* why) {
  if (a >= last_alloc_begin && a + n <= last_alloc_end) return true;
  std::lock_guard<std::mutex> lock(alloc_mutex);
  auto it = allocations.upper_bound(a);
  if (it != allocations.begin()) {
    --it;
    if (a + n <= it->first + it->second) {
      last_alloc_begin = it->first;
      last_alloc_end = it->first + it->second;
      return true;
    }
    if (why != nullptr) {
      char buf[200];
      std::snprintf(buf, sizeof(buf), "%zu bytes at offset %lld of a %zu-byte buffer (past its end by %lld)", n,
                    static_cast<long long>(a - it->first), it->second,
                    static_cast<long long>(a + n - (it->first + it->second)));
      *why = buf;
    }
    return false;
  }
  if (why != nullptr) *why = std::to_string(n) + " bytes before every live buffer";
  return false;
}

cudaError_t memset_checked(void* p, int value, size_t bytes) {
  std::string why;
  if (bytes > 0 && !sim().in_allocation(reinterpret_cast<uintptr_t>(p), bytes, &why)) {
    sim().report("global bounds", "cudaMemsetAsync of " + why);
    return cudaErrorInvalidValue;
  }
  std::memset(p, value, bytes);
  return cudaSuccess;
}

// ---- errors ---------------------------------------------------------------------------------------

cudaError_t take_last_error() {
  const cudaError_t err = sim().last_error;
  sim().last_error = cudaSuccess;
  return err;
}

const char* error_string(cudaError_t err) {
  switch (err) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorLaunchFailure:
      sim().error_text = "the host execution's checkers reported:\n" +
                         sim().reports.substr(std::min(sim().launch_reports_begin, sim().reports.size()));
      return sim().error_text.c_str();
  }
  return "unknown error";
}

// ---- shared memory --------------------------------------------------------------------------------

void* dynamic_shared() { return sim().block->smem.data(); }

// Where a shared address is: its shadow, and a name for messages; nullptr if not shared memory.
Shadow* Sim::shared_shadow(uintptr_t a, size_t n, std::string* name) {
  Block& b = *block;
  const auto base = reinterpret_cast<uintptr_t>(b.smem.data());
  if (a >= base && a < base + b.smem.size()) {
    if (a + n > base + b.smem_bytes) {
      char buf[160];
      std::snprintf(buf, sizeof(buf), "%zu bytes at dynamic shared offset %zu, past the launch's %zu bytes", n,
                    static_cast<size_t>(a - base), b.smem_bytes);
      report("shared bounds", buf);
      return nullptr;
    }
    if (name != nullptr) *name = "dynamic shared offset " + std::to_string(a - base);
    return &b.smem_shadow[a - base];
  }
  const auto sbegin = reinterpret_cast<uintptr_t>(__start_fastcl_shared);
  const auto send = reinterpret_cast<uintptr_t>(__stop_fastcl_shared);
  if (sbegin != 0 && a >= sbegin && a < send) {
    if (a + n > send) {
      report("shared bounds", "an access past the end of the static __shared__ variables");
      return nullptr;
    }
    if (name != nullptr) *name = "static shared memory (section offset " + std::to_string(a - sbegin) + ")";
    return &b.static_shadow[a - sbegin];
  }
  if (StaticVar* v = static_var(a, false)) {
    if (a + n > v->begin + v->size) {
      report("shared bounds", std::to_string(n) + " bytes at offset " + std::to_string(a - v->begin) + " of " +
                                  v->name + ", a " + std::to_string(v->size) + "-byte __shared__ variable");
      return nullptr;
    }
    if (name != nullptr) *name = v->name + " + " + std::to_string(a - v->begin);
    return &v->shadow[a - v->begin];
  }
  return nullptr;
}

bool Sim::is_shared(uintptr_t a) {
  const auto base = reinterpret_cast<uintptr_t>(block->smem.data());
  if (a >= base && a < base + block->smem.size()) return true;
  const auto sbegin = reinterpret_cast<uintptr_t>(__start_fastcl_shared);
  if (sbegin != 0 && a >= sbegin && a < reinterpret_cast<uintptr_t>(__stop_fastcl_shared)) return true;
  return static_var(a, false) != nullptr;
}

// GCC ignores the section attribute on the statics of template functions, so __shared__ variables of
// kernel templates are found by their symbol instead: a function-local static (mangled _ZZ...) of this
// library, whose size the symbol table gives. `discover`: look the address up if it is not known yet.
StaticVar* Sim::static_var(uintptr_t a, bool discover) {
  auto it = static_vars.upper_bound(a);
  if (it != static_vars.begin() && a < std::prev(it)->second.begin + std::prev(it)->second.size) {
    return &std::prev(it)->second;
  }
  if (!discover) return nullptr;
  static const void* own_base = [] {
    Dl_info self{};
    dladdr(reinterpret_cast<const void*>(&sim), &self);
    return self.dli_fbase;
  }();
  Dl_info info{};
  void* entry = nullptr;
  const bool found = dladdr1(reinterpret_cast<void*>(a), &info, &entry, RTLD_DL_SYMENT) != 0;
  const auto* sym = static_cast<const ElfW(Sym)*>(entry);
  if (!found ||
      sym == nullptr || info.dli_sname == nullptr || info.dli_fbase != own_base ||
      std::strncmp(info.dli_sname, "_ZZ", 3) != 0 || ELF64_ST_TYPE(sym->st_info) != STT_OBJECT) {
    return nullptr;
  }
  const auto begin = reinterpret_cast<uintptr_t>(info.dli_saddr);
  if (a >= begin + sym->st_size) return nullptr;
  StaticVar& v = static_vars[begin];
  v.begin = begin;
  v.size = sym->st_size;
  v.name = info.dli_sname;
  v.shadow.assign(v.size, Shadow{});
  std::memset(reinterpret_cast<void*>(begin), 0xff, v.size);  // fresh shared memory holds garbage
  return &v;
}

void Sim::reset_static_vars() {
  for (auto& [begin, v] : static_vars) {
    v.shadow.assign(v.size, Shadow{});
    std::memset(reinterpret_cast<void*>(begin), 0xff, v.size);
  }
}

// One thread's load or store of shared bytes [a, a + n) in the current barrier epoch.
void Sim::shared_access(uintptr_t a, size_t n, bool write, int tid, const void* pc) {
  ++counters.shared_accesses;
  std::string name;
  Shadow* sh = shared_shadow(a, n, nullptr);
  if (sh == nullptr) return;
  const uint32_t epoch = block->epoch;
  const char* problem = nullptr;
  int other = -1;
  for (size_t i = 0; i < n && problem == nullptr; ++i) {
    Shadow& s = sh[i];
    if (!write) {
      if (s.state == Shadow::kPending) {
        problem = "cp.async";
        other = s.writer;
      } else if (s.state == Shadow::kUnwritten) {
        problem = "uninitialised";
      } else if (s.write_epoch == epoch && s.writer != tid) {
        problem = "race";
        other = s.writer;
      }
    } else {
      if (s.state == Shadow::kPending || (s.write_epoch == epoch && s.writer != tid)) {
        problem = "race";
        other = s.writer;
      } else if (s.read_epoch == epoch && s.reader != tid) {
        problem = "race";
        other = s.reader;
      }
    }
  }
  if (problem != nullptr) {
    shared_shadow(a, n, &name);
    std::string what;
    const std::string who = other == Shadow::kMany ? "several threads" : "thread " + std::to_string(other);
    if (std::strcmp(problem, "cp.async") == 0) {
      what = std::string("read of ") + name + " while a cp.async of " + who +
             " to it is in flight (no cp.async.wait_group covers it yet)";
    } else if (std::strcmp(problem, "uninitialised") == 0) {
      what = "read of " + name + ", never written in this block";
    } else {
      what = std::string(write ? "write" : "read") + " of " + name + ", which " + who + " " +
             (write && sh->read_epoch == epoch && sh->state != Shadow::kPending ? "read" : "wrote") +
             " in the same barrier epoch (no __syncthreads between)";
    }
    report(problem, what + " in " + symbol_of(pc));
  }
  for (size_t i = 0; i < n; ++i) {
    Shadow& s = sh[i];
    if (write) {
      s.state = Shadow::kWritten;
      s.writer = static_cast<int16_t>(tid);
      s.write_epoch = epoch;
    } else if (s.read_epoch != epoch) {
      s.read_epoch = epoch;
      s.reader = static_cast<int16_t>(tid);
    } else if (s.reader != tid) {
      s.reader = Shadow::kMany;
    }
  }
}

// ---- the instrumentation's view of one access ---------------------------------------------------

void Sim::access(const void* p, size_t n, bool write, const void* pc) {
  Fiber* f = current;
  if (f == nullptr) return;  // host code (launchers) between grids
  const auto a = reinterpret_cast<uintptr_t>(p);
  if (a >= f->stack_lo && a < f->stack_hi) return;  // registers and locals
  // A GPU faults on an access that is not aligned to its size (a float2 store at an odd float, ...).
  if (n <= 16 && (n & (n - 1)) == 0 && a % n != 0) {
    report("alignment", std::to_string(n) + "-byte " + (write ? "write" : "read") + " at an address that is not " +
                            std::to_string(n) + "-byte aligned in " + symbol_of(pc));
  }
  if (is_shared(a)) {
    shared_access(a, n, write, f->tid, pc);
    return;
  }
  if (a >= params_begin && a < params_end) {
    if (write) report("parameters", "a kernel wrote its parameters in " + symbol_of(pc));
    return;
  }
  for (const void* builtin : {static_cast<const void*>(&threadIdx), static_cast<const void*>(&blockIdx),
                              static_cast<const void*>(&blockDim), static_cast<const void*>(&gridDim)}) {
    const auto b = reinterpret_cast<uintptr_t>(builtin);
    if (a >= b && a < b + sizeof(dim3)) {
      if (write) report("parameters", "a kernel wrote a builtin (threadIdx, blockIdx, ...)");
      return;
    }
  }
  std::string why;
  if (in_allocation(a, n, &why)) {
    ++counters.global_accesses;
    return;
  }
  if (static_var(a, true) != nullptr) {
    shared_access(a, n, write, f->tid, pc);
    return;
  }
  ++counters.global_accesses;
  report("global bounds", std::string(write ? "write" : "read") + " of " + why + " in " + symbol_of(pc));
}

}  // namespace fastcl::host

// ---- the hooks -fsanitize=thread's instrumentation calls (kernel translation units only) ------------

#define FASTCL_HOOK(name, bytes, write)                                                  \
  extern "C" void name(void* p) {                                                        \
    fastcl::host::sim().access(p, bytes, write, __builtin_return_address(0));             \
  }
FASTCL_HOOK(__tsan_read1, 1, false)
FASTCL_HOOK(__tsan_read2, 2, false)
FASTCL_HOOK(__tsan_read4, 4, false)
FASTCL_HOOK(__tsan_read8, 8, false)
FASTCL_HOOK(__tsan_read16, 16, false)
FASTCL_HOOK(__tsan_write1, 1, true)
FASTCL_HOOK(__tsan_write2, 2, true)
FASTCL_HOOK(__tsan_write4, 4, true)
FASTCL_HOOK(__tsan_write8, 8, true)
FASTCL_HOOK(__tsan_write16, 16, true)
FASTCL_HOOK(__tsan_unaligned_read2, 2, false)
FASTCL_HOOK(__tsan_unaligned_read4, 4, false)
FASTCL_HOOK(__tsan_unaligned_read8, 8, false)
FASTCL_HOOK(__tsan_unaligned_read16, 16, false)
FASTCL_HOOK(__tsan_unaligned_write2, 2, true)
FASTCL_HOOK(__tsan_unaligned_write4, 4, true)
FASTCL_HOOK(__tsan_unaligned_write8, 8, true)
FASTCL_HOOK(__tsan_unaligned_write16, 16, true)
#undef FASTCL_HOOK
extern "C" void __tsan_read_range(void* p, unsigned long n) {
  fastcl::host::sim().access(p, n, false, __builtin_return_address(0));
}
extern "C" void __tsan_write_range(void* p, unsigned long n) {
  fastcl::host::sim().access(p, n, true, __builtin_return_address(0));
}
extern "C" void __tsan_func_entry(void*) {}
extern "C" void __tsan_func_exit() {}
extern "C" void __tsan_init() {}
