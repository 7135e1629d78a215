// CUDA emulator: the kernel language under g++. Barriers, warp collectives, atomics, memory fences,
// load/store hints and the math and bit intrinsics kernels typically use, with CUDA's names and
// signatures. Part of the header-only layer; include "cuda_emu/cuda_emu.h", not this file.
//
// Synchronising intrinsics are macros that capture __FILE__/__LINE__ (so the checker can name the call
// site) and forward to functions in fastvq::emu::detail; everything else is an ordinary inline function
// in the global namespace, as in CUDA. To add an intrinsic: a pure function goes into the "math and
// bit intrinsics" section; a new warp collective needs an Op (emu_runtime.h), its result in
// Block::complete(), and a wrapper here modelled on __ballot_sync.
#pragma once

#include <math.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "emu_runtime.h"

namespace fastvq {
namespace emu {
namespace detail {

// ---- barriers ----------------------------------------------------------------------------------------

inline unsigned barrier(Op op, const Site* site, bool pred) {
  ThreadCtx& t = kernel_thread(op_name(op));
  if (!sync_point(t, [&](Block& b) { b.arrive_barrier(t, op, site, pred); })) return pred ? 1u : 0u;
  return static_cast<unsigned>(t.out);
}

// ---- warp collectives --------------------------------------------------------------------------------

template <std::size_t N>
struct UintOfSize;
template <>
struct UintOfSize<1> {
  using type = std::uint8_t;
};
template <>
struct UintOfSize<2> {
  using type = std::uint16_t;
};
template <>
struct UintOfSize<4> {
  using type = std::uint32_t;
};
template <>
struct UintOfSize<8> {
  using type = std::uint64_t;
};

template <typename T>
inline std::uint64_t to_bits(const T& v) {
  static_assert(std::is_trivially_copyable<T>::value, "warp shuffles need a trivially copyable type");
  static_assert(sizeof(T) == 1 || sizeof(T) == 2 || sizeof(T) == 4 || sizeof(T) == 8,
                "warp shuffles move 1, 2, 4 or 8 bytes: shuffle the members of a larger type one by one");
  return __builtin_bit_cast(typename UintOfSize<sizeof(T)>::type, v);
}

template <typename T>
inline T from_bits(std::uint64_t u) {
  return __builtin_bit_cast(T, static_cast<typename UintOfSize<sizeof(T)>::type>(u));
}

/// One warp collective by the current thread: returns its result bits (its own input bits when it
/// could not synchronise, see sync_point).
inline std::uint64_t warp_op(Op op, const Site* site, unsigned mask, std::uint64_t in, int arg = 0,
                             int width = 32, bool* pred = nullptr) {
  ThreadCtx& t = kernel_thread(op_name(op));
  if (!sync_point(t, [&](Block& b) { b.arrive_warp(t, op, site, mask, in, arg, width); })) return in;
  if (pred) *pred = t.pred;
  return t.out;
}

template <typename T>
inline T shfl(Op op, const Site* site, unsigned mask, T var, int arg, int width) {
  return from_bits<T>(warp_op(op, site, mask, to_bits(var), arg, width));
}

template <typename T>
inline T shfl_sync(const Site* site, unsigned mask, T var, int src_lane, int width = warpSize) {
  return shfl(Op::kShfl, site, mask, var, src_lane, width);
}
template <typename T>
inline T shfl_up_sync(const Site* site, unsigned mask, T var, unsigned delta, int width = warpSize) {
  return shfl(Op::kShflUp, site, mask, var, static_cast<int>(delta), width);
}
template <typename T>
inline T shfl_down_sync(const Site* site, unsigned mask, T var, unsigned delta, int width = warpSize) {
  return shfl(Op::kShflDown, site, mask, var, static_cast<int>(delta), width);
}
template <typename T>
inline T shfl_xor_sync(const Site* site, unsigned mask, T var, int lane_mask, int width = warpSize) {
  return shfl(Op::kShflXor, site, mask, var, lane_mask, width);
}

/// __syncwarp(mask = full): a callable so that the macro works with and without an argument.
struct Syncwarp {
  const Site* site;
  void operator()(unsigned mask = 0xffffffffu) const { warp_op(Op::kSyncwarp, site, mask, 0); }
};

template <typename T>
inline unsigned match_any_sync(const Site* site, unsigned mask, T value) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "__match_any_sync takes a 32- or 64-bit value");
  return static_cast<unsigned>(warp_op(Op::kMatchAny, site, mask, to_bits(value)));
}
template <typename T>
inline unsigned match_all_sync(const Site* site, unsigned mask, T value, int* pred) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "__match_all_sync takes a 32- or 64-bit value");
  bool p = false;
  const unsigned r = static_cast<unsigned>(warp_op(Op::kMatchAll, site, mask, to_bits(value), 0, 32, &p));
  *pred = p ? 1 : 0;
  return r;
}

inline unsigned reduce_min_sync(const Site* site, unsigned mask, unsigned v) {
  return static_cast<unsigned>(warp_op(Op::kReduceMinU, site, mask, v));
}
inline int reduce_min_sync(const Site* site, unsigned mask, int v) {
  return static_cast<int>(warp_op(Op::kReduceMinI, site, mask, static_cast<std::uint32_t>(v)));
}
inline unsigned reduce_max_sync(const Site* site, unsigned mask, unsigned v) {
  return static_cast<unsigned>(warp_op(Op::kReduceMaxU, site, mask, v));
}
inline int reduce_max_sync(const Site* site, unsigned mask, int v) {
  return static_cast<int>(warp_op(Op::kReduceMaxI, site, mask, static_cast<std::uint32_t>(v)));
}
inline unsigned reduce_add_sync(const Site* site, unsigned mask, unsigned v) {
  return static_cast<unsigned>(warp_op(Op::kReduceAdd, site, mask, v));
}
inline int reduce_add_sync(const Site* site, unsigned mask, int v) {
  return static_cast<int>(warp_op(Op::kReduceAdd, site, mask, static_cast<std::uint32_t>(v)));
}

// ---- atomics -----------------------------------------------------------------------------------------
// GCC/Clang __atomic builtins, relaxed like CUDA's atomicXxx (same code in C++17 and C++20, and
// understood by ThreadSanitizer). Read-modify-writes without a native instruction are CAS loops.

template <typename T, typename F>
inline T atomic_update(T* address, F f) {
  T old;
  __atomic_load(address, &old, __ATOMIC_RELAXED);
  T desired = f(old);
  while (!__atomic_compare_exchange(address, &old, &desired, /*weak=*/true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    desired = f(old);
  }
  return old;
}

[[noreturn]] inline void trap(const char* what, const Site* site) { throw KernelTrap{what, site}; }

template <typename T>
inline T* dynamic_shared() {
  Block* b = tls.block;
  if (b == nullptr) throw EmuError("fastvq::emu: FASTVQ_DYNAMIC_SHARED used outside an emulated kernel");
  static_assert(alignof(T) <= kDynamicSmemAlign, "dynamic shared memory is 128-byte aligned");
  return reinterpret_cast<T*>(b->dyn_smem);
}

}  // namespace detail
}  // namespace emu
}  // namespace fastvq

// ---- the kernel language: synchronisation (macros capture the call site) ------------------------------

// A pointer to a static Site unique to this macro expansion (see Site in emu_runtime.h).
#define FASTVQ_EMU_SITE()                                                   \
  ([]() -> const ::fastvq::emu::detail::Site* {                           \
    static const ::fastvq::emu::detail::Site fastvq_emu_site{__FILE__, __LINE__}; \
    return &fastvq_emu_site;                                               \
  }())

#define __syncthreads() \
  ((void)::fastvq::emu::detail::barrier(::fastvq::emu::detail::Op::kSyncthreads, FASTVQ_EMU_SITE(), false))
#define FASTVQ_EMU_BARRIER_PRED(op, pred) \
  (static_cast<int>(::fastvq::emu::detail::barrier(::fastvq::emu::detail::Op::op, FASTVQ_EMU_SITE(), (pred) != 0)))
#define __syncthreads_count(pred) FASTVQ_EMU_BARRIER_PRED(kSyncthreadsCount, pred)
#define __syncthreads_and(pred) FASTVQ_EMU_BARRIER_PRED(kSyncthreadsAnd, pred)
#define __syncthreads_or(pred) FASTVQ_EMU_BARRIER_PRED(kSyncthreadsOr, pred)
#define __syncwarp(...) (::fastvq::emu::detail::Syncwarp{FASTVQ_EMU_SITE()}(__VA_ARGS__))

#define __shfl_sync(...) ::fastvq::emu::detail::shfl_sync(FASTVQ_EMU_SITE(), __VA_ARGS__)
#define __shfl_up_sync(...) ::fastvq::emu::detail::shfl_up_sync(FASTVQ_EMU_SITE(), __VA_ARGS__)
#define __shfl_down_sync(...) ::fastvq::emu::detail::shfl_down_sync(FASTVQ_EMU_SITE(), __VA_ARGS__)
#define __shfl_xor_sync(...) ::fastvq::emu::detail::shfl_xor_sync(FASTVQ_EMU_SITE(), __VA_ARGS__)
#define __ballot_sync(mask, pred)                                                                          \
  (static_cast<unsigned>(::fastvq::emu::detail::warp_op(::fastvq::emu::detail::Op::kBallot, FASTVQ_EMU_SITE(), \
                                                        (mask), (pred) != 0)))
#define __any_sync(mask, pred)                                                                          \
  (static_cast<int>(::fastvq::emu::detail::warp_op(::fastvq::emu::detail::Op::kAny, FASTVQ_EMU_SITE(), (mask), \
                                                   (pred) != 0)))
#define __all_sync(mask, pred)                                                                          \
  (static_cast<int>(::fastvq::emu::detail::warp_op(::fastvq::emu::detail::Op::kAll, FASTVQ_EMU_SITE(), (mask), \
                                                   (pred) != 0)))
#define __match_any_sync(...) ::fastvq::emu::detail::match_any_sync(FASTVQ_EMU_SITE(), __VA_ARGS__)
#define __match_all_sync(...) ::fastvq::emu::detail::match_all_sync(FASTVQ_EMU_SITE(), __VA_ARGS__)
#define __reduce_add_sync(...) ::fastvq::emu::detail::reduce_add_sync(FASTVQ_EMU_SITE(), __VA_ARGS__)
#define __reduce_min_sync(...) ::fastvq::emu::detail::reduce_min_sync(FASTVQ_EMU_SITE(), __VA_ARGS__)
#define __reduce_max_sync(...) ::fastvq::emu::detail::reduce_max_sync(FASTVQ_EMU_SITE(), __VA_ARGS__)
#define __reduce_and_sync(mask, v)                                                                         \
  (static_cast<unsigned>(::fastvq::emu::detail::warp_op(::fastvq::emu::detail::Op::kReduceAnd, FASTVQ_EMU_SITE(), \
                                                        (mask), static_cast<unsigned>(v))))
#define __reduce_or_sync(mask, v)                                                                         \
  (static_cast<unsigned>(::fastvq::emu::detail::warp_op(::fastvq::emu::detail::Op::kReduceOr, FASTVQ_EMU_SITE(), \
                                                        (mask), static_cast<unsigned>(v))))
#define __reduce_xor_sync(mask, v)                                                                         \
  (static_cast<unsigned>(::fastvq::emu::detail::warp_op(::fastvq::emu::detail::Op::kReduceXor, FASTVQ_EMU_SITE(), \
                                                        (mask), static_cast<unsigned>(v))))

/// Ends the block with an EmuError naming the call site (CUDA: aborts the kernel, the context is lost).
#define __trap() ::fastvq::emu::detail::trap("__trap()", FASTVQ_EMU_SITE())
#define __brkpt() ::fastvq::emu::detail::trap("__brkpt()", FASTVQ_EMU_SITE())

// ---- memory fences: the emulated threads are OS threads or fibers of one OS thread ---------------------

inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ---- atomics (global and shared memory are ordinary memory here) ------------------------------------

#define FASTVQ_EMU_ATOMIC_FETCH(name, builtin, T) \
  inline T name(T* address, T val) { return builtin(address, val, __ATOMIC_RELAXED); }
FASTVQ_EMU_ATOMIC_FETCH(atomicAdd, __atomic_fetch_add, int)
FASTVQ_EMU_ATOMIC_FETCH(atomicAdd, __atomic_fetch_add, unsigned int)
FASTVQ_EMU_ATOMIC_FETCH(atomicAdd, __atomic_fetch_add, unsigned long long)
FASTVQ_EMU_ATOMIC_FETCH(atomicSub, __atomic_fetch_sub, int)
FASTVQ_EMU_ATOMIC_FETCH(atomicSub, __atomic_fetch_sub, unsigned int)
FASTVQ_EMU_ATOMIC_FETCH(atomicAnd, __atomic_fetch_and, int)
FASTVQ_EMU_ATOMIC_FETCH(atomicAnd, __atomic_fetch_and, unsigned int)
FASTVQ_EMU_ATOMIC_FETCH(atomicAnd, __atomic_fetch_and, unsigned long long)
FASTVQ_EMU_ATOMIC_FETCH(atomicOr, __atomic_fetch_or, int)
FASTVQ_EMU_ATOMIC_FETCH(atomicOr, __atomic_fetch_or, unsigned int)
FASTVQ_EMU_ATOMIC_FETCH(atomicOr, __atomic_fetch_or, unsigned long long)
FASTVQ_EMU_ATOMIC_FETCH(atomicXor, __atomic_fetch_xor, int)
FASTVQ_EMU_ATOMIC_FETCH(atomicXor, __atomic_fetch_xor, unsigned int)
FASTVQ_EMU_ATOMIC_FETCH(atomicXor, __atomic_fetch_xor, unsigned long long)
#undef FASTVQ_EMU_ATOMIC_FETCH

inline float atomicAdd(float* address, float val) {
  return ::fastvq::emu::detail::atomic_update(address, [val](float old) { return old + val; });
}
inline double atomicAdd(double* address, double val) {
  return ::fastvq::emu::detail::atomic_update(address, [val](double old) { return old + val; });
}

// Half precision: the sum is computed in fp32 and rounded once to the 16-bit type (as the hardware does
// up to double rounding on very different magnitudes).
inline __half atomicAdd(__half* address, __half val) {
  return ::fastvq::emu::detail::atomic_update(
      address, [val](__half old) { return __float2half(__half2float(old) + __half2float(val)); });
}
inline __nv_bfloat16 atomicAdd(__nv_bfloat16* address, __nv_bfloat16 val) {
  return ::fastvq::emu::detail::atomic_update(
      address, [val](__nv_bfloat16 old) { return __float2bfloat16(__bfloat162float(old) + __bfloat162float(val)); });
}

#define FASTVQ_EMU_ATOMIC_EXCH(T) \
  inline T atomicExch(T* address, T val) { return __atomic_exchange_n(address, val, __ATOMIC_RELAXED); }
FASTVQ_EMU_ATOMIC_EXCH(int)
FASTVQ_EMU_ATOMIC_EXCH(unsigned int)
FASTVQ_EMU_ATOMIC_EXCH(unsigned long long)
#undef FASTVQ_EMU_ATOMIC_EXCH
inline float atomicExch(float* address, float val) {
  float old;
  __atomic_exchange(address, &val, &old, __ATOMIC_RELAXED);
  return old;
}

#define FASTVQ_EMU_ATOMIC_CAS(T)                                                                 \
  inline T atomicCAS(T* address, T compare, T val) {                                             \
    __atomic_compare_exchange_n(address, &compare, val, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED); \
    return compare; /* the old value, whether or not it matched */                               \
  }
FASTVQ_EMU_ATOMIC_CAS(int)
FASTVQ_EMU_ATOMIC_CAS(unsigned int)
FASTVQ_EMU_ATOMIC_CAS(unsigned long long)
FASTVQ_EMU_ATOMIC_CAS(unsigned short)
#undef FASTVQ_EMU_ATOMIC_CAS

#define FASTVQ_EMU_ATOMIC_MINMAX(T)                                                                         \
  inline T atomicMin(T* address, T val) {                                                                   \
    return ::fastvq::emu::detail::atomic_update(address, [val](T old) { return val < old ? val : old; }); \
  }                                                                                                         \
  inline T atomicMax(T* address, T val) {                                                                   \
    return ::fastvq::emu::detail::atomic_update(address, [val](T old) { return val > old ? val : old; }); \
  }
FASTVQ_EMU_ATOMIC_MINMAX(int)
FASTVQ_EMU_ATOMIC_MINMAX(unsigned int)
FASTVQ_EMU_ATOMIC_MINMAX(long long)
FASTVQ_EMU_ATOMIC_MINMAX(unsigned long long)
#undef FASTVQ_EMU_ATOMIC_MINMAX

inline unsigned int atomicInc(unsigned int* address, unsigned int val) {
  return ::fastvq::emu::detail::atomic_update(address, [val](unsigned int old) { return old >= val ? 0u : old + 1; });
}
inline unsigned int atomicDec(unsigned int* address, unsigned int val) {
  return ::fastvq::emu::detail::atomic_update(
      address, [val](unsigned int old) { return (old == 0 || old > val) ? val : old - 1; });
}

// ---- loads and stores with cache hints: plain accesses here -------------------------------------------

template <typename T>
inline T __ldg(const T* p) { return *p; }
template <typename T>
inline T __ldca(const T* p) { return *p; }
template <typename T>
inline T __ldcg(const T* p) { return *p; }
template <typename T>
inline T __ldcs(const T* p) { return *p; }
template <typename T>
inline T __ldlu(const T* p) { return *p; }
template <typename T>
inline T __ldcv(const T* p) { return *p; }
template <typename T>
inline void __stwb(T* p, T v) { *p = v; }
template <typename T>
inline void __stcg(T* p, T v) { *p = v; }
template <typename T>
inline void __stcs(T* p, T v) { *p = v; }
template <typename T>
inline void __stwt(T* p, T v) { *p = v; }

// ---- math and bit intrinsics -------------------------------------------------------------------------
// The C math library (sqrtf, fmaf, expf, fminf, ...) is CUDA's device math library under the same names.
// The fast-math intrinsics below compute the accurate function (a GPU's __expf differs in the last
// bits); the _rn/_rz variants use the CPU's round-to-nearest-even default where they round to nearest.

inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float rcbrtf(float x) { return 1.0f / cbrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return powf(10.0f, x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline void __sincosf(float x, float* s, float* c) {
  *s = sinf(x);
  *c = cosf(x);
}
inline float __fdividef(float x, float y) { return x / y; }
inline float __saturatef(float x) { return x != x ? 0.0f : (x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x)); }
inline float __fadd_rn(float x, float y) { return x + y; }
inline float __fsub_rn(float x, float y) { return x - y; }
inline float __fmul_rn(float x, float y) { return x * y; }
inline float __fdiv_rn(float x, float y) { return x / y; }
inline float __fmaf_rn(float x, float y, float z) { return fmaf(x, y, z); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline double __dadd_rn(double x, double y) { return x + y; }
inline double __dmul_rn(double x, double y) { return x * y; }
inline double __fma_rn(double x, double y, double z) { return std::fma(x, y, z); }

inline float __int_as_float(int x) { return __builtin_bit_cast(float, x); }
inline int __float_as_int(float x) { return __builtin_bit_cast(int, x); }
inline float __uint_as_float(unsigned int x) { return __builtin_bit_cast(float, x); }
inline unsigned int __float_as_uint(float x) { return __builtin_bit_cast(unsigned int, x); }
inline double __longlong_as_double(long long x) { return __builtin_bit_cast(double, x); }
inline long long __double_as_longlong(double x) { return __builtin_bit_cast(long long, x); }

inline int __float2int_rn(float x) { return static_cast<int>(nearbyintf(x)); }
inline int __float2int_rz(float x) { return static_cast<int>(x); }
inline int __float2int_rd(float x) { return static_cast<int>(floorf(x)); }
inline int __float2int_ru(float x) { return static_cast<int>(ceilf(x)); }
inline unsigned int __float2uint_rn(float x) { return static_cast<unsigned int>(nearbyintf(x)); }
inline unsigned int __float2uint_rz(float x) { return static_cast<unsigned int>(x); }
inline long long __float2ll_rn(float x) { return static_cast<long long>(nearbyintf(x)); }
inline long long __float2ll_rz(float x) { return static_cast<long long>(x); }
inline float __int2float_rn(int x) { return static_cast<float>(x); }
inline float __uint2float_rn(unsigned int x) { return static_cast<float>(x); }
inline float __ll2float_rn(long long x) { return static_cast<float>(x); }
inline float __double2float_rn(double x) { return static_cast<float>(x); }

inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned int>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned int __brev(unsigned int x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  return __builtin_bswap32(x);
}
inline unsigned long long __brevll(unsigned long long x) {
  return (static_cast<unsigned long long>(__brev(static_cast<unsigned int>(x))) << 32) |
         __brev(static_cast<unsigned int>(x >> 32));
}
inline unsigned int __byte_perm(unsigned int x, unsigned int y, unsigned int s) {
  const unsigned long long v = (static_cast<unsigned long long>(y) << 32) | x;
  unsigned int r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<unsigned int>((v >> (8 * ((s >> (4 * i)) & 7u))) & 0xffu) << (8 * i);
  return r;
}
inline unsigned int __funnelshift_l(unsigned int lo, unsigned int hi, unsigned int shift) {
  const unsigned long long v = (static_cast<unsigned long long>(hi) << 32) | lo;
  return static_cast<unsigned int>((v << (shift & 31u)) >> 32);
}
inline unsigned int __funnelshift_r(unsigned int lo, unsigned int hi, unsigned int shift) {
  const unsigned long long v = (static_cast<unsigned long long>(hi) << 32) | lo;
  return static_cast<unsigned int>(v >> (shift & 31u));
}
inline int __mul24(int x, int y) { return ((x << 8) >> 8) * ((y << 8) >> 8); }
inline unsigned int __umul24(unsigned int x, unsigned int y) { return (x & 0xffffffu) * (y & 0xffffffu); }
inline int __mulhi(int x, int y) { return static_cast<int>((static_cast<long long>(x) * y) >> 32); }
inline unsigned int __umulhi(unsigned int x, unsigned int y) {
  return static_cast<unsigned int>((static_cast<unsigned long long>(x) * y) >> 32);
}
inline long long __mul64hi(long long x, long long y) {
  return static_cast<long long>((static_cast<__int128>(x) * y) >> 64);
}
inline unsigned long long __umul64hi(unsigned long long x, unsigned long long y) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(x) * y) >> 64);
}

// CUDA's integer/floating min and max overloads (device code calls them unqualified).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
inline unsigned int min(int a, unsigned int b) { return min(static_cast<unsigned int>(a), b); }
inline unsigned int max(int a, unsigned int b) { return max(static_cast<unsigned int>(a), b); }
inline unsigned int min(unsigned int a, int b) { return min(a, static_cast<unsigned int>(b)); }
inline unsigned int max(unsigned int a, int b) { return max(a, static_cast<unsigned int>(b)); }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline double min(float a, double b) { return fmin(a, b); }
inline double max(float a, double b) { return fmax(a, b); }
inline double min(double a, float b) { return fmin(a, b); }
inline double max(double a, float b) { return fmax(a, b); }

/// clock64(): nanoseconds of a steady clock (a GPU counts SM cycles; only differences are meaningful).
inline long long clock64() {
  const auto now = std::chrono::steady_clock::now().time_since_epoch();
  return std::chrono::duration_cast<std::chrono::nanoseconds>(now).count();
}
/// __nanosleep: a no-op. Spin-waiting on other threads is not supported by the emulator (docs).
inline void __nanosleep(unsigned int) {}
