// Fibers: each CUDA thread of a block runs on a stack of its own and gives the CPU back only where it
// waits (a barrier, a warp meeting, its end), so a block's threads interleave exactly at the points
// CUDA synchronises them, deterministically. x86-64: a six-register switch (no system call, unlike
// swapcontext's signal mask); elsewhere ucontext.
#pragma once

#include <cstddef>
#include <cstdint>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace fastcl::host {

struct Fiber;
// What a fiber runs; it must end with finish_fiber, never return.
using FiberMain = void (*)(Fiber*);

struct Context {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

struct Fiber {
  Context ctx;
  char* stack = nullptr;
  size_t stack_bytes = 0;
  uintptr_t stack_lo = 0, stack_hi = 0;  // the stack's bytes, for the checkers
  int tid = 0;                           // linear thread index in the block
  enum State { kReady, kBarrier, kWarp, kDone } state = kDone;
};

// Allocate (once) and arm a fiber to run main(f) on its next switch.
void arm_fiber(Fiber* f, Context* scheduler, FiberMain main);
// Save the running context into `from` and run `to`.
void switch_context(Context* from, Context* to);

}  // namespace fastcl::host
