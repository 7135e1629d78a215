// Torch-free CPU cores of mcq_search and mcq_gather. The search algorithm (mcq_search_cpu_kernel.inc) is
// compiled once per ISA, each copy in its own namespace under `#pragma GCC target`, and picked at run
// time by cpu_isa_active(): one binary, the best code path the running CPU supports.
#include "mcq/mcq_search_cpu_kernel.h"

#include <cstring>

#include "common/cpu_lanes.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace fastvq {

// ---- portable fallback: plain C++ over 8-lane arrays (auto-vectorised by the compiler) -------------
namespace mcq_scalar {

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
  // Lanes where run > best[l] remember group t in group[l]; best becomes run (run >= best by construction).
  static void update(float* best, int32_t* group, const F& run, int32_t t) {
    for (int l = 0; l < L; ++l) {
      if (run.v[l] > best[l]) group[l] = t;
      best[l] = run.v[l];
    }
  }
  // Bit l set where a[l] == m.
  static uint32_t eq_mask(const F& a, float m) {
    uint32_t bits = 0;
    for (int l = 0; l < L; ++l) bits |= static_cast<uint32_t>(a.v[l] == m) << l;
    return bits;
  }
};
constexpr int kR = 2;
constexpr int kP = 2;
constexpr int kS = 4;
constexpr bool kReloadRows = false;

#include "mcq/mcq_search_cpu_kernel.inc"

}  // namespace mcq_scalar

#if defined(FASTVQ_CPU_X86_PATHS)

// ---- AVX2 + FMA: 8 lanes, 4 rows x 2 vectors: 8 accumulators, 2 code vectors, a broadcast and 4 running
// maxima in the 16 ymm registers; the stored maxima are updated once per 8 tiles (128 codes). On a Zen 3
// core this measured ~1.3x the 2 rows x 4 vectors blocking with a per-tile update, and 4 x 2 stayed ahead
// of 5 x 2 and 6 x 2 (and of 4-tile tracking groups) once the row broadcasts are reloaded (docs/ops/mcq.md) --
namespace mcq_avx2 {
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
  static F max_keep(F a, F b) { return _mm256_max_ps(a, b); }  // (a > b) ? a : b, NaN a -> b
  static void update(float* best, int32_t* group, F run, int32_t t) {
    const __m256 gt = _mm256_cmp_ps(run, _mm256_loadu_ps(best), _CMP_GT_OQ);
    storei(group, _mm256_blendv_epi8(loadi(group), _mm256_set1_epi32(t), _mm256_castps_si256(gt)));
    _mm256_storeu_ps(best, run);
  }
  static uint32_t eq_mask(F a, float m) {
    return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(a, _mm256_set1_ps(m), _CMP_EQ_OQ)));
  }
};
constexpr int kR = 4;
constexpr int kP = 2;
constexpr int kS = 8;
// GCC hoists the 4 x d loop-invariant row broadcasts of a row group out of the code loop into pre-broadcast
// stack vectors, which every FMA then reads as a memory operand: 60% of the FMA peak on a Zen 3 core at d = 8,
// against 78-86% when the row pointer is made opaque per tile and the broadcasts are reloaded (docs/ops/mcq.md).
constexpr bool kReloadRows = true;

#include "mcq/mcq_search_cpu_kernel.inc"

#pragma GCC pop_options
}  // namespace mcq_avx2

// ---- AVX-512: 16 lanes, 4 rows x 4 vectors (16 accumulators of 32 zmm registers) -------------------
namespace mcq_avx512 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx2,fma")
// GCC 12 warns about the deliberately undefined pass-through operand inside _mm512_max_ps.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

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
  static F max_keep(F a, F b) { return _mm512_max_ps(a, b); }  // (a > b) ? a : b, NaN a -> b
  static void update(float* best, int32_t* group, F run, int32_t t) {
    const __mmask16 gt = _mm512_cmp_ps_mask(run, _mm512_loadu_ps(best), _CMP_GT_OQ);
    _mm512_mask_storeu_epi32(group, gt, _mm512_set1_epi32(t));
    _mm512_storeu_ps(best, run);
  }
  static uint32_t eq_mask(F a, float m) {
    return static_cast<uint32_t>(_mm512_cmp_ps_mask(a, _mm512_set1_ps(m), _CMP_EQ_OQ));
  }
};
constexpr int kR = 4;
constexpr int kP = 4;
constexpr int kS = 1;
constexpr bool kReloadRows = false;  // not measured on an AVX-512 machine since the AVX2 finding

#include "mcq/mcq_search_cpu_kernel.inc"

#pragma GCC diagnostic pop
#pragma GCC pop_options
}  // namespace mcq_avx512
#endif

// ---- dispatch -----------------------------------------------------------------------------------------

McqSearchCpuPlan mcq_search_cpu_plan(const McqSearchParams& p, CpuIsa isa) {
  McqSearchCpuPlan pl{};
  FASTVQ_CPU_ISA_SWITCH(isa, mcq, pl = ns::plan(p));
  return pl;
}

void mcq_prepare_codebook_cpu(const McqSearchParams& p, CpuIsa isa, int64_t g) {
  FASTVQ_CPU_ISA_SWITCH(isa, mcq, ns::prepare_codebook(p, g));
}

void mcq_search_cpu_task(const McqSearchParams& p, CpuIsa isa, int64_t task, float* scratch) {
  FASTVQ_CPU_ISA_SWITCH(isa, mcq, ns::search_task(p, task, scratch));
}

// ---- gather: a copy per (n, g) row (zeros for index -1); memory-bound, so plain code -------------------------------------
namespace {
template <typename T>
int64_t gather_rows(const McqGatherParams& p, int64_t n_begin, int64_t n_end) {
  const T* cb = static_cast<const T*>(p.codebooks);
  T* out = static_cast<T*>(p.out);
  for (int64_t n = n_begin; n < n_end; ++n) {
    for (int64_t g = 0; g < p.G; ++g) {
      const int64_t off = n * p.idx_stride_n + g * p.idx_stride_g;
      const int64_t k = p.indices_int64 ? static_cast<const int64_t*>(p.indices)[off]
                                        : static_cast<const int32_t*>(p.indices)[off];
      T* dst = out + (n * p.G + g) * p.d;
      if (k == -1) {  // a masked row: a zero code
        std::memset(dst, 0, sizeof(T) * p.d);  // all-zero bits are +0 in every float format
        continue;
      }
      if (k < 0 || k >= p.K) return n * p.G + g;
      const T* src = cb + g * p.cb_stride_g + k * p.cb_stride_k;
      if (p.cb_stride_d == 1) {
        std::memcpy(dst, src, sizeof(T) * p.d);
      } else {
        for (int64_t j = 0; j < p.d; ++j) dst[j] = src[j * p.cb_stride_d];
      }
    }
  }
  return -1;
}
}  // namespace

int64_t mcq_gather_cpu_rows(const McqGatherParams& p, DType dtype, int64_t n_begin, int64_t n_end) {
  switch (dtype) {
    case DType::kFloat64: return gather_rows<double>(p, n_begin, n_end);
    case DType::kFloat32: return gather_rows<float>(p, n_begin, n_end);
    default: return gather_rows<uint16_t>(p, n_begin, n_end);  // fp16 / bf16: a bit copy
  }
}

}  // namespace fastvq
