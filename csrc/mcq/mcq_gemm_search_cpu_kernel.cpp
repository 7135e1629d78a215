// Torch-free CPU core of mcq_search's GEMM path. The algorithm (mcq_gemm_search_cpu_kernel.inc) is
// compiled once per ISA, each copy in its own namespace under `#pragma GCC target`, and picked at run time
// by the caller's CpuIsa, like the small-d core (mcq_search_cpu_kernel.cpp).
#include "mcq/mcq_gemm_search_cpu_kernel.h"

#include "common/cpu_lanes.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace fastvq {

// ---- portable fallback: plain C++ over 8-lane arrays ---------------------------------------------------
// a * b + c in two roundings, as the small-d core's scalar path (the baseline ISA has no fma instruction).
namespace mcq_gemm_scalar {

struct Vec : PortableLanes<8> {
  struct I {
    int32_t v[L];
  };
  static I loadi(const int32_t* p) {
    I r;
    for (int l = 0; l < L; ++l) r.v[l] = p[l];
    return r;
  }
  static void storei(int32_t* p, const I& a) {
    for (int l = 0; l < L; ++l) p[l] = a.v[l];
  }
  static F fma(const F& a, const F& b, const F& c) {
    return gen([&](int l) { return a.v[l] * b.v[l] + c.v[l]; });
  }
  static void update(F& best, I& idx, const F& cand, int32_t k) {
    for (int l = 0; l < L; ++l) {
      if (cand.v[l] > best.v[l]) {
        best.v[l] = cand.v[l];
        idx.v[l] = k;
      }
    }
  }
};
constexpr int kMv = 2;
constexpr int kNR = 6;
constexpr int64_t kKC = 256;
constexpr int64_t kMC = 128;

#include "mcq/mcq_gemm_search_cpu_kernel.inc"

}  // namespace mcq_gemm_scalar

#if defined(FASTVQ_CPU_X86_PATHS)

// ---- AVX2 + FMA: 16 rows (2 ymm) x 6 codes = 12 accumulators + 2 row vectors + 1 broadcast --------------
namespace mcq_gemm_avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma")

struct Vec {
  static constexpr int L = 8;
  using F = __m256;
  using I = __m256i;
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F a) { _mm256_storeu_ps(p, a); }
  static I loadi(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static void storei(int32_t* p, I a) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), a); }
  static F set1(float x) { return _mm256_set1_ps(x); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  // Lanes where cand > best (ordered: never for NaN) take cand and code k.
  static void update(F& best, I& idx, F cand, int32_t k) {
    const __m256 gt = _mm256_cmp_ps(cand, best, _CMP_GT_OQ);
    best = _mm256_blendv_ps(best, cand, gt);
    idx = _mm256_blendv_epi8(idx, _mm256_set1_epi32(k), _mm256_castps_si256(gt));
  }
};
constexpr int kMv = 2;
constexpr int kNR = 6;
constexpr int64_t kKC = 256;  // B slice 256 x 6 floats = 6 KiB in L1; A block 128 x 256 floats = 128 KiB in L2
constexpr int64_t kMC = 128;

#include "mcq/mcq_gemm_search_cpu_kernel.inc"

#pragma GCC pop_options
}  // namespace mcq_gemm_avx2

// ---- AVX-512: 32 rows (2 zmm) x 12 codes = 24 accumulators of 32 zmm registers ---------------------------
namespace mcq_gemm_avx512 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx2,fma")

struct Vec {
  static constexpr int L = 16;
  using F = __m512;
  using I = __m512i;
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F a) { _mm512_storeu_ps(p, a); }
  static I loadi(const int32_t* p) { return _mm512_loadu_si512(p); }
  static void storei(int32_t* p, I a) { _mm512_storeu_si512(p, a); }
  static F set1(float x) { return _mm512_set1_ps(x); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static void update(F& best, I& idx, F cand, int32_t k) {
    const __mmask16 gt = _mm512_cmp_ps_mask(cand, best, _CMP_GT_OQ);
    best = _mm512_mask_mov_ps(best, gt, cand);
    idx = _mm512_mask_mov_epi32(idx, gt, _mm512_set1_epi32(k));
  }
};
constexpr int kMv = 2;
constexpr int kNR = 12;
constexpr int64_t kKC = 256;
constexpr int64_t kMC = 128;

#include "mcq/mcq_gemm_search_cpu_kernel.inc"

#pragma GCC pop_options
}  // namespace mcq_gemm_avx512
#endif

// ---- dispatch -----------------------------------------------------------------------------------------

McqGemmCpuPlan mcq_gemm_cpu_plan(const McqSearchParams& p, CpuIsa isa, int threads) {
  McqGemmCpuPlan pl{};
  FASTVQ_CPU_ISA_SWITCH(isa, mcq_gemm, pl = ns::plan(p, threads < 1 ? 1 : threads));
  return pl;
}

void mcq_gemm_pack_rows(const McqSearchParams& p, CpuIsa isa, const McqGemmCpuPlan& pl, int64_t g,
                        int64_t panel_begin, int64_t panel_end, float* zpack, float* row_ok) {
  FASTVQ_CPU_ISA_SWITCH(isa, mcq_gemm, ns::pack_rows(p, pl, g, panel_begin, panel_end, zpack, row_ok));
}

void mcq_gemm_pack_codes(const McqSearchParams& p, CpuIsa isa, const McqGemmCpuPlan& pl, int64_t g, int64_t code0,
                         int64_t panel_begin, int64_t panel_end, float* cpack, float* bias) {
  FASTVQ_CPU_ISA_SWITCH(isa, mcq_gemm, ns::pack_codes(p, pl, g, code0, panel_begin, panel_end, cpack, bias));
}

void mcq_gemm_search_task(const McqSearchParams& p, CpuIsa isa, const McqGemmCpuPlan& pl, const float* zpack,
                          const float* cpack, const float* bias, int64_t code0, int64_t block_panels, int64_t task,
                          float* best_v, int32_t* best_k, float* ctile) {
  FASTVQ_CPU_ISA_SWITCH(isa, mcq_gemm,
                        ns::search_task(p, pl, zpack, cpack, bias, code0, block_panels, task, best_v, best_k, ctile));
}

void mcq_gemm_finish_rows(const McqSearchParams& p, CpuIsa isa, const McqGemmCpuPlan& pl, int64_t g,
                          int64_t n_begin, int64_t n_end, const float* zpack, const float* row_ok,
                          const float* best_v, const int32_t* best_k) {
  FASTVQ_CPU_ISA_SWITCH(isa, mcq_gemm, ns::finish_rows(p, pl, g, n_begin, n_end, zpack, row_ok, best_v, best_k));
}

}  // namespace fastvq
