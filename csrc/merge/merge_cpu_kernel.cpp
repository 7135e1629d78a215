// Torch-free CPU cores of bipartite_merge's matching step: merge_cpu_kernel.inc compiled once per ISA, each
// copy in its own namespace under `#pragma GCC target`, picked at run time (as mcq_search_cpu_kernel.cpp).
// Every path computes each score as the same exact fma chain, so all ISAs (and the CUDA kernel) agree bitwise.
#include "merge/merge_cpu_kernel.h"

#include "common/cpu_lanes.h"
#include "common/macros.h"
#include "merge/merge.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace fastvq {

// ---- portable fallback: 8-lane arrays, exact fmaf (a library call without an FMA unit: slow, exact) ----
namespace merge_scalar {
struct Vec : PortableLanes<8> {
  static F fma(const F& a, const F& b, const F& c) {
    return gen([&](int l) { return __builtin_fmaf(a.v[l], b.v[l], c.v[l]); });
  }
};
#include "merge/merge_cpu_kernel.inc"
}  // namespace merge_scalar

#if defined(FASTVQ_CPU_X86_PATHS)
namespace merge_avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma")
struct Vec {
  static constexpr int L = 8;
  using F = __m256;
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F a) { _mm256_storeu_ps(p, a); }
  static F set1(float x) { return _mm256_set1_ps(x); }
  static F zero() { return _mm256_setzero_ps(); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F max_keep(F a, F b) { return _mm256_max_ps(a, b); }  // (a > b) ? a : b, NaN a -> b
};
#include "merge/merge_cpu_kernel.inc"
#pragma GCC pop_options
}  // namespace merge_avx2

namespace merge_avx512 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx2,fma")
// GCC 12 warns about the deliberately undefined pass-through operand inside _mm512_max_ps.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
struct Vec {
  static constexpr int L = 16;
  using F = __m512;
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F a) { _mm512_storeu_ps(p, a); }
  static F set1(float x) { return _mm512_set1_ps(x); }
  static F zero() { return _mm512_setzero_ps(); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F max_keep(F a, F b) { return _mm512_max_ps(a, b); }  // (a > b) ? a : b, NaN a -> b
};
#include "merge/merge_cpu_kernel.inc"
#pragma GCC diagnostic pop
#pragma GCC pop_options
}  // namespace merge_avx512
#endif


void merge_normalize_rows_cpu(CpuIsa isa, const float* in, int64_t in_row_stride, int64_t n, int64_t Cm, float* out, int64_t os_row,
                              int64_t os_k) {
  FASTVQ_CPU_ISA_SWITCH(isa, merge, ns::normalize_rows(in, in_row_stride, n, Cm, out, os_row, os_k));
}

void merge_match_rows_cpu(CpuIsa isa, const float* a_hat, int64_t na, int64_t Cm, const float* bt, int64_t ldb,
                          int64_t nb, float* score, int64_t* best, float* scratch) {
  FASTVQ_CPU_ISA_SWITCH(isa, merge, ns::match_rows(a_hat, na, Cm, bt, ldb, nb, score, best, scratch));
}

}  // namespace fastvq
