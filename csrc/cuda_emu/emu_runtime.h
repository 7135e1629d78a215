// CUDA emulator: the runtime. Runs a grid block by block; runs the threads of a block as fibers (one OS
// thread, deterministic schedules) or as OS threads (for ThreadSanitizer); implements barriers and warp
// collectives, and checks them: every CUDA undefined behaviour it can see becomes an EmuError that names
// the kernel, the block, the threads and the source lines involved. Part of the header-only layer;
// include "cuda_emu/cuda_emu.h", not this file.
//
// Model (also in docs/cuda_emu.md):
//   * Blocks run one after another, in the order the schedule gives (forward, reverse, shuffled).
//   * Every thread is in one of three states: runnable, blocked (in a barrier or warp collective), or
//     exited. A barrier completes when every thread of the block waits in it (same call site); a warp
//     collective completes when every non-exited lane named in its mask waits in the same collective
//     (same call site, except __syncwarp, and same mask). Completion happens as soon as the last
//     participant arrives (or the last missing lane exits), and releases the participants.
//   * Fiber mode runs in passes: each pass resumes, in schedule order, every thread that was runnable
//     when the pass started, and runs it up to its next barrier, collective or exit. A thread released
//     during a pass runs in the next pass. So between two synchronisation points the threads of a block,
//     and the lanes of a warp, run one after the other in schedule order.
//   * Threads mode runs every thread of the block on its own OS thread, truly concurrently; barriers and
//     collectives are condition-variable rendezvous under one mutex per block (which gives
//     ThreadSanitizer the happens-before edges a real barrier gives).
//   * A block is stuck when no thread is runnable and some have not exited: that is a deadlock, and the
//     checker explains which collective waits for which lanes and where those are. Nothing can hang
//     (kernel code that spins forever is caught by the watchdog).
#pragma once

#include <vector_types.h>

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <system_error>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "emu_config.h"
#include "emu_fiber.h"
#include "emu_watchdog.h"

// The CUDA built-in variables, per emulated thread: written by the runtime whenever an emulated thread
// starts or resumes on an OS thread (fiber switch, or OS-thread start). They are real variables (not
// macros), so that headers mentioning these names (e.g. cudaDeviceProp::warpSize) still compile.
inline thread_local ::uint3 threadIdx;
inline thread_local ::uint3 blockIdx;
inline thread_local ::dim3 blockDim;
inline thread_local ::dim3 gridDim;
inline constexpr int warpSize = 32;

namespace fastvq {
namespace emu {
namespace detail {

constexpr unsigned kWarpSize = 32;
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr std::size_t kMaxDynamicSmemBytes = 227 * 1024;  // sm_90 opt-in maximum
constexpr std::size_t kDynamicSmemAlign = 128;
constexpr unsigned char kDynamicSmemFill = 0xff;  // every block starts with this pattern (NaN, -1)

/// Barriers and warp collectives: what a blocked thread waits in.
enum class Op : std::uint8_t {
  kNone,
  kSyncthreads,
  kSyncthreadsCount,
  kSyncthreadsAnd,
  kSyncthreadsOr,
  kSyncwarp,
  kShfl,
  kShflUp,
  kShflDown,
  kShflXor,
  kBallot,
  kAny,
  kAll,
  kMatchAny,
  kMatchAll,
  kReduceAdd,
  kReduceMinU,
  kReduceMaxU,
  kReduceMinI,
  kReduceMaxI,
  kReduceAnd,
  kReduceOr,
  kReduceXor,
};

inline bool is_barrier(Op op) { return op >= Op::kSyncthreads && op <= Op::kSyncthreadsOr; }
inline bool is_shfl(Op op) { return op >= Op::kShfl && op <= Op::kShflXor; }

inline const char* op_name(Op op) {
  switch (op) {
    case Op::kNone: return "(none)";
    case Op::kSyncthreads: return "__syncthreads()";
    case Op::kSyncthreadsCount: return "__syncthreads_count()";
    case Op::kSyncthreadsAnd: return "__syncthreads_and()";
    case Op::kSyncthreadsOr: return "__syncthreads_or()";
    case Op::kSyncwarp: return "__syncwarp";
    case Op::kShfl: return "__shfl_sync";
    case Op::kShflUp: return "__shfl_up_sync";
    case Op::kShflDown: return "__shfl_down_sync";
    case Op::kShflXor: return "__shfl_xor_sync";
    case Op::kBallot: return "__ballot_sync";
    case Op::kAny: return "__any_sync";
    case Op::kAll: return "__all_sync";
    case Op::kMatchAny: return "__match_any_sync";
    case Op::kMatchAll: return "__match_all_sync";
    case Op::kReduceAdd: return "__reduce_add_sync";
    case Op::kReduceMinU:
    case Op::kReduceMinI: return "__reduce_min_sync";
    case Op::kReduceMaxU:
    case Op::kReduceMaxI: return "__reduce_max_sync";
    case Op::kReduceAnd: return "__reduce_and_sync";
    case Op::kReduceOr: return "__reduce_or_sync";
    case Op::kReduceXor: return "__reduce_xor_sync";
  }
  return "?";
}

/// A call site of a barrier, collective or trap. Every macro expansion creates its own static Site
/// (FASTVQ_EMU_SITE), so two calls on one line are still two sites, and a site in an inline function
/// is one object in the whole program (the static of an inline function's lambda is merged by the
/// linker). Sites compare by address; file and line are for messages.
struct Site {
  const char* file;
  int line;
};

/// Thrown inside an emulated thread to unwind it once its block has failed; never escapes a launch. Not
/// derived from std::exception, so kernel code catching std::exception does not swallow it.
struct Cancel {};

/// Thrown by __trap() (and similar): ends the block with an error naming the call site.
struct KernelTrap {
  const char* what;
  const Site* site;
};

// ---- formatting --------------------------------------------------------------------------------------

inline const char* base_name(const char* path) {
  const char* s = path ? std::strrchr(path, '/') : nullptr;
  return s ? s + 1 : (path ? path : "?");
}

inline std::string at_site(const Site* s) {
  return std::string(" at ") + base_name(s->file) + ":" + std::to_string(s->line);
}

inline std::string hex32(std::uint32_t v) {
  char b[16];
  std::snprintf(b, sizeof b, "0x%08x", v);
  return b;
}

inline std::string xyz(unsigned x, unsigned y, unsigned z) {
  return "(" + std::to_string(x) + "," + std::to_string(y) + "," + std::to_string(z) + ")";
}
inline std::string xyz(const ::uint3& v) { return xyz(v.x, v.y, v.z); }
inline std::string xyz(const ::dim3& v) { return xyz(v.x, v.y, v.z); }

/// "0-15, 17, 20-31" for a sorted list of ids.
inline std::string ranges(const std::vector<unsigned>& ids) {
  std::string s;
  for (std::size_t i = 0; i < ids.size();) {
    std::size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (!s.empty()) s += ", ";
    s += std::to_string(ids[i]);
    if (j > i) s += "-" + std::to_string(ids[j]);
    i = j + 1;
  }
  return s;
}

inline std::vector<unsigned> bits_of(std::uint32_t m) {
  std::vector<unsigned> v;
  for (; m; m &= m - 1) v.push_back(static_cast<unsigned>(__builtin_ctz(m)));
  return v;
}

inline std::string lanes(std::uint32_t m) {
  const std::vector<unsigned> v = bits_of(m);
  return (v.size() == 1 ? "lane " : "lanes ") + ranges(v);
}

// ---- per-thread and per-block state ------------------------------------------------------------------

class FiberExecutor;
struct Block;
struct ThreadCtx;

/// The thread running on this OS thread (a fiber, or a worker of threads mode) and its block.
struct Tls {
  ThreadCtx* thread = nullptr;
  Block* block = nullptr;
};
inline thread_local Tls tls;

struct ThreadCtx {
  enum class State : std::uint8_t { kRunnable, kBlocked, kExited };

  Block* block = nullptr;
  ::uint3 idx{0, 0, 0};
  unsigned linear = 0, warp = 0, lane = 0;
  State state = State::kRunnable;
  bool started = false;     // has run (fiber mode: its stack holds frames that must be unwound)
  unsigned ready_pass = 0;  // fiber mode: the first pass in which it may run again

  // The barrier or collective the thread waits in (or last waited in), its arguments and its result.
  Op op = Op::kNone;
  const Site* site = nullptr;
  std::uint32_t mask = 0;
  int arg = 0, width = 0;
  std::uint64_t in = 0, out = 0;
  bool pred = false;

  // Fiber mode.
  Context ctx;
  FiberStack* stack = nullptr;
  void* asan_fake_stack = nullptr;
  EhState eh;

  // Threads mode: signalled (under Block::m) when the thread is released or the block fails.
  std::condition_variable cv;
};

/// The state of one block of a launch; launch-wide fields are set once, the rest is reset per block.
/// Fiber mode: touched only by the launching OS thread. Threads mode: every field below `m` is guarded
/// by `m`.
struct Block {
  // Launch-wide.
  const LaunchSite* site = nullptr;
  FiberEntry body = nullptr;  // runs the kernel for the current thread
  void* body_arg = nullptr;
  ::dim3 grid, dim;
  unsigned nthreads = 0, nwarps = 0;
  Config cfg;
  unsigned char* dyn_smem = nullptr;
  std::size_t smem_bytes = 0;
  FiberExecutor* fibers = nullptr;
  std::unique_ptr<ThreadCtx[]> threads;
  std::vector<std::uint32_t> exited;   // per warp: lanes that exited, or do not exist (partial last warp)
  std::vector<std::uint32_t> waiting;  // per warp: lanes blocked in a warp collective

  // Per block.
  std::mutex m;
  std::condition_variable done_cv;  // threads mode: all threads finished
  ::uint3 idx{0, 0, 0};
  unsigned live = 0;      // threads not exited
  unsigned runnable = 0;  // threads neither blocked nor exited
  unsigned finished = 0;  // threads mode: OS threads done with this block
  unsigned barrier_waiting = 0;
  const ThreadCtx* barrier_first = nullptr;  // the first waiter: op and call site of the pending barrier
  unsigned barrier_acc = 0;                  // __syncthreads_count/and/or accumulator
  unsigned pass = 0;
  bool failed = false;
  std::string error;

  void init(const LaunchSite& s, const ::dim3& g, const ::dim3& b, const Config& c) {
    site = &s;
    grid = g;
    dim = b;
    cfg = c;
    nthreads = b.x * b.y * b.z;
    nwarps = (nthreads + kWarpSize - 1) / kWarpSize;
    threads.reset(new ThreadCtx[nthreads]);
    for (unsigned i = 0; i < nthreads; ++i) {
      ThreadCtx& t = threads[i];
      t.block = this;
      t.linear = i;
      t.idx = ::uint3{i % b.x, (i / b.x) % b.y, i / (b.x * b.y)};
      t.warp = i / kWarpSize;
      t.lane = i % kWarpSize;
    }
    exited.assign(nwarps, 0);
    waiting.assign(nwarps, 0);
  }

  void reset(const ::uint3& block_idx) {
    idx = block_idx;
    live = runnable = nthreads;
    finished = barrier_waiting = barrier_acc = pass = 0;
    barrier_first = nullptr;
    failed = false;
    error.clear();
    for (unsigned w = 0; w < nwarps; ++w) {
      const unsigned n = std::min(kWarpSize, nthreads - w * kWarpSize);
      exited[w] = n == kWarpSize ? 0u : ~((1u << n) - 1u);
      waiting[w] = 0;
    }
    for (unsigned i = 0; i < nthreads; ++i) {
      ThreadCtx& t = threads[i];
      t.state = ThreadCtx::State::kRunnable;
      t.started = false;
      t.ready_pass = 0;
      t.op = Op::kNone;
      t.asan_fake_stack = nullptr;
      t.eh = EhState{};
    }
  }

  ThreadCtx& at(unsigned warp, unsigned lane) { return threads[warp * kWarpSize + lane]; }
  const ThreadCtx& at(unsigned warp, unsigned lane) const { return threads[warp * kWarpSize + lane]; }

  /// Threads mode: the block lock; fiber mode: nothing to lock.
  std::unique_lock<std::mutex> guard() {
    return cfg.mode == Mode::kThreads ? std::unique_lock<std::mutex>(m) : std::unique_lock<std::mutex>();
  }

  std::string thread_name(const ThreadCtx& t) const {
    std::string s = "thread " + std::to_string(t.linear);
    if (dim.y > 1 || dim.z > 1) s += " " + xyz(t.idx);
    return s;
  }

  /// Where a thread is, for messages.
  std::string describe(const ThreadCtx& t) const {
    switch (t.state) {
      case ThreadCtx::State::kExited: return "exited";
      case ThreadCtx::State::kRunnable:
        if (cfg.mode == Mode::kFibers && !t.started) return "not started";
        if (cfg.mode == Mode::kFibers && tls.thread != &t) return "ready (released, not resumed yet)";
        return "running";
      case ThreadCtx::State::kBlocked: break;
    }
    if (is_barrier(t.op)) return std::string(op_name(t.op)) + at_site(t.site);
    return std::string(op_name(t.op)) + "(mask " + hex32(t.mask) + ")" + at_site(t.site);
  }

  /// Every thread's position, grouped into runs of consecutive ids.
  std::string summary() const {
    std::string s;
    unsigned lines = 0;
    for (unsigned i = 0; i < nthreads;) {
      const std::string d = describe(threads[i]);
      unsigned j = i;
      while (j + 1 < nthreads && describe(threads[j + 1]) == d) ++j;
      if (++lines > 24) {
        s += "\n    ... (threads " + std::to_string(i) + "-" + std::to_string(nthreads - 1) + " not listed)";
        break;
      }
      s += "\n    " + std::string(j > i ? "threads " : "thread ") + std::to_string(i);
      if (j > i) s += "-" + std::to_string(j);
      s += ": " + d;
      i = j + 1;
    }
    return s;
  }

  /// Records the block's first error (later ones are consequences) and wakes every waiter.
  void fail(const std::string& what) {
    if (failed) return;
    failed = true;
    const std::string seed = cfg.schedule == Schedule::kShuffled ? " (seed " + std::to_string(cfg.seed) + ")" : "";
    const char* ids = dim.y > 1 || dim.z > 1 ? " (linear ids x + y*blockDim.x + z*blockDim.x*blockDim.y)" : "";
    error = "fastvq::emu: " + what + "\n  kernel " + site->kernel + " launched at " + base_name(site->file) + ":" +
            std::to_string(site->line) + ", grid " + xyz(grid) + ", block " + xyz(dim) + ", schedule " +
            to_string(cfg.schedule) + seed + ", " + to_string(cfg.mode) + " mode\n  threads of block " + xyz(idx) +
            ids + ":" + summary();
    if (cfg.mode == Mode::kThreads) {
      for (unsigned i = 0; i < nthreads; ++i) threads[i].cv.notify_one();
      done_cv.notify_all();
    }
  }

  void block_thread(ThreadCtx& t) {
    t.state = ThreadCtx::State::kBlocked;
    --runnable;
  }

  void release(ThreadCtx& t) {
    t.state = ThreadCtx::State::kRunnable;
    t.ready_pass = pass + 1;
    ++runnable;
    if (cfg.mode == Mode::kThreads) t.cv.notify_one();
  }

  void check_stuck() {
    if (!failed && runnable == 0 && live > 0) fail(diagnose_stuck());
  }

  // -- barriers --

  void arrive_barrier(ThreadCtx& t, Op op, const Site* site, bool pred) {
    t.op = op;
    t.site = site;
    if (live != nthreads) {
      std::vector<unsigned> gone;
      for (unsigned i = 0; i < nthreads; ++i) {
        if (threads[i].state == ThreadCtx::State::kExited) gone.push_back(i);
      }
      fail(std::string(op_name(op)) + at_site(site) + " reached by " + thread_name(t) + " after " +
           (gone.size() == 1 ? "thread " : "threads ") + ranges(gone) +
           " of the block exited: every thread of a block must reach every __syncthreads() (a thread that "
           "returns early must not skip a barrier the others reach)");
      return;
    }
    if (barrier_waiting > 0) {
      const ThreadCtx& f = *barrier_first;
      if (f.op != op || f.site != site) {
        fail("divergent barrier: " + thread_name(t) + " reached " + op_name(op) + at_site(site) +
             (f.site->line == site->line ? " (another call on the same line)" : "") + " while other threads wait in " +
             op_name(f.op) + at_site(f.site) + ": every thread of a block must reach the same __syncthreads() call");
        return;
      }
    } else {
      barrier_first = &t;
      barrier_acc = op == Op::kSyncthreadsAnd ? 1u : 0u;
    }
    if (op == Op::kSyncthreadsCount) barrier_acc += pred ? 1u : 0u;
    if (op == Op::kSyncthreadsAnd) barrier_acc &= pred ? 1u : 0u;
    if (op == Op::kSyncthreadsOr) barrier_acc |= pred ? 1u : 0u;
    block_thread(t);
    if (++barrier_waiting == live) {
      barrier_waiting = 0;
      barrier_first = nullptr;
      for (unsigned i = 0; i < nthreads; ++i) {
        ThreadCtx& o = threads[i];
        if (o.state == ThreadCtx::State::kBlocked && is_barrier(o.op)) {
          o.out = barrier_acc;
          release(o);
        }
      }
    }
  }

  // -- warp collectives --

  static bool same_collective(const ThreadCtx& a, const ThreadCtx& b) {
    // CUDA: every non-exited lane named in the mask executes the same intrinsic with the same mask.
    // __syncwarp may be matched by a __syncwarp at another call site; data collectives may not.
    return a.op == b.op && a.mask == b.mask && (a.op == Op::kSyncwarp || a.site == b.site);
  }

  void arrive_warp(ThreadCtx& t, Op op, const Site* site, std::uint32_t mask, std::uint64_t in, int arg, int width) {
    t.op = op;
    t.site = site;
    t.mask = mask;
    t.in = in;
    t.arg = arg;
    t.width = width;
    t.pred = false;
    if (((mask >> t.lane) & 1u) == 0) {
      fail(std::string(op_name(op)) + "(mask " + hex32(mask) + ")" + at_site(site) + ": " + thread_name(t) +
           " (warp " + std::to_string(t.warp) + " lane " + std::to_string(t.lane) +
           ") is not in its own mask: the calling lane must be named in the mask");
      return;
    }
    if (is_shfl(op) && (width < 1 || width > static_cast<int>(kWarpSize) || (width & (width - 1)) != 0)) {
      fail(std::string(op_name(op)) + at_site(site) + ": width " + std::to_string(width) + " of " +
           thread_name(t) + " must be a power of two in [1, 32]");
      return;
    }
    block_thread(t);
    waiting[t.warp] |= 1u << t.lane;
    try_complete(t);
  }

  /// Completes t's collective if every non-exited lane of its mask waits in the same collective.
  void try_complete(const ThreadCtx& t) {
    const unsigned w = t.warp;
    const std::uint32_t group = t.mask & ~exited[w];
    if ((group & ~waiting[w]) != 0) return;
    for (std::uint32_t g = group; g; g &= g - 1) {
      if (!same_collective(at(w, static_cast<unsigned>(__builtin_ctz(g))), t)) return;
    }
    complete(w, group);
  }

  /// The lane a shuffle reads, per the PTX definition of shfl.sync (the CUDA intrinsics pass
  /// c = ((32 - width) << 8) | 0x1f, or (32 - width) << 8 for .up): the source is confined to the
  /// lane's width-segment (xor may also reach lower segments); out of range, a lane reads itself.
  static std::int32_t as_signed(std::uint32_t v) { return static_cast<std::int32_t>(v); }

  static unsigned shfl_source(Op op, unsigned lane, int arg, int width) {
    const unsigned seg = (kWarpSize - static_cast<unsigned>(width)) & 31u;  // segment-index bits
    const unsigned b = static_cast<unsigned>(arg) & 31u;
    const unsigned min_lane = lane & seg, max_lane = min_lane | (31u & ~seg);
    switch (op) {
      case Op::kShfl: return min_lane | (b & ~seg & 31u);
      case Op::kShflUp: return lane >= min_lane + b ? lane - b : lane;
      case Op::kShflDown: return lane + b <= max_lane ? lane + b : lane;
      case Op::kShflXor: return (lane ^ b) <= max_lane ? lane ^ b : lane;
      default: return lane;
    }
  }

  void complete(unsigned w, std::uint32_t group) {
    const ThreadCtx& first = at(w, static_cast<unsigned>(__builtin_ctz(group)));
    const Op op = first.op;
    std::uint32_t ballot = 0;
    std::uint32_t reduced = op == Op::kReduceAnd ? ~0u : 0u;
    bool all_equal = true;
    if (op == Op::kReduceMinU) reduced = ~0u;
    if (op == Op::kReduceMinI) reduced = 0x7fffffffu;
    if (op == Op::kReduceMaxI) reduced = 0x80000000u;
    for (std::uint32_t g = group; g; g &= g - 1) {
      const unsigned l = static_cast<unsigned>(__builtin_ctz(g));
      const ThreadCtx& o = at(w, l);
      const std::uint32_t v = static_cast<std::uint32_t>(o.in);
      if (o.in != 0) ballot |= 1u << l;
      all_equal = all_equal && o.in == first.in;
      switch (op) {
        case Op::kReduceAdd: reduced += v; break;
        case Op::kReduceMinU: reduced = std::min(reduced, v); break;
        case Op::kReduceMaxU: reduced = std::max(reduced, v); break;
        case Op::kReduceMinI:
          reduced = static_cast<std::uint32_t>(std::min(as_signed(reduced), as_signed(v)));
          break;
        case Op::kReduceMaxI:
          reduced = static_cast<std::uint32_t>(std::max(as_signed(reduced), as_signed(v)));
          break;
        case Op::kReduceAnd: reduced &= v; break;
        case Op::kReduceOr: reduced |= v; break;
        case Op::kReduceXor: reduced ^= v; break;
        default: break;
      }
    }
    // Results first, releases after: a failure leaves every participant blocked (and unwound later).
    for (std::uint32_t g = group; g; g &= g - 1) {
      const unsigned l = static_cast<unsigned>(__builtin_ctz(g));
      ThreadCtx& o = at(w, l);
      switch (op) {
        case Op::kShfl:
        case Op::kShflUp:
        case Op::kShflDown:
        case Op::kShflXor: {
          const unsigned j = shfl_source(op, l, o.arg, o.width);
          if (j == l || ((group >> j) & 1u)) {
            o.out = at(w, j).in;
          } else if (cfg.strict_shfl_source) {
            const unsigned jt = w * kWarpSize + j;
            const char* why = ((o.mask >> j) & 1u) == 0 ? "is not in the mask"
                              : jt >= nthreads          ? "does not exist (partial last warp)"
                                                        : "has exited";
            fail(std::string(op_name(op)) + "(mask " + hex32(o.mask) + ")" + at_site(o.site) + ": " +
                 thread_name(o) + " (warp " + std::to_string(w) + " lane " + std::to_string(l) + ") reads lane " +
                 std::to_string(j) + ", which " + why +
                 ": the value read from an inactive lane is undefined (Config::strict_shfl_source = false "
                 "returns all-ones bits instead, for kernels that discard such values)");
            return;
          } else {
            o.out = ~std::uint64_t{0};
          }
          break;
        }
        case Op::kBallot: o.out = ballot; break;
        case Op::kAny: o.out = ballot != 0; break;
        case Op::kAll: o.out = ballot == group; break;
        case Op::kMatchAny: {
          std::uint32_t same = 0;
          for (std::uint32_t h = group; h; h &= h - 1) {
            const unsigned k = static_cast<unsigned>(__builtin_ctz(h));
            if (at(w, k).in == o.in) same |= 1u << k;
          }
          o.out = same;
          break;
        }
        case Op::kMatchAll:
          o.out = all_equal ? group : 0u;
          o.pred = all_equal;
          break;
        case Op::kSyncwarp: break;
        default: o.out = reduced; break;
      }
    }
    waiting[w] &= ~group;
    for (std::uint32_t g = group; g; g &= g - 1) release(at(w, static_cast<unsigned>(__builtin_ctz(g))));
  }

  // -- exit --

  void thread_exit(ThreadCtx& t) {
    if (t.state == ThreadCtx::State::kExited) return;
    if (t.state == ThreadCtx::State::kBlocked) {  // unwound out of a wait (the block failed)
      waiting[t.warp] &= ~(1u << t.lane);
    } else {
      --runnable;
    }
    t.state = ThreadCtx::State::kExited;
    exited[t.warp] |= 1u << t.lane;
    --live;
    if (failed) return;
    if (barrier_waiting > 0) {
      const ThreadCtx& f = *barrier_first;
      fail(thread_name(t) + " exited while other threads wait in " + op_name(f.op) + at_site(f.site) +
           ": every thread of a block must reach every __syncthreads() (a barrier inside a branch that some "
           "threads skip is undefined behaviour, and deadlocks or corrupts later barriers on a GPU)");
      return;
    }
    // CUDA: a collective waits only for the non-exited lanes of its mask, so this exit may complete one.
    for (std::uint32_t wm = waiting[t.warp]; wm; wm &= wm - 1) {
      const unsigned l = static_cast<unsigned>(__builtin_ctz(wm));
      if ((waiting[t.warp] >> l) & 1u) try_complete(at(t.warp, l));
      if (failed) return;
    }
    check_stuck();
  }

  // -- deadlock diagnosis --

  /// Explains why no thread can run: the first warp collective whose group can never form, or else the
  /// barrier. (Every barrier or collective is tried as soon as its last participant arrives or exits,
  /// so when nothing is runnable, nothing can complete.)
  std::string diagnose_stuck() const {
    for (unsigned i = 0; i < nthreads; ++i) {
      const ThreadCtx& t = threads[i];
      if (t.state != ThreadCtx::State::kBlocked || is_barrier(t.op)) continue;
      const unsigned w = t.warp;
      const std::uint32_t group = t.mask & ~exited[w];
      std::uint32_t here = 0, elsewhere = 0;
      for (std::uint32_t g = group; g; g &= g - 1) {
        const unsigned l = static_cast<unsigned>(__builtin_ctz(g));
        const ThreadCtx& o = at(w, l);
        (o.state == ThreadCtx::State::kBlocked && same_collective(o, t) ? here : elsewhere) |= 1u << l;
      }
      if (elsewhere == 0) continue;
      // Group the missing lanes by where they are.
      std::vector<std::pair<std::string, std::uint32_t>> places;
      bool at_barrier = false, same_kind = true;
      for (std::uint32_t g = elsewhere; g; g &= g - 1) {
        const unsigned l = static_cast<unsigned>(__builtin_ctz(g));
        const ThreadCtx& o = at(w, l);
        at_barrier = at_barrier || is_barrier(o.op);
        same_kind = same_kind && o.op == t.op && o.mask == t.mask;
        const std::string d = describe(o);
        auto it = std::find_if(places.begin(), places.end(), [&](const auto& p) { return p.first == d; });
        if (it == places.end()) places.emplace_back(d, 1u << l);
        else it->second |= 1u << l;
      }
      std::string where;
      for (const auto& p : places) where += (where.empty() ? "" : "; ") + lanes(p.second) + " in " + p.first;
      const std::string head = at_barrier ? "deadlock"
                               : same_kind ? "divergent warp collective (same collective at different call sites)"
                                           : "mismatched warp collectives";
      const char* verb = __builtin_popcount(elsewhere) == 1 ? ", which is elsewhere: " : ", which are elsewhere: ";
      return head + ": in warp " + std::to_string(w) + ", " + lanes(here) + " wait in " + describe(t) + " for " +
             lanes(elsewhere) + verb + where +
             ". Every non-exited lane named in a collective's mask must execute that same collective (same "
             "call site, same mask)";
    }
    return "deadlock: no thread of the block can make progress";
  }
};

inline ThreadCtx& kernel_thread(const char* what) {
  ThreadCtx* t = tls.thread;
  if (t == nullptr) throw EmuError(std::string("fastvq::emu: ") + what + " called outside an emulated kernel thread");
  return *t;
}

/// Runs the kernel for one thread; records what ends it abnormally.
inline void run_thread_body(Block& b, ThreadCtx& t) noexcept {
  std::string error;
  try {
    b.body(b.body_arg);
    return;
  } catch (const Cancel&) {
    return;
  } catch (const KernelTrap& e) {
    error = std::string(e.what) + at_site(e.site) + " in " + b.thread_name(t);
  } catch (const std::exception& e) {
    error = b.thread_name(t) + " threw an exception out of the kernel: " + e.what();
  } catch (...) {
    error = b.thread_name(t) + " threw an exception of unknown type out of the kernel";
  }
  const std::unique_lock<std::mutex> lock = b.guard();
  b.fail(error);
}

// ---- fiber mode ------------------------------------------------------------------------------------

/// splitmix64: small, fast, good enough for schedules.
struct Rng {
  std::uint64_t s;
  std::uint64_t next() {
    std::uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  unsigned below(unsigned n) { return static_cast<unsigned>(next() % n); }
};

class FiberExecutor {
 public:
  void run_block(Block& b) {
    ensure_stacks(b.nthreads, b.cfg.stack_bytes);
    for (unsigned i = 0; i < b.nthreads; ++i) {
      ThreadCtx& t = b.threads[i];
      t.stack = stacks_[i].get();
      context_make(t.ctx, t.stack->lo(), t.stack->size(), &FiberExecutor::fiber_main, &t);
    }
#if defined(FASTVQ_EMU_TSAN)
    sched_tsan_fiber_ = __tsan_get_current_fiber();
#endif
    RunningInfo& info = running_info();
    info.stack_bytes.store(stacks_.empty() ? 0 : stacks_[0]->size(), std::memory_order_relaxed);

    order_.resize(b.nthreads);
    for (unsigned i = 0; i < b.nthreads; ++i) order_[i] = b.cfg.schedule == Schedule::kReverse ? b.nthreads - 1 - i : i;
    const std::uint64_t block_linear =
        b.idx.x + std::uint64_t{b.grid.x} * (b.idx.y + std::uint64_t{b.grid.y} * b.idx.z);
    Rng rng{b.cfg.seed * 0x2545f4914f6cdd1dull ^ (block_linear + 0x632be59bd9b4e019ull)};

    for (b.pass = 0;; ++b.pass) {
      if (b.cfg.schedule == Schedule::kShuffled) {
        for (unsigned i = b.nthreads; i > 1; --i) std::swap(order_[i - 1], order_[rng.below(i)]);
      }
      bool ran = false;
      for (unsigned k = 0; k < b.nthreads && !b.failed; ++k) {
        ThreadCtx& t = b.threads[order_[k]];
        if (t.state != ThreadCtx::State::kRunnable || t.ready_pass > b.pass) continue;
        ran = true;
        resume(t);
      }
      if (b.failed || b.live == 0) break;
      if (!ran) {  // unreachable: a stuck block fails in check_stuck(); never loop without progress
        b.fail("internal error: no runnable thread and no deadlock detected");
        break;
      }
    }
    if (b.failed) {
      // Unwind every thread that has frames on its stack: resumed in a failed block, its pending barrier
      // or collective throws Cancel, whose unwinding runs the destructors of the thread's frames and ends
      // in fiber_main, which exits the thread. Threads that never ran have nothing to unwind.
      for (unsigned i = 0; i < b.nthreads; ++i) {
        ThreadCtx& t = b.threads[i];
        if (t.state == ThreadCtx::State::kExited) continue;
        if (t.started) {
          resume(t);
        } else {
          b.thread_exit(t);
        }
      }
    }
    info.thread.store(~0u, std::memory_order_relaxed);
    info.guard_lo.store(0, std::memory_order_relaxed);
    info.guard_hi.store(0, std::memory_order_relaxed);
  }

  /// Called on a fiber: suspends it and returns to the scheduler; returns when resumed. `final`: the
  /// fiber has finished and will never be resumed.
  void yield(ThreadCtx& t, bool final) {
    asan_start_switch(final ? nullptr : &t.asan_fake_stack, sched_stack_bottom_, sched_stack_size_);
#if defined(FASTVQ_EMU_TSAN)
    __tsan_switch_to_fiber(sched_tsan_fiber_, 0);
#endif
    context_switch(t.ctx, sched_);
    asan_finish_switch(t.asan_fake_stack, nullptr, nullptr);
  }

 private:
  static void fiber_main(void* arg) noexcept {
    ThreadCtx& t = *static_cast<ThreadCtx*>(arg);
    Block& b = *t.block;
    FiberExecutor& ex = *b.fibers;
    // First code on the new stack: completes the scheduler's switch, and learns the scheduler's stack
    // bounds, which every later switch back names.
    asan_finish_switch(nullptr, &ex.sched_stack_bottom_, &ex.sched_stack_size_);
    run_thread_body(b, t);
    b.thread_exit(t);
    ex.yield(t, /*final=*/true);
    std::abort();  // a finished fiber is never resumed
  }

  /// Runs `t` until it blocks or exits, with its threadIdx, exception state and sanitizer view.
  void resume(ThreadCtx& t) {
    RunningInfo& info = running_info();
    info.thread.store(t.linear, std::memory_order_relaxed);
    info.guard_lo.store(t.stack->guard_lo(), std::memory_order_relaxed);
    info.guard_hi.store(t.stack->guard_hi(), std::memory_order_relaxed);
    watchdog_tick();
    t.started = true;
    tls.thread = &t;
    ::threadIdx = t.idx;
    EhState* eh = eh_globals();
    if (eh) {
      sched_eh_ = *eh;
      *eh = t.eh;
    }
    asan_start_switch(&sched_fake_stack_, t.stack->lo(), t.stack->size());
#if defined(FASTVQ_EMU_TSAN)
    __tsan_switch_to_fiber(t.stack->tsan_fiber(), 0);
#endif
    context_switch(sched_, t.ctx);
    asan_finish_switch(sched_fake_stack_, nullptr, nullptr);
    if (eh) {
      t.eh = *eh;
      *eh = sched_eh_;
    }
    tls.thread = nullptr;
  }

  void ensure_stacks(unsigned n, std::size_t bytes) {
    if (bytes != stack_bytes_) {
      stacks_.clear();
      stack_bytes_ = bytes;
    }
    while (stacks_.size() < n) stacks_.push_back(std::make_unique<FiberStack>(bytes));
  }

  std::vector<std::unique_ptr<FiberStack>> stacks_;
  std::size_t stack_bytes_ = 0;
  std::vector<unsigned> order_;
  Context sched_;
  const void* sched_stack_bottom_ = nullptr;
  std::size_t sched_stack_size_ = 0;
  void* sched_fake_stack_ = nullptr;
  EhState sched_eh_;
#if defined(FASTVQ_EMU_TSAN)
  void* sched_tsan_fiber_ = nullptr;
#endif
};

// ---- threads mode ----------------------------------------------------------------------------------

/// Worker OS threads, one per thread of the largest block seen, reused across blocks and launches.
class ThreadPool {
 public:
  ThreadPool() = default;
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  ~ThreadPool() {
    restart_after_fork(owner_, workers_, shared_);
    {
      const std::lock_guard<std::mutex> lock(shared_->m);
      shared_->stop = true;
    }
    shared_->cv.notify_all();
    for (std::thread& w : workers_) w.join();
  }

  /// Runs the block's threads, one per worker, and returns when all have finished. Called under the
  /// launch lock.
  void run_block(Block& b) {
    restart_after_fork(owner_, workers_, shared_);
    Shared& s = *shared_;
    while (workers_.size() < b.nthreads) {
      const unsigned index = static_cast<unsigned>(workers_.size());
      try {
        // A new worker starts at the current generation, whose job (if any) belongs to an older worker.
        workers_.emplace_back([p = &s, index, seen = s.generation] { loop(p, index, seen); });
      } catch (const std::system_error& e) {
        throw EmuError("fastvq::emu: threads mode cannot start OS thread " + std::to_string(index) + " of a block of " +
                       std::to_string(b.nthreads) + ": " + e.what());
      }
    }
    {
      const std::lock_guard<std::mutex> lock(s.m);
      s.block = &b;
      s.jobs = b.nthreads;
      ++s.generation;
    }
    s.cv.notify_all();
    std::unique_lock<std::mutex> lock(b.m);
    b.done_cv.wait(lock, [&] { return b.finished == b.nthreads; });
  }

 private:
  struct Shared {
    std::mutex m;
    std::condition_variable cv;
    std::uint64_t generation = 0;  // one per block run
    Block* block = nullptr;
    unsigned jobs = 0;  // workers 0 .. jobs-1 run thread `index` of `block`
    bool stop = false;
  };

  static void loop(Shared* s, unsigned index, std::uint64_t seen) {
    for (;;) {
      Block* b = nullptr;
      {
        std::unique_lock<std::mutex> lock(s->m);
        s->cv.wait(lock, [&] { return s->stop || s->generation != seen; });
        if (s->stop) return;
        seen = s->generation;
        if (index >= s->jobs) continue;
        b = s->block;
      }
      run(*b, b->threads[index]);
    }
  }

  static void run(Block& b, ThreadCtx& t) {
    tls.thread = &t;
    tls.block = &b;
    ::threadIdx = t.idx;
    ::blockIdx = b.idx;
    ::blockDim = b.dim;
    ::gridDim = b.grid;
    bool skip;
    {
      const std::lock_guard<std::mutex> lock(b.m);
      skip = b.failed;  // a block that already failed does not start more threads
      t.started = !skip;
    }
    watchdog_tick();
    if (!skip) run_thread_body(b, t);
    {
      const std::lock_guard<std::mutex> lock(b.m);
      b.thread_exit(t);
      if (++b.finished == b.nthreads) b.done_cv.notify_all();
    }
    tls.thread = nullptr;
    tls.block = nullptr;
  }

  std::unique_ptr<Shared> shared_{new Shared()};
  std::vector<std::thread> workers_;
  pid_t owner_ = getpid();
};

// ---- barriers and collectives: the common path -------------------------------------------------------

/// A thread arrives at a barrier or collective (arrive(Block&) records it and completes it if it was the
/// last participant) and waits until released. Returns false, without synchronising, when called while
/// the thread unwinds an exception (from a destructor), where waiting could never end. Throws Cancel
/// when the block fails.
template <typename Arrive>
inline bool sync_point(ThreadCtx& t, Arrive&& arrive) {
  if (std::uncaught_exceptions() > 0) return false;
  Block& b = *t.block;
  watchdog_tick();
  if (b.cfg.mode == Mode::kFibers) {
    if (b.failed) throw Cancel{};
    arrive(b);
    b.check_stuck();
    if (b.failed) throw Cancel{};
    b.fibers->yield(t, false);  // even if already released: released threads run in the next pass
    if (b.failed) throw Cancel{};
  } else {
    std::unique_lock<std::mutex> lock(b.m);
    if (b.failed) throw Cancel{};
    arrive(b);
    b.check_stuck();
    while (!b.failed && t.state == ThreadCtx::State::kBlocked) t.cv.wait(lock);
    if (b.failed) throw Cancel{};
  }
  return true;
}

// ---- runtime and launch --------------------------------------------------------------------------

struct Runtime {
  std::mutex launch_mutex;  // one launch at a time, process-wide (__shared__ variables are statics)
  FiberExecutor fibers;
  ThreadPool pool;
};

inline Runtime& runtime() {
  static Runtime rt;
  return rt;
}

/// The order of a grid's blocks: k-th block to run -> linear block id. Shuffled uses a seeded 4-round
/// Feistel permutation of the next power-of-4 domain with cycle walking: a true permutation of any grid
/// size, no storage.
class BlockOrder {
 public:
  BlockOrder(Schedule s, std::uint64_t seed, std::uint64_t n) : schedule_(s), n_(n) {
    unsigned bits = 0;
    while (bits < 64 && (std::uint64_t{1} << bits) < n) ++bits;
    half_ = std::max(1u, (bits + 1) / 2);
    Rng rng{seed ^ 0x5851f42d4c957f2dull};
    for (std::uint64_t& k : keys_) k = rng.next();
  }

  std::uint64_t operator()(std::uint64_t k) const {
    switch (schedule_) {
      case Schedule::kForward: return k;
      case Schedule::kReverse: return n_ - 1 - k;
      case Schedule::kShuffled: break;
    }
    std::uint64_t x = k;
    do x = feistel(x);
    while (x >= n_);
    return x;
  }

 private:
  std::uint64_t feistel(std::uint64_t x) const {
    const std::uint64_t mask = (std::uint64_t{1} << half_) - 1;
    std::uint64_t l = x >> half_, r = x & mask;
    for (std::uint64_t key : keys_) {
      Rng f{r ^ key};
      const std::uint64_t nl = r;
      r = l ^ (f.next() & mask);
      l = nl;
    }
    return (l << half_) | r;
  }

  Schedule schedule_;
  std::uint64_t n_;
  unsigned half_ = 1;
  std::uint64_t keys_[4] = {};
};

inline void check_launch(const LaunchSite& site, const ::dim3& grid, const ::dim3& block, std::size_t smem) {
  auto bad = [&](const std::string& what) {
    throw EmuError("fastvq::emu: invalid launch configuration of " + std::string(site.kernel) + " at " +
                   base_name(site.file) + ":" + std::to_string(site.line) + ": " + what);
  };
  const std::uint64_t threads = std::uint64_t{block.x} * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0) bad("block " + xyz(block) + " has a zero dimension");
  if (block.x > 1024 || block.y > 1024 || block.z > 64) bad("block " + xyz(block) + " exceeds (1024, 1024, 64)");
  if (threads > kMaxThreadsPerBlock) {
    bad("block " + xyz(block) + " has " + std::to_string(threads) + " threads, at most 1024");
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) bad("grid " + xyz(grid) + " has a zero dimension");
  if (grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    bad("grid " + xyz(grid) + " exceeds (2^31-1, 65535, 65535)");
  }
  if (smem > kMaxDynamicSmemBytes) {
    bad(std::to_string(smem) + " bytes of dynamic shared memory, at most " + std::to_string(kMaxDynamicSmemBytes));
  }
}

/// Runs a grid. body(body_arg) runs the kernel for the current thread.
inline void run_launch(const LaunchSite& site, const ::dim3& grid, const ::dim3& block_dim, std::size_t smem_bytes,
                       FiberEntry body, void* body_arg) {
  if (tls.thread != nullptr) {
    throw EmuError(std::string("fastvq::emu: ") + site.kernel + " launched at " + base_name(site.file) + ":" +
                   std::to_string(site.line) + " from inside a kernel: dynamic parallelism is not supported");
  }
  const Config cfg = config();
  check_launch(site, grid, block_dim, smem_bytes);

  Runtime& rt = runtime();
  const std::lock_guard<std::mutex> launch_lock(rt.launch_mutex);
  if (cfg.mode == Mode::kFibers) install_stack_overflow_reporter();
  RunningInfo& info = running_info();
  struct SiteScope {
    RunningInfo& info;
    SiteScope(RunningInfo& i, const LaunchSite* s) : info(i) { info.site.store(s, std::memory_order_relaxed); }
    ~SiteScope() { info.site.store(nullptr, std::memory_order_relaxed); }
  } site_scope(info, &site);
  const WatchdogScope watchdog(cfg.watchdog_s);

  Block b;
  b.init(site, grid, block_dim, cfg);
  b.body = body;
  b.body_arg = body_arg;
  b.fibers = &rt.fibers;
  // Dynamic shared memory: exactly smem_bytes (AddressSanitizer sees any access past the end),
  // 128-byte aligned, refilled with a 0xff pattern for every block (uninitialised reads show up as NaN/-1).
  struct SmemDeleter {
    void operator()(unsigned char* p) const { ::operator delete[](p, std::align_val_t{kDynamicSmemAlign}); }
  };
  const std::unique_ptr<unsigned char[], SmemDeleter> smem(
      static_cast<unsigned char*>(::operator new[](smem_bytes, std::align_val_t{kDynamicSmemAlign})));
  b.dyn_smem = smem.get();
  b.smem_bytes = smem_bytes;

  struct TlsScope {
    explicit TlsScope(Block* b) { tls.block = b; }
    ~TlsScope() { tls.block = nullptr; }
  } tls_scope(&b);
  ::gridDim = grid;
  ::blockDim = block_dim;

  const std::uint64_t nblocks = std::uint64_t{grid.x} * grid.y * grid.z;
  const BlockOrder order(cfg.schedule, cfg.seed, nblocks);
  for (std::uint64_t k = 0; k < nblocks && !b.failed; ++k) {
    const std::uint64_t lin = order(k);
    const ::uint3 bidx{static_cast<unsigned>(lin % grid.x), static_cast<unsigned>(lin / grid.x % grid.y),
                       static_cast<unsigned>(lin / (std::uint64_t{grid.x} * grid.y))};
    b.reset(bidx);
    if (smem_bytes) std::memset(b.dyn_smem, kDynamicSmemFill, smem_bytes);
    ::blockIdx = bidx;
    info.bx.store(bidx.x, std::memory_order_relaxed);
    info.by.store(bidx.y, std::memory_order_relaxed);
    info.bz.store(bidx.z, std::memory_order_relaxed);
    watchdog_tick();
    if (cfg.mode == Mode::kFibers) {
      rt.fibers.run_block(b);
    } else {
      rt.pool.run_block(b);
    }
  }
  if (b.failed) throw EmuError(b.error);
}

/// FASTVQ_LAUNCH_KERNEL(kernel, grid, block, smem, stream)(args...) under the emulator: converts the
/// arguments to the kernel's parameter types once (as a launch copies them to the device), and runs
/// the kernel on a copy of them in every thread.
template <typename... P>
class Launcher {
 public:
  using Kernel = void (*)(P...);

  template <typename Stream>
  Launcher(const LaunchSite& site, Kernel kernel, const ::dim3& grid, const ::dim3& block, std::size_t smem,
           const Stream& /*stream: ignored, the CPU runs launches in order*/)
      : site_(site), kernel_(kernel), grid_(grid), block_(block), smem_(smem) {}

  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "FASTVQ_LAUNCH_KERNEL: wrong number of kernel arguments");
    Payload payload{kernel_, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
    run_launch(site_, grid_, block_, smem_, &Launcher::run_thread, &payload);
  }

 private:
  struct Payload {
    Kernel kernel;
    std::tuple<std::decay_t<P>...> args;
  };

  static void run_thread(void* p) {
    Payload& payload = *static_cast<Payload*>(p);
    std::apply(payload.kernel, payload.args);  // by-value parameters: every thread gets its own copies
  }

  LaunchSite site_;
  Kernel kernel_;
  ::dim3 grid_, block_;
  std::size_t smem_;
};

template <typename Stream, typename... P>
Launcher<P...> make_launcher(const LaunchSite& site, void (*kernel)(P...), const ::dim3& grid, const ::dim3& block,
                             std::size_t smem, const Stream& stream) {
  return Launcher<P...>(site, kernel, grid, block, smem, stream);
}

}  // namespace detail
}  // namespace emu
}  // namespace fastvq
