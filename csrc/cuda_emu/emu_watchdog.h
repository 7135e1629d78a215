// CUDA emulator: the two safety nets that turn a hang or a stack overflow into a clear message.
//   Watchdog      a background thread that aborts the process, naming the kernel, block and thread,
//                 when a launch makes no progress (no barrier, collective, thread exit or block start)
//                 for Config::watchdog_s seconds: a kernel thread spinning on another thread or block,
//                 which the emulator cannot run (see docs/cuda_emu.md).
//   Stack overflow a SIGSEGV handler (installed only where SIGSEGV has the default action and no
//                 sanitizer owns it) that recognises a fault in the running fiber's guard region and
//                 says so before the process dies.
// Part of the header-only layer; include "cuda_emu/cuda_emu.h", not this file.
#pragma once

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <memory>
#include <thread>
#include <vector>

#include "emu_config.h"
#include "emu_fiber.h"

#if defined(FASTVQ_EMU_ASAN)
#include <sanitizer/lsan_interface.h>
#endif

namespace fastvq {
namespace emu {
namespace detail {

/// Where a launch came from (FASTVQ_LAUNCH_KERNEL captures it).
struct LaunchSite {
  const char* file;
  int line;
  const char* kernel;
};

/// What the watchdog and the fault handler report: written by the launching thread (relaxed atomics,
/// a few stores per block or fiber switch), read by the watchdog thread or a signal handler.
struct RunningInfo {
  std::atomic<std::uint64_t> progress{0};
  std::atomic<const LaunchSite*> site{nullptr};
  std::atomic<unsigned> bx{0}, by{0}, bz{0};
  std::atomic<unsigned> thread{~0u};  // linear id of the running fiber, ~0u when unknown (threads mode)
  std::atomic<std::uintptr_t> guard_lo{0}, guard_hi{0};  // guard region of the running fiber's stack
  std::atomic<std::size_t> stack_bytes{0};
};

inline RunningInfo& running_info() {
  static RunningInfo info;
  return info;
}

/// Emulator-owned threads (the watchdog, the workers of threads mode) and fork(). The child of a fork has
/// only the forking thread, and glibc has already recycled the descriptors of the parent's other threads:
/// their handles must be neither joined nor detached (a stale pthread_t may now name a new thread), nor
/// destroyed while joinable (std::terminate); and the mutexes and condition variables those threads used
/// are copies of objects in use (a glibc condition variable counts its waiters, which never wake in the
/// child, and destroying it waits for them). So the owners keep that state on the heap and, on first use
/// in a child, forget the stale handles and abandon the copied state: never touched, never destroyed.
template <typename State>
inline void restart_after_fork(pid_t& owner, std::vector<std::thread>& threads, std::unique_ptr<State>& state) {
  if (owner == getpid()) return;
  for (std::thread& t : threads) {
    std::thread* forgotten = new std::thread(std::move(t));  // deliberately never destroyed
#if defined(FASTVQ_EMU_ASAN)
    __lsan_ignore_object(forgotten);
#endif
    (void)forgotten;
  }
  threads.clear();
  State* abandoned = state.release();  // deliberately never destroyed
#if defined(FASTVQ_EMU_ASAN)
  __lsan_ignore_object(abandoned);
#endif
  (void)abandoned;
  state.reset(new State());
  owner = getpid();
}

/// Records progress. A plain load + store rather than an atomic increment (no locked instruction on
/// the hot path): concurrent ticks may collapse into one, which still counts as progress.
inline void watchdog_tick() {
  std::atomic<std::uint64_t>& p = running_info().progress;
  p.store(p.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
}

class Watchdog {
 public:
  static Watchdog& get() {
    static Watchdog w;
    return w;
  }

  /// Watches the launch that starts now (timeout_s > 0) until disarm(). Called under the launch lock.
  void arm(double timeout_s) {
    if (!(timeout_s > 0)) return;
    restart_after_fork(owner_, thread_, shared_);
    Shared& s = *shared_;
    const std::lock_guard<std::mutex> lock(s.m);
    s.timeout_ms = static_cast<long long>(timeout_s * 1000.0);
    ++s.generation;
    if (thread_.empty()) thread_.emplace_back([p = &s] { loop(p); });
    s.cv.notify_all();
  }

  void disarm() {
    Shared& s = *shared_;
    const std::lock_guard<std::mutex> lock(s.m);
    s.timeout_ms = 0;
    ++s.generation;
  }

  ~Watchdog() {
    restart_after_fork(owner_, thread_, shared_);
    {
      const std::lock_guard<std::mutex> lock(shared_->m);
      shared_->stop = true;
    }
    shared_->cv.notify_all();
    for (std::thread& t : thread_) t.join();
  }

  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

 private:
  struct Shared {
    std::mutex m;
    std::condition_variable cv;
    bool stop = false;
    long long timeout_ms = 0;  // 0: disarmed
    std::uint64_t generation = 0;
  };

  Watchdog() = default;

  static void loop(Shared* s) {
    using Clock = std::chrono::steady_clock;
    std::unique_lock<std::mutex> lock(s->m);
    std::uint64_t seen_generation = ~std::uint64_t{0}, last_progress = 0;
    Clock::time_point last_change = Clock::now();
    while (!s->stop) {
      s->cv.wait_for(lock, std::chrono::milliseconds(100));
      if (s->stop) break;
      const Clock::time_point now = Clock::now();
      const std::uint64_t p = running_info().progress.load(std::memory_order_relaxed);
      if (s->timeout_ms == 0 || s->generation != seen_generation || p != last_progress) {
        seen_generation = s->generation;
        last_progress = p;
        last_change = now;
        continue;
      }
      const long long idle_ms = std::chrono::duration_cast<std::chrono::milliseconds>(now - last_change).count();
      if (idle_ms >= s->timeout_ms) report_and_abort(idle_ms);
    }
  }

  [[noreturn]] static void report_and_abort(long long idle_ms) {
    RunningInfo& r = running_info();
    const LaunchSite* site = r.site.load();
    const unsigned t = r.thread.load();
    std::fprintf(stderr,
                 "fastvq::emu: watchdog: no progress for %.1f s in kernel %s (launched at %s:%d), block (%u,%u,%u)",
                 idle_ms / 1000.0, site ? site->kernel : "?", site ? site->file : "?", site ? site->line : 0,
                 r.bx.load(), r.by.load(), r.bz.load());
    if (t != ~0u) std::fprintf(stderr, ", thread %u is running", t);
    std::fprintf(stderr,
                 ".\n  A kernel thread runs without reaching a barrier, a warp collective or its end: most likely"
                 " it spins waiting for another thread or block, which the emulator cannot run (blocks run one"
                 " at a time; in fiber mode a thread runs until it reaches a barrier or collective), or it loops"
                 " forever. Set FASTVQ_EMU_WATCHDOG_S (Config::watchdog_s) to change the limit, 0 to disable.\n");
    std::fflush(stderr);
    std::abort();
  }

  std::unique_ptr<Shared> shared_{new Shared()};
  std::vector<std::thread> thread_;  // zero or one
  pid_t owner_ = getpid();
};

/// Arms the watchdog for one launch.
class WatchdogScope {
 public:
  explicit WatchdogScope(double timeout_s) : armed_(timeout_s > 0) {
    if (armed_) Watchdog::get().arm(timeout_s);
  }
  ~WatchdogScope() {
    if (armed_) Watchdog::get().disarm();
  }
  WatchdogScope(const WatchdogScope&) = delete;
  WatchdogScope& operator=(const WatchdogScope&) = delete;

 private:
  bool armed_;
};

// ---- stack overflow report ----------------------------------------------------------------------

// Async-signal-safe formatting into a fixed buffer.
struct SignalMessage {
  char buf[640];
  std::size_t n = 0;
  void add(const char* s) {
    while (s && *s && n + 1 < sizeof(buf)) buf[n++] = *s++;
  }
  void add(std::uint64_t v) {
    char tmp[24];
    int k = 0;
    do {
      tmp[k++] = static_cast<char>('0' + v % 10);
      v /= 10;
    } while (v && k < 24);
    while (k > 0 && n + 1 < sizeof(buf)) buf[n++] = tmp[--k];
  }
};

inline void on_stack_overflow_signal(int, siginfo_t* info, void*) {
  RunningInfo& r = running_info();
  const std::uintptr_t a = reinterpret_cast<std::uintptr_t>(info->si_addr);
  if (a >= r.guard_lo.load(std::memory_order_relaxed) && a < r.guard_hi.load(std::memory_order_relaxed)) {
    const LaunchSite* site = r.site.load(std::memory_order_relaxed);
    SignalMessage m;
    m.add("fastvq::emu: stack overflow in kernel ");
    m.add(site ? site->kernel : "?");
    m.add(", block (");
    m.add(r.bx.load()), m.add(","), m.add(r.by.load()), m.add(","), m.add(r.bz.load());
    m.add("), thread ");
    m.add(r.thread.load());
    m.add(": the fiber stack of ");
    m.add(r.stack_bytes.load() / 1024);
    m.add(" KiB is too small (raise FASTVQ_EMU_STACK_KB or Config::stack_bytes), or the kernel recurses without"
          " bound.\n");
    ssize_t ignored = write(STDERR_FILENO, m.buf, m.n);
    (void)ignored;
  }
  // SA_RESETHAND restored the default action: returning re-executes the faulting access, which now
  // terminates the process with SIGSEGV exactly as if this handler had not been installed.
}

/// Installs the handler once per process if SIGSEGV still has its default action (a sanitizer, Python's
/// faulthandler or the application keep theirs), and an alternate signal stack on the calling thread
/// (the handler cannot run on the overflowed stack).
inline void install_stack_overflow_reporter() {
#if !defined(FASTVQ_EMU_ASAN) && !defined(FASTVQ_EMU_TSAN)
  static std::once_flag once;
  static bool installed = false;
  std::call_once(once, [] {
    struct sigaction old {};
    if (sigaction(SIGSEGV, nullptr, &old) != 0) return;
    if ((old.sa_flags & SA_SIGINFO) != 0 || old.sa_handler != SIG_DFL) return;
    struct sigaction sa {};
    sa.sa_sigaction = &on_stack_overflow_signal;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESETHAND;
    sigemptyset(&sa.sa_mask);
    installed = sigaction(SIGSEGV, &sa, nullptr) == 0;
  });
  if (!installed) return;
  struct AltStack {
    void* mem = nullptr;
    std::size_t size = 0;
    ~AltStack() {
      if (!mem) return;
      stack_t cur{};
      if (sigaltstack(nullptr, &cur) == 0 && cur.ss_sp == mem) {
        stack_t off{};
        off.ss_flags = SS_DISABLE;
        sigaltstack(&off, nullptr);
      }
      munmap(mem, size);
    }
  };
  static thread_local AltStack alt;
  if (alt.mem) return;
  stack_t cur{};
  if (sigaltstack(nullptr, &cur) != 0 || (cur.ss_flags & SS_DISABLE) == 0) return;  // the thread has one
  const std::size_t size = 64 * 1024;
  void* mem = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) return;
  stack_t ss{};
  ss.ss_sp = mem;
  ss.ss_size = size;
  if (sigaltstack(&ss, nullptr) != 0) {
    munmap(mem, size);
    return;
  }
  alt.mem = mem;
  alt.size = size;
#endif
}

}  // namespace detail
}  // namespace emu
}  // namespace fastvq
