// CUDA emulator: fibers. A minimal user-space context switch, fiber stacks with guard pages, and the
// bookkeeping that keeps AddressSanitizer, ThreadSanitizer and C++ exception handling correct across
// stack switches. Part of the header-only layer; include "cuda_emu/cuda_emu.h", not this file.
//
// x86-64 (the default): the switch saves the callee-saved registers of the System V ABI (rbx, rbp,
// r12-r15) on the current stack, stores rsp, loads the other fiber's rsp and pops its registers: about
// 20 instructions, a few ns. Caller-saved registers need no saving: the switch is an ordinary
// (opaque, out-of-line) call, so the compiler already assumes they are clobbered, and it also assumes
// that the call reads and writes any memory, including function-local statics (__shared__ memory).
// The MXCSR and x87 control words are not switched: every fiber of a block runs with the launching
// thread's floating-point environment, and CUDA kernels cannot change it.
// Elsewhere (or with -DFASTVQ_EMU_UCONTEXT) the switch is glibc's swapcontext, about 6x slower (it
// makes a sigprocmask system call).
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "emu_config.h"

#if defined(__x86_64__) && !defined(FASTVQ_EMU_UCONTEXT)
#define FASTVQ_EMU_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#define FASTVQ_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FASTVQ_EMU_ASAN 1
#endif
#endif

#if defined(FASTVQ_EMU_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#if defined(FASTVQ_EMU_TSAN)
#include <sanitizer/tsan_interface.h>
#endif
#if defined(__GLIBCXX__)
#include <cxxabi.h>
#endif

#if defined(FASTVQ_EMU_ASM_SWITCH)
// The context switch and the fiber entry trampoline, in assembly so that no compiler can interpose a
// prologue, and emitted by every translation unit that includes this header as a hidden symbol in a
// COMDAT group (exactly how C++ inline functions are emitted): the linker keeps one copy, and each
// shared library keeps its own.
//
// void fastvq_emu_switch_v1(void** save_sp /* rdi */, void* load_sp /* rsi */)
//   Pushes the callee-saved registers, stores rsp to *save_sp, switches to load_sp, pops the target's
//   registers and returns into the target (a suspended switch call, or the trampoline).
// fastvq_emu_fiber_start_v1
//   First code of a fiber: context_make() lays out the new stack so that the switch "returns" here
//   with the entry function in r13 and its argument in r12; rsp is then 16-byte aligned, as the ABI
//   requires at a call. The entry function never returns. .cfi_undefined rip marks the outermost
//   frame for debuggers and unwinders.
__asm__(
    ".pushsection .text.fastvq_emu_switch_v1,\"axG\",@progbits,fastvq_emu_switch_v1,comdat\n"
    ".weak fastvq_emu_switch_v1\n"
    ".hidden fastvq_emu_switch_v1\n"
    ".type fastvq_emu_switch_v1,@function\n"
    ".p2align 4\n"
    "fastvq_emu_switch_v1:\n"
    "  pushq %rbp\n"
    "  pushq %rbx\n"
    "  pushq %r12\n"
    "  pushq %r13\n"
    "  pushq %r14\n"
    "  pushq %r15\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  popq %r15\n"
    "  popq %r14\n"
    "  popq %r13\n"
    "  popq %r12\n"
    "  popq %rbx\n"
    "  popq %rbp\n"
    "  ret\n"
    ".size fastvq_emu_switch_v1,.-fastvq_emu_switch_v1\n"
    ".popsection\n"
    ".pushsection .text.fastvq_emu_fiber_start_v1,\"axG\",@progbits,fastvq_emu_fiber_start_v1,comdat\n"
    ".weak fastvq_emu_fiber_start_v1\n"
    ".hidden fastvq_emu_fiber_start_v1\n"
    ".type fastvq_emu_fiber_start_v1,@function\n"
    ".p2align 4\n"
    "fastvq_emu_fiber_start_v1:\n"
    "  .cfi_startproc\n"
    "  .cfi_undefined rip\n"
    "  movq %r12, %rdi\n"
    "  callq *%r13\n"
    "  ud2\n"
    "  .cfi_endproc\n"
    ".size fastvq_emu_fiber_start_v1,.-fastvq_emu_fiber_start_v1\n"
    ".popsection\n");

extern "C" __attribute__((visibility("hidden"))) void fastvq_emu_switch_v1(void** save_sp, void* load_sp);
extern "C" __attribute__((visibility("hidden"))) void fastvq_emu_fiber_start_v1();
#endif

namespace fastvq {
namespace emu {
namespace detail {

using FiberEntry = void (*)(void*);

/// A suspended execution context: where a fiber, or the scheduler, resumes.
struct Context {
#if defined(FASTVQ_EMU_ASM_SWITCH)
  void* sp = nullptr;
#else
  ucontext_t uc;
  FiberEntry entry = nullptr;
  void* arg = nullptr;
#endif
};

#if !defined(FASTVQ_EMU_ASM_SWITCH)
// makecontext() passes only int arguments; the trampoline takes its context from here instead (set by
// the scheduler right before the first switch into a new fiber, on the same OS thread).
inline thread_local Context* tls_starting_context = nullptr;
inline void ucontext_trampoline() {
  Context* c = tls_starting_context;
  c->entry(c->arg);
  std::abort();  // entry functions never return
}
#endif

/// Prepares `c` to run entry(arg) on the stack [lo, lo + size) at its first context_switch().
inline void context_make(Context& c, void* lo, std::size_t size, FiberEntry entry, void* arg) {
#if defined(FASTVQ_EMU_ASM_SWITCH)
  void** sp = reinterpret_cast<void**>((reinterpret_cast<std::uintptr_t>(lo) + size) & ~std::uintptr_t{15});
  *--sp = reinterpret_cast<void*>(&fastvq_emu_fiber_start_v1);  // "return address" of the first switch
  *--sp = nullptr;                                              // rbp: ends frame-pointer backtraces
  *--sp = nullptr;                                              // rbx
  *--sp = arg;                                                  // r12
  *--sp = reinterpret_cast<void*>(entry);                       // r13
  *--sp = nullptr;                                              // r14
  *--sp = nullptr;                                              // r15
  c.sp = sp;
#else
  if (getcontext(&c.uc) != 0) throw EmuError("fastvq::emu: getcontext failed");
  c.uc.uc_stack.ss_sp = lo;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  c.entry = entry;
  c.arg = arg;
  makecontext(&c.uc, &ucontext_trampoline, 0);
#endif
}

/// Saves the running context into `from` and resumes `to`. Returns when something switches back to
/// `from`.
inline void context_switch(Context& from, Context& to) {
#if defined(FASTVQ_EMU_ASM_SWITCH)
  fastvq_emu_switch_v1(&from.sp, to.sp);
#else
  tls_starting_context = &to;
  swapcontext(&from.uc, &to.uc);
#endif
}

/// The C++ runtime's per-OS-thread exception state (libstdc++ / libc++abi __cxa_eh_globals: the stack
/// of caught exceptions and the uncaught count). Each fiber gets its own copy, swapped in while it runs,
/// so std::uncaught_exceptions() and rethrow are per fiber, as they would be per thread.
struct EhState {
  void* caught = nullptr;
  unsigned int uncaught = 0;
};

inline EhState* eh_globals() {
#if defined(__GLIBCXX__)
  return reinterpret_cast<EhState*>(abi::__cxa_get_globals());
#else
  return nullptr;
#endif
}

inline std::size_t page_size() {
  static const std::size_t p = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  return p;
}

/// One fiber stack: `size` usable bytes above an inaccessible guard region, so that an overflow faults
/// instead of silently corrupting a neighbour. Memory is reserved (MAP_NORESERVE) and committed only as
/// the fiber touches it; stacks are reused across blocks and launches.
class FiberStack {
 public:
  static constexpr std::size_t kGuardBytes = 64 * 1024;  // large enough that a big frame cannot jump it

  explicit FiberStack(std::size_t size) {
    const std::size_t page = page_size();
    size_ = (size + page - 1) / page * page;
    map_bytes_ = size_ + kGuardBytes;
    void* p = mmap(nullptr, map_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK,
                   -1, 0);
    if (p == MAP_FAILED) {
      throw EmuError("fastvq::emu: cannot map a fiber stack of " + std::to_string(map_bytes_) +
                     " bytes: " + std::strerror(errno));
    }
    base_ = static_cast<char*>(p);
    if (mprotect(base_, kGuardBytes, PROT_NONE) != 0) {
      munmap(base_, map_bytes_);
      throw EmuError(std::string("fastvq::emu: cannot protect a fiber stack guard: ") + std::strerror(errno));
    }
#if defined(FASTVQ_EMU_TSAN)
    tsan_fiber_ = __tsan_create_fiber(0);
#endif
  }

  ~FiberStack() {
#if defined(FASTVQ_EMU_ASAN)
    // Frames abandoned on this stack may leave poisoned shadow behind; the next mapping at this address
    // must start clean.
    __asan_unpoison_memory_region(lo(), size_);
#endif
#if defined(FASTVQ_EMU_TSAN)
    __tsan_destroy_fiber(tsan_fiber_);
#endif
    munmap(base_, map_bytes_);
  }

  FiberStack(const FiberStack&) = delete;
  FiberStack& operator=(const FiberStack&) = delete;

  char* lo() const { return base_ + kGuardBytes; }
  std::size_t size() const { return size_; }
  std::uintptr_t guard_lo() const { return reinterpret_cast<std::uintptr_t>(base_); }
  std::uintptr_t guard_hi() const { return reinterpret_cast<std::uintptr_t>(base_) + kGuardBytes; }
#if defined(FASTVQ_EMU_TSAN)
  void* tsan_fiber() const { return tsan_fiber_; }
#endif

 private:
  char* base_ = nullptr;
  std::size_t size_ = 0, map_bytes_ = 0;
#if defined(FASTVQ_EMU_TSAN)
  void* tsan_fiber_ = nullptr;
#endif
};

// AddressSanitizer must be told about every stack switch: it keeps per-stack bounds (used when an
// exception or longjmp unpoisons the frames it skips) and per-fiber fake stacks (use-after-return
// detection). start: right before the switch, naming the target stack (a null save slot means the
// current fiber is finished for good); finish: first thing after the switch, in the target.
inline void asan_start_switch(void** fake_stack_save, const void* bottom, std::size_t size) {
#if defined(FASTVQ_EMU_ASAN)
  __sanitizer_start_switch_fiber(fake_stack_save, bottom, size);
#else
  (void)fake_stack_save, (void)bottom, (void)size;
#endif
}

inline void asan_finish_switch(void* fake_stack_save, const void** bottom_old, std::size_t* size_old) {
#if defined(FASTVQ_EMU_ASAN)
  __sanitizer_finish_switch_fiber(fake_stack_save, bottom_old, size_old);
#else
  (void)fake_stack_save, (void)bottom_old, (void)size_old;
#endif
}

}  // namespace detail
}  // namespace emu
}  // namespace fastvq
