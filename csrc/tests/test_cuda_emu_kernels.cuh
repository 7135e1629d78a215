// Kernels of the CUDA emulator self-tests (test_cuda_emu*.cpp). Plain CUDA C++ that compiles with nvcc
// too (CMake's test_cuda_emu_nvcc_compile checks that), so these are real kernels, not emulator-only
// code. Host launchers use FASTVQ_LAUNCH_KERNEL with stream 0.
//
// The first group is correct and must give the same result under every schedule and mode. The
// "planted bugs" group is wrong on purpose; each comment says what the emulator must report.
#pragma once

#include "cuda_emu/cuda_emu.h"

#if FASTVQ_CUDA_EMU
#include <thread>
#endif

namespace emu_test {

constexpr unsigned kFull = 0xffffffffu;

// ---- correct kernels ----------------------------------------------------------------------------------

// Sum of each block's 256 elements: tree reduction in static shared memory, a barrier per level.
__global__ void __launch_bounds__(256) block_sum_kernel(const int* in, int n, int* out) {
  __shared__ int s[256];
  const int tid = threadIdx.x;
  const int i = blockIdx.x * blockDim.x + tid;
  s[tid] = i < n ? in[i] : 0;
  __syncthreads();
  for (int off = blockDim.x / 2; off > 0; off >>= 1) {
    if (tid < off) s[tid] += s[tid + off];
    __syncthreads();
  }
  if (tid == 0) out[blockIdx.x] = s[0];
}

// Warp shuffles within segments of `width` lanes:
//   xor_out  butterfly all-reduce: every lane gets its segment's sum
//   down_out __shfl_down_sync reduction: lane 0 of a segment gets the segment's sum
//   idx_out  __shfl_sync from source lane 35: taken modulo width, within the lane's own segment
//   up_out   __shfl_up_sync inclusive scan within the segment
__global__ void segment_shuffles_kernel(const int* in, int width, int* xor_out, int* down_out, int* idx_out,
                                        int* up_out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const int seg_lane = (threadIdx.x % 32) % width;
  const int v = in[i];
  int x = v;
  for (int m = width / 2; m > 0; m >>= 1) x += __shfl_xor_sync(kFull, x, m, width);
  xor_out[i] = x;
  int d = v;
  for (int off = width / 2; off > 0; off >>= 1) d += __shfl_down_sync(kFull, d, off, width);
  down_out[i] = d;
  idx_out[i] = __shfl_sync(kFull, v, 35, width);
  int u = v;
  for (int off = 1; off < width; off <<= 1) {
    const int o = __shfl_up_sync(kFull, u, off, width);
    if (seg_lane >= off) u += o;
  }
  up_out[i] = u;
}

// Votes and block-wide predicate reductions, per thread:
//   out[5 i + 0] ballot of (in > 0) in the warp, [1] any, [2] all, [3] __syncthreads_count(in > 0),
//   [4] __syncthreads_and(in > 0) | __syncthreads_or(in > 0) << 1
__global__ void votes_kernel(const int* in, unsigned* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const bool p = in[i] > 0;
  out[5 * i + 0] = __ballot_sync(kFull, p);
  out[5 * i + 1] = __any_sync(kFull, p);
  out[5 * i + 2] = __all_sync(kFull, p);
  out[5 * i + 3] = __syncthreads_count(p);
  const int a = __syncthreads_and(p);
  const int o = __syncthreads_or(p);
  out[5 * i + 4] = static_cast<unsigned>(a | (o << 1));
}

// sm_70/sm_80 warp intrinsics, per thread: out[4 i + 0] __match_any_sync(in % 4), [1] __reduce_add_sync,
// [2] __reduce_min_sync, [3] __reduce_max_sync (signed).
__global__ void warp_intrinsics_kernel(const int* in, int* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const int v = in[i];
  out[4 * i + 0] = static_cast<int>(__match_any_sync(kFull, v & 3));
  out[4 * i + 1] = __reduce_add_sync(kFull, v);
  out[4 * i + 2] = __reduce_min_sync(kFull, v);
  out[4 * i + 3] = __reduce_max_sync(kFull, v);
}

// Inclusive scan of a block of any size (the last warp may be partial): warp scans with
// __shfl_up_sync over the lanes that exist, warp totals through shared memory, a scan of the totals by
// warp 0. Also the warp's sum by __reduce_add_sync over the same lanes.
__global__ void block_scan_kernel(const int* in, int* out, int* warp_sum) {
  __shared__ int totals[32];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int nwarps = (blockDim.x + 31) / 32;
  const int i = blockIdx.x * blockDim.x + tid;
  const unsigned active = __ballot_sync(kFull, true);  // the lanes of this warp that exist
  int v = in[i];
  warp_sum[i] = __reduce_add_sync(active, v);
  for (int off = 1; off < 32; off <<= 1) {
    const int o = __shfl_up_sync(active, v, off);
    if (lane >= off) v += o;
  }
  if (lane == 31 - __clz(static_cast<int>(active))) totals[warp] = v;
  __syncthreads();
  if (warp == 0) {
    int t = lane < nwarps ? totals[lane] : 0;
    for (int off = 1; off < 32; off <<= 1) {
      const int o = __shfl_up_sync(kFull, t, off);
      if (lane >= off) t += o;
    }
    if (lane < nwarps) totals[lane] = t;
  }
  __syncthreads();
  if (warp > 0) v += totals[warp - 1];
  out[i] = v;
}

// Disjoint half-warp groups, each with its own __syncwarp mask and call site (legal since Volta):
// exchange through shared memory with the neighbour lane.
__global__ void half_warp_exchange_kernel(const int* in, int* out) {
  __shared__ int s[256];
  const int tid = threadIdx.x, lane = tid % 32;
  const int i = blockIdx.x * blockDim.x + tid;
  s[tid] = in[i];
  if (lane < 16) {
    __syncwarp(0x0000ffffu);
  } else {
    __syncwarp(0xffff0000u);
  }
  out[i] = s[tid ^ 1];
}

// Atomics from every thread of every block. Counters: [0] int add, [1] unsigned add, [2] CAS-loop
// increment, [3] int max, [4] int min, [5] unsigned max, [6] atomicInc modulo 10, [7] atomicExch
// (some thread id), [8] atomicSub, [9] atomicOr of bits, [10] atomicAnd.
__global__ void atomics_kernel(int* ic, unsigned* uc, unsigned long long* ull, float* f, double* d) {
  const int gid = blockIdx.x * blockDim.x + threadIdx.x;
  atomicAdd(&ic[0], gid % 7 - 3);
  atomicAdd(&uc[1], 1u);
  int old = atomicAdd(&ic[2], 0);
  for (;;) {
    const int assumed = old;
    old = atomicCAS(&ic[2], assumed, assumed + 1);
    if (old == assumed) break;
  }
  atomicMax(&ic[3], gid * 37 % 1001);
  atomicMin(&ic[4], 5000 - gid * 37 % 1001);
  atomicMax(&uc[5], static_cast<unsigned>(gid) * 2654435761u);
  atomicInc(&uc[6], 9u);
  atomicExch(&ic[7], gid);
  atomicSub(&ic[8], 2);
  atomicOr(&uc[9], 1u << (gid % 32));
  atomicAnd(&uc[10], ~(1u << (gid % 31)));
  atomicAdd(ull, static_cast<unsigned long long>(gid) << 20);
  atomicAdd(f, 0.5f);
  atomicAdd(d, 0.25);
}

// Dynamic shared memory: reverse each block's elements.
__global__ void reverse_kernel(const float* in, float* out) {
  FASTVQ_DYNAMIC_SHARED(float, buf);
  const int n = blockDim.x, tid = threadIdx.x, base = blockIdx.x * n;
  buf[tid] = in[base + tid];
  __syncthreads();
  out[base + tid] = buf[n - 1 - tid];
}

// Dynamic shared memory with another element type in the same translation unit; reads it before
// writing, to see the emulator's fill pattern (undefined contents on a GPU).
__global__ void dynamic_fill_kernel(int* out) {
  FASTVQ_DYNAMIC_SHARED(int, words);
  const int tid = threadIdx.x;
  out[blockIdx.x * blockDim.x + tid] = words[tid];
  __syncthreads();
  words[tid] = tid;
}

// A kernel template with a comma in its template arguments.
template <typename T, int kOffset>
__global__ void axpb_kernel(const T* x, T* y, T a, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = a * x[i] + T(kOffset);
}

// 3-D grid and block: every thread writes its coordinates to its own slot and counts the writes.
__global__ void coords_kernel(unsigned* out, unsigned* writes) {
  const unsigned nthreads = blockDim.x * blockDim.y * blockDim.z;
  const unsigned block = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  const unsigned thread = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
  const unsigned slot = block * nthreads + thread;
  out[4 * slot + 0] = blockIdx.x | (blockIdx.y << 8) | (blockIdx.z << 16);
  out[4 * slot + 1] = threadIdx.x | (threadIdx.y << 8) | (threadIdx.z << 16);
  out[4 * slot + 2] = blockDim.x | (blockDim.y << 8) | (blockDim.z << 16);
  out[4 * slot + 3] = gridDim.x | (gridDim.y << 8) | (gridDim.z << 16);
  atomicAdd(&writes[slot], 1u);
  __syncthreads();  // a barrier with a partial last warp (60 threads)
}

// Shuffles of 8-byte and 2-byte types: a butterfly sum, a broadcast from lane 5, a shift down, a
// reversal of __half values.
__global__ void wide_shuffles_kernel(double* d_out, long long* ll_out, unsigned long long* ull_out, float* h_out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x % 32;
  double d = 0.5 * lane + 1e10;
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) d += __shfl_xor_sync(kFull, d, m);
  d_out[i] = d;
  ll_out[i] = __shfl_sync(kFull, (static_cast<long long>(lane) << 40) | lane, 5);
  ull_out[i] = __shfl_down_sync(kFull, (static_cast<unsigned long long>(lane) << 33) | 1u, 1);
  h_out[i] = __half2float(__shfl_sync(kFull, __float2half(static_cast<float>(lane)), 31 - lane));
}

// ---- planted bugs ---------------------------------------------------------------------------------

// Missing barrier: thread 0 sums what the others wrote without waiting for them. Wrong under forward
// and shuffled schedules (thread 0 runs before most writers); reverse runs thread 0 last and hides it.
// In threads mode it is a data race (ThreadSanitizer).
__global__ void missing_barrier_kernel(const int* in, int* out) {
  __shared__ int s[256];
  s[threadIdx.x] = in[threadIdx.x];
  // BUG: __syncthreads() missing here.
  if (threadIdx.x == 0) {
    int sum = 0;
    for (unsigned k = 0; k < blockDim.x; ++k) sum += s[k];
    out[blockIdx.x] = sum;
  }
}

// Missing __syncwarp: lanes read their neighbour's shared slot without synchronising the warp.
__global__ void missing_syncwarp_kernel(const int* in, int* out) {
  __shared__ int s[32];
  const int lane = threadIdx.x;
  s[lane] = in[lane];
  // BUG: __syncwarp() missing here.
  out[lane] = s[lane ^ 1];
}

// Divergent barrier: two __syncthreads() calls, each reached by half of the block.
__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 128) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

// A barrier inside a branch that only some threads take: the others skip it and exit.
__global__ void barrier_in_branch_kernel(int* out) {
  if (threadIdx.x < 100) {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

// Deadlock: half of each warp waits in __syncwarp() for lanes that wait in __syncthreads().
__global__ void syncwarp_deadlock_kernel(int* out) {
  if (threadIdx.x % 32 < 16) __syncwarp();
  __syncthreads();
  out[threadIdx.x] = 1;
}

// A lane calls a shuffle with a mask that does not name it.
__global__ void lane_not_in_mask_kernel(int* out) {
  out[threadIdx.x] = __shfl_sync(0x0000ffffu, static_cast<int>(threadIdx.x), 0);
}

// A shuffle reads a lane outside its mask.
__global__ void source_not_in_mask_kernel(int* out) {
  if (threadIdx.x % 32 < 16) out[threadIdx.x] = __shfl_sync(0x0000ffffu, static_cast<int>(threadIdx.x), 20);
}

// A shuffle reads a lane that has exited.
__global__ void source_exited_kernel(int* out) {
  if (threadIdx.x % 32 >= 16) return;
  out[threadIdx.x] = __shfl_down_sync(kFull, static_cast<int>(threadIdx.x), 8);
}

// The lanes of a warp call the same shuffle from two different call sites.
__global__ void collective_sites_kernel(int* out) {
  int v;
  if (threadIdx.x % 32 < 16) {
    v = __shfl_sync(kFull, static_cast<int>(threadIdx.x), 0);
  } else {
    v = __shfl_sync(kFull, static_cast<int>(threadIdx.x), 0);
  }
  out[threadIdx.x] = v;
}

// The lanes of a warp disagree on the mask: lanes 0-3 shuffle, lane 3 names lanes 0-7 (4-7 exit).
__global__ void mask_mismatch_kernel(int* out) {
  const unsigned mask = threadIdx.x == 3 ? 0x000000ffu : 0x0000000fu;
  if (threadIdx.x < 4) out[threadIdx.x] = __shfl_xor_sync(mask, static_cast<int>(threadIdx.x), 1);
}

// A shuffle width that is not a power of two.
__global__ void bad_width_kernel(int* out) {
  out[threadIdx.x] = __shfl_xor_sync(kFull, static_cast<int>(threadIdx.x), 1, 12);
}

// A block reads what another block wrote, with no ordering between blocks: right only when the blocks
// run in increasing order (forward); reverse and shuffled expose it.
__global__ void chain_kernel(int* out) {
  if (threadIdx.x == 0) out[blockIdx.x] = blockIdx.x == 0 ? 1 : out[blockIdx.x - 1] + 1;
}

// __trap() in one thread.
__global__ void trap_kernel(int* out) {
  if (threadIdx.x == 7) __trap();
  __syncthreads();
  out[threadIdx.x] = 1;
}

// Out-of-bounds static shared memory write (thread 255 writes s[256]) through an out-of-line helper,
// which cannot see the array's bounds (so UndefinedBehaviorSanitizer cannot either): AddressSanitizer.
__device__ __attribute__((noinline)) void store_at(int* p, unsigned i, int v) { p[i] = v; }
__global__ void shared_oob_kernel(const int* in, int* out) {
  __shared__ int s[256];
  store_at(s, threadIdx.x + 1, in[threadIdx.x]);
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}

// Out-of-bounds dynamic shared memory read (one element past smem_bytes): AddressSanitizer.
__global__ void dynamic_oob_kernel(int* out) {
  FASTVQ_DYNAMIC_SHARED(int, words);
  words[threadIdx.x] = static_cast<int>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = words[threadIdx.x + 1];
}

// Unbounded recursion: overflows the thread's stack (the fiber stack's guard region).
__device__ int recurse_forever(volatile int* sink, int depth) {
  if (*sink == -12345) return 0;  // never true: keeps the recursion unprovably unbounded for -Winfinite-recursion
  volatile char frame[512];
  frame[depth % 512] = static_cast<char>(depth);
  const int r = recurse_forever(sink, depth + 1);
  *sink = frame[(depth + r) % 512];
  return r + 1;
}
__global__ void stack_overflow_kernel(int* out) { out[threadIdx.x] = recurse_forever(out, 0); }

// The planted data race of the ThreadSanitizer self-test (threads mode only: it spin-waits, which fibers
// cannot run). Thread 1 writes s[1] and thread 0 reads it with no barrier between them: a data race by the
// CUDA and C++ memory models. ThreadSanitizer reports a race only when the two accesses are unordered by
// happens-before in the run it observes; left to the OS scheduler, thread 0 may start after thread 1 has
// finished, and the emulator's own lock hand-off then orders them (a busy machine did exactly that). So the
// two threads rendezvous through relaxed atomics (which ThreadSanitizer, like the memory model, treats as no
// synchronisation): thread 1 writes only once thread 0 is running, and thread 0 reads only after the write.
// The racy pair then exists in every run, whatever the load and scheduling.
// Lets the other OS thread run while one spins (threads mode on a busy machine); nothing on a GPU.
__device__ inline void spin_pause() {
#if FASTVQ_CUDA_EMU
  std::this_thread::yield();
#endif
}

__global__ void planted_race_kernel(const int* in, int* out, int* rendezvous) {
  __shared__ int s[2];
  if (threadIdx.x == 1) {
    while (atomicAdd(&rendezvous[0], 0) == 0) spin_pause();  // thread 0 is running
    s[1] = in[1];                                                          // the racy write
    atomicExch(&rendezvous[1], 1);
  } else if (threadIdx.x == 0) {
    atomicExch(&rendezvous[0], 1);
    while (atomicAdd(&rendezvous[1], 0) == 0) spin_pause();  // thread 1 has written
    // BUG: no __syncthreads() between thread 1's write and this read.
    out[0] = s[1];  // the racy read
  }
}

// Spin-wait on a flag that another block would set: never ends when blocks run one at a time (and is
// not guaranteed to end on a GPU either). The emulator's watchdog must catch it.
__global__ void spin_wait_kernel(volatile int* flag) {
  if (blockIdx.x == 0) {
    while (*flag == 0) {
    }
  } else if (threadIdx.x == 0) {
    *flag = 1;
  }
}

// ---- host launchers -------------------------------------------------------------------------------

inline void launch_block_sum(const int* in, int n, int* out) {
  FASTVQ_LAUNCH_KERNEL(block_sum_kernel, (n + 255) / 256, 256, 0, 0, in, n, out);
}
inline void launch_segment_shuffles(const int* in, int n, int width, int* xo, int* dn, int* ix, int* up) {
  FASTVQ_LAUNCH_KERNEL(segment_shuffles_kernel, n / 128, 128, 0, 0, in, width, xo, dn, ix, up);
}
inline void launch_votes(const int* in, int n, unsigned* out) {
  FASTVQ_LAUNCH_KERNEL(votes_kernel, n / 96, 96, 0, 0, in, out);
}
inline void launch_warp_intrinsics(const int* in, int n, int* out) {
  FASTVQ_LAUNCH_KERNEL(warp_intrinsics_kernel, n / 64, 64, 0, 0, in, out);
}
inline void launch_block_scan(const int* in, int blocks, int threads, int* out, int* warp_sum) {
  FASTVQ_LAUNCH_KERNEL(block_scan_kernel, blocks, threads, 0, 0, in, out, warp_sum);
}
inline void launch_half_warp_exchange(const int* in, int n, int* out) {
  FASTVQ_LAUNCH_KERNEL(half_warp_exchange_kernel, n / 256, 256, 0, 0, in, out);
}
inline void launch_atomics(int blocks, int threads, int* ic, unsigned* uc, unsigned long long* ull, float* f,
                           double* d) {
  FASTVQ_LAUNCH_KERNEL(atomics_kernel, blocks, threads, 0, 0, ic, uc, ull, f, d);
}
inline void launch_reverse(const float* in, float* out, int blocks, int threads) {
  FASTVQ_LAUNCH_KERNEL(reverse_kernel, blocks, threads, threads * sizeof(float), 0, in, out);
}
inline void launch_dynamic_fill(int* out, int blocks, int threads) {
  FASTVQ_LAUNCH_KERNEL(dynamic_fill_kernel, blocks, threads, threads * sizeof(int), 0, out);
}
inline void launch_axpb_float(const float* x, float* y, float a, int n) {
  FASTVQ_LAUNCH_KERNEL((axpb_kernel<float, 4>), (n + 127) / 128, 128, 0, 0, x, y, a, n);
}
inline void launch_axpb_double(const double* x, double* y, double a, int n) {
  FASTVQ_LAUNCH_KERNEL((axpb_kernel<double, -7>), (n + 63) / 64, 64, 0, 0, x, y, a, n);
}
inline void launch_coords(unsigned* out, unsigned* writes) {
  FASTVQ_LAUNCH_KERNEL(coords_kernel, dim3(3, 2, 2), dim3(4, 3, 5), 0, 0, out, writes);
}
inline void launch_wide_shuffles(double* d, long long* ll, unsigned long long* ull, float* h) {
  FASTVQ_LAUNCH_KERNEL(wide_shuffles_kernel, 2, 64, 0, 0, d, ll, ull, h);
}
inline void launch_missing_barrier(const int* in, int* out) {
  FASTVQ_LAUNCH_KERNEL(missing_barrier_kernel, 1, 256, 0, 0, in, out);
}
inline void launch_planted_race(const int* in, int* out, int* rendezvous) {
  FASTVQ_LAUNCH_KERNEL(planted_race_kernel, 1, 2, 0, 0, in, out, rendezvous);
}
inline void launch_missing_syncwarp(const int* in, int* out) {
  FASTVQ_LAUNCH_KERNEL(missing_syncwarp_kernel, 1, 32, 0, 0, in, out);
}
inline void launch_divergent_barrier(int* out) { FASTVQ_LAUNCH_KERNEL(divergent_barrier_kernel, 2, 256, 0, 0, out); }
inline void launch_barrier_in_branch(int* out) { FASTVQ_LAUNCH_KERNEL(barrier_in_branch_kernel, 2, 256, 0, 0, out); }
inline void launch_syncwarp_deadlock(int* out) { FASTVQ_LAUNCH_KERNEL(syncwarp_deadlock_kernel, 2, 256, 0, 0, out); }
inline void launch_lane_not_in_mask(int* out) { FASTVQ_LAUNCH_KERNEL(lane_not_in_mask_kernel, 1, 64, 0, 0, out); }
inline void launch_source_not_in_mask(int* out) { FASTVQ_LAUNCH_KERNEL(source_not_in_mask_kernel, 1, 64, 0, 0, out); }
inline void launch_source_exited(int* out) { FASTVQ_LAUNCH_KERNEL(source_exited_kernel, 1, 64, 0, 0, out); }
inline void launch_collective_sites(int* out) { FASTVQ_LAUNCH_KERNEL(collective_sites_kernel, 1, 64, 0, 0, out); }
inline void launch_mask_mismatch(int* out) { FASTVQ_LAUNCH_KERNEL(mask_mismatch_kernel, 1, 32, 0, 0, out); }
inline void launch_bad_width(int* out) { FASTVQ_LAUNCH_KERNEL(bad_width_kernel, 1, 32, 0, 0, out); }
inline void launch_chain(int* out, int blocks) { FASTVQ_LAUNCH_KERNEL(chain_kernel, blocks, 32, 0, 0, out); }
inline void launch_trap(int* out) { FASTVQ_LAUNCH_KERNEL(trap_kernel, 1, 64, 0, 0, out); }
inline void launch_shared_oob(const int* in, int* out) {
  FASTVQ_LAUNCH_KERNEL(shared_oob_kernel, 1, 256, 0, 0, in, out);
}
inline void launch_dynamic_oob(int* out) {
  FASTVQ_LAUNCH_KERNEL(dynamic_oob_kernel, 1, 64, 64 * sizeof(int), 0, out);
}
inline void launch_stack_overflow(int* out) { FASTVQ_LAUNCH_KERNEL(stack_overflow_kernel, 1, 32, 0, 0, out); }
inline void launch_spin_wait(int* flag) { FASTVQ_LAUNCH_KERNEL(spin_wait_kernel, 2, 32, 0, 0, flag); }

}  // namespace emu_test
