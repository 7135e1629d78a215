// Torch-free CPU core of decode_attention: the algorithm (decode_attention_cpu_kernel.inc) compiled once
// per ISA under `#pragma GCC target`, picked at run time by cpu_isa_active(). Memory-bound: one pass over
// a (sequence, kv-head)'s keys and values, chunk by chunk, serving all of its query heads from L1.
#include "decode/decode_attention_cpu_kernel.h"

#include <math.h>

#include <cstring>

#include "common/dtype.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace fastvq {

// ---- portable fallback: 16-lane arrays (fmaf per lane keeps the single rounding of an fma) ----------
namespace decode_scalar {

struct V {
  struct F {
    float v[16];
  };
  static F zero() { return set1(0.f); }
  static F set1(float x) {
    F r;
    for (int i = 0; i < 16; ++i) r.v[i] = x;
    return r;
  }
  static F load(const float* p) {
    F r;
    for (int i = 0; i < 16; ++i) r.v[i] = p[i];
    return r;
  }
  static void store(float* p, const F& a) {
    for (int i = 0; i < 16; ++i) p[i] = a.v[i];
  }
  static F mul(const F& a, const F& b) {
    F r;
    for (int i = 0; i < 16; ++i) r.v[i] = a.v[i] * b.v[i];
    return r;
  }
  static F fma(const F& a, const F& b, const F& c) {
    F r;
    for (int i = 0; i < 16; ++i) r.v[i] = fmaf(a.v[i], b.v[i], c.v[i]);
    return r;
  }
  // (l, l + 8), (l, l + 4), (l, l + 2), (0, 1)
  static float sum_tree(const F& a) {
    float t[8];
    for (int i = 0; i < 8; ++i) t[i] = a.v[i] + a.v[i + 8];
    for (int i = 0; i < 4; ++i) t[i] = t[i] + t[i + 4];
    for (int i = 0; i < 2; ++i) t[i] = t[i] + t[i + 2];
    return t[0] + t[1];
  }
};

inline int64_t convert_fp16_contiguous(const uint16_t*, int64_t, float*) { return 0; }

#include "decode/decode_attention_cpu_kernel.inc"

}  // namespace decode_scalar

#if defined(FASTVQ_CPU_X86_PATHS)

// ---- AVX2 + FMA: a 16-lane vector is two ymm registers (lanes 0-7, 8-15) ----------------------------
namespace decode_avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

struct V {
  struct F {
    __m256 lo, hi;
  };
  static F zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static F set1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
  static F load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  static void store(float* p, F a) { _mm256_storeu_ps(p, a.lo), _mm256_storeu_ps(p + 8, a.hi); }
  static F mul(F a, F b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
  static F fma(F a, F b, F c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
  static float sum_tree(F a) {
    const __m256 t8 = _mm256_add_ps(a.lo, a.hi);                                           // (l, l + 8)
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(t8), _mm256_extractf128_ps(t8, 1));       // (l, l + 4)
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));                                                // (l, l + 2)
    t = _mm_add_ss(t, _mm_shuffle_ps(t, t, 1));                                            // (0, 1)
    return _mm_cvtss_f32(t);
  }
};

inline int64_t convert_fp16_contiguous(const uint16_t* src, int64_t n, float* dst) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j))));
  }
  return j;
}

#include "decode/decode_attention_cpu_kernel.inc"

#pragma GCC pop_options
}  // namespace decode_avx2

// ---- AVX-512: one zmm register ------------------------------------------------------------------------
namespace decode_avx512 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx2,fma,f16c")
// GCC 12 warns about the deliberately undefined pass-through operand inside _mm512_cvtph_ps.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

struct V {
  using F = __m512;
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float x) { return _mm512_set1_ps(x); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F a) { _mm512_storeu_ps(p, a); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum_tree(F a) {
    const __m256 t8 = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));  // (l, l + 8)
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(t8), _mm256_extractf128_ps(t8, 1));           // (l, l + 4)
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));                                                    // (l, l + 2)
    t = _mm_add_ss(t, _mm_shuffle_ps(t, t, 1));                                                // (0, 1)
    return _mm_cvtss_f32(t);
  }
};

inline int64_t convert_fp16_contiguous(const uint16_t* src, int64_t n, float* dst) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    _mm512_storeu_ps(dst + j, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + j))));
  }
  return j;
}

#include "decode/decode_attention_cpu_kernel.inc"

#pragma GCC diagnostic pop
#pragma GCC pop_options
}  // namespace decode_avx512
#endif


int64_t decode_attention_cpu_scratch_floats(const DecodeAttentionParams& p) { return decode_scalar::scratch_floats(p); }

void decode_attention_cpu_task(const DecodeAttentionParams& p, CpuIsa isa, int64_t task, float* scratch) {
  FASTVQ_CPU_ISA_SWITCH(isa, decode, ns::attend_task(p, task, scratch));
}

}  // namespace fastvq
