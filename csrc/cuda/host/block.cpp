// A grid on the host: blocks one after another, each block's threads as fibers that meet for real at
// __syncthreads and at every warp collective (shuffles, ldmatrix, mma), in a fixed order. A thread
// that waits where its block or warp never comes (divergence, a missing thread) is reported, and
// the grid stops.
#include <cstdio>
#include <cstring>
#include <string>
#include <unordered_map>

#include <cuda_runtime.h>

#include "sim_state.h"

namespace fastcl::host {

namespace {

constexpr size_t kSharedDefault = 48 << 10;   // what a launch gets without opting in (sm_80, sm_90)
constexpr size_t kSharedOptIn = 163 << 10;    // the most a block may opt in to on sm_80 (sm_90: 227 KiB)

// Each kernel's cudaFuncAttributeMaxDynamicSharedMemorySize, by address.
std::unordered_map<const void*, size_t>& opted_in() {
  static std::unordered_map<const void*, size_t> sizes;
  return sizes;
}
constexpr int kMaxThreads = 1024;

void (*g_body)(void*) = nullptr;
void* g_ctx = nullptr;

[[noreturn]] void fiber_main(Fiber* f) {
  Sim& s = sim();
  g_body(g_ctx);
  f->state = Fiber::kDone;
  switch_context(&f->ctx, &s.scheduler);
  __builtin_unreachable();
}

// The variant's name: the kernel as launched plus the launcher's template arguments, e.g.
// "pair_grad_kernel<T, kKind> [with T = float; ... kKind = fastcl::cuda::GradKind::kLse]".
std::string variant_name(const char* kernel, const char* launcher) {
  std::string name = kernel;
  const char* with = std::strstr(launcher, "[with ");
  if (with == nullptr) return name;
  std::string args = with;  // "[with T = float; GradKind kKind = ...; cudaStream_t = CUstream_st*]"
  if (const size_t stream = args.find("; cudaStream_t"); stream != std::string::npos) args = args.substr(0, stream) + "]";
  return name + " " + args;
}

std::string where_text(const char* file, unsigned line) {
  const char* slash = std::strrchr(file, '/');
  return std::string(slash != nullptr ? slash + 1 : file) + ":" + std::to_string(line);
}

void release_barrier(Block& b) {
  ++b.epoch;
  b.at_barrier = 0;
  for (Fiber& f : b.fibers) {
    if (f.state == Fiber::kBarrier) f.state = Fiber::kReady;
  }
}

int live_threads(const Block& b) {
  int live = 0;
  for (int i = 0; i < b.threads; ++i) live += b.fibers[i].state != Fiber::kDone;
  return live;
}

std::string waiting_text(const Block& b) {
  std::string text;
  int barrier = 0;
  for (int i = 0; i < b.threads; ++i) barrier += b.fibers[i].state == Fiber::kBarrier;
  if (barrier > 0) {
    text += std::to_string(barrier) + " threads at __syncthreads (" + where_text(b.barrier_file, b.barrier_line) + ")";
  }
  for (size_t w = 0; w < b.warps.size(); ++w) {
    const Meeting& m = b.warps[w];
    if (m.arrived == 0) continue;
    char buf[160];
    std::snprintf(buf, sizeof(buf), "%swarp %zu: lanes 0x%08x of 0x%08x at %s (%s)", text.empty() ? "" : "; ", w,
                  m.arrived, m.mask, m.kind, where_text(m.file, m.line).c_str());
    text += buf;
  }
  return text;
}

}  // namespace

cudaError_t set_func_attribute(const void* kernel, cudaFuncAttribute attr, int value) {
  // static_shared_bytes() is every kernel's static shared memory together: an upper bound of this one's
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) + static_shared_bytes() > kSharedOptIn) {
    return cudaErrorInvalidValue;
  }
  opted_in()[kernel] = static_cast<size_t>(value);
  return cudaSuccess;
}

void run_grid(const char* kernel, const char* launcher, const void* function, dim3 grid, dim3 block_dim,
              size_t smem_bytes, void (*body)(void*), void* ctx, const void* params, size_t params_bytes) {
  Sim& s = sim();
  const std::string variant = variant_name(kernel, launcher);
  s.variants.insert(variant);
  ++s.counters.launches;
  s.launch_reports = 0;
  s.launch_reports_begin = s.reports.size();
  s.launch_counts.clear();
  const int64_t threads = static_cast<int64_t>(block_dim.x) * block_dim.y * block_dim.z;
  if (threads < 1 || threads > kMaxThreads || grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.y > 65535 ||
      grid.z > 65535 || grid.x > 0x7fffffffu) {
    s.last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (smem_bytes > kSharedDefault) {  // a launch above 48 KiB needs cudaFuncSetAttribute first
    const auto opted = opted_in().find(function);
    if (opted == opted_in().end() || opted->second < smem_bytes) {
      s.last_error = cudaErrorInvalidValue;
      return;
    }
  }

  static Block b;  // reused: its fibers keep their stacks
  b.kernel = s.variants.find(variant)->c_str();
  b.threads = static_cast<int>(threads);
  if (b.fibers.size() < static_cast<size_t>(threads)) b.fibers.resize(threads);
  b.thread_state.assign(threads, ThreadState{});
  b.smem.assign((smem_bytes + 15) / 16 * 16 + 64, 0);
  b.smem_bytes = smem_bytes;
  const size_t static_bytes = static_shared_bytes();
  g_body = body;
  g_ctx = ctx;
  gridDim = grid;
  blockDim = block_dim;
  s.params_begin = reinterpret_cast<uintptr_t>(params);
  s.params_end = s.params_begin + params_bytes;
  s.block = &b;

  for (unsigned z = 0; z < grid.z && !b.aborted; ++z) {
    for (unsigned y = 0; y < grid.y && !b.aborted; ++y) {
      for (unsigned x = 0; x < grid.x && !b.aborted; ++x) {
        blockIdx = {x, y, z};
        ++s.counters.blocks;
        s.counters.threads += threads;
        // Fresh shared memory holds garbage (0xff bytes: NaN as floats), and nothing is written.
        std::memset(b.smem.data(), 0xff, b.smem.size());
        b.smem_shadow.assign(b.smem.size(), Shadow{});
        b.static_shadow.assign(static_bytes, Shadow{});
        std::memset(static_shared_base(), 0xff, static_bytes);
        s.reset_static_vars();
        b.warps.assign((threads + 31) / 32, Meeting{});
        for (ThreadState& t : b.thread_state) t = ThreadState{};
        b.epoch = 1;
        b.at_barrier = 0;
        for (int i = 0; i < threads; ++i) {
          Fiber& f = b.fibers[i];
          f.tid = i;
          arm_fiber(&f, &s.scheduler, &fiber_main);
          f.state = Fiber::kReady;
        }
        for (;;) {
          bool ran = false;
          for (int i = 0; i < threads && !b.aborted; ++i) {
            Fiber& f = b.fibers[i];
            if (f.state != Fiber::kReady) continue;
            threadIdx = {static_cast<unsigned>(i % block_dim.x), static_cast<unsigned>(i / block_dim.x % block_dim.y),
                         static_cast<unsigned>(i / (block_dim.x * block_dim.y))};
            s.current = &f;
            switch_context(&s.scheduler, &f.ctx);
            s.current = nullptr;
            ran = true;
            // A thread that ends counts as arrived at the block's barrier (as on sm_70 and later).
            if (f.state == Fiber::kDone && b.at_barrier > 0 && b.at_barrier == live_threads(b)) release_barrier(b);
          }
          if (b.aborted) break;
          if (live_threads(b) == 0) break;
          if (!ran) {
            s.report("deadlock", "no thread can go on: " + waiting_text(b));
            b.aborted = true;
          }
        }
      }
    }
  }
  s.block = nullptr;
  b.aborted = false;
  s.params_begin = s.params_end = 0;
  s.last_error = s.launch_reports > 0 ? cudaErrorLaunchFailure : cudaSuccess;
}

void Sim::wait(Fiber::State why) {
  Fiber* f = current;
  f->state = why;
  switch_context(&f->ctx, &scheduler);
}

void sync_block(const std::source_location& where) {
  Sim& s = sim();
  Block& b = *s.block;
  Fiber* f = s.current;
  const Meeting& m = b.warps[f->tid / 32];
  if (m.arrived != 0) {
    s.report("divergence", "__syncthreads (" + where_text(where.file_name(), where.line()) +
                               ") while lanes of the warp wait at " + m.kind + " (" + where_text(m.file, m.line) + ")");
  }
  if (b.at_barrier == 0) {
    b.barrier_file = where.file_name();
    b.barrier_line = where.line();
  } else if (b.barrier_line != where.line() || std::strcmp(b.barrier_file, where.file_name()) != 0) {
    s.report("divergence", "threads of one block wait at different __syncthreads: " +
                               where_text(b.barrier_file, b.barrier_line) + " and " +
                               where_text(where.file_name(), where.line()));
  }
  if (++b.at_barrier == live_threads(b)) {
    release_barrier(b);  // the last thread to arrive goes on at once
    return;
  }
  s.wait(Fiber::kBarrier);
}

void Sim::meet(const char* kind, const std::source_location& where, unsigned mask, const void* in, void* out, int arg,
               void (*complete)(Meeting&, int warp)) {
  Fiber* f = current;
  const int warp = f->tid / 32, lane = f->tid % 32;
  Meeting& m = block->warps[warp];
  if ((mask >> lane & 1u) == 0) {
    report("divergence", std::string(kind) + " by a lane outside its own mask");
  }
  if (m.arrived == 0) {
    m.kind = kind;
    m.file = where.file_name();
    m.line = where.line();
    m.mask = mask;
    m.complete = complete;
  } else if (std::strcmp(m.kind, kind) != 0 || m.line != where.line() || m.mask != mask ||
             std::strcmp(m.file, where.file_name()) != 0) {
    report("divergence", "lanes of one warp at different collectives: " + std::string(m.kind) + " (" +
                             where_text(m.file, m.line) + ") and " + kind + " (" +
                             where_text(where.file_name(), where.line()) + ")");
    block->aborted = true;
    wait(Fiber::kWarp);
    return;
  }
  m.in[lane] = in;
  m.out[lane] = out;
  m.arg[lane] = arg;
  m.arrived |= 1u << lane;
  if (m.arrived != m.mask) {
    wait(Fiber::kWarp);
    return;
  }
  ++counters.meetings;
  m.complete(m, warp);
  for (int l = 0; l < 32; ++l) {
    Fiber& other = block->fibers[warp * 32 + l];
    if ((m.mask >> l & 1u) && other.state == Fiber::kWarp) other.state = Fiber::kReady;
  }
  m = Meeting{};
}

float shfl_xor(unsigned mask, float value, int lane_mask, const std::source_location& where) {
  float out = 0.0f;
  sim().meet("shfl.sync.bfly", where, mask, &value, &out, lane_mask, [](Meeting& m, int) {
    for (int l = 0; l < 32; ++l) {
      if ((m.mask >> l & 1u) == 0) continue;
      const int src = l ^ m.arg[l];
      if (src > 31 || (m.mask >> src & 1u) == 0) {
        sim().report("divergence", "shfl.sync.bfly from lane " + std::to_string(src) + ", outside the mask");
        *static_cast<float*>(m.out[l]) = 0.0f;
        continue;
      }
      *static_cast<float*>(m.out[l]) = *static_cast<const float*>(m.in[src]);
    }
  });
  return out;
}

}  // namespace fastcl::host
