#include "fiber.h"

#include <sys/mman.h>

#include <cstdlib>
#include <new>

namespace fastcl::host {

namespace {

constexpr size_t kStackBytes = 256 << 10;  // instrumented kernels at -O2 need a few KiB; lazily mapped

void ensure_stack(Fiber* f) {
  if (f->stack != nullptr) return;
  void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  f->stack = static_cast<char*>(p);
  f->stack_bytes = kStackBytes;
  f->stack_lo = reinterpret_cast<uintptr_t>(p);
  f->stack_hi = f->stack_lo + kStackBytes;
}

}  // namespace

#if defined(__x86_64__)

// switch_context(from, to): push the callee-saved registers, MXCSR and the x87 control word, save
// the stack pointer into from->sp, load to->sp, pop, return into `to`.
extern "C" void fastcl_host_switch(void** from_sp, void* to_sp);
extern "C" void fastcl_host_fiber_entry();
asm(R"(
  .text
  .p2align 4
  .globl fastcl_host_switch
  .hidden fastcl_host_switch
  .type fastcl_host_switch, @function
fastcl_host_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fastcl_host_switch, .-fastcl_host_switch

  .p2align 4
  .globl fastcl_host_fiber_entry
  .hidden fastcl_host_fiber_entry
  .type fastcl_host_fiber_entry, @function
fastcl_host_fiber_entry:
  movq %r12, %rdi
  movq %r13, %rax
  callq *%rax
  ud2
  .size fastcl_host_fiber_entry, .-fastcl_host_fiber_entry
)");

void switch_context(Context* from, Context* to) { fastcl_host_switch(&from->sp, to->sp); }

void arm_fiber(Fiber* f, Context*, FiberMain main) {
  ensure_stack(f);
  // The frame fastcl_host_switch pops: [mxcsr, fpcw] r15 r14 r13 r12 rbx rbp, return address; the
  // stack is 16-byte aligned after the return, so the entry's call keeps the ABI's alignment.
  auto* top = reinterpret_cast<uint64_t*>((f->stack_hi - 64) & ~uintptr_t{15});
  uint64_t* sp = top - 8;
  uint32_t mxcsr = 0;
  uint16_t fpcw = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpcw));
  sp[0] = static_cast<uint64_t>(mxcsr) | (static_cast<uint64_t>(fpcw) << 32);
  sp[1] = 0;                                     // r15
  sp[2] = 0;                                     // r14
  sp[3] = reinterpret_cast<uint64_t>(main);      // r13: what the entry calls
  sp[4] = reinterpret_cast<uint64_t>(f);         // r12: its argument
  sp[5] = 0;                                     // rbx
  sp[6] = 0;                                     // rbp
  sp[7] = reinterpret_cast<uint64_t>(&fastcl_host_fiber_entry);
  f->ctx.sp = sp;
}

#else  // ucontext

FiberMain g_main = nullptr;  // what a fiber's first entry runs

static void ucontext_entry(unsigned hi, unsigned lo) {
  auto* f = reinterpret_cast<Fiber*>((static_cast<uintptr_t>(hi) << 32) | lo);
  g_main(f);
}

void arm_fiber(Fiber* f, Context* scheduler, FiberMain main) {
  ensure_stack(f);
  g_main = main;
  getcontext(&f->ctx.uc);
  f->ctx.uc.uc_stack.ss_sp = f->stack;
  f->ctx.uc.uc_stack.ss_size = f->stack_bytes;
  f->ctx.uc.uc_link = &scheduler->uc;
  const auto bits = reinterpret_cast<uintptr_t>(f);
  makecontext(&f->ctx.uc, reinterpret_cast<void (*)()>(&ucontext_entry), 2, static_cast<unsigned>(bits >> 32),
              static_cast<unsigned>(bits));
}

void switch_context(Context* from, Context* to) { swapcontext(&from->uc, &to->uc); }

#endif

}  // namespace fastcl::host
